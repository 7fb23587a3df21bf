"""Data-parallel RGO training and a sharded consolidation across processes (``jax.distributed``).

Run one copy per process; each process feeds its own slice of every global batch, the P's
are sharded by rows over the devices of all processes, and process 0 writes the results::

    # two CPU processes on one machine (gloo collectives), 2 devices each:
    python benchmarks/multihost/dp_consolidate.py --processes 2 --process-id 0 --out run.npz &
    python benchmarks/multihost/dp_consolidate.py --processes 2 --process-id 1
    # the same computation in one process (4 devices), for comparison:
    python benchmarks/multihost/dp_consolidate.py --processes 1 --out ref.npz

On a TPU pod or a GPU cluster drop ``--cpu`` and the coordinator flags: ``jax.distributed
.initialize()`` reads them from the cluster environment (see the README, "Running across
hosts"). The numbers written are the trained parameters and the consolidated P's.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--coordinator", default="127.0.0.1:12355")
    ap.add_argument("--devices-per-process", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=None, help="npz written by process 0")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    per = args.devices_per_process or 4 // args.processes
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={per}"
    import jax

    if args.cpu and args.processes > 1:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception as e:  # noqa: BLE001  (reported to the caller, who may skip)
            print(f"GLOO_UNAVAILABLE: {type(e).__name__}: {e}", flush=True)
            return 3
    if args.processes > 1:
        jax.distributed.initialize(args.coordinator, args.processes, args.process_id)

    import numpy as np

    out = run(args.steps)
    if jax.process_index() == 0 and args.out:
        np.savez(args.out, **out)
    print(f"process {jax.process_index()}/{jax.process_count()}: done", flush=True)
    if args.processes > 1:
        jax.distributed.shutdown()
    return 0


def run(steps: int = 3) -> dict:
    """Trains ``steps`` data-parallel steps, then consolidates with row-sharded P's.

    Every process builds the same parameters and data (from fixed seeds) and contributes
    its own rows of each global batch. Returns the results as host NumPy arrays.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import rgo_jax
    from rgo_jax import sharding

    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(12, 16)) / 4, jnp.float32),
        "b1": jnp.zeros(16, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(16, 4)) / 4, jnp.float32),
    }
    x_all = rng.normal(size=(steps, 16, 12)).astype(np.float32)
    y_all = rng.integers(0, 4, size=(steps, 16)).astype(np.int32)
    v_all = {k: rng.normal(size=(8, v.shape[0])).astype(np.float32) for k, v in params.items()}

    def logits(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

    tx = rgo_jax.rgo(0.5)
    mesh = sharding.data_mesh()  # all devices of all processes
    n_proc, me = jax.process_count(), jax.process_index()
    batch = NamedSharding(mesh, P("data"))

    def global_batch(a):  # this process's rows of a global array sharded over "data"
        rows = a.shape[0] // n_proc
        return jax.make_array_from_process_local_data(batch, a[me * rows : (me + 1) * rows])

    with jax.set_mesh(mesh):
        state = tx.init(params)
        # A first task's consolidation, so that P != I during training.
        state = rgo_jax.consolidate(
            sharding.replicate_state(state, mesh),
            {k: global_batch(v) for k, v in v_all.items()},
            alpha=1.0,
        )
        state = sharding.shard_projection_rows(state, mesh, min_dim=12)  # 12 and 16 rows
        params = sharding.replicate_state(params, mesh)

        @jax.jit
        def step(params, state, x, y):
            g = jax.grad(loss)(params, x, y)
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

        for t in range(steps):
            params, state = step(params, state, global_batch(x_all[t]), global_batch(y_all[t]))
        # Task boundary: vectors of the global batch, P's stay row-sharded.
        vectors = {k: global_batch(v[::-1].copy()) for k, v in v_all.items()}
        state = rgo_jax.consolidate(state, vectors, alpha=1.0)
        p = rgo_jax.rgo_states(state)[0].p
        layout = {k: str(tuple(v.sharding.spec)) for k, v in p.items()}

    def gather(a):  # the global value of a (possibly cross-process) array, on every host
        return multihost_utils.process_allgather(a, tiled=True)

    out = {f"params/{k}": np.asarray(gather(v)) for k, v in params.items()}
    out.update({f"p/{k}": np.asarray(gather(v)) for k, v in p.items()})
    out["p_specs"] = np.asarray(sorted(f"{k}={v}" for k, v in layout.items()))
    out["processes"] = np.asarray(n_proc)
    return out


if __name__ == "__main__":
    sys.exit(main())
