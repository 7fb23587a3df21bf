"""The benchmark scripts still run against the library they measure.

They are not part of the suite's runs (they take minutes), so an API change can break them
silently (the per-method step benchmark imported two names the redesign removed): this
imports every one of them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

IMPORT_ALL = r"""
import importlib.util, pathlib, sys
failed = []
for f in sorted(pathlib.Path("benchmarks").rglob("*.py")):
    sys.path.insert(0, str(f.parent))
    spec = importlib.util.spec_from_file_location("benchmark_" + f.stem, f)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except ModuleNotFoundError as err:  # an optional dependency (PyTorch) not installed
        if err.name not in {"torch"}:
            failed.append(f"{f}: {err!r}")
    except Exception as err:
        failed.append(f"{f}: {err!r}")
    finally:
        sys.path.pop(0)
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # a subprocess
def test_every_benchmark_script_imports():
    out = _run(IMPORT_ALL)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_every_library_name_the_scripts_use_exists():
    """Importing a script does not run its functions: ``compare_torch.py``'s step and
    consolidation rows called ``rgo_jax.rgo_input_projected`` and
    ``rgo_jax.batched_curvature_vectors`` long after both were gone. Every ``rgo_jax.X``,
    ``baselines.X`` and ``layouts.X`` the scripts read must exist (``from ... import``
    lines are checked by the import test above)."""
    import ast
    import importlib

    modules = {
        "rgo_jax": "rgo_jax",
        "baselines": "rgo_jax.baselines",
        "layouts": "rgo_jax.layouts",
    }
    missing = []
    for path in sorted((REPO / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                continue
            module = modules.get(node.value.id)
            if module is None or node.attr == "bench":  # the harness subpackage, imported
                continue
            if not hasattr(importlib.import_module(module), node.attr):
                rel = path.relative_to(REPO)
                missing.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not missing, "\n".join(missing)


def _tune_module():
    import importlib.util

    path = REPO / "benchmarks" / "tune.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_tune", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_tune_changes_only_the_searched_value_of_a_config_file():
    """The search on a conv benchmark's config (whose ``method_options`` already set each
    baseline's value under its earlier flat name) runs each value it names, not the file's
    and not a 'given twice' error, and keeps every other setting of the file."""
    from rgo_jax.bench import cli

    tune = _tune_module()
    base = cli.config_from_argv(["--config", str(REPO / "benchmarks/configs/split_cifar10.json")])
    assert base.method("owm").options.alpha == 10.0  # the file's value
    owm = tune._with_value(base, "owm", "owm.alpha", 1000.0)
    assert owm.methods == ("owm",)
    assert owm.method("owm").options.alpha == 1000.0
    assert owm.method("agem").options.batch == base.method("agem").options.batch == 10
    assert (owm.model, owm.hidden, owm.steps_per_task) == ("alexnet", (256, 256), 500)
    gpm = tune._with_value(base, "gpm", "gpm.threshold", 0.9)
    assert gpm.method("gpm").options.threshold == 0.9
    rgo = tune._with_value(base, "rgo-plus", "rgo.alpha", 1.0)
    assert rgo.alpha == 1.0 and rgo.method("rgo-plus").options.alpha == 1.0
    assert rgo.method("owm").options.alpha == 10.0


def test_tune_records_a_diverging_value_instead_of_ending_the_search():
    """The conv-benchmark search met EWC at lambda 1000 diverging (loss NaN): that value is a
    result of the search, and the runs after it must still happen."""
    from rgo_jax.bench import train

    tune = _tune_module()
    quick = dict(benchmark="permuted_digits", num_tasks=2, steps_per_task=20, hidden=(16,))
    cfg = train.Config(**quick, methods=("ewc",), plots=False, checkpoint=False)
    row = tune._measure(tune._with_value(cfg, "ewc", "ewc.lambda", 1e8), "ewc", 1e8)
    assert row["value"] == 1e8 and "method ewc, seed 0, task 1" in row["diverged"]
    assert "val_acc" not in row
    row = tune._measure(tune._with_value(cfg, "ewc", "ewc.lambda", 1.0), "ewc", 1.0)
    assert "diverged" not in row and 0.1 < row["val_acc"] <= 1.0  # above chance


def test_tune_resume_runs_only_the_values_the_record_lacks(tmp_path, monkeypatch):
    tune = _tune_module()
    calls = []

    def fake_measure(cfg, method, value):  # the search's bookkeeping, not its training
        calls.append((method, value))
        if value == 1000.0:
            return {"value": value, "seconds": 0.0, "diverged": "loss nan"}
        return {"value": value, "seconds": 0.0, "val_acc": 1 / value, "val_bwt": 0, "val_la": 0}

    monkeypatch.setattr(tune, "_measure", fake_measure)
    out = tmp_path / "search.json"
    argv = ["tune.py", "--benchmark", "permuted_digits", "--methods", "ewc", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--grid", "ewc=10,1000"])
    tune.main()
    monkeypatch.setattr(sys, "argv", argv + ["--grid", "ewc=1,10,1000", "--resume"])
    tune.main()
    assert calls == [("ewc", 10.0), ("ewc", 1000.0), ("ewc", 1.0)]
    import json

    record = json.loads(out.read_text())
    assert [r["value"] for r in record["search"]["ewc"]["rows"]] == [1.0, 10.0, 1000.0]
    assert record["chosen"] == {"ewc": {"ewc.lambda": 1.0}}  # the diverged value is not chosen
    assert "--resume" in record["command"] and len(record["earlier_runs"]) == 1
    # a record of another protocol is not continued: its rows measured something else
    monkeypatch.setattr(sys, "argv", argv + ["--grid", "ewc=3", "--resume", "--tasks", "5"])
    with pytest.raises(SystemExit, match="searched with --tasks None, this search has 5"):
        tune.main()
    assert calls == [("ewc", 10.0), ("ewc", 1000.0), ("ewc", 1.0)]
