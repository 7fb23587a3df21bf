"""rgo_jax: Recursive Gradient Optimization for continual learning in JAX/Optax."""

from rgo_jax import layouts as layouts
from rgo_jax._curvature import curvature_vectors as curvature_vectors
from rgo_jax._fel import FEL as FEL
from rgo_jax._fel import FELKey as FELKey
from rgo_jax._fel import LinenFEL as LinenFEL
from rgo_jax._fel import fel_permutation as fel_permutation
from rgo_jax._fel import permute_features as permute_features
from rgo_jax._layout import MatrixLayout as MatrixLayout
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
