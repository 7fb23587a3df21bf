"""Test-wide JAX hardening: several host devices, rank promotion is an error."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# The CLI's persistent compilation cache stays off in tests (and their subprocesses) unless
# a test asks for it: no files written under the home directory.
os.environ.setdefault("RGO_JAX_COMPILATION_CACHE", "off")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
