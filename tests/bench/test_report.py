"""Reporting: formatted text, Markdown tables, atomic JSON/text files, PNG plots, run reports."""

import json
import math
import os
import re
import stat

import numpy as np
import pytest

from rgo_jax.bench import _files, metrics
from rgo_jax.bench import _report as report
from tests.helpers import REPO

NAN = float("nan")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Row i = after training task i, column j = task j; R3[0, 2] was not measured.
R3 = np.array(
    [
        [0.90, 0.20, NAN],
        [0.93, 0.95, 0.30],
        [0.70, 0.85, 0.92],
    ]
)
# Hand-computed (percent): ACC (70 + 85 + 92) / 3 = 82.333; BWT ((70-90) + (85-95)) / 2 = -15;
# GEM divisor: -30 / 3 = -10; forgetting ((93-70) + (95-85)) / 2 = 16.5; LA (90+95+92)/3 = 92.333
R3_LOW = R3.copy()
R3_LOW[2] -= 0.03  # seed 2: ACC 79.333, BWT -18, forgetting 19.5, LA (90+95+89)/3 = 91.333


def _table_cells(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()]


def _check_png(path, min_bytes=2_000):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert min_bytes < len(data) < 5_000_000
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= 200 and im.size[1] >= 200


# ----------------------------------------------------------------------------------------
# Text


def test_format_matrix_rows_and_markers():
    text = report.format_matrix(R3)
    lines = text.splitlines()
    assert lines[0].split() == ["task", "0", "task", "1", "task", "2"]
    assert lines[1].split() == ["after", "task", "0", "90.0", "(20.0)", "-"]
    assert lines[2].split() == ["after", "task", "1", "93.0", "95.0", "(30.0)"]
    assert lines[3].split() == ["after", "task", "2", "70.0", "85.0", "92.0"]
    assert "zero-shot" in lines[4] and "not measured" in lines[4]
    # columns line up: the digits of each column end at the same offset
    assert lines[1].index("90.0") + 4 == lines[3].index("70.0") + 4
    assert lines[1].index("(20.0)") + 5 == lines[2].index("95.0") + 4

    named = report.format_matrix(R3, task_names=["A", "B", "C"], decimals=2)
    assert named.splitlines()[3].split() == ["after", "C", "70.00", "85.00", "92.00"]
    with pytest.raises(ValueError, match="task_names has 2 names for a matrix of 3 tasks"):
        report.format_matrix(R3, task_names=["A", "B"])
    with pytest.raises(ValueError, match="square"):
        report.format_matrix(np.zeros((2, 3)))


def test_format_summary_single_run():
    text = report.format_summary(metrics.summarize(R3))
    assert re.search(r"^ACC\s+82\.33 %$", text, re.M)
    assert re.search(r"^BWT\s+-15\.00 %\s+\(divisor T-1\)$", text, re.M)
    assert re.search(r"^Forgetting\s+16\.50 %$", text, re.M)
    assert re.search(r"^Learning accuracy\s+92\.33 %$", text, re.M)
    assert "FWT" not in text
    assert text.splitlines()[-1] == "3 tasks, 1 run"

    gem = report.format_summary(metrics.summarize(R3, bwt_divisor="T"))
    assert re.search(r"^BWT\s+-10\.00 %\s+\(divisor T, as GEM's code\)$", gem, re.M)

    # FWT with b = [0.1, 0.1, 0.1]: (0.20 - 0.10 + 0.30 - 0.10) / 2 = 0.15
    fwt = report.format_summary(metrics.summarize(R3, [0.1, 0.1, 0.1]))
    assert re.search(r"^FWT\s+15\.00 %$", fwt, re.M)

    one = report.format_summary(metrics.summarize([[0.9]]))
    assert re.search(r"^BWT\s+n/a .*undefined with a single task", one, re.M)
    assert re.search(r"^ACC\s+90\.00 %$", one, re.M)

    with pytest.raises(TypeError, match="metrics.summarize"):
        report.format_summary({"accuracy": 0.5})


