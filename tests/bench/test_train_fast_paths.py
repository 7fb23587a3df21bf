"""The harness's fast paths change how the numbers are computed, never the numbers.

Input-side projection of dense layers, unrolled training chunks, un-vmapped single seeds
and pre-averaged kernel cotangents for the consolidation pass are each compared with the
plain computation on the same data, initialisation and steps.
"""

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rgo_jax import _matrices, _transform
from rgo_jax.bench import _methods, cli, models, train
from rgo_jax.layouts import path_str
from tests.helpers import REPO, task_context

BASE = dict(benchmark="permuted_digits", num_tasks=2, hidden=(64, 48), batch_size=10)


def _after_first_task(cfg, method, net, params, state, stream):
    """Consolidates task 0 so that P is far from the identity."""
    ctx = task_context(cfg, stream, net)
    vecs = _methods.rgo_consolidation_vectors(
        ctx, params, per_sample=False, num_batches=40, batch_size=10
    )
    return _transform.consolidate(state, vecs, method.options.alpha)


STEPS = 10
"""Training steps of task 1 in these comparisons: one number, so that runs are shared."""


def _train_task_1(method_name, steps=STEPS, **options):
    """Task 1's parameters after ``steps`` (from a consolidated P for RGO), and the chunk.

    Memoised on its arguments: tests that compare the same run (the plain RGO or SGD
    network) share one training, its compilations included. Callers only read the result.
    """
    key = (method_name, steps, repr(sorted(options.items())))
    if key not in _RUNS:
        _RUNS[key] = _run_task_1(method_name, steps, **options)
    return _RUNS[key]


_RUNS: dict = {}


_NETWORKS: dict = {}


def _network(cfg, method):
    """The stream and initial network of ``BASE`` (one per FEL setting, the only field of
    the method or the options that changes them), shared by the runs: one ``_Net`` object
    whose functions compile once for all of them."""
    if method.fel not in _NETWORKS:
        stream = train.build_stream(cfg, 0)
        graphdef, params, rest = train._build(cfg, method, stream, 0)
        _NETWORKS[method.fel] = stream, params, train._Net(graphdef, rest)
    return _NETWORKS[method.fel]


def _run_task_1(method_name, steps, **options):
    cfg = train.Config(**BASE, methods=(method_name,), **options)
    method = cfg.method(method_name)
    stream, params, net = _network(cfg, method)
    tx = method.optimizer(cfg.run_info())
    state = tx.init(params)
    if method.family == "rgo":
        state = _after_first_task(cfg, method, net, params, state, stream)
    x, y = stream.get_split(1, "train")
    n, c = len(y), stream.num_classes
    masks = np.broadcast_to(stream.class_masks()[1], (n, c))
    tasks = np.ones(n, np.int32)
    idx = train._step_indices(n, steps, cfg.batch_size, 0, 1)
    args = (x, y, masks, tasks, idx, np.arange(steps, dtype=np.int32))
    chunk = train._make_chunk_fn(net, tx, method, cfg)
    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], (params, state, ()) + args)
    out = jax.jit(train._over_seeds(chunk, 1))(*stacked)
    return jax.tree.map(lambda a: np.asarray(a[0]), out[0]), (chunk, stacked)


@pytest.mark.slow
def test_input_projection_and_unrolling_train_the_same_network():
    plain, _ = _train_task_1("rgo")
    # 4 steps unrolled per scan iteration; 10 = 2 * 4 + 2, so a remainder is unrolled too.
    assert STEPS % 4 and STEPS > 4
    fast, _ = _train_task_1("rgo", input_projection=True, scan_unroll=4)
    sgd, _ = _train_task_1("sgd")
    fast_leaves = dict(jax.tree_util.tree_leaves_with_path(fast))
    for path, a in jax.tree_util.tree_leaves_with_path(plain):
        np.testing.assert_allclose(fast_leaves[path], a, rtol=1e-4, atol=2e-6, err_msg=str(path))
    # ...and the projection mattered: SGD from the same start ends elsewhere.
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), plain, sgd)
    assert max(jax.tree.leaves(diff)) > 1e-3


