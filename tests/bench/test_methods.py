"""Every registered method runs through the harness; method-specific state behaves."""

import dataclasses

import jax
import numpy as np
import pytest

from rgo_jax.bench import _methods, cli, train
from rgo_jax.bench._methods import METHODS

TINY = dict(
    benchmark="permuted_digits",
    num_tasks=2,
    steps_per_task=60,
    consolidation_batches=20,
    # As wide as the 8x8 inputs: RGO's two P matrices are both 65 x 65, one bucket of the
    # RLS update, which compiles in less time than two sizes (measured: 5.2 vs 7.6 CPU s).
    hidden=(64,),
    plots=False,
    seeds=(0,),
)


@pytest.fixture(scope="module")
def all_methods(tmp_path_factory):
    cfg = train.Config(methods=tuple(sorted(METHODS)), **TINY)
    out = tmp_path_factory.mktemp("methods")
    return out, train.run(cfg, out, log=lambda *a: None)


@pytest.mark.slow
def test_every_method_fills_a_valid_matrix(all_methods):
    _, result = all_methods
    for name, (r,) in result["matrices"].items():
        assert r.shape == (2, 2), name
        assert np.all((r >= 0) & (r <= 1)), name
        assert r[0, 0] > 0.5, f"{name} did not learn the first task"


@pytest.mark.slow
def test_methods_resume_with_their_state(all_methods):
    """A second run on the same directory restores every method's state, trains nothing."""
    out, first = all_methods
    logs = []
    cfg = train.Config(methods=tuple(sorted(METHODS)), **TINY)
    second = train.run(cfg, out, log=logs.append)
    for name in METHODS:
        np.testing.assert_array_equal(first["matrices"][name][0], second["matrices"][name][0])
    assert sum("resumed after task 1" in str(line) for line in logs) == len(METHODS)


def test_agem_memory_holds_each_task():
    from rgo_jax.bench._methods import TaskContext

    cfg = train.Config(**{**TINY, "num_tasks": 3}, method_options={"agem_per_task": 5})
    method = cfg.method("agem")
    stream = train.build_stream(cfg, 0)
    extra = method.init_extra(None, stream, cfg.run_info())
    assert extra["x"].shape == (15, 8, 8, 1)
    for t in range(2):
        x, y = stream.get_split(t, "train")
        ctx = TaskContext(
            task=t,
            x_train=x,
            y_train=y,
            class_mask=stream.class_mask(t),
            logits_fn=None,
            inputs_fn=None,
            rng=np.random.default_rng(t),
            run=cfg.run_info(),
        )
        _, extra = method.after_task(ctx, None, None, extra)
    assert int(extra["n"]) == 10
    x1, _ = stream.get_split(1, "train")
    # the second task's slots hold rows of the second task's (permuted) data
    rows = np.asarray(extra["x"][5:10]).reshape(5, -1)
    pool = x1.reshape(len(x1), -1)
    assert all((np.abs(pool - r).sum(1) == 0).any() for r in rows)
    assert not np.asarray(extra["x"][10:]).any()


@pytest.mark.slow
def test_gpm_threshold_rises_per_task_when_asked(monkeypatch, tmp_path):
    from rgo_jax import baselines

    seen = []
    real = baselines.gpm_update_bases

    def spy(state, reps, threshold):
        seen.append(threshold)
        return real(state, reps, threshold)

    monkeypatch.setattr(baselines, "gpm_update_bases", spy)
    opts = {"gpm_threshold": 0.9, "gpm_threshold_step": 0.06}
    cfg = train.Config(
        methods=("gpm",), checkpoint=False, **{**TINY, "num_tasks": 3}, method_options=opts
    )
    train.run(cfg, tmp_path, log=lambda *a: None)
    np.testing.assert_allclose(seen, [0.9, 0.96, 1.0])  # capped at 1


def _has_task_boundary_work(m):
    return type(m).after_task is not _methods.Method.after_task


@pytest.mark.parametrize(
    "name", sorted(n for n, m in METHODS.items() if _has_task_boundary_work(m))
)
@pytest.mark.slow
def test_after_task_keeps_no_reference_to_the_task_data(name):
    """JAX's caches must not keep a finished task's data alive (a leak of one training set
    per task and seed: EWC once grew by 0.35 GB per task on permuted MNIST)."""
    import gc
    import weakref

    from rgo_jax.bench._methods import TaskContext

    cfg = train.Config(**TINY)
    method = cfg.method(name)
    stream = train.build_stream(cfg, 0)
    graphdef, params, rest = train._build(cfg, method, stream, 0)
    net = train._Net(graphdef, rest)
    opt_state = method.optimizer(cfg.run_info()).init(params)
    extra = method.init_extra(params, stream, cfg.run_info())
    refs = []
    for t in range(2):
        x, y = stream.get_split(t, "train")
        x = np.array(x)  # our own copy: the stream's cache holds no reference to it
        refs.append(weakref.ref(x))
        ctx = TaskContext(
            task=t,
            x_train=x,
            y_train=y,
            class_mask=stream.class_mask(t),
            logits_fn=net.logits,
            inputs_fn=net.inputs,
            curvature_logits_fn=net.reduced_logits,
            rng=np.random.default_rng(t),
            run=cfg.run_info(),
        )
        opt_state, extra = method.after_task(ctx, params, opt_state, extra)
        del ctx, x
    gc.collect()
    assert [r() is None for r in refs] == [True, True]