def test_format_summary_seeds():
    text = report.format_summary(metrics.summarize_seeds([R3, R3_LOW]))
    # ACC (82.333 + 79.333) / 2 = 80.83, population std 3 / 2 = 1.50
    assert re.search(r"^ACC\s+80\.83 ± 1\.50 %$", text, re.M)
    # BWT (-15 - 18) / 2 = -16.50 ± 1.50; forgetting (16.5 + 19.5) / 2 = 18.00 ± 1.50
    assert re.search(r"^BWT\s+-16\.50 ± 1\.50 %\s+\(divisor T-1\)$", text, re.M)
    assert re.search(r"^Forgetting\s+18\.00 ± 1\.50 %$", text, re.M)
    # LA (92.333 + 91.333) / 2 = 91.83 ± 0.50
    assert re.search(r"^Learning accuracy\s+91\.83 ± 0\.50 %$", text, re.M)
    assert text.splitlines()[-1] == "3 tasks, 2 seeds (mean ± population std, ddof=0)"
    sample = report.format_summary(metrics.summarize_seeds([R3, R3_LOW], ddof=1))
    # sample std of two values = |a - b| / sqrt(2) = 3 / 1.41421 = 2.12
    assert re.search(r"^ACC\s+80\.83 ± 2\.12 %$", sample, re.M)
    assert "sample std, ddof=1" in sample


def test_markdown_table_layout_and_cells():
    rows = [
        {"method": "RGO", "acc": 91.136, "seeds": 5, "note": "a|b"},
        {"method": "SGD", "acc": NAN, "seeds": np.int64(1), "note": None},
        {"method": "STL", "seeds": 2},
    ]
    md = report.markdown_table(
        rows, {"method": "method", "acc": "ACC %", "seeds": "n", "note": "note"}
    )
    lines = md.splitlines()
    assert len(lines) == 5 and all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert len({len(line) for line in lines}) == 1  # padded to a common width
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    assert cells[0] == ["method", "ACC %", "n", "note"]
    assert cells[1] == ["---"] * 4
    assert cells[2] == ["RGO", "91.14", "5", "a\\|b"]
    assert cells[3] == ["SGD", "—", "1", "—"]
    assert cells[4] == ["STL", "—", "2", "—"]
    assert report.markdown_table(rows, ["acc"], floatfmt=".1f").splitlines()[2] == "| 91.1 |"
    with pytest.raises(KeyError, match="'ACC' is in none of the rows"):
        report.markdown_table(rows, ["method", "ACC"])


def test_summary_table_numbers():
    md = report.summary_table(
        {"RGO": metrics.summarize_seeds([R3, R3_LOW]), "SGD": metrics.summarize_seeds([R3])}
    )
    cells = _table_cells(md)
    assert cells[0] == ["method", "tasks", "seeds", "ACC %", "BWT %", "forgetting %", "LA %"]
    assert cells[2] == ["RGO", "3", "2", "80.83 ± 1.50", "-16.50 ± 1.50", "18.00 ± 1.50",
                        "91.83 ± 0.50"]  # fmt: skip
    # one seed: no std shown
    assert cells[3] == ["SGD", "3", "1", "82.33", "-15.00", "16.50", "92.33"]


# ----------------------------------------------------------------------------------------
# Atomic files


def test_json_round_trip(tmp_path):
    obj = {
        "R": R3,
        "f32": np.array([0.5, 0.25], dtype=np.float32),
        "ints": np.arange(3, dtype=np.int64),
        "flags": np.array([True, False]),
        "scalars": (np.float64(0.1), np.int32(7), np.bool_(True)),
        "bad": [NAN, float("inf"), -np.inf],
        "path": tmp_path / "x",
        1: "int key",
    }
    p = tmp_path / "r.json"
    report.write_json_atomic(p, obj)
    back = json.loads(p.read_text())
    assert back["f32"] == [0.5, 0.25] and back["ints"] == [0, 1, 2]
    assert back["flags"] == [True, False]
    assert back["scalars"] == [0.1, 7, True]
    assert back["bad"] == [None, None, None]
    assert back["path"] == str(tmp_path / "x") and back["1"] == "int key"
    assert back["R"][0][2] is None
    # the matrix comes back bit for bit, nan restored from null
    R_back = np.array(back["R"], dtype=np.float64)
    np.testing.assert_array_equal(R_back, R3)
    assert "NaN" not in p.read_text() and "Infinity" not in p.read_text()
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_failed_serialisation_keeps_old_file(tmp_path):
    p = tmp_path / "r.json"
    report.write_json_atomic(p, {"acc": 0.9})
    old = p.read_bytes()
    with pytest.raises(TypeError, match=r"obj\['b'\]\[1\]: object of type object"):
        report.write_json_atomic(p, {"a": np.eye(2), "b": [1, object()]})
    with pytest.raises(TypeError, match="complex"):
        report.write_json_atomic(p, {"z": np.array([1j])})
    assert p.read_bytes() == old
    assert os.listdir(tmp_path) == ["r.json"]


