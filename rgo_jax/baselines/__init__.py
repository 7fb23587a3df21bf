"""Continual-learning baselines for comparison with RGO, as Optax/JAX building blocks.

- OWM (:func:`scale_by_owm`, :func:`owm_update`): gradient projection by an RLS matrix of
  the layer inputs, updated every step.
- GPM (:func:`scale_by_gpm`, :func:`gpm_update_bases`): gradient projection off an SVD
  basis of the layer inputs, extended once per task.
- A-GEM (:func:`agem`, :func:`agem_project`): **uses memory** (replays stored examples).
- EWC and online EWC (:func:`ewc_loss`, :func:`ewc_penalty`, :func:`diagonal_fisher`,
  :func:`ewc_accumulate`): a quadratic penalty added to the loss.

Only A-GEM stores data; the others, like RGO, keep per-layer matrices or per-parameter
statistics.
"""

from rgo_jax.baselines._agem import AGEMState as AGEMState
from rgo_jax.baselines._agem import agem as agem
from rgo_jax.baselines._agem import agem_project as agem_project
from rgo_jax.baselines._ewc import EWCState as EWCState
from rgo_jax.baselines._ewc import diagonal_fisher as diagonal_fisher
from rgo_jax.baselines._ewc import ewc_accumulate as ewc_accumulate
from rgo_jax.baselines._ewc import ewc_loss as ewc_loss
from rgo_jax.baselines._ewc import ewc_penalty as ewc_penalty
from rgo_jax.baselines._gpm import GPMState as GPMState
from rgo_jax.baselines._gpm import gpm_update_bases as gpm_update_bases
from rgo_jax.baselines._gpm import scale_by_gpm as scale_by_gpm
from rgo_jax.baselines._owm import OWMState as OWMState
from rgo_jax.baselines._owm import owm_update as owm_update
from rgo_jax.baselines._owm import scale_by_owm as scale_by_owm