@pytest.mark.slow
def test_one_seed_without_vmap_matches_vmap():
    single, (chunk, stacked) = _train_task_1("rgo")
    vmapped = jax.jit(jax.vmap(chunk))(*stacked)[0]
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(vmapped), strict=True):
        np.testing.assert_allclose(a, np.asarray(b[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_global_normalisation_trains_the_same_network_with_input_projection():
    """The input-projected kernels are rescaled by (tr P / d) / t_bar after their layer."""
    options = {"method_options": {"rgo.trace_normalisation": "global"}}
    plain, _ = _train_task_1("rgo", **options)
    fast, _ = _train_task_1("rgo", input_projection=True, **options)
    fast_leaves = dict(jax.tree_util.tree_leaves_with_path(fast))
    for path, a in jax.tree_util.tree_leaves_with_path(plain):
        np.testing.assert_allclose(fast_leaves[path], a, rtol=1e-4, atol=2e-6, err_msg=str(path))


@pytest.mark.slow
def test_owm_input_projection_trains_the_same_network():
    """``input_projection`` applies to OWM: its dense kernels' P are marked for their layers
    to project, P absorbs each step's inputs before the gradient, and the network after
    ten steps (P changing at each) is the plain OWM one's."""
    cfg = train.Config(**BASE, methods=("owm",), input_projection=True)
    method = cfg.method("owm")
    _, params, _ = _network(cfg, method)
    state = method.optimizer(cfg.run_info()).init(params)
    flat = jax.tree_util.tree_flatten_with_path(
        state[0].p, is_leaf=lambda x: isinstance(x, _matrices.InputProjected)
    )[0]
    marked = {path_str(p) for p, node in flat if isinstance(node, _matrices.InputProjected)}
    assert marked == set(_methods._kernel_paths(params)) and len(marked) == 3  # not biases
    plain, _ = _train_task_1("owm")
    fast, _ = _train_task_1("owm", input_projection=True)
    sgd, _ = _train_task_1("sgd")
    fast_leaves = dict(jax.tree_util.tree_leaves_with_path(fast))
    for path, a in jax.tree_util.tree_leaves_with_path(plain):
        np.testing.assert_allclose(fast_leaves[path], a, rtol=1e-4, atol=2e-6, err_msg=str(path))
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), plain, sgd)
    assert max(jax.tree.leaves(diff)) > 1e-3  # OWM's projection mattered


@pytest.mark.slow
def test_input_projection_applies_only_to_rgo_methods():
    # SGD ignores the flag (its optimizer holds no P); RGO keeps its P state layout.
    a, _ = _train_task_1("sgd")
    b, _ = _train_task_1("sgd", input_projection=True)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "name, shape", [("mlp", (8, 8, 1)), ("alexnet", (32, 32, 3)), ("reduced_resnet18", (8, 8, 3))]
)
def test_linear_kernels_regex_selects_exactly_the_dense_layers(name, shape):
    kw = {"width": 4} if name == "reduced_resnet18" else {}
    # The layer structure only: built abstractly, no initialiser is compiled.
    model = nnx.eval_shape(lambda: models.build_model(name, num_classes=5, input_shape=shape, **kw))
    linear = {
        "/".join(map(str, (*p, "kernel")))
        for p, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    }
    params = {models.param_path_str(k) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {p for p in params if re.search(models.LINEAR_KERNELS, p)} == linear
    assert linear  # every model has at least its head


@functools.cache
def _small_model(name, shape):
    """Parameters and ``_Net`` of a small ``name`` (one per model: built once for both
    ``per_sample`` cases)."""
    # Small widths: every layer kind (conv, dense, head) is still checked.
    kw = {"hidden": (32, 24), **({"channels": (8, 16, 16)} if name == "alexnet" else {})}
    model = models.build_model(name, num_classes=6, input_shape=shape, seed=3, **kw)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.as_pure(params), train._Net(graphdef, rest)


@pytest.mark.parametrize("name, shape", [("mlp", (8, 8, 1)), ("alexnet", (32, 32, 3))])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.slow
def test_reduced_cotangents_give_the_same_curvature_vectors(name, shape, per_sample):
    params, net = _small_model(name, shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, *shape)).astype(np.float32)
    y = rng.integers(0, 3, size=60).astype(np.int32)

    def vectors(fast):
        ctx = _methods.TaskContext(
            task=2,
            x_train=x,
            y_train=y,
            class_mask=np.arange(6) < 3,
            logits_fn=net.logits,
            inputs_fn=net.inputs,
            rng=np.random.default_rng(1),
            # uneven chunks (3 + 3 + 1 batches) for the fast path, one chunk for the plain
            run=train.Config(vector_chunk=3 if fast else 7).run_info(),
            curvature_logits_fn=net.reduced_logits if fast else None,
        )
        return _methods.rgo_consolidation_vectors(
            ctx, params, per_sample=per_sample, num_batches=7, batch_size=4
        )

    full, fast = vectors(False), vectors(True)
    leaves = jax.tree_util.tree_leaves_with_path(full)
    assert leaves
    for path, v in leaves:
        w = dict(jax.tree_util.tree_leaves_with_path(fast))[path]
        assert v.shape == w.shape and v.shape[0] == 7 * (4 if per_sample else 1)
        np.testing.assert_allclose(w, v, rtol=2e-4, atol=1e-6, err_msg=str(path))


