"""rgo_jax.bench: the benchmark harness (needs the ``bench`` extra: ``pip install rgo_jax[bench]``).

Config, benchmark registry, methods, the training loop with run/resume, checkpoints,
metrics, reports/plots/merge, models, data loaders and task streams, and the ``rgo-bench``
command line. It is built on the optimizer library :mod:`rgo_jax`, which never imports it.
"""

from rgo_jax.bench._report import SCENARIO as SCENARIO
from rgo_jax.bench._report import format_matrix as format_matrix
from rgo_jax.bench._report import format_summary as format_summary
from rgo_jax.bench._report import markdown_table as markdown_table
from rgo_jax.bench._report import merge_run_reports as merge_run_reports
from rgo_jax.bench._report import plot_accuracy_matrix as plot_accuracy_matrix
from rgo_jax.bench._report import plot_accuracy_per_task as plot_accuracy_per_task
from rgo_jax.bench._report import summary_table as summary_table
from rgo_jax.bench._report import write_json_atomic as write_json_atomic
from rgo_jax.bench._report import write_run_report as write_run_report
from rgo_jax.bench._report import write_text_atomic as write_text_atomic
from rgo_jax.bench.train import register_benchmark as register_benchmark

__all__ = (
    "SCENARIO",
    "format_matrix",
    "format_summary",
    "markdown_table",
    "merge_run_reports",
    "plot_accuracy_matrix",
    "plot_accuracy_per_task",
    "register_benchmark",
    "summary_table",
    "write_json_atomic",
    "write_run_report",
    "write_text_atomic",
)