def test_failure_midway_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    p = tmp_path / "summary.md"
    report.write_text_atomic(p, "old\n")

    def failing_replace(src, dst):
        assert os.path.exists(src)  # the new content was fully written to the temp file
        raise OSError("disk full")

    monkeypatch.setattr(_files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        report.write_text_atomic(p, "new\n")
    monkeypatch.undo()
    assert p.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["summary.md"]
    with pytest.raises(UnicodeEncodeError):
        report.write_text_atomic(p, "bad \ud800")
    assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["summary.md"]
    with pytest.raises(TypeError, match="text must be str"):
        report.write_text_atomic(p, b"bytes")


def test_atomic_write_modes_and_missing_directory(tmp_path):
    p = tmp_path / "a.txt"
    report.write_text_atomic(p, "x")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    os.chmod(p, 0o600)
    report.write_text_atomic(p, "y")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600 and p.read_text() == "y"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.write_text_atomic(tmp_path / "missing" / "a.txt", "x")


# ----------------------------------------------------------------------------------------
# Plots


def test_plots_are_pngs_and_leave_no_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    report.plot_accuracy_matrix(R3, tmp_path / "m.png", title="RGO")
    report.plot_accuracy_matrix(R3, tmp_path / "named.png", task_names=["A", "B", "C"])
    rng = np.random.default_rng(0)
    seeds = [np.tril(rng.uniform(0.5, 1, (6, 6))) for _ in range(3)]
    report.plot_accuracy_per_task(
        {"RGO": [R3, R3_LOW], "SGD": [[0.9, 0.1], [0.5, 0.9]], "EWC": np.stack(seeds)},
        tmp_path / "curves.png",
        title="demo",
    )
    for name in ("m.png", "named.png", "curves.png"):
        _check_png(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "m.png", "named.png"]
    assert plt.get_fignums() == before == []


def test_plot_input_errors(tmp_path):
    with pytest.raises(ValueError, match="different shapes"):
        report.plot_accuracy_per_task({"RGO": [R3, [[0.5, 0.5], [0.5, 0.5]]]}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="non-empty"):
        report.plot_accuracy_per_task({}, tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"R\[0, 0\] = 90"):
        report.plot_accuracy_matrix(R3 * 100, tmp_path / "m.png")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------
# Run report


def test_write_run_report(tmp_path):
    run = tmp_path / "run"
    config = {"lr": np.float32(0.5), "tasks": 3, "alpha": 0.01, "seeds": (0, 1)}
    sgd = np.array([[0.9, NAN, NAN], [0.4, 0.95, NAN], [0.2, 0.3, 0.96]])
    b = np.array([0.1, 0.1, 0.1, 0.1])  # measured for 4 tasks; cut to the 3 of the matrices
    out = report.write_run_report(
        run,
        config=config,
        matrices={"RGO": [R3, R3_LOW], "SGD fine-tuning": [sgd]},
        random_init={"RGO": b},
    )
    files = sorted(os.listdir(run))
    assert files == [
        "accuracy_matrix_RGO.png",
        "accuracy_matrix_SGD_fine-tuning.png",
        "accuracy_per_task.png",
        "config.json",
        "results.json",
        "summary.md",
    ]
    for name in files:
        if name.endswith(".png"):
            _check_png(run / name)

    assert out["RGO"]["acc"]["mean"] == pytest.approx((2.47 + 2.38) / 6, abs=1e-12)
    assert out["RGO"]["fwt"]["mean"] == pytest.approx(0.15, abs=1e-12)  # (0.1 + 0.2) / 2
    assert "fwt" not in out["SGD fine-tuning"]
    # SGD: BWT ((0.2 - 0.9) + (0.3 - 0.95)) / 2 = -0.675
    assert out["SGD fine-tuning"]["bwt"]["mean"] == pytest.approx(-0.675, abs=1e-12)

    assert json.loads((run / "config.json").read_text()) == {
        "lr": 0.5,
        "tasks": 3,
        "alpha": 0.01,
        "seeds": [0, 1],
    }
    results = json.loads((run / "results.json").read_text())
    assert results["scenario"] == "task-incremental, task id known at train and test time"
    assert results["bwt_divisor"] == "T-1" and results["std_ddof"] == 0
    rgo = results["methods"]["RGO"]
    np.testing.assert_array_equal(np.array(rgo["matrices"][1], dtype=float), R3_LOW)
    assert rgo["summary"]["bwt"]["per_seed"] == pytest.approx([-0.15, -0.18], abs=1e-12)
    np.testing.assert_allclose(
        np.array(rgo["summary"]["mean_matrix"], dtype=float), (R3 + R3_LOW) / 2, atol=1e-12
    )
    assert results["methods"]["SGD fine-tuning"]["random_init"] is None

    md = (run / "summary.md").read_text(encoding="utf-8")
    assert "task-incremental, task id known at train and test time" in md
    assert "divisor T-1" in md and "population std, ddof=0" in md
    rows = {r[0]: r for r in _table_cells(md[md.index("| method") :].split("\n\n")[0])}
    assert rows["RGO"][3:8] == ["80.83 ± 1.50", "-16.50 ± 1.50", "18.00 ± 1.50",
                                "91.83 ± 0.50", "15.00 ± 0.00"]  # fmt: skip
    assert rows["SGD fine-tuning"][3:5] == ["48.67", "-67.50"]  # (20 + 30 + 96) / 3 = 146 / 3
    # mean matrix, last row: (70 + 67) / 2, (85 + 82) / 2, (92 + 89) / 2
    assert re.search(r"^after task 2\s+68\.5\s+83\.5\s+90\.5$", md, re.M)
    assert "![accuracy per task](accuracy_per_task.png)" in md


def test_write_run_report_partial_runs_and_rewrites(tmp_path):
    run = tmp_path / "run"
    # after task 0 of seed 0
    out = report.write_run_report(run, config={}, matrices={"RGO": [R3[:1, :1]]}, plots=False)
    assert out["RGO"]["num_tasks"] == 1 and math.isnan(out["RGO"]["bwt"]["mean"])
    assert (
        json.loads((run / "results.json").read_text())["methods"]["RGO"]["summary"]["bwt"]["mean"]
        is None
    )
    # seed 0 complete, seed 1 after two tasks: summary over seed 0 only, seed 1 running
    out = report.write_run_report(
        run, config={}, matrices={"RGO": [R3, R3_LOW[:2, :2]]}, plots=False
    )
    assert out["RGO"]["num_seeds"] == 1 and out["RGO"]["seeds_in_progress"] == [1]
    assert out["RGO"]["acc"]["mean"] == pytest.approx(2.47 / 3, abs=1e-12)
    md = (run / "summary.md").read_text(encoding="utf-8")
    rgo_row = next(line for line in md.splitlines() if line.startswith("| RGO "))
    assert _table_cells(rgo_row)[0][1:4] == ["3", "1 (+1 running)", "82.33"]
    assert "Seeds still running (not in the summary): [1]." in md
    results = json.loads((run / "results.json").read_text())
    assert len(results["methods"]["RGO"]["matrices"][1]) == 2  # the partial seed is kept
    assert sorted(os.listdir(run)) == ["config.json", "results.json", "summary.md"]

    # invalid input: nothing is rewritten
    before = {n: (run / n).read_bytes() for n in os.listdir(run)}
    with pytest.raises(ValueError, match=r"matrices\['SGD'\]\[0\]\[1, 0\] = nan"):
        report.write_run_report(
            run, config={"x": 1}, matrices={"RGO": [R3], "SGD": [[[0.5, NAN], [NAN, 0.5]]]}
        )
    with pytest.raises(TypeError, match=r"config\['f'\]: object of type builtin_function"):
        report.write_run_report(run, config={"f": print}, matrices={"RGO": [R3]})
    with pytest.raises(ValueError, match="same file name"):
        report.write_run_report(run, config={}, matrices={"a b": [R3], "a/b": [R3]})
    with pytest.raises(ValueError, match=r"T_total >= 3"):
        report.write_run_report(run, config={}, matrices={"RGO": [R3]}, random_init=[0.1, 0.1])
    assert {n: (run / n).read_bytes() for n in os.listdir(run)} == before


def test_merge_run_reports_orders_seeds_and_checks_inputs(tmp_path):
    sgd = np.array([[0.9, NAN, NAN], [0.4, 0.95, NAN], [0.2, 0.3, 0.96]])
    report.write_run_report(
        tmp_path / "a",
        config={"lr": 0.1, "seeds": [3], "method_options": {"k": 1}},
        matrices={"RGO": [R3_LOW], "SGD": [sgd]},
        random_init={"RGO": [[0.1, 0.2, 0.3]]},
        plots=False,
    )
    report.write_run_report(
        tmp_path / "b",
        config={"lr": 0.1, "seeds": [1], "method_options": {"j": 2}, "chunk_steps": 5},
        matrices={"RGO": [R3]},
        random_init={"RGO": [[0.0, 0.1, 0.2]]},
        plots=False,
    )
    with pytest.raises(ValueError, match="differ in 'chunk_steps'"):
        report.merge_run_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "m", plots=False)
    with pytest.raises(TypeError, match="not the string"):
        report.merge_run_reports([tmp_path / "a"], tmp_path / "m", free_keys="chunk_steps")
    assert not (tmp_path / "m").exists()
    # The caller names the keys that do not change the protocol.
    out = report.merge_run_reports(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "m", free_keys=("chunk_steps",), plots=False
    )
    # seed 1 (R3) before seed 3 (R3_LOW)
    assert out["RGO"]["acc"]["per_seed"] == pytest.approx([2.47 / 3, 2.38 / 3], abs=1e-12)
    # FWT = mean of R[j-1, j] - b_j, with R[0, 1] + R[1, 2] = 0.5 for both matrices; each
    # seed keeps its own random-init row: seed 1 (0.5 - 0.3) / 2, seed 3 (0.5 - 0.5) / 2.
    assert out["RGO"]["fwt"]["per_seed"] == pytest.approx([0.1, 0.0], abs=1e-12)
    assert out["SGD"]["acc"]["mean"] == pytest.approx(1.46 / 3, abs=1e-12)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["method_options"] == {"k": 1, "j": 2}
    assert cfg["seeds_per_method"] == {"RGO": [1, 3], "SGD": [3]}

    report.write_run_report(
        tmp_path / "c",
        config={"lr": 0.1, "seeds": [5], "method_options": {"k": 2}},
        matrices={"SGD": [sgd]},
        plots=False,
    )
    with pytest.raises(ValueError, match="method option 'k' is 2"):
        report.merge_run_reports([tmp_path / "a", tmp_path / "c"], tmp_path / "x")
    report.write_run_report(
        tmp_path / "d", config={"lr": 0.1, "seeds": [0, 1]}, matrices={"SGD": [sgd]}, plots=False
    )
    with pytest.raises(ValueError, match="1 matrices for the 2 seeds"):
        report.merge_run_reports([tmp_path / "d"], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        report.merge_run_reports([tmp_path / "nope"], tmp_path / "x")

    # SGD rerun with another option value supersedes run a's SGD: excluded, it merges.
    sgd_e = np.array([[0.9, NAN, NAN], [0.8, 0.95, NAN], [0.7, 0.8, 0.96]])
    report.write_run_report(
        tmp_path / "e",
        config={"lr": 0.1, "seeds": [3], "method_options": {"k": 2}},
        matrices={"SGD": [sgd_e]},
        plots=False,
    )
    with pytest.raises(ValueError, match="'k' is 2 .* both give method 'SGD'"):
        report.merge_run_reports([tmp_path / "a", tmp_path / "e"], tmp_path / "x")
    with pytest.raises(ValueError, match=r"method\(s\) \['OWM'\] that .* does not have"):
        report.merge_run_reports(
            [tmp_path / "a"], tmp_path / "x", exclude=[(tmp_path / "a", "OWM")]
        )
    with pytest.raises(ValueError, match="not one of the runs merged"):
        report.merge_run_reports(
            [tmp_path / "a"], tmp_path / "x", exclude=[(tmp_path / "z", "SGD")]
        )
    assert not (tmp_path / "x").exists()
    out = report.merge_run_reports(
        [tmp_path / "a", tmp_path / "e"],
        tmp_path / "m2",
        exclude=[(str(tmp_path / "a") + "/", "SGD")],
        plots=False,
    )
    assert out["SGD"]["acc"]["per_seed"] == pytest.approx([2.46 / 3], abs=1e-12)
    assert out["RGO"]["acc"]["per_seed"] == pytest.approx([2.38 / 3], abs=1e-12)
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert cfg["method_options"] == {}  # 'k' differs between the methods: per method only
    assert cfg["method_options_per_method"] == {"RGO": {"k": 1}, "SGD": {"k": 2}}
    assert cfg["merged_excluded"] == {"a": ["SGD"]}
    # a merged report merges again, each method keeping its own options
    again = report.merge_run_reports(
        [tmp_path / "m2", tmp_path / "b"], tmp_path / "m3", free_keys=("chunk_steps",), plots=False
    )
    assert again["RGO"]["acc"]["per_seed"] == pytest.approx([2.47 / 3, 2.38 / 3], abs=1e-12)
    cfg = json.loads((tmp_path / "m3" / "config.json").read_text())
    assert cfg["method_options_per_method"] == {"RGO": {"k": 1, "j": 2}, "SGD": {"k": 2}}
    assert not (tmp_path / "x").exists()


def test_merge_reads_a_key_added_later_as_its_old_value(tmp_path):
    sgd = np.array([[0.9, NAN, NAN], [0.4, 0.95, NAN], [0.2, 0.3, 0.96]])
    runs = (("old", 0, {}), ("new", 1, {"init": "lecun"}), ("other", 2, {"init": "torch"}))
    for name, seed, extra in runs:
        report.write_run_report(
            tmp_path / name,
            config={"lr": 0.1, "seeds": [seed], **extra},
            matrices={"SGD": [sgd]},
            plots=False,
        )
    old, new, other = tmp_path / "old", tmp_path / "new", tmp_path / "other"
    with pytest.raises(ValueError, match="differ in 'init' \\('lecun' vs None\\)"):
        report.merge_run_reports([old, new], tmp_path / "m", plots=False)
    defaults = {"init": "lecun"}
    out = report.merge_run_reports([old, new], tmp_path / "m", key_defaults=defaults, plots=False)
    assert out["SGD"]["acc"]["per_seed"] == pytest.approx([1.46 / 3] * 2, abs=1e-12)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["init"] == "lecun"
    with pytest.raises(ValueError, match="differ in 'init' \\('torch' vs 'lecun'\\)"):
        report.merge_run_reports([old, other], tmp_path / "x", key_defaults=defaults, plots=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_publish_merges_and_records_what_it_left_out(tmp_path):
    import subprocess
    import sys

    sgd = np.array([[0.9, NAN, NAN], [0.4, 0.95, NAN], [0.2, 0.3, 0.96]])
    for name, seed, opts, mats in (
        ("a", 0, {"k": 1}, {"RGO": [R3], "SGD": [sgd]}),
        ("b", 0, {"k": 2}, {"SGD": [sgd * 0.9]}),
    ):
        report.write_run_report(
            tmp_path / name,
            config={"seeds": [seed], "method_options": opts, "data_dir": str(tmp_path)},
            matrices=mats,
            plots=False,
        )
    script = REPO / "benchmarks" / "publish.py"
    argv = [sys.executable, str(script), str(tmp_path / "a"), str(tmp_path / "b")]
    argv += [str(tmp_path / "out"), "--command", "cmd a", "--command", "cmd b", "--commit", "c1"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "both give method 'SGD'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    done = subprocess.run(
        [*argv, "--exclude", f"{tmp_path / 'a'}:SGD"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["seeds_per_method"] == {"RGO": [0], "SGD": [0]}
    assert cfg["method_options_per_method"] == {"RGO": {"k": 1}, "SGD": {"k": 2}}
    assert cfg["data_dir"] == "DATA"  # not the path of the machine that ran
    provenance = (tmp_path / "out" / "PROVENANCE.md").read_text()
    assert "`cmd b` at commit `c1`" in provenance and "left out: `SGD` of `a`" in provenance
