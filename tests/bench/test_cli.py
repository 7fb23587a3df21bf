"""The ``rgo-bench`` command line: help, version, listing, progress bar, missing extras."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

import rgo_jax
from rgo_jax.bench import cli, train
from rgo_jax.bench._methods import METHODS

TINY = ["--tasks", "2", "--steps", "4", "--consolidation-batches", "2", "--hidden", "8"]
TINY += ["--methods", "sgd", "--no-plots", "--no-checkpoint"]


def test_help_shows_the_default_of_each_protocol_flag(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = text[text.index("options:") :]
    entries = {
        m.group(1): m.group(2) for m in re.finditer(r" (--[a-z-]+) [A-Z_]+ (.*?)(?= --|$)", options)
    }
    # What a run without flags gets is what the help says.
    cfg = cli.config_from_args(cli._parser().parse_args([]))
    want = {
        "--tasks": str(cfg.num_tasks),
        "--steps": str(cfg.steps_per_task),
        "--lr": str(cfg.learning_rate),
        "--alpha": str(cfg.alpha),
        "--seeds": ",".join(map(str, cfg.seeds)),
        "--consolidation-batches": str(cfg.consolidation_batches),
    }
    assert (cfg.num_tasks, cfg.steps_per_task, cfg.seeds) == (5, 500, (0,))  # the demo's
    for flag, value in want.items():
        assert f"(default {value})" in entries[flag], (flag, entries[flag])
    assert "--progress | --no-progress" in text and "--version" in text


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert capsys.readouterr().out == f"rgo-bench {pyproject['project']['version']}\n"
    assert rgo_jax.__version__ == pyproject["project"]["version"]


def test_list_names_benchmarks_with_their_files_and_methods(capsys):
    assert cli.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "benchmarks:" and "methods:" in lines
    split = lines.index("methods:")
    benchmarks = {ln.split()[0]: ln for ln in lines[1:split] if not ln.strip().startswith("(")}
    options = next(i for i, ln in enumerate(lines) if ln.startswith("method options"))
    methods = [ln.split()[0] for ln in lines[split + 1 : options]]
    assert "rgo.alpha" in "\n".join(lines[options:])
    assert sorted(benchmarks) == sorted(train.BENCHMARKS)
    assert methods == sorted(METHODS)
    assert "no files" in benchmarks["permuted_digits"] and "no files" in benchmarks["split_digits"]
    assert benchmarks["permuted_mnist"].endswith("needs data files: mnist")
    assert benchmarks["split_cifar10"].endswith("needs data files: cifar10")
    assert "two or more of mnist, fashion_mnist, cifar10" in benchmarks["multi_dataset"]
    assert any("RGO_DATA_DIR" in ln for ln in lines[1:split])


@pytest.mark.parametrize(
    "tty, flags, drawn",
    [
        (False, [], False),
        (False, ["--progress"], True),
        (True, [], True),
        (True, ["--no-progress"], False),
    ],
)
def test_progress_bar_only_on_a_terminal_unless_asked(
    tty, flags, drawn, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert cli.main([*TINY, "--out", str(tmp_path), *flags]) == 0
    err = capsys.readouterr().err
    assert ("sgd s0" in err and "step" in err) == drawn, err
    assert ("\r" in err) == drawn


def test_missing_bench_extra_is_one_line(tmp_path, capsys, monkeypatch):
    # scikit-learn absent: the bundled digits cannot be read.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main([*TINY, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "rgo-bench: scikit-learn is not installed; the benchmark harness needs the bench "
        "extra: pip install 'rgo_jax[bench]'"
    ]


def test_other_import_errors_are_not_hidden(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'thing'", name="rgo_jax.bench.something")

    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(ImportError, match="cannot import name 'thing'"):
        cli.main([*TINY, "--out", str(tmp_path)])
    # The chain of a wrapped error is followed to the missing package.
    try:
        try:
            raise ModuleNotFoundError("No module named 'orbax'", name="orbax")
        except ImportError as inner:
            raise ImportError("checkpoints need orbax-checkpoint") from inner
    except ImportError as outer:
        assert cli._missing_extra(outer) == "orbax-checkpoint"


def test_missing_cifar10_describes_the_layout_and_how_to_get_it(tmp_path, capsys):
    args = [
        "--benchmark",
        "split_cifar10",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli.main([*args, "--tasks", "2", "--steps", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cifar-10-batches-py/" in err and "data_batch_1" in err and "test_batch" in err
    assert "cifar-10-python.tar.gz" in err  # the official archive, unpacked by the user
    assert "--data-dir" in err and "RGO_DATA_DIR" in err
    # Downloading is one way, into a folder of the user's choice (the given one may be
    # read-only or offline).
    assert "network" in err and "download('cifar10', FOLDER)" in err
    assert f"download('cifar10', '{tmp_path}" not in err
