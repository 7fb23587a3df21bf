"""rgo_jax: Recursive Gradient Optimization for continual learning in JAX/Optax.

The optimizer (:func:`scale_by_rgo`, :func:`rgo`) projects each layer's gradient by a
trace-normalised matrix P built from earlier tasks' curvature (:func:`curvature_vectors`,
:func:`consolidate`); the feature encoding layer (:class:`FEL`) gives every task its own
permutation of the hidden features. Submodules: :mod:`rgo_jax.layouts`,
:mod:`rgo_jax.models`, :mod:`rgo_jax.data`, :mod:`rgo_jax.metrics`,
:mod:`rgo_jax.baselines`, :mod:`rgo_jax.train`.
"""

from rgo_jax import baselines as baselines
from rgo_jax import data as data
from rgo_jax import layouts as layouts
from rgo_jax import metrics as metrics
from rgo_jax import models as models
from rgo_jax import sharding as sharding
from rgo_jax._curvature import curvature_vectors as curvature_vectors
from rgo_jax._fast_curvature import batched_curvature_vectors as batched_curvature_vectors
from rgo_jax._fast_curvature import use_reduced_kernel_gradients as use_reduced_kernel_gradients
from rgo_jax._fel import FEL as FEL
from rgo_jax._fel import FELKey as FELKey
from rgo_jax._fel import LinenFEL as LinenFEL
from rgo_jax._fel import fel_permutation as fel_permutation
from rgo_jax._fel import permute_features as permute_features
from rgo_jax._input_projection import input_projection_matrices as input_projection_matrices
from rgo_jax._input_projection import projected_matmul as projected_matmul
from rgo_jax._input_projection import rgo_input_projected as rgo_input_projected
from rgo_jax._input_projection import (
    scale_by_rgo_input_projected as scale_by_rgo_input_projected,
)
from rgo_jax._input_projection import use_input_projection as use_input_projection
from rgo_jax._layout import MatrixLayout as MatrixLayout
from rgo_jax._report import SCENARIO as SCENARIO
from rgo_jax._report import format_matrix as format_matrix
from rgo_jax._report import format_summary as format_summary
from rgo_jax._report import markdown_table as markdown_table
from rgo_jax._report import merge_run_reports as merge_run_reports
from rgo_jax._report import plot_accuracy_matrix as plot_accuracy_matrix
from rgo_jax._report import plot_accuracy_per_task as plot_accuracy_per_task
from rgo_jax._report import summary_table as summary_table
from rgo_jax._report import write_json_atomic as write_json_atomic
from rgo_jax._report import write_run_report as write_run_report
from rgo_jax._report import write_text_atomic as write_text_atomic
from rgo_jax._rls import rls_block as rls_block
from rgo_jax._rls import rls_sequential as rls_sequential
from rgo_jax._rls import rls_step as rls_step
from rgo_jax._transform import DEFAULT_ALPHA as DEFAULT_ALPHA
from rgo_jax._transform import RGOState as RGOState
from rgo_jax._transform import consolidate as consolidate
from rgo_jax._transform import map_rgo_states as map_rgo_states
from rgo_jax._transform import rgo as rgo
from rgo_jax._transform import rgo_states as rgo_states
from rgo_jax._transform import scale_by_rgo as scale_by_rgo
from rgo_jax._transform import update_projection as update_projection

__version__ = "0.1.0"
