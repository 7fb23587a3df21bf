"""Result reporting: printed matrices and summaries, Markdown tables, atomic files, plots,
the report of a run and the merge of runs.

One module per part: :mod:`._text` (matrices, summaries, tables as text), :mod:`._files`
(atomic writes), :mod:`._plots`, :mod:`._run_report` (one run's files), :mod:`._merge`
(several runs into one report). This module gathers their public names.
"""

from rgo_jax.bench._files import to_jsonable as to_jsonable
from rgo_jax.bench._files import write_json_atomic as write_json_atomic
from rgo_jax.bench._files import write_text_atomic as write_text_atomic
from rgo_jax.bench._merge import merge_run_reports as merge_run_reports
from rgo_jax.bench._plots import plot_accuracy_matrix as plot_accuracy_matrix
from rgo_jax.bench._plots import plot_accuracy_per_task as plot_accuracy_per_task
from rgo_jax.bench._run_report import write_run_report as write_run_report
from rgo_jax.bench._text import SCENARIO as SCENARIO
from rgo_jax.bench._text import format_matrix as format_matrix
from rgo_jax.bench._text import format_summary as format_summary
from rgo_jax.bench._text import markdown_table as markdown_table
from rgo_jax.bench._text import summary_table as summary_table

__all__ = [
    "SCENARIO",
    "format_matrix",
    "format_summary",
    "markdown_table",
    "merge_run_reports",
    "plot_accuracy_matrix",
    "plot_accuracy_per_task",
    "summary_table",
    "to_jsonable",
    "write_json_atomic",
    "write_run_report",
    "write_text_atomic",
]
