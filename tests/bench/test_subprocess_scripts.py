"""The benchmark scripts that start processes of their own, run end to end.

One module, so that their subprocesses (the GPU check's 1.2 GB; the two 0.4 GB processes of
the data-parallel run) run one after the other, never beside each other.

``benchmarks/perf/gpu_check.py --small`` runs on a CPU and writes what it printed.

``benchmarks/multihost/dp_consolidate.py`` as two CPU processes joined by
``jax.distributed`` (gloo collectives) on 127.0.0.1, with two host devices each (a 4-device
mesh across processes): data-parallel RGO steps with each process feeding its own half of
every global batch, then a consolidation with the P's sharded by rows across the processes.
The parameters and P's must equal the same script run in this one process on its 4 host
devices (float32 reduction order only: ``rtol=1e-5, atol=1e-6``; measured differences are
about 6e-8).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import REPO

SCRIPT = REPO / "benchmarks" / "multihost" / "dp_consolidate.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("dp_consolidate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (host) devices")
def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "two.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    coord = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, str(SCRIPT), "--processes", "2", "--coordinator", coord]
    procs = [
        subprocess.Popen(
            [*cmd, "--process-id", str(i), *(["--out", str(out)] if i == 0 else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any("GLOO_UNAVAILABLE" in log for log in logs):
        pytest.skip("this jaxlib has no gloo CPU collectives: " + logs[0].strip()[-200:])
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    two = np.load(out)
    assert int(two["processes"]) == 2

    one = _load_script().run()  # this process: 4 host devices, no jax.distributed
    assert list(two["p_specs"]) == list(one["p_specs"])  # P's were row-sharded both times
    assert all(s.endswith("=('data', None)") for s in one["p_specs"]), one["p_specs"]
    keys = [k for k in one if k.startswith(("params/", "p/"))]
    assert len(keys) == 6
    for k in keys:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # Training and consolidation did something (P is far from the identity).
    assert np.abs(one["p/w1"] - np.eye(12)).max() > 0.1


@pytest.mark.slow
def test_gpu_check_runs_small_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    # LLVM optimisation level 0: a third less compile time; the script's checks and outputs
    # do not depend on it (this is a smoke run of the script, not a timing).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/perf/gpu_check.py"), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert printed["config"] == saved["config"]
    assert printed["config"]["small"] is True
    step = printed["step"]
    assert step["rgo"]["median_s"] > 0 and step["base"]["median_s"] > 0
    assert step["rgo_over_base"] == pytest.approx(
        step["rgo"]["median_s"] / step["base"]["median_s"]
    )
    assert printed["consolidation"]["vectors_per_s"] > 0
    assert printed["checks"]["rgo_update_finite"] and printed["checks"]["p_symmetric"]
