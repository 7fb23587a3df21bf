"""Where a benchmark result came from: the commit of the code that made it."""

from __future__ import annotations

import subprocess


def git_commit() -> str:
    """``HEAD``'s hash (``"unknown"`` outside a checkout), ``-dirty`` when tracked files differ."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return commit + ("-dirty" if dirty else "")


def machine() -> dict:
    """The platform, CPU count, JAX version and backend a result was measured on."""
    import os  # noqa: PLC0415
    import platform  # noqa: PLC0415

    import jax  # noqa: PLC0415

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }
