"""The harness's cost breakdown and compilation-cache settings (rgo_jax.bench._profile)."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import pytest

from rgo_jax.bench import _profile
from tests.helpers import no_persistent_compilation_cache


def test_cache_dir_flag_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv(_profile.CACHE_ENV, str(tmp_path / "env"))
    assert _profile.compilation_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert _profile.compilation_cache_dir(None) == tmp_path / "env"
    for off in ("off", "OFF", "0", "none"):
        monkeypatch.setenv(_profile.CACHE_ENV, off)
        assert _profile.compilation_cache_dir(None) is None
    monkeypatch.delenv(_profile.CACHE_ENV)
    default = _profile.compilation_cache_dir(None)
    assert default.parts[-2:] == ("rgo_jax", "jax_compilation_cache")


def test_laps_time_phases_per_task_and_count_compiles(tmp_path):
    assert _profile.finish() == ""  # nothing active: hooks are no-ops
    _profile.lap("train", 0)
    _profile.start()
    try:
        _profile.lap("train", 0)
        time.sleep(0.05)

        @jax.jit
        def profiled_fn(x):
            return jnp.sin(x) * 3.0

        with no_persistent_compilation_cache():  # compiled here, not read back
            profiled_fn(jnp.arange(7.0)).block_until_ready()
        _profile.lap("evaluation", 0)
        time.sleep(0.02)
        _profile.lap("train", 1)
    finally:
        text = _profile.finish(tmp_path)
    data = json.loads((tmp_path / "profile.json").read_text())
    phases = {(p["task"], p["phase"]): p for p in data["phases"]}
    assert phases[(0, "train")]["seconds"] >= 0.05
    assert 0.02 <= phases[(0, "evaluation")]["seconds"] < phases[(0, "train")]["seconds"]
    compiled = {c["function"]: c for c in data["compiles"]}
    assert compiled["jit(profiled_fn)"]["count"] == 1
    # the compilation happened inside task 0's train phase and is attributed to it
    assert phases[(0, "train")]["compile_seconds"] >= compiled["jit(profiled_fn)"]["seconds"]
    assert phases[(0, "evaluation")]["compile_seconds"] == 0.0
    assert "jit(profiled_fn)" in text and "evaluation" in text
    assert data["wall_seconds"] >= 0.07


def test_no_listener_left_after_finish():
    _profile.start()
    prof = _profile._ACTIVE
    _profile.finish()
    jax.jit(lambda x: x + 1.0)(jnp.ones(3)).block_until_ready()
    assert not prof.compiles  # the finished profile no longer records


@pytest.mark.parametrize("value", ["off", None])
def test_enable_cache_off_changes_nothing(value, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    _profile.enable_compilation_cache(_profile.compilation_cache_dir("off") if value else None)
    assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.slow
def test_cli_profile_and_warm_cache_give_the_same_numbers(tmp_path):
    import subprocess
    import sys

    import numpy as np

    def run(out):
        cmd = [sys.executable, "-m", "rgo_jax", "--benchmark", "permuted_digits", "--tasks", "2"]
        cmd += ["--steps", "30", "--consolidation-batches", "10", "--hidden", "64"]
        cmd += ["--methods", "rgo", "--no-plots", "--no-checkpoint", "--profile"]
        cmd += ["--compilation-cache", str(tmp_path / "cache"), "--out", str(out)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads((out / "results.json").read_text())["methods"]["rgo"]["matrices"][0]
        return res.stdout, np.array(r, dtype=float), json.loads((out / "profile.json").read_text())

    out1, r1, prof1 = run(tmp_path / "cold")
    assert any((tmp_path / "cache").iterdir())  # the cold run filled the cache
    out2, r2, prof2 = run(tmp_path / "warm")
    np.testing.assert_array_equal(r1, r2)  # cached executables: bit-identical results
    assert "Cost breakdown" in out1 and "task boundary" in out2
    phases = {(p["task"], p["phase"]) for p in prof2["phases"]}
    assert {(0, "train"), (1, "train"), (0, "task boundary"), (1, "evaluation")} <= phases
    assert any("_update_projection" in c["function"] for c in prof1["compiles"])
