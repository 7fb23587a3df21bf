"""The ``rgo-bench`` command line as a user meets it: the protocol a named benchmark runs,
exit codes, what a run leaves on disk, a data set of one's own, unequal task sizes."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rgo_jax.bench import cli, data, register_benchmark, train
from rgo_jax.bench._protocols import PROTOCOLS

ROOT = Path(__file__).parents[2]
TINY = ["--steps", "3", "--consolidation-batches", "2", "--hidden", "8", "--no-plots"]
TINY += ["--methods", "sgd"]


def _npz(path: Path, sizes, test_per_class: int = 2, seed: int = 0) -> Path:
    """An .npz data set of ``len(sizes)`` classes, class ``c`` with ``sizes[c]`` samples."""
    rng = np.random.default_rng(seed)

    def part(counts):
        y = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        x = rng.integers(0, 256, size=(len(y), 4, 4), dtype=np.uint8)
        x[:, 0, 0] = y * 40  # a learnable cue
        return x, y

    x_train, y_train = part(sizes)
    x_test, y_test = part([test_per_class] * len(sizes))
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# -- 1. a named benchmark runs its protocol ---------------------------------------------------


def test_protocols_are_the_committed_config_files():
    files = sorted((ROOT / "benchmarks" / "configs").glob("*.json"))
    assert sorted(p.stem for p in files) == sorted(PROTOCOLS)
    for path in files:
        fields = json.loads(path.read_text())
        fields.pop("_doc")
        assert PROTOCOLS[path.stem] == fields, path


def _config(argv):
    return cli.config_and_sources(cli._parser().parse_args(argv))


def test_named_benchmark_runs_its_protocol_unless_a_flag_overrides_it():
    cfg, _ = _config(["--benchmark", "permuted_mnist"])
    proto = json.loads((ROOT / "benchmarks/configs/permuted_mnist.json").read_text())
    assert (cfg.steps_per_task, cfg.consolidation_batches) == (1000, 1000)
    assert (cfg.num_tasks, cfg.seeds) == (proto["num_tasks"], tuple(proto["seeds"]))
    cfg, sources = _config(
        ["--benchmark", "permuted_mnist", "--steps", "7", "--option", "rgo.consolidation_batches=5"]
    )
    assert (cfg.steps_per_task, cfg.consolidation_batches, cfg.num_tasks) == (7, 5, 20)
    assert sources["steps_per_task"] == "flag --steps"
    assert sources["num_tasks"] == "permuted_mnist protocol"
    # A benchmark without a protocol keeps the demo's budget; a config file wins over both.
    assert _config(["--benchmark", "split_digits"])[0].steps_per_task == 500
    cfg, sources = _config(["--config", str(ROOT / "benchmarks/configs/rotated_mnist.json")])
    assert sources["steps_per_task"].startswith("config file ")
    # The protocol's options of methods not chosen are dropped, not an error.
    cfg, _ = _config(["--benchmark", "split_cifar10", "--methods", "rgo"])
    assert cfg.model == "alexnet" and cfg.methods == ("rgo",)


def test_run_header_says_which_protocol_values_it_uses(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--benchmark", "permuted_mnist", "--steps", "7", "--data-dir", str(tmp_path)]
    assert cli.main([*argv, "--out", str(out)]) == 2  # no MNIST in tmp_path
    text = capsys.readouterr().out
    lines = {ln.split(":")[0].strip(): ln for ln in text.splitlines()[1:] if ":" in ln}
    assert text.startswith("protocol:\n")
    protocol = lines["permuted_mnist protocol"]
    assert "num_tasks=20" in protocol and "consolidation_batches=1000" in protocol
    assert "steps_per_task" not in protocol
    assert lines["flag --steps"].endswith("steps_per_task=7")


# -- 2. one exit code for input errors --------------------------------------------------------


def _exit_code(argv) -> int:
    """The status ``rgo-bench ARGV`` exits with (``main`` returns it or raises it)."""
    try:
        return cli.main(argv)
    except SystemExit as done:
        assert isinstance(done.code, int), done.code
        return done.code


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "steps_per_task must be a positive integer"),
        (["--benchmark", "nope"], "Unknown benchmark 'nope'"),
        (["--dataset", "no_such_set", "--stream", "split"], "unknown data set 'no_such_set'"),
        (["--dataset", "digits", "--stream", "split", "--tasks", "11"], "cannot make 11 tasks"),
        (["--benchmark", "permuted_mnist", "--tasks", "2"], "mnist"),  # not found
        (["--option", "novalue"], "must be KEY=VALUE"),
        (["--tasks", "x"], "--tasks 'x' is not a valid value"),
        (["--no-such-flag"], "unrecognized arguments"),  # argparse's own
    ],
)
def test_every_input_error_exits_2_in_one_line(argv, message, tmp_path, capsys):
    code = _exit_code([*argv, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.splitlines()[-1].startswith("rgo-bench: ") and message in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_the_process_exits_2_on_an_input_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "rgo_jax", "--steps", "0", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "rgo-bench: steps_per_task must be a positive integer, got 0."


def test_exit_codes_are_documented_in_help_and_readme(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    assert cli.EXIT_CODES in help_text
    readme = (ROOT / "README.md").read_text()
    assert cli.EXIT_CODES in readme


# -- 3. a failed data lookup leaves nothing behind --------------------------------------------


def test_failed_data_lookup_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    argv = ["--benchmark", "split_mnist", "--tasks", "2", "--data-dir", str(tmp_path / "none")]
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert "mnist" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # A folder that was there is kept, with its content.
    kept = tmp_path / "kept"
    (kept / "sub").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    assert cli.main([*argv, "--out", str(kept)]) == 2
    assert (kept / "notes.txt").read_text() == "mine" and (kept / "sub").is_dir()


# -- 4. checkpoint retention ------------------------------------------------------------------


def _tasks_kept(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints" / "sgd" / "seed0").iterdir())


@pytest.mark.slow
def test_finished_run_keeps_the_last_two_checkpoints_unless_asked(tmp_path, capsys):
    argv = [*TINY, "--tasks", "4"]
    everything = tmp_path / "all"
    assert cli.main([*argv, "--keep-checkpoints", "--out", str(everything)]) == 0
    assert _tasks_kept(everything) == ["task_000", "task_001", "task_002", "task_003"]
    out = tmp_path / "default"
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert _tasks_kept(out) == ["task_002", "task_003"]
    assert _results(out)["methods"] == _results(everything)["methods"]
    # Rerun without the flag: the finished run resumes (same numbers) and drops the rest.
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(everything)]) == 0
    assert "resumed after task 3" in capsys.readouterr().out
    assert _tasks_kept(everything) == ["task_002", "task_003"]
    assert _results(everything)["methods"] == _results(out)["methods"]


# -- 5. a data set of one's own ---------------------------------------------------------------


@pytest.mark.slow
def test_own_npz_data_set_as_a_split_stream(tmp_path, capsys):
    path = _npz(tmp_path / "toy.npz", [6] * 6)
    out = tmp_path / "run"
    argv = [*TINY, "--dataset", str(path), "--stream", "split", "--no-checkpoint"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "derived: 6 classes of toy, 2 per task: num_tasks=3" in text
    R = np.array(_results(out)["methods"]["sgd"]["matrices"][0])
    assert R.shape == (3, 3)
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["stream"], config["benchmark"]) == (
        str(path),
        "split",
        "split_toy",
    )
    # Classes per task given: 6 classes of 3 make 2 tasks; a config file says the same.
    out2 = tmp_path / "run2"
    assert cli.main([*argv, "--classes-per-task", "3", "--out", str(out2)]) == 0
    assert np.array(_results(out2)["methods"]["sgd"]["matrices"][0]).shape == (2, 2)
    config_file = tmp_path / "mine.json"
    keys = {"dataset": str(path), "stream": "split", "classes_per_task": 3, "methods": ["sgd"]}
    config_file.write_text(json.dumps(keys))
    cfg, sources = _config(["--config", str(config_file)])
    assert sources["num_tasks"].startswith("derived: 6 classes")
    stream = train.build_stream(cfg, 0)
    assert [stream.task_classes(t).size for t in range(len(stream))] == [3, 3]


def test_own_data_set_as_permuted_and_rotated_streams(tmp_path):
    path = _npz(tmp_path / "toy.npz", [4] * 3)
    for stream in ("permuted", "rotated"):
        cfg, sources = _config(["--dataset", str(path), "--stream", stream, "--tasks", "2"])
        built = train.build_stream(cfg, 0)
        assert len(built) == 2 and built.num_classes == 3
        assert sources["num_tasks"] == "flag --tasks"
    with pytest.raises(SystemExit, match="classes_per_task applies to class splits"):
        _config(["--dataset", str(path), "--stream", "rotated", "--classes-per-task", "2"])


def test_register_benchmark_runs_from_the_command_line(tmp_path):
    path = _npz(tmp_path / "toy.npz", [5] * 4)
    ds = data.load_npz(path)
    register_benchmark(
        "toy_split_test",
        lambda cfg, seed: data.class_split(ds, cfg.num_tasks, seed, classes_per_task=2),
        datasets=("toy.npz",),
    )
    try:
        out = tmp_path / "run"
        argv = [*TINY, "--benchmark", "toy_split_test", "--tasks", "2", "--no-checkpoint"]
        assert cli.main([*argv, "--out", str(out)]) == 0
        assert np.array(_results(out)["methods"]["sgd"]["matrices"][0]).shape == (2, 2)
        with pytest.raises(ValueError, match="built-in benchmark"):
            register_benchmark("permuted_mnist", lambda cfg, seed: None)
    finally:
        train.BENCHMARKS.pop("toy_split_test")


# -- 6. unequal class sizes, several seeds vmapped --------------------------------------------


@pytest.mark.slow
def test_unbalanced_class_split_runs_with_vmapped_seeds(tmp_path, capsys, monkeypatch):
    path = _npz(tmp_path / "unbalanced.npz", [3, 5, 7, 9])
    ds = data.load_npz(path)
    sizes = {s: data.class_split(ds, 2, s).meta["train_sizes"] for s in (0, 1, 2, 3)}
    seeds = [s for s in sizes if sizes[s] != sizes[0]][:1] + [0]
    assert len(seeds) == 2  # two seeds whose tasks differ in size
    out = tmp_path / "run"
    argv = [*TINY, "--dataset", str(path), "--stream", "split", "--tasks", "2"]
    argv += ["--seeds", ",".join(map(str, seeds)), "--no-checkpoint"]
    built = []
    real = train.build_stream
    monkeypatch.setattr(train, "build_stream", lambda cfg, s: built.append(s) or real(cfg, s))
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert sorted(built) == sorted(seeds)  # each seed's stream built once
    log = capsys.readouterr().out
    assert re.search(r"vmapped in groups of equal sizes: \d \| \d\.", log)
    mats = _results(out)["methods"]["sgd"]["matrices"]
    assert len(mats) == 2 and all(np.array(R).shape == (2, 2) for R in mats)
    # Each seed's numbers are those of the seed trained alone.
    alone = tmp_path / "alone"
    argv[argv.index("--seeds") + 1] = str(seeds[1])
    assert cli.main([*argv, "--out", str(alone)]) == 0
    np.testing.assert_allclose(
        _results(alone)["methods"]["sgd"]["matrices"][0], mats[1], rtol=0, atol=1e-6
    )
