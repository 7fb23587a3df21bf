"""Two CPU processes joined by ``jax.distributed`` (gloo collectives) equal one process.

Runs ``benchmarks/multihost/dp_consolidate.py`` as two processes on 127.0.0.1 with two
host devices each (a 4-device mesh across processes): data-parallel RGO steps with each
process feeding its own half of every global batch, then a consolidation with the P's
sharded by rows across the processes. The parameters and P's must equal the same script
run in this one process on its 4 host devices (float32 reduction order only:
``rtol=1e-5, atol=1e-6``; measured differences are about 6e-8).
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
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
