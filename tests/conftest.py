"""Test-wide JAX hardening: several host devices, rank promotion is an error.

Each test file compiles its own functions; when a file is done (a test module, or a file
of doctests) and its worker holds more than ``RGO_JAX_TEST_RELEASE_MB`` (default 750 MB),
the compiled code is dropped and the freed heap handed back to the system, so that the
suite's memory stays bounded instead of the sum of all files. Below that the caches stay:
the next file reuses what is compiled (JAX's eager operations, shared programs) instead
of tracing and compiling it again.

The processes of one test run (pytest, its xdist workers and the tests' subprocesses) share
one persistent XLA compilation cache in a temporary folder, removed at the end: a program
that an earlier module (or another worker) compiled is read back instead of compiled again.
A cached executable is the compiled code itself, so every result is the same. Tests that
count compilations turn it off (``tests.helpers.no_persistent_compilation_cache``).
"""

import ctypes
import gc
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# One BLAS thread per process for NumPy: the xdist workers already use every core, and
# each worker's spinning BLAS threads competing with the other's slowed NumPy's QR/SVD
# (GPM's bases) 2x. Set before NumPy is first imported (by JAX, once tests run).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# The CLI's persistent compilation cache stays off in tests (and their subprocesses) unless
# a test asks for it: no files written under the home directory.
os.environ.setdefault("RGO_JAX_COMPILATION_CACHE", "off")

_SHARED_CACHE = "RGO_JAX_TEST_XLA_CACHE"
"""Set by the first process of a run (the one that owns and removes the folder)."""
_OWN_CACHE = None
if _SHARED_CACHE not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="rgo_jax_test_xla_cache_")
    os.environ[_SHARED_CACHE] = _OWN_CACHE
    # JAX reads these at import, here and in every process started from this one.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402


def _runs_tests(config) -> bool:
    """False in the xdist controller, which only hands out test files: it never imports JAX
    (200 MB less for the run)."""
    return "PYTEST_XDIST_WORKER" in os.environ or not getattr(config.option, "numprocesses", 0)


def _malloc_trim():
    """Returns the C heap's free pages to the system (glibc only; elsewhere a no-op).

    ``CDLL(None)`` is the process's own symbol table, libc's among them: no
    ``ctypes.util.find_library``, which forks ``ldconfig`` from a worker of a GB or more.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


_RELEASE_ABOVE_BYTES = int(float(os.environ.get("RGO_JAX_TEST_RELEASE_MB", "750")) * 2**20)


def _rss_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; elsewhere a huge value: always release)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 2**62


class _ReleaseCompiledCode:
    """When the last test of a file is done (a test module, or a file of doctests: the
    package's modules and the README) and the worker holds more than
    ``_RELEASE_ABOVE_BYTES``, its compiled code is dropped and the freed heap handed back
    to the system. A plugin, not a fixture of this folder, so that it also
    runs after the doctests outside ``tests/``."""

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item, nextitem):
        if nextitem is not None and nextitem.path == item.path:
            return
        if _rss_bytes() < _RELEASE_ABOVE_BYTES:
            return
        import jax

        jax.clear_caches()
        gc.collect()
        _malloc_trim()


def pytest_configure(config):
    if _runs_tests(config):
        import jax

        jax.config.update("jax_numpy_rank_promotion", "raise")
        config.pluginmanager.register(_ReleaseCompiledCode(), "rgo_jax_release_compiled_code")


def pytest_unconfigure(config):
    del config
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The README's examples run end to end (whole training and consolidation): slow."""
    del config
    for item in items:
        if item.nodeid == "README.md::README.md":
            item.add_marker(pytest.mark.slow)