def test_cli_sets_the_fast_paths_and_alexnet_widths():
    args = cli._parser().parse_args(
        ["--input-projection", "--scan-unroll", "5", "--model", "alexnet", "--hidden", "32,16"]
    )
    cfg = cli.config_from_args(args)
    assert cfg.input_projection and cfg.scan_unroll == 5
    assert cfg.model == "alexnet" and cfg.hidden == (32, 16)
    plain = cli.config_from_args(cli._parser().parse_args([]))
    assert not plain.input_projection and plain.scan_unroll == 1
    chunked = cli.config_from_args(cli._parser().parse_args(["--vector-chunk", "5"]))
    assert chunked.vector_chunk == 5 and plain.vector_chunk == 50
    assert chunked.fingerprint() == plain.fingerprint()  # does not change the numbers


def test_hidden_sets_alexnet_fc_widths_and_is_refused_for_resnets():
    stream = types.SimpleNamespace(input_shape=(32, 32, 3), num_classes=10)
    cfg = train.Config(model="alexnet", hidden=(32, 16))

    def shapes(cfg):  # the parameters' shapes, without drawing (compiling) their values
        return jax.eval_shape(lambda: train._build(cfg, train.METHODS["sgd"], stream, 0)[1])

    params = shapes(cfg)
    assert params["fc1"]["kernel"].shape == (2 * 2 * 256, 32)
    assert params["fc2"]["kernel"].shape == (32, 16)
    default = shapes(train.Config(model="alexnet"))
    assert default["fc2"]["kernel"].shape == (2048, 2048)
    with pytest.raises(ValueError, match="hidden applies to the MLP and AlexNet"):
        train._build(
            train.Config(model="reduced_resnet18", hidden=(8,)), train.METHODS["sgd"], stream, 0
        )


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "benchmarks" / "configs").glob("*.json")),
    ids=lambda p: p.stem,
)
def test_every_benchmark_config_is_a_valid_configuration(path):
    cfg = cli.config_from_args(cli._parser().parse_args(["--config", str(path)]))
    assert cfg.benchmark == path.stem  # each config is named after its benchmark
    assert cfg.methods and cfg.seeds


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "benchmarks" / "configs" / "papers").glob("*.json")),
    ids=lambda p: p.stem,
)
def test_every_paper_protocol_config_is_a_valid_configuration(path):
    """configs/papers/: other papers' protocols (a baseline's own), run on a named benchmark."""
    cfg = cli.config_from_args(cli._parser().parse_args(["--config", str(path)]))
    assert cfg.benchmark in train.BENCHMARKS
    assert cfg.methods and cfg.seeds
