"""The harness end to end on the bundled digits: RGO keeps old tasks, runs resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rgo_jax.bench import cli, train

QUICK = dict(
    benchmark="permuted_digits",
    num_tasks=3,
    steps_per_task=200,
    consolidation_batches=100,
    hidden=(128, 128),
    plots=False,
)


@pytest.fixture(scope="module")
def rgo_vs_sgd(tmp_path_factory):
    cfg = train.Config(methods=("rgo", "sgd", "stl"), checkpoint=False, **QUICK)
    return train.run(cfg, tmp_path_factory.mktemp("run"), log=lambda *a: None)


@pytest.mark.slow
def test_rgo_with_fel_keeps_the_first_task(rgo_vs_sgd):
    r_rgo = rgo_vs_sgd["matrices"]["rgo"][0]
    r_sgd = rgo_vs_sgd["matrices"]["sgd"][0]
    # Both learn task 0 equally (same init, P = I during the first task).
    assert r_rgo[0, 0] == pytest.approx(r_sgd[0, 0], abs=0.02)
    assert r_rgo[0, 0] > 0.85
    # After two more permuted tasks, SGD has forgotten much of task 0; RGO has not.
    assert r_rgo[0, 0] - r_rgo[2, 0] < 0.05
    assert r_rgo[2, 0] - r_sgd[2, 0] > 0.2
    s = rgo_vs_sgd["summaries"]
    assert s["rgo"]["acc"]["mean"] > s["sgd"]["acc"]["mean"] + 0.1


@pytest.mark.slow
def test_stl_has_no_forgetting_by_construction(rgo_vs_sgd):
    r = rgo_vs_sgd["matrices"]["stl"][0]
    for i in range(3):
        for j in range(i):
            assert r[i, j] == r[j, j]


# Every RGO run of this module has QUICK's network and consolidation size, so that RGO's
# RLS update (seconds to compile) compiles once for all of them.
SMALL = dict(hidden=QUICK["hidden"], consolidation_batches=QUICK["consolidation_batches"])


def _args(out, *extra, plots=False):
    return [
        "--benchmark",
        "permuted_digits",
        "--tasks",
        "3",
        "--steps",
        "150",
        "--chunk-steps",  # two chunks of one shape: the training chunk compiles once
        "75",
        "--consolidation-batches",
        str(SMALL["consolidation_batches"]),
        "--hidden",
        ",".join(map(str, SMALL["hidden"])),
        "--methods",
        "rgo",
        *([] if plots else ["--no-plots"]),
        "--out",
        str(out),
        *extra,
    ]


def _cli(out, *extra):
    return [sys.executable, "-m", "rgo_jax", *_args(out, *extra)]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One uninterrupted CLI run of RGO, with plots and checkpoints (run in this process)."""
    out = tmp_path_factory.mktemp("cli_run")
    assert cli.main(_args(out, plots=True)) == 0
    return out


