"""The run directory across reruns: a read-only --out, a changed config, Ctrl-C, other
methods or seeds, and a diverging run each get one clear line, and no result is lost."""

import contextlib
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from rgo_jax.bench import cli, merge_run_reports, train
from rgo_jax.bench._validate import NonFiniteError

# SGD and STL compile in a couple of seconds: these tests are about the run directory.
ARGS = [
    "--benchmark",
    "permuted_digits",
    "--tasks",
    "2",
    "--steps",
    "20",
    "--chunk-steps",
    "10",
    "--hidden",
    "16",
    "--no-plots",
]
QUICK = dict(
    benchmark="permuted_digits",
    num_tasks=2,
    steps_per_task=20,
    chunk_steps=10,
    hidden=(16,),
    plots=False,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of SGD, seed 0 (copied by the tests that rerun into it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main([*ARGS, "--out", str(out), "--methods", "sgd", "--seeds", "0"]) == 0
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _main(capsys, out, *extra):
    code = cli.main([*ARGS, "--out", str(out), *extra])
    return code, capsys.readouterr()


def _results(out):
    return json.loads((out / "results.json").read_text())


@contextlib.contextmanager
def _read_only(folder):
    """``folder`` made unwritable, also for root (immutable attribute) where possible."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a folder read-only")
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("this file system does not support the immutable attribute")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_a_read_only_out_fails_before_training(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    with _read_only(out):
        code, io = _main(capsys, out, "--methods", "sgd")
    assert code == 2
    assert io.err.startswith("rgo-bench: --out ") and "is not writable" in io.err
    assert len(io.err.strip().splitlines()) == 1
    assert "accuracy matrix" not in io.out  # nothing trained
    with _read_only(out):
        code, io = _main(capsys, out / "sub", "--methods", "sgd")
    assert code == 2 and "sub cannot be created" in io.err


@pytest.mark.slow
def test_a_changed_config_names_the_differing_keys(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    code, io = _main(capsys, out, "--methods", "sgd", "--steps", "10", "--lr", "0.05")
    assert code == 2
    line = io.err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("rgo-bench: --out ")
    assert "steps_per_task: 20 -> 10" in line and "learning_rate: 0.1 -> 0.05" in line


@pytest.mark.slow
def test_ctrl_c_says_where_it_stopped_and_the_summary_says_partial(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = train.check_finite_losses

    def interrupt_in_task_1(losses, method, seeds, task, step0):
        if task == 1:
            raise KeyboardInterrupt
        return real(losses, method, seeds, task, step0)

    monkeypatch.setattr(train, "check_finite_losses", interrupt_in_task_1)
    code, io = _main(capsys, out, "--methods", "sgd")
    assert code == 130
    assert io.err.strip().splitlines()[-1] == (
        "rgo-bench: interrupted after task 0 (sgd); rerun the same command to resume."
    )
    assert "Partial results" in (out / "summary.md").read_text()
    monkeypatch.setattr(train, "check_finite_losses", real)
    code, io = _main(capsys, out, "--methods", "sgd")
    assert code == 0 and "resumed after task 0" in io.out
    assert "Partial results" not in (out / "summary.md").read_text()


@pytest.mark.slow
def test_other_methods_and_seeds_keep_the_finished_results(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    first = np.array(_results(out)["methods"]["sgd"]["matrices"][0], dtype=float)
    # Another method: sgd's seed 0 stays in the report.
    assert _main(capsys, out, "--methods", "stl", "--seeds", "0")[0] == 0
    res = _results(out)
    assert sorted(res["methods"]) == ["sgd", "stl"]
    np.testing.assert_array_equal(res["methods"]["sgd"]["matrices"][0], first)
    # More seeds, trained together by default: seed 0 is restored, not retrained.
    code, io = _main(capsys, out, "--methods", "sgd", "--seeds", "0,1")
    assert code == 0
    assert "[sgd seed 0] resumed after task 1" in io.out
    assert "[sgd seed 1] resumed" not in io.out
    res = _results(out)
    config = json.loads((out / "config.json").read_text())
    assert config["seeds_per_method"] == {"sgd": [0, 1], "stl": [0]}
    assert sorted(res["methods"]) == ["sgd", "stl"]
    sgd = res["methods"]["sgd"]["matrices"]
    assert len(sgd) == 2 and np.array_equal(np.array(sgd[0], dtype=float), first)
    assert not np.array_equal(np.array(sgd[1], dtype=float), first)
    # Such a directory still merges with others (each method with its own seeds).
    merged = merge_run_reports([out], tmp_path / "m", free_keys=train.MERGE_FREE_KEYS, plots=False)
    assert merged["sgd"]["num_seeds"] == 2 and merged["stl"]["num_seeds"] == 1


@pytest.mark.slow
def test_a_diverging_run_stops_naming_method_seed_task_and_step(tmp_path, capsys):
    code, io = _main(capsys, tmp_path, "--methods", "sgd", "--lr", "1e308")
    assert code == 2
    line = io.err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"rgo-bench: method sgd, seed 0, task 0, step \d+: the training loss .*", line
    )
    assert not (tmp_path / "checkpoints" / "sgd" / "seed0" / "task_000").exists()


@pytest.mark.slow
def test_a_non_finite_state_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    # A method whose task-boundary work leaves NaN in its state (as a broken P would).
    import dataclasses

    import jax.numpy as jnp

    sgd = train.METHODS["sgd"]

    @dataclasses.dataclass(frozen=True)
    class Broken(type(sgd)):
        def init_extra(self, params, stream, run):
            return {"p": jnp.eye(3)}

        def after_task(self, ctx, params, opt_state, extra):
            return opt_state, {"p": extra["p"] * jnp.nan}

    broken = Broken(**{f.name: getattr(sgd, f.name) for f in dataclasses.fields(sgd)})
    monkeypatch.setitem(train.METHODS, "sgd", broken)
    cfg = train.Config(**QUICK, methods=("sgd",))
    with pytest.raises(NonFiniteError, match=r"method sgd, seed 0, task 0 .*\['p'\] \(3, 3\)"):
        train.run(cfg, tmp_path, log=lambda *a: None)
    assert not (tmp_path / "checkpoints" / "sgd" / "seed0" / "task_000").exists()


@pytest.mark.slow
def test_rerunning_a_finished_run_rewrites_the_same_report(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = {n: (out / n).read_bytes() for n in ("config.json", "results.json", "summary.md")}
    code, io = _main(capsys, out, "--methods", "sgd", "--seeds", "0")
    assert code == 0 and "[sgd seed 0] resumed after task 1" in io.out
    assert {n: (out / n).read_bytes() for n in before} == before
