"""The RLS width sweep of ``benchmarks/perf/bench_rls_forms.py`` (``compare_torch.py
--rls-sweep-only``) at a tiny width: every form it times computes the same P."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import REPO, closed_form_p

pytest.importorskip("torch")


@pytest.mark.slow  # compiles seven RLS programs
def test_every_timed_rls_form_is_the_closed_form(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks" / "perf"))
    import bench_rls_forms as forms  # noqa: PLC0415 - needs the path above

    # 20 vectors in blocks of 8: two full blocks and one zero-padded one.
    row = forms.one_width(12, 20, block=8, rounds=1, budget=0.0, keep=True)
    expected = closed_form_p(row["vectors"], forms.ALPHA)
    assert set(row["p"]) == {*forms.KERNELS, "library_checked"}
    for name, p in row["p"].items():
        err = np.max(np.abs(p - expected)) / np.max(np.abs(expected))
        assert err < 1e-4, (name, err)
    assert row["check_passed"] and row["check_agrees"]
    timed = {*forms.KERNELS, "library_checked", "check_library", "check_lapack"}
    assert set(row["times"]) == timed
    assert all(t["median_s"] > 0 for t in row["times"].values())
    table = forms.markdown([row])
    assert "| 12 | 20 |" in table and "best LAPACK / torch" in table
