"""RGO's opt-in extensions in the harness: options, their wiring, and unchanged defaults."""

import jax
import numpy as np
import pytest

from rgo_jax import _transform
from rgo_jax.bench import _methods, cli, train
from tests.helpers import task_context

TINY = dict(
    benchmark="permuted_digits", num_tasks=2, hidden=(16,), batch_size=10, max_train_per_task=200
)


def _set_up(**options):
    cfg = train.Config(**TINY, methods=("rgo",), method_options=options)
    method = cfg.method("rgo")
    stream = train.build_stream(cfg, 0)
    graphdef, params, rest = train._build(cfg, method, stream, 0)
    return cfg, method, stream, train._Net(graphdef, rest), params


def test_the_default_options_are_the_reference_code():
    opts = _methods.RGOOptions()
    assert (opts.hessian, opts.alpha_scale) == ("true-class", "absolute")
    assert (opts.trace_normalisation, opts.consolidation) == ("per-leaf", "sampled")
    # a configuration that does not name them has the fingerprint it had before them
    cfg = train.Config(**TINY, methods=("rgo",))
    assert cfg.method_options == {}
    assert "hessian" not in str(cfg.to_dict())


@pytest.mark.parametrize(
    "option, value",
    [
        ("rgo.hessian", "diagonal"),
        ("rgo.alpha_scale", "per-layer"),
        ("rgo.trace_normalisation", "none"),
        ("rgo.consolidation", "all"),
    ],
)
def test_extension_options_refuse_unknown_values_naming_the_option(option, value):
    with pytest.raises(SystemExit, match=f"'{option}' must be one of"):
        cli.config_from_args(cli._parser().parse_args(["--option", f"{option}={value}"]))


def test_epoch_consolidation_uses_every_training_example_once():
    cfg, method, stream, net, params = _set_up()
    ctx = task_context(cfg, stream, net)
    xs, ys = _methods._epoch_batches(ctx, 10)
    n = len(ctx.x_train) // 10 * 10
    assert xs.shape[:2] == ys.shape == (n // 10, 10)
    # the same draw: a permutation of the training examples, each used at most once
    idx = np.random.default_rng(0).permutation(len(ctx.x_train))[:n]
    assert len(np.unique(idx)) == n
    np.testing.assert_array_equal(xs.reshape(n, *xs.shape[2:]), ctx.x_train[idx])
    np.testing.assert_array_equal(ys.ravel(), ctx.y_train[idx])
    ctx = task_context(cfg, stream, net)
    vecs = _methods.rgo_consolidation_vectors(
        ctx, params, per_sample=False, num_batches=None, batch_size=10
    )
    assert all(v.shape[0] == n // 10 for v in jax.tree.leaves(vecs))


@pytest.mark.slow
def test_after_task_passes_the_extension_options_on(monkeypatch):
    cfg, method, stream, net, params = _set_up(
        **{"rgo.hessian": "sampled", "rgo.alpha_scale": "relative", "rgo.consolidation": "epoch"}
    )
    seen = {}
    real_cv = _methods.curvature_vectors

    def cv(*args, **kwargs):
        seen["cv"] = kwargs
        return real_cv(*args, **kwargs)

    def cons(state, vecs, alpha, **kwargs):  # records the call (the RLS has its own tests)
        seen["cons"] = kwargs
        seen["n"] = jax.tree.leaves(vecs)[0].shape[0]
        return state

    monkeypatch.setattr(_methods, "curvature_vectors", cv)
    monkeypatch.setattr(_transform, "consolidate", cons)
    ctx = task_context(cfg, stream, net)
    method.after_task(ctx, params, method.optimizer(cfg.run_info()).init(params), ())
    assert seen["cv"]["hessian"] == "sampled" and "rng" in seen["cv"]
    assert seen["cons"] == {"method": "block", "relative_alpha": True}
    assert seen["n"] == len(ctx.x_train) // 10  # an epoch, not consolidation_batches
    # the default passes none of them (the reference code's call, unchanged)
    cfg, method, stream, net, params = _set_up()
    method.after_task(
        task_context(cfg, stream, net), params, method.optimizer(cfg.run_info()).init(params), ()
    )
    assert "hessian" not in seen["cv"] and "rng" not in seen["cv"]
    assert seen["cons"] == {"method": "block"}


def test_rgo_plus_is_rgo_with_global_normalisation_and_keeps_it():
    plus = _methods.get_method("rgo-plus")
    assert plus.options == _methods.RGOOptions(trace_normalisation="global")
    assert plus.fel and not plus.per_sample
    # the family's option does not apply to the preset's fixed field; the preset's own does
    kept = _methods.bind_options("rgo-plus", {"rgo.trace_normalisation": "per-leaf"})
    assert kept.options.trace_normalisation == "global"
    changed = _methods.bind_options("rgo-plus", {"rgo-plus.trace_normalisation": "per-leaf"})
    assert changed.options.trace_normalisation == "per-leaf"
    # its optimizer scales a fresh (P = I) state's update like SGD, with one global scale
    params = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    tx = plus.optimizer(_methods.RunInfo(learning_rate=0.5))
    g = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    out, _ = tx.update(g, tx.init(params))
    np.testing.assert_allclose(out["w"], -0.5 * np.ones((3, 2)), rtol=1e-6)
