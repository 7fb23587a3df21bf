"""Test-wide JAX hardening: several host devices, rank promotion is an error.

Each test module compiles its own functions; when a module is done its compiled code is
dropped and the freed heap handed back to the system, so that the suite's memory stays
that of its largest module instead of the sum of all of them.
"""

import ctypes
import ctypes.util
import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# The CLI's persistent compilation cache stays off in tests (and their subprocesses) unless
# a test asks for it: no files written under the home directory.
os.environ.setdefault("RGO_JAX_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def _malloc_trim():
    """Returns the C heap's free pages to the system (glibc only; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_after_each_module():
    yield
    jax.clear_caches()
    gc.collect()
    _malloc_trim()


def pytest_collection_modifyitems(config, items):
    """The README's examples run end to end (whole training and consolidation): slow."""
    del config
    for item in items:
        if item.nodeid == "README.md::README.md":
            item.add_marker(pytest.mark.slow)
