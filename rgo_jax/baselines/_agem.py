"""A-GEM: averaged gradient episodic memory (Chaudhry et al., 2019). USES MEMORY."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rgo_jax import _layout

__all__ = ["AGEMState", "EpisodicMemory", "agem", "agem_project"]


class AGEMState(NamedTuple):
    """State of :func:`agem`: counters only (the memory itself lives in :class:`EpisodicMemory`)."""

    count: jax.Array  # int32 [], updates with a reference gradient
    num_projected: jax.Array  # int32 [], of which violated <g, g_ref> >= 0 and were projected


def _by_path(tree: Any, what: str) -> tuple[list[str], list[jax.Array], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [_layout.path_str(p) for p, _ in flat]
    if len(set(names)) != len(names):
        raise ValueError(f"A-GEM: {what} has repeated parameter paths.")
    return names, [x for _, x in flat], treedef


def _tree_dot(a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
    hi = jax.lax.Precision.HIGHEST
    total = jnp.zeros([], jnp.float32)
    for x, y in zip(a, b, strict=True):
        total = total + jnp.dot(
            x.reshape(-1).astype(jnp.float32), y.reshape(-1).astype(jnp.float32), precision=hi
        )
    return total


def agem_project(grads: Any, ref_grads: Any) -> tuple[Any, jax.Array]:
    r"""A-GEM's projection of a gradient tree against a reference gradient tree.

    .. math::
        g' = g - \frac{g^\top g_{ref}}{g_{ref}^\top g_{ref}}\, g_{ref}
        \quad\text{if } g^\top g_{ref} < 0, \qquad g' = g \text{ otherwise,}

    with the dot products over the *whole* parameter tree (one constraint for the average
    loss on the memory, not one per layer). A zero ``g_ref`` leaves ``g`` unchanged.

    Args:
      grads: the gradient on the current batch.
      ref_grads: the gradient on a batch from the episodic memory, same parameter paths.

    Returns:
      ``(projected grads, violated)`` with ``violated`` a bool scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax.baselines import agem_project
      >>> g, v = agem_project({"w": jnp.array([1.0, -1.0])}, {"w": jnp.array([0.0, 1.0])})
      >>> g["w"].tolist(), bool(v)
      ([1.0, 0.0], True)
    """
    names, g, treedef = _by_path(grads, "grads")
    ref_names, r, _ = _by_path(ref_grads, "ref_grads")
    if names != ref_names:
        ref_by_name = dict(zip(ref_names, r, strict=True))
        missing = [n for n in names if n not in ref_by_name]
        if missing or len(ref_names) != len(names):
            raise ValueError(
                f"A-GEM: ref_grads do not match grads: missing {missing[:8]}, extra "
                f"{sorted(set(ref_names) - set(names))[:8]}."
            )
        r = [ref_by_name[n] for n in names]
    for n, x, y in zip(names, g, r, strict=True):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"A-GEM: ref_grads for '{n}' have shape {jnp.shape(y)}, grads {jnp.shape(x)}."
            )
    dot = _tree_dot(g, r)
    ref_sq = _tree_dot(r, r)
    violated = (dot < 0) & (ref_sq > 0)
    coef = jnp.where(violated, dot / jnp.where(ref_sq > 0, ref_sq, 1.0), 0.0)
    out = [x - (coef * y.astype(jnp.float32)).astype(x.dtype) for x, y in zip(g, r, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out), violated


def agem() -> optax.GradientTransformationExtraArgs:
    r"""A-GEM as a gradient transformation: projects ``g`` when it conflicts with ``g_ref``.

    **This method USES MEMORY: it replays stored examples of earlier tasks** (through the
    reference gradient), unlike RGO, OWM, GPM and EWC. Pair it with
    :class:`EpisodicMemory`.

    ``update(grads, state, ref_grads=g_ref)`` returns :func:`agem_project` of ``grads``,
    where ``g_ref`` is the gradient of the loss on a batch sampled from the episodic memory
    (each example with its own task's head/mask). Without ``ref_grads`` (the first task,
    empty memory) the gradient passes unchanged. Put it first in a chain so that it sees the
    raw gradients: ``optax.chain(agem(), optax.sgd(lr))``. With ``nnx.Optimizer``:
    ``optimizer.update(model, grads, ref_grads=ref)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; other extra arguments are ignored.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rgo_jax.baselines import agem
      >>> tx = optax.chain(agem(), optax.sgd(1.0))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update({"w": jnp.array([1.0, -1.0])}, state,
      ...                      ref_grads={"w": jnp.array([0.0, 1.0])})
      >>> u["w"].tolist(), int(state[0].num_projected)
      ([-1.0, -0.0], 1)

    References:
      Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient Lifelong Learning with A-GEM",
      ICLR 2019.
    """

    def init_fn(params):
        del params
        # Two buffers, not one: a step that donates its state would donate one twice.
        return AGEMState(count=jnp.zeros([], jnp.int32), num_projected=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, ref_grads=None, **extra_args):
        del params, extra_args
        if ref_grads is None:
            return updates, state
        updates, violated = agem_project(updates, ref_grads)
        return updates, AGEMState(
            count=state.count + 1,
            num_projected=state.num_projected + violated.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class EpisodicMemory:
    """A small episodic memory of ``(x, y)`` examples per task, with a fixed quota per task.

    **A method that uses this memory REPLAYS STORED DATA of earlier tasks** (A-GEM, or
    experience replay); RGO, OWM, GPM and EWC store no examples.

    Each task keeps at most ``per_task`` examples, chosen by

    - ``"reservoir"``: reservoir sampling over the task's stream (every example seen so far
      is kept with equal probability ``per_task / seen``), driven by a generator seeded by
      ``(seed, task)``, so a task's contents do not depend on the order of other tasks;
    - ``"ring"``: the last ``per_task`` examples (a ring buffer).

    Everything is NumPy on the host; contents are deterministic given the seed and the
    sequence of :meth:`add` calls.

    Args:
      per_task: the quota of examples per task (> 0).
      policy: ``"reservoir"`` (default) or ``"ring"``.
      seed: seed of the reservoir decisions.

    Examples:
      >>> import numpy as np
      >>> from rgo_jax.baselines import EpisodicMemory
      >>> mem = EpisodicMemory(per_task=3, seed=0)
      >>> mem.add(0, np.arange(10.0)[:, None], np.arange(10))
      >>> len(mem), mem.num_seen(0)
      (3, 10)
      >>> x, y, task = mem.sample(np.random.default_rng(0), 4)
      >>> x.shape, y.shape, task.tolist()
      ((4, 1), (4,), [0, 0, 0, 0])
    """

    def __init__(self, per_task: int, *, policy: str = "reservoir", seed: int = 0):
        if not isinstance(per_task, (int, np.integer)) or per_task < 1:
            raise ValueError(f"EpisodicMemory: per_task must be a positive int, got {per_task!r}.")
        if policy not in ("reservoir", "ring"):
            raise ValueError(
                f"EpisodicMemory: policy must be 'reservoir' or 'ring', got {policy!r}."
            )
        self.per_task = int(per_task)
        self.policy = policy
        self.seed = int(seed)
        self._x: dict[int, np.ndarray] = {}
        self._y: dict[int, np.ndarray] = {}
        self._size: dict[int, int] = {}
        self._seen: dict[int, int] = {}
        self._rng: dict[int, np.random.Generator] = {}

    @property
    def tasks(self) -> list[int]:
        """The tasks with at least one stored example, in increasing order."""
        return sorted(t for t, n in self._size.items() if n > 0)

    def __len__(self) -> int:
        return sum(self._size.values())

    def num_seen(self, task: int) -> int:
        """How many examples of ``task`` were offered to :meth:`add`."""
        return self._seen.get(int(task), 0)

    def task_data(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored ``(x, y)`` of ``task`` (copies, in slot order)."""
        task = int(task)
        if task not in self._size:
            raise KeyError(f"EpisodicMemory: no examples stored for task {task}.")
        n = self._size[task]
        return self._x[task][:n].copy(), self._y[task][:n].copy()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, stored examples, counters, RNG states.

        Plain Python containers and NumPy arrays (picklable; ``x``/``y`` per task as
        arrays), e.g. for a task-boundary checkpoint. Restore with :meth:`from_state_dict`.
        """
        return {
            "per_task": self.per_task,
            "policy": self.policy,
            "seed": self.seed,
            "tasks": {
                t: {
                    "x": self._x[t].copy(),
                    "y": self._y[t].copy(),
                    "size": self._size[t],
                    "seen": self._seen[t],
                    "rng": self._rng[t].bit_generator.state,
                }
                for t in self._x
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EpisodicMemory:
        """The memory saved by :meth:`state_dict`; it continues exactly as the original."""
        try:
            mem = cls(state["per_task"], policy=state["policy"], seed=state["seed"])
            for t, d in state["tasks"].items():
                t = int(t)
                x, y = np.asarray(d["x"]), np.asarray(d["y"])
                if x.shape[0] != mem.per_task or y.shape != (mem.per_task,):
                    raise ValueError(
                        f"task {t} stores {x.shape[0]} slots, expected per_task={mem.per_task}"
                    )
                mem._x[t], mem._y[t] = x.copy(), y.copy()
                mem._size[t], mem._seen[t] = int(d["size"]), int(d["seen"])
                mem._rng[t] = np.random.default_rng()
                mem._rng[t].bit_generator.state = d["rng"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"EpisodicMemory.from_state_dict: malformed state ({e!r}).") from e
        return mem

    def _check(self, x: np.ndarray, y: np.ndarray) -> None:
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"EpisodicMemory.add: x must be [n, ...] and y [n] with the same n, got x "
                f"{x.shape} and y {y.shape}."
            )
        for t, old in self._x.items():
            if old.shape[1:] != x.shape[1:] or old.dtype != x.dtype:
                raise ValueError(
                    f"EpisodicMemory.add: examples {x.dtype}{x.shape[1:]} differ from those of "
                    f"task {t} ({old.dtype}{old.shape[1:]}); all tasks must share one shape."
                )
            if self._y[t].dtype != y.dtype:
                raise ValueError(
                    f"EpisodicMemory.add: labels {y.dtype} differ from those of task {t} "
                    f"({self._y[t].dtype})."
                )
            break

    def add(self, task: int, x: Any, y: Any) -> None:
        """Offers a batch ``x [n, ...]``, ``y [n]`` of ``task`` to the memory."""
        task = int(task)
        x, y = np.asarray(x), np.asarray(y)
        self._check(x, y)
        if task not in self._x:
            self._x[task] = np.zeros((self.per_task, *x.shape[1:]), x.dtype)
            self._y[task] = np.zeros((self.per_task,), y.dtype)
            self._size[task] = 0
            self._seen[task] = 0
            self._rng[task] = np.random.default_rng([self.seed, task])
        xs, ys, q = self._x[task], self._y[task], self.per_task
        size, seen = self._size[task], self._seen[task]
        for i in range(x.shape[0]):
            if size < q:
                slot = size
                size += 1
            elif self.policy == "ring":
                slot = seen % q
            else:
                j = int(self._rng[task].integers(0, seen + 1))
                slot = j if j < q else -1
            if slot >= 0:
                xs[slot], ys[slot] = x[i], y[i]
            seen += 1
        self._size[task], self._seen[task] = size, seen

    def sample(
        self,
        rng: np.random.Generator | int,
        batch_size: int,
        *,
        tasks: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch ``(x, y, task)`` drawn uniformly from the stored examples.

        Without replacement when enough examples are stored, with replacement otherwise, so
        the batch always has ``batch_size`` rows (static shapes for a jitted step).

        Args:
          rng: a NumPy ``Generator`` or an int seed.
          batch_size: rows of the batch (> 0).
          tasks: restrict to these tasks (e.g. the tasks before the current one); default
            all stored tasks.

        Returns:
          ``x [b, ...]``, ``y [b]`` and ``task [b]`` (int32).
        """
        if batch_size < 1:
            raise ValueError(
                f"EpisodicMemory.sample: batch_size must be positive, got {batch_size}."
            )
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        chosen = self.tasks if tasks is None else sorted({int(t) for t in tasks})
        chosen = [t for t in chosen if self._size.get(t, 0) > 0]
        if not chosen:
            raise ValueError(
                f"EpisodicMemory.sample: no stored examples for tasks {tasks!r} "
                f"(stored: {self.tasks})."
            )
        sizes = np.array([self._size[t] for t in chosen])
        total = int(sizes.sum())
        idx = rng.choice(total, size=batch_size, replace=total < batch_size)
        owner = np.searchsorted(np.cumsum(sizes), idx, side="right")
        slot = idx - np.concatenate([[0], np.cumsum(sizes)[:-1]])[owner]
        task_ids = np.asarray(chosen)[owner]
        x = np.stack([self._x[t][s] for t, s in zip(task_ids, slot, strict=True)])
        y = np.array([self._y[t][s] for t, s in zip(task_ids, slot, strict=True)])
        return x, y, task_ids.astype(np.int32)
