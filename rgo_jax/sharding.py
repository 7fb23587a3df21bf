"""Multi-device helpers for RGO: data mesh, sharded batches, row-sharded P, state shardings."""

from rgo_jax._sharding import DATA_AXIS as DATA_AXIS
from rgo_jax._sharding import data_mesh as data_mesh
from rgo_jax._sharding import replicate_state as replicate_state
from rgo_jax._sharding import shard_batch as shard_batch
from rgo_jax._sharding import shard_projection_rows as shard_projection_rows
from rgo_jax._sharding import shardings_of as shardings_of
from rgo_jax._sharding import state_shardings as state_shardings