def _ewc_fisher(kind: str, samples: int):
    """The Fisher that the harness's EWC stores after task 0 of the digits, by ``kind``."""
    from rgo_jax.bench._methods import TaskContext

    cfg = train.Config(**TINY, method_options={"ewc_fisher": kind, "ewc_samples": samples})
    method = cfg.method("ewc")
    stream = train.build_stream(cfg, 0)
    graphdef, params, rest = train._build(cfg, method, stream, 0)
    net = train._Net(graphdef, rest)
    extra = method.init_extra(params, stream, cfg.run_info())
    x, y = stream.get_split(0, "train")
    ctx = TaskContext(
        task=0,
        x_train=x,
        y_train=y,
        class_mask=stream.class_mask(0),
        logits_fn=net.logits,
        inputs_fn=net.inputs,
        rng=np.random.default_rng(0),
        run=cfg.run_info(),
    )
    _, extra = method.after_task(ctx, params, method.optimizer(cfg.run_info()).init(params), extra)
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(extra.fisher)])


@pytest.mark.slow
def test_ewc_fisher_option_picks_the_estimator():
    """exact: the expectation over the model's classes; sampled: one label per example from
    the model, unbiased for it; empirical: the true labels (a different quantity)."""
    exact = _ewc_fisher("exact", 400)
    sampled = _ewc_fisher("sampled", 400)
    empirical = _ewc_fisher("empirical", 400)
    assert not np.allclose(sampled, exact)
    # the sampled estimator averages to the exact one: total mass within 15 %
    assert sampled.sum() == pytest.approx(exact.sum(), rel=0.15)
    assert np.corrcoef(sampled, exact)[0, 1] > 0.9
    # at random init the model is far from the labels: the empirical Fisher differs
    assert not np.allclose(empirical, exact, rtol=0.1)


def test_options_are_addressed_per_family_and_per_preset():
    cfg = train.Config(
        **TINY,
        methods=("rgo", "rgo-sample", "rgo-alpha1", "ewc"),
        method_options={"rgo.alpha": 0.1, "ewc.lambda": 3.0},
    )
    assert cfg.method("rgo").options == _methods.RGOOptions(alpha=0.1, consolidation_batches=20)
    assert cfg.method("rgo-sample").options.alpha == 0.1
    assert cfg.method("ewc").options.lambda_ == 3.0
    # rgo-alpha1 fixes alpha = 1: the family's value does not apply to it, and the run says so
    assert cfg.method("rgo-alpha1").options.alpha == 1.0
    (note,) = train._fixed_option_notes(cfg)
    assert "[rgo-alpha1] alpha = 1.0" in note and "rgo-alpha1.alpha" in note
    # ...unless the preset itself is addressed: an override
    cfg = train.Config(**TINY, methods=("rgo-alpha1",), method_options={"rgo-alpha1.alpha": 0.5})
    assert cfg.method("rgo-alpha1").options.alpha == 0.5
    assert train._fixed_option_notes(cfg) == []
    # a preset's options are its own: the registered instance is unchanged
    assert _methods.get_method("rgo-alpha1").options.alpha == 1.0


def test_each_spelling_of_an_option_gives_one_configuration():
    """Addressed names and the earlier flat names are one option: same fingerprint and file."""

    def cfg(*argv):
        return cli.config_from_args(cli._parser().parse_args(["--methods", "rgo,ewc", *argv]))

    flat = cfg("--alpha", "0.1", "--consolidation-batches", "7", "--option", "ewc_lambda=3")
    addressed = cfg(
        "--option", "rgo.alpha=0.1", "--option", "rgo.consolidation_batches=7",
        "--option", "ewc.lambda=3",
    )  # fmt: skip
    assert addressed.to_dict() == flat.to_dict()
    assert addressed.fingerprint() == flat.fingerprint()
    assert (addressed.alpha, addressed.consolidation_batches) == (0.1, 7)
    assert addressed.method_options == {"ewc_lambda": 3.0}
    python = train.Config(methods=("rgo", "ewc"), method_options={"ewc.lambda": 3.0})
    assert python.method_options == {"ewc_lambda": 3.0}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "rgo,sgd", "--option", "ewc.lambda=3"], "applies to none of the methods"),
        (["--option", "rgo.lambda=3"], "rgo has no option 'lambda'; its options: rgo.alpha"),
        (["--option", "sgd.lr=3"], "Method 'sgd' has no options"),
        (["--option", "adam.beta=3"], "Unknown method option 'adam.beta'"),
        (["--methods", "ewc", "--option", "ewc.fisher=x"], "'ewc.fisher' must be one of exact"),
        (["--methods", "gpm", "--option", "gpm.samples=2.5"], "'gpm.samples' must be an integer"),
        (["--alpha", "0.1", "--option", "rgo.alpha=0.2"], "contradicts --alpha 0.1"),
        (["--option", "rgo.alpha=-1"], "alpha must be positive"),
    ],
)
def test_an_option_the_chosen_methods_lack_is_an_error(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.config_from_args(cli._parser().parse_args(argv))


def test_methods_read_only_what_the_run_tells_them():
    """No hook gets the harness Config: EWC's Fisher loop follows ``RunInfo.convolutional``."""
    fields = {f.name for f in dataclasses.fields(_methods.TaskContext)}
    assert "config" not in fields and "run" in fields
    mlp, alexnet = train.Config(**TINY).run_info(), train.Config(model="alexnet").run_info()
    assert (mlp.convolutional, alexnet.convolutional) == (False, True)
    assert (mlp.batch_size, mlp.num_tasks, mlp.learning_rate) == (10, 2, 0.1)
