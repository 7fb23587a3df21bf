"""``python -m rgo_jax``: the benchmark command (same as ``rgo-bench``)."""

import sys

from rgo_jax.bench.cli import main

sys.exit(main())
