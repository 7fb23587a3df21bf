"""``python -m rgo_jax.bench``: the ``rgo-bench`` command line."""

import sys

from rgo_jax.bench.cli import main

sys.exit(main())
