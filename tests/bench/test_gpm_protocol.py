"""What GPM's permuted-MNIST protocol needs from the harness: a bias-free MLP, standardised
inputs and one GPM energy threshold per layer."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rgo_jax.bench import train
from rgo_jax.bench._methods import GPMOptions, RunInfo, TaskContext, bind_options
from rgo_jax.bench.models import MLP, build_model

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


@pytest.mark.slow
def test_bias_free_mlp_is_a_product_of_kernels():
    model = MLP(6, (5, 4), 3, bias=False, rngs=nnx.Rngs(0))
    paths = sorted(path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert paths == [("head", "kernel"), ("hidden", 0, "kernel"), ("hidden", 1, "kernel")]
    x = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    w = [np.asarray(layer.kernel[...], np.float64) for layer in (*model.hidden, model.head)]
    want = np.maximum(np.maximum(x @ w[0], 0) @ w[1], 0) @ w[2]  # no FEL on task 0
    np.testing.assert_allclose(model(x, 0), want, rtol=1e-5, atol=1e-6)
    # zero input, zero output: nothing is added anywhere
    np.testing.assert_array_equal(np.asarray(model(np.zeros((1, 6)), 3)), 0.0)


def test_bias_free_mlp_has_the_kernels_of_the_torch_initialisation():
    """PyTorch's default initialisation draws the kernels from the layer index alone, so the
    bias-free network has exactly the kernels of the network with biases."""
    kw = dict(num_classes=3, input_shape=(6,), hidden=(5, 4), init="torch", seed=1)
    with_bias = build_model("mlp", **kw)
    without = build_model("mlp", bias=False, **kw)
    for a, b in zip(
        (*with_bias.hidden, with_bias.head), (*without.hidden, without.head), strict=True
    ):
        np.testing.assert_array_equal(a.kernel[...], b.kernel[...])
        assert b.bias is None
        bound = 1 / np.sqrt(a.kernel.shape[0])
        assert np.abs(np.asarray(b.kernel[...])).max() <= bound


def test_new_fields_at_their_defaults_keep_every_fingerprint():
    cfg = train.Config()
    for field, value in (("bias", False), ("normalize", (0.5, 0.25))):
        assert dataclasses.replace(cfg, **{field: value}).fingerprint() != cfg.fingerprint()
    d = cfg.to_dict()
    assert d["bias"] is True and d["normalize"] is None
    assert train.ADDED_KEYS["bias"] is True and train.ADDED_KEYS["normalize"] is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"bias": "no"}, "bias must be true or false"),
        ({"bias": False, "model": "alexnet"}, "bias = false applies to the MLP"),
        ({"normalize": [0.1]}, "normalize must be a pair"),
        ({"normalize": 0.1}, "normalize must be a pair"),
        ({"normalize": [0.1, 0.0]}, r"normalize\[1\] \(std\) must be positive"),
        ({"normalize": ["0.1", 0.3]}, r"normalize\[0\] \(mean\) must be a number"),
        ({"method_options": {"gpm_threshold": [0.9, 1.5]}}, r"gpm_threshold\[1\] must be"),
        ({"method_options": {"gpm_threshold": []}}, "gpm_threshold is empty"),
        ({"methods": ("gpm",), "method_options": {"gpm.threshold": [0.9, "a"]}}, "number"),
    ],
)
def test_bad_protocol_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        train.Config(**fields)


def test_normalize_standardises_every_task():
    base = dict(benchmark="permuted_digits", num_tasks=2, max_train_per_task=30)
    plain = train.build_stream(train.Config(**base), 0)
    scaled = train.build_stream(train.Config(**base, normalize=[0.25, 0.5]), 0)
    for t in range(2):
        for split in ("train", "test"):
            (x0, y0), (x1, y1) = plain.get_split(t, split), scaled.get_split(t, split)
            np.testing.assert_array_equal(y0, y1)
            np.testing.assert_allclose(x1, (x0 - 0.25) / 0.5, rtol=1e-6)
            assert x1.dtype == np.float32


def _energy_rank(rep: np.ndarray, threshold: float) -> int:
    """Fewest leading singular directions of ``rep`` holding ``threshold`` of its energy."""
    s2 = np.linalg.svd(rep.astype(np.float64), compute_uv=False) ** 2
    return int(np.argmax(np.cumsum(s2) / s2.sum() >= threshold)) + 1


def test_per_layer_thresholds_follow_forward_order():
    """Each layer's basis keeps its own threshold's share of its inputs' energy (GPM eq. 5),
    the list read in forward order (hidden/0, hidden/1, head), not in the parameter tree's
    sorted order (head first)."""
    thresholds = [0.6, 0.97, 0.8]
    method = bind_options("gpm", {"gpm.threshold": thresholds, "gpm.samples": 1000})
    model = MLP(12, (10, 8), 3, bias=False, fel=False, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.as_pure(params)

    def inputs_fn(p, x, task):
        return nnx.merge(graphdef, p)(x, task, return_inputs=True)[1]

    x = np.random.default_rng(1).normal(size=(40, 12)).astype(np.float32)
    run = RunInfo(learning_rate=0.1)
    tx = method.optimizer(run)
    assert method.init_extra(params, None, run) == ()
    ctx = TaskContext(
        task=0,
        x_train=x,
        y_train=np.zeros(40, np.int32),
        class_mask=np.ones(3, bool),
        logits_fn=None,
        inputs_fn=inputs_fn,
        rng=np.random.default_rng(0),
        run=run,
    )
    state, _ = method.after_task(ctx, params, tx.init(params), ())
    gpm_state = state[0]
    reps = {k: np.asarray(v) for k, v in inputs_fn(params, jnp.asarray(x), 0).items()}
    want = {
        ("hidden", 0): _energy_rank(reps[("hidden", 0, "kernel")], thresholds[0]),
        ("hidden", 1): _energy_rank(reps[("hidden", 1, "kernel")], thresholds[1]),
        ("head",): _energy_rank(reps[("head", "kernel")], thresholds[2]),
    }
    got = {
        ("hidden", 0): int(gpm_state.rank["hidden"][0]["kernel"]),
        ("hidden", 1): int(gpm_state.rank["hidden"][1]["kernel"]),
        ("head",): int(gpm_state.rank["head"]["kernel"]),
    }
    assert got == want
    assert len(set(want.values())) > 1  # the thresholds do give the layers different ranks


def test_a_threshold_list_of_the_wrong_length_fails_before_training(tmp_path):
    cfg = train.Config(
        benchmark="permuted_digits",
        methods=("gpm",),
        hidden=(16,),  # two weight layers
        num_tasks=1,
        steps_per_task=5,
        plots=False,
        checkpoint=False,
        method_options={"gpm.threshold": [0.9, 0.9, 0.9]},
    )
    with pytest.raises(ValueError, match="lists 3 thresholds, but the network has 2 weight"):
        train.run(cfg, tmp_path / "run", log=lambda *a: None)


def test_threshold_list_with_a_step_and_biases():
    opts = GPMOptions(threshold=[0.9, 0.95], threshold_step=0.03)
    got = opts.layer_thresholds(["hidden/0/kernel", "head/kernel"], task=2)
    assert got == pytest.approx(
        {"hidden/0/kernel": 0.96, "hidden/0/bias": 0.96, "head/kernel": 1.0, "head/bias": 1.0}
    )
    assert GPMOptions(threshold=(0.9,)) == GPMOptions(threshold=[0.9])  # one spelling
    hash(GPMOptions(threshold=[0.9]))  # frozen options stay hashable


def test_the_gpm_protocol_config_reads():
    fields = json.loads((CONFIGS / "papers" / "gpm_pmnist.json").read_text())
    fields.pop("_doc")
    cfg = train.Config(
        **{k: tuple(v) if k in ("methods", "seeds") else v for k, v in fields.items()}
    )
    assert (cfg.bias, cfg.normalize, cfg.first_task_identity) == (False, (0.1307, 0.3081), False)
    assert cfg.steps_per_task * cfg.batch_size == 5 * cfg.max_train_per_task  # 5 epochs
    gpm = cfg.method("gpm").options
    assert gpm.threshold == (0.95, 0.99, 0.99) and gpm.samples == 300
    jax.tree.map(lambda a: a, gpm.threshold)  # a plain tuple of floats


def test_input_side_gpm_projection_equals_the_plain_one():
    """Through the span of the batch inputs, the projected gradient is the plain
    ``G - M M^T G`` (float64 reference), orthogonal to the basis, for every layer."""
    from rgo_jax import baselines
    from rgo_jax.bench._methods import _scale_by_gpm_input_side

    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.zeros((40, 7))}, "b": {"kernel": jnp.zeros((7, 3))}}
    plain, side = baselines.scale_by_gpm(project_biases=True), _scale_by_gpm_input_side()
    reps = {"a/kernel": rng.normal(size=(12, 40)), "b/kernel": rng.normal(size=(12, 7))}
    state = baselines.gpm_update_bases(plain.init(params), reps, 0.8)
    x = {"a/kernel": rng.normal(size=(5, 40)), "b/kernel": rng.normal(size=(5, 7))}
    d = {"a/kernel": rng.normal(size=(5, 7)), "b/kernel": rng.normal(size=(5, 3))}
    grads = {k.split("/")[0]: {"kernel": jnp.asarray(x[k].T @ d[k], jnp.float32)} for k in x}
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
    got, _ = side.update(grads, state, gpm_inputs=inputs)
    want, _ = plain.update(grads, state)
    for name in ("a", "b"):
        m = np.asarray(state.bases[name]["kernel"], np.float64)
        g = np.asarray(grads[name]["kernel"], np.float64)
        ref = g - m @ (m.T @ g)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got[name]["kernel"], ref, atol=1e-5 * scale)
        np.testing.assert_allclose(want[name]["kernel"], ref, atol=1e-5 * scale)
        assert np.abs(m.T @ np.asarray(got[name]["kernel"], np.float64)).max() < 1e-5 * scale
    assert int(state.rank["a"]["kernel"]) > 0 and int(state.rank["b"]["kernel"]) > 0
    # no inputs given: the plain projection
    fallback, _ = side.update(grads, state)
    np.testing.assert_allclose(fallback["a"]["kernel"], want["a"]["kernel"], rtol=1e-6)