@pytest.mark.slow
def test_run_directory_contents(cli_run):
    for name in (
        "config.json",
        "results.json",
        "summary.md",
        "accuracy_per_task.png",
        "accuracy_matrix_rgo.png",
    ):
        assert (cli_run / name).is_file(), name
    assert "task-incremental" in (cli_run / "summary.md").read_text()
    assert Path(cli_run / "checkpoints" / "rgo" / "seed0" / "task_001" / "meta.json").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(cli_run, tmp_path, capsys):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The uninterrupted run (``cli_run``: the same command with plots, which change no
    # number) and the resumed one run in this process, without two more interpreter starts.
    full = cli_run
    part = tmp_path / "part"
    proc = subprocess.Popen(
        _cli(part), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    meta = part / "checkpoints" / "rgo" / "seed0" / "task_000" / "meta.json"
    deadline = time.time() + 300
    while not meta.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert meta.exists(), "the run never wrote its first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Interrupted before the last task: its checkpoint is not there.
    assert not (part / "checkpoints" / "rgo" / "seed0" / "task_002" / "meta.json").exists()
    capsys.readouterr()
    assert cli.main(_args(part)) == 0
    assert "resumed after task" in capsys.readouterr().out
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    ra = np.array(a["methods"]["rgo"]["matrices"][0], dtype=float)
    rb = np.array(b["methods"]["rgo"]["matrices"][0], dtype=float)
    np.testing.assert_allclose(ra, rb, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--benchmark", "nope"], "Unknown benchmark 'nope'"),
        (["--steps", "0"], "steps_per_task must be a positive integer"),
        (["--methods", "rgo,adamw"], "Unknown method 'adamw'"),
        (["--tasks", "x"], "--tasks 'x' is not a valid value"),
        (["--config", "missing.json"], "does not exist"),
        (["--option", "ewc_lamda=3"], "Unknown method option 'ewc_lamda'"),
        (["--option", "ewc_fisher=sample"], "'ewc_fisher' must be one of exact, sampled"),
        (["--option", "ewc_fisher=2"], "'ewc_fisher' must be one of"),
        (["--option", "owm_alpha=big"], "'owm_alpha' must be a number"),
        (["--init", "he"], "init must be one of lecun, torch, glorot, normal0.1, got 'he'"),
        (["--init-scale", "0"], "init_scale must be positive, got 0.0"),
    ],
)
def test_bad_configuration_fails_at_once(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_missing_data_directory_says_what_to_do(tmp_path, capsys):
    code = cli.main(
        [
            "--benchmark",
            "permuted_mnist",
            "--data-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
            "--tasks",
            "2",
            "--steps",
            "10",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "none" in err and ("RGO_DATA_DIR" in err or "--data-dir" in err)


def test_too_many_tasks_for_classes(tmp_path):
    cfg = train.Config(benchmark="split_digits", num_tasks=11, steps_per_task=10)
    with pytest.raises(ValueError, match="11"):
        train.run(cfg, tmp_path, log=lambda *a: None)


def test_multi_head_gives_each_task_its_own_units():
    cfg = train.Config(**{**QUICK, "head": "multi"})
    stream = train.build_stream(cfg, 0)
    assert stream.num_classes == 30
    masks = stream.class_masks()
    np.testing.assert_array_equal(masks.sum(1), [10, 10, 10])
    assert not (masks[0] & masks[1]).any()
    _, y2 = stream.get_split(2, "test")
    _, y0 = stream.get_split(0, "test")
    assert y2.min() >= 20 and y0.max() < 10
    split = train.build_stream(
        train.Config(**{**QUICK, "benchmark": "split_digits", "head": "multi"}), 0
    )
    assert split.num_classes == 10  # class splits are already disjoint
    # The seed grouping reads the wrapped stream's task sizes through the transform.
    assert split.meta["train_sizes"] == split.stream.meta["train_sizes"]
    assert train._seed_groups(
        train.Config(**{**QUICK, "benchmark": "split_digits", "head": "multi", "seeds": (0, 1)}),
        train.METHODS["sgd"],
        {},
    )


# Two methods, two seeds, each seed trained on its own: the reference of the vmapped seeds
# and the joint run that the runs split by seed must merge into.
SEQUENTIAL = {
    **QUICK,
    "num_tasks": 2,
    "steps_per_task": 60,
    **SMALL,
    "checkpoint": False,
    "vmap_seeds": False,
}


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    cfg = train.Config(**SEQUENTIAL, methods=("rgo", "sgd"), seeds=(0, 1))
    return out, train.run(cfg, out, log=lambda *a: None)


@pytest.mark.slow
def test_vmapped_seeds_match_sequential_seeds(sequential_run, tmp_path):
    base = {**SEQUENTIAL, "vmap_seeds": True, "methods": ("rgo",), "seeds": (0, 1)}
    together = train.run(train.Config(**base), tmp_path / "v", log=lambda *a: None)
    _, apart = sequential_run
    for a, b in zip(together["matrices"]["rgo"], apart["matrices"]["rgo"], strict=True):
        # Same data, init and steps; only float rounding of batched kernels may differ.
        np.testing.assert_allclose(a, b, atol=0.01)
    ra, rb = together["matrices"]["rgo"]
    assert not np.array_equal(ra, rb)  # the two seeds are different runs
    assert train._seed_groups(train.Config(**base, vmap_memory_gb=1e-9), train.METHODS["rgo"]) == [
        (0,),
        (1,),
    ]


@pytest.mark.slow
def test_runs_split_by_seed_merge_into_the_joint_run(sequential_run, tmp_path):
    from rgo_jax.bench import merge_run_reports

    base = SEQUENTIAL
    quiet = dict(log=lambda *a: None)
    joint_dir, joint = sequential_run
    # seed 1 first, seed 0 later, and the methods split too: the merge orders by seed.
    train.run(train.Config(**base, methods=("rgo", "sgd"), seeds=(1,)), tmp_path / "a", **quiet)
    train.run(train.Config(**base, methods=("sgd",), seeds=(0,)), tmp_path / "b", **quiet)
    # A harness switch that does not change the protocol (evaluation batch) may differ.
    train.run(
        train.Config(**{**base, "eval_batch_size": 77}, methods=("rgo",), seeds=(0,)),
        tmp_path / "c",
        **quiet,
    )
    parts = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    with pytest.raises(ValueError, match="differ in 'eval_batch_size'"):
        merge_run_reports(parts, tmp_path / "m", plots=False)
    merged = merge_run_reports(parts, tmp_path / "m", free_keys=train.MERGE_FREE_KEYS, plots=False)
    for name in ("rgo", "sgd"):
        assert merged[name]["acc"]["per_seed"] == pytest.approx(
            joint["summaries"][name]["acc"]["per_seed"], abs=1e-6
        )
        assert merged[name]["bwt"]["mean"] == pytest.approx(
            joint["summaries"][name]["bwt"]["mean"], abs=1e-6
        )
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["seeds"] == [0, 1] and cfg["merged_from"] == ["a", "b", "c"]
    assert cfg["seeds_per_method"] == {"rgo": [0, 1], "sgd": [0, 1]}
    # A run of another protocol, or the same seed twice, is refused.
    train.run(
        train.Config(**{**base, "steps_per_task": 30}, methods=("sgd",), seeds=(2,)),
        tmp_path / "d",
        **quiet,
    )
    with pytest.raises(ValueError, match="differ in 'steps_per_task'"):
        merge_run_reports(
            [tmp_path / "a", tmp_path / "d"],
            tmp_path / "x",
            free_keys=train.MERGE_FREE_KEYS,
            plots=False,
        )
    with pytest.raises(ValueError, match="method 'sgd', seed 0"):
        merge_run_reports([tmp_path / "b", joint_dir], tmp_path / "x", plots=False)
    assert not (tmp_path / "x").exists()


def test_key_lists_name_config_fields():
    fields = {f.name for f in dataclasses.fields(train.Config)}
    assert set(train.MERGE_FREE_KEYS) <= fields
    assert set(train.OUTPUT_KEYS) <= set(train.MERGE_FREE_KEYS)
    # An output key leaves the fingerprint unchanged; a protocol key changes it.
    cfg = train.Config()
    assert dataclasses.replace(cfg, seeds=(5,), plots=False).fingerprint() == cfg.fingerprint()
    assert dataclasses.replace(cfg, chunk_steps=7).fingerprint() != cfg.fingerprint()
    assert dataclasses.replace(cfg, learning_rate=0.2).fingerprint() != cfg.fingerprint()


def test_joint_training_data_is_every_task_so_far():
    """Joint training sees the concatenation of tasks 0..t (tasks of different sizes), with
    each task's class mask and id; other methods see task t alone."""
    from rgo_jax.bench._methods import METHODS

    cfg = train.Config(benchmark="split_digits", num_tasks=3)
    stream = train.build_stream(cfg, 0)
    masks = stream.class_masks()
    splits = [stream.get_split(k, "train") for k in range(3)]
    assert len({len(y) for _, y in splits}) > 1
    for name in ("joint", "sgd"):
        for t in range(3):
            tasks = range(t + 1) if METHODS[name].joint else [t]
            x, y, m, ids = train._task_arrays(stream, t, cfg, METHODS[name])
            np.testing.assert_array_equal(x, np.concatenate([splits[k][0] for k in tasks]))
            np.testing.assert_array_equal(y, np.concatenate([splits[k][1] for k in tasks]))
            sizes = [len(splits[k][1]) for k in tasks]
            np.testing.assert_array_equal(m, np.repeat(masks[list(tasks)], sizes, axis=0))
            np.testing.assert_array_equal(ids, np.repeat(list(tasks), sizes))
            assert ids.dtype == np.int32 and m.dtype == bool


@pytest.mark.slow
def test_initialisation_is_a_protocol_key_that_older_runs_read_as_flax_default():
    import hashlib

    cfg = train.Config()
    # The fingerprint a version without the ``init`` key computed: runs checkpointed then
    # still resume.
    added = (
        "init",
        "init_scale",
        "dataset",
        "stream",
        "classes_per_task",
        "bias",
        "normalize",
        "subsample",
    )
    old = {k: v for k, v in cfg.to_dict().items() if k not in train.OUTPUT_KEYS + added}
    old_hash = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() == old_hash
    assert train.ADDED_KEYS == {
        "init": cfg.init,
        "init_scale": cfg.init_scale,
        "dataset": cfg.dataset,
        "stream": cfg.stream,
        "classes_per_task": cfg.classes_per_task,
        "bias": cfg.bias,
        "normalize": cfg.normalize,
        "subsample": cfg.subsample,
    }
    assert dataclasses.replace(cfg, init="torch").fingerprint() != cfg.fingerprint()
    assert dataclasses.replace(cfg, bias=False).fingerprint() != cfg.fingerprint()
    assert dataclasses.replace(cfg, init="glorot").fingerprint() != cfg.fingerprint()
    assert dataclasses.replace(cfg, init_scale=0.5).fingerprint() != cfg.fingerprint()

    # The flag reaches the networks the harness trains.
    args = cli._parser().parse_args(["--init", "torch", "--init-scale", "0.5", "--hidden", "16"])
    cfg = cli.config_from_args(args)
    assert (cfg.init, cfg.init_scale) == ("torch", 0.5)
    stream = train.build_stream(cfg, 0)
    method = train.get_method("rgo")
    _, params, _ = train._build(cfg, method, stream, 3)
    from flax import nnx

    from rgo_jax.bench import models

    want = models.build_model(
        "mlp",
        num_classes=10,
        input_shape=stream.input_shape,
        hidden=(16,),
        init="torch",
        init_scale=0.5,
        seed=3,
    )
    got = dict(nnx.to_flat_state(params))
    for path, v in nnx.to_flat_state(nnx.state(want, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(v[...]))


def test_published_runs_keep_their_fingerprint():
    """Every published run's configuration hashes as the versions that wrote it hashed it
    (their formula applied to the stored ``config.json``), so its checkpoints still resume."""
    import hashlib

    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(train.Config)
    }
    root = Path(__file__).parents[2] / "benchmarks" / "results"
    checked = 0
    for path in sorted(root.glob("*/config.json")):
        raw = json.loads(path.read_text())
        if "merged_from" in raw:  # a merged report, not a run
            continue
        # keys missing from the oldest files read as today's defaults
        stored = {k: raw.get(k, v) for k, v in defaults.items()}
        old = {
            k: v
            for k, v in stored.items()
            if k not in train.OUTPUT_KEYS and train.ADDED_KEYS.get(k, object()) != v
        }
        want = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
        tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        assert train.Config(**tupled).fingerprint() == want, path
        checked += 1
    assert checked >= 30


@pytest.mark.slow
def test_each_seed_stream_is_built_once_per_method(tmp_path, monkeypatch):
    """Grouping the seeds measures the first seed's stream; its lane reuses that one."""
    built = []
    real = train.build_stream

    def counting(cfg, seed):
        built.append(seed)
        return real(cfg, seed)

    monkeypatch.setattr(train, "build_stream", counting)
    cfg = train.Config(
        benchmark="permuted_digits",
        methods=("sgd", "stl"),
        num_tasks=2,
        steps_per_task=5,
        hidden=(8,),
        seeds=(0, 1),
        plots=False,
        checkpoint=False,
    )
    train.run(cfg, tmp_path, log=lambda *a: None)
    assert built == [0, 1, 0, 1]


def test_subsample_option_reaches_every_stream():
    """``subsample`` (config key, ``--subsample``) reaches the stream builders, the
    multi-dataset sequence included (which used to drop ``max_*_per_task`` silently)."""
    from rgo_jax.bench import data
    from tests.helpers import SHARED_DATA

    args = cli._parser().parse_args(
        ["--benchmark", "permuted_digits", "--max-train-per-task", "20", "--subsample", "first"]
    )
    cfg = cli.config_from_args(args)
    assert cfg.subsample == "first"
    digits = data.load_digits()
    for t in (0, 1):
        np.testing.assert_array_equal(train.build_stream(cfg, 0)[t].y_train, digits.y_train[:20])
    with pytest.raises(ValueError, match="subsample must be one of random, first"):
        train.Config(subsample="last")
    assert dataclasses.replace(cfg, subsample="random").fingerprint() != cfg.fingerprint()
    if not (SHARED_DATA / "mnist").exists():
        pytest.skip("MNIST not available")
    multi = train.Config(
        benchmark="multi_dataset",
        num_tasks=2,
        data_dir=str(SHARED_DATA),
        max_train_per_task=50,
        max_test_per_task=30,
        subsample="first",
    )
    stream = train.build_stream(multi, 0)
    mnist = data.load_mnist(SHARED_DATA)
    assert stream[0].x_train.shape[0] == 50 and stream[0].x_test.shape[0] == 30
    np.testing.assert_array_equal(stream[0].y_train, mnist.y_train[:50])
