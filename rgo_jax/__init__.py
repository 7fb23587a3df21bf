"""rgo_jax: Recursive Gradient Optimization for continual learning in JAX/Optax.

The optimizer (:func:`scale_by_rgo`, :func:`rgo`) projects each layer's gradient by a
trace-normalised matrix P built from earlier tasks' curvature (:func:`curvature_vectors`,
:func:`consolidate`); the feature encoding layer (:class:`FEL`) gives every task its own
permutation of the hidden features.

Submodules: :mod:`rgo_jax.layouts` (how a parameter is viewed as a matrix),
:mod:`rgo_jax.nnx` (Flax NNX helpers: fast curvature vectors, input-side projection),
:mod:`rgo_jax.sharding` (multi-device helpers), :mod:`rgo_jax.baselines` (OWM, GPM, A-GEM,
EWC). The benchmark harness is :mod:`rgo_jax.bench` (the ``bench`` extra); importing
``rgo_jax`` never loads it.
"""

from rgo_jax import baselines as baselines
from rgo_jax import layouts as layouts
from rgo_jax import nnx as nnx
from rgo_jax import sharding as sharding
from rgo_jax._curvature import curvature_vectors as curvature_vectors
from rgo_jax._fel import FEL as FEL
from rgo_jax._fel import FELKey as FELKey
from rgo_jax._fel import LinenFEL as LinenFEL
from rgo_jax._fel import fel_permutation as fel_permutation
from rgo_jax._fel import permute_features as permute_features
from rgo_jax._input_projection import projected_matmul as projected_matmul
from rgo_jax._layout import MatrixLayout as MatrixLayout
from rgo_jax._rls import rls_block as rls_block
from rgo_jax._rls import rls_sequential as rls_sequential
from rgo_jax._rls import rls_step as rls_step
from rgo_jax._transform import DEFAULT_ALPHA as DEFAULT_ALPHA
from rgo_jax._transform import RGOState as RGOState
from rgo_jax._transform import consolidate as consolidate
from rgo_jax._transform import rgo as rgo
from rgo_jax._transform import rgo_states as rgo_states
from rgo_jax._transform import scale_by_rgo as scale_by_rgo
from rgo_jax._transform import update_projection as update_projection

__version__ = "0.1.0"

__all__ = (
    "DEFAULT_ALPHA",
    "FEL",
    "FELKey",
    "LinenFEL",
    "MatrixLayout",
    "RGOState",
    "baselines",
    "consolidate",
    "curvature_vectors",
    "fel_permutation",
    "layouts",
    "nnx",
    "permute_features",
    "projected_matmul",
    "rgo",
    "rgo_states",
    "rls_block",
    "rls_sequential",
    "rls_step",
    "scale_by_rgo",
    "sharding",
    "update_projection",
)
