"""rgo_jax: Recursive Gradient Optimization for continual learning in JAX/Optax."""

from rgo_jax._fel import FEL as FEL
from rgo_jax._fel import FELKey as FELKey
from rgo_jax._fel import LinenFEL as LinenFEL
from rgo_jax._fel import fel_permutation as fel_permutation
from rgo_jax._fel import permute_features as permute_features

__version__ = "0.1.0"
