"""Task-boundary checkpoints (Orbax) so that an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rgo_jax.bench._report import write_json_atomic

__all__ = ["latest_checkpoint", "restore_checkpoint", "save_checkpoint"]

_META = "meta.json"


def _ocp():
    import orbax.checkpoint as ocp  # noqa: PLC0415  (optional dependency, imported lazily)

    return ocp


def save_checkpoint(directory: str | Path, state: Any, meta: dict) -> Path:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``directory``.

    The arrays are written by Orbax; the checkpoint counts as complete only once
    ``meta.json`` exists (written atomically last), so a run killed while saving leaves an
    incomplete directory that :func:`latest_checkpoint` ignores. Zero-size leaves (the
    placeholders of unprojected parameters) are not stored: they are rebuilt from the
    template at restore time.
    """
    ocp = _ocp()
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    leaves = jax.tree.leaves(state)
    arrays = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves) if np.size(x) > 0}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((directory / "arrays").absolute(), arrays)
    ckptr.wait_until_finished()
    write_json_atomic(directory / _META, {**meta, "num_leaves": len(leaves)})
    return directory


def latest_checkpoint(root: str | Path, prefix: str = "task_") -> tuple[Path, dict] | None:
    """The complete checkpoint with the highest task number under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    best = None
    for d in root.glob(f"{prefix}*"):
        meta_path = d / _META
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if best is None or meta["task"] > best[1]["task"]:
            best = (d, meta)
    return best


def restore_checkpoint(directory: str | Path, template: Any) -> Any:
    """Restores a state saved by :func:`save_checkpoint` into the structure of ``template``."""
    ocp = _ocp()
    directory = Path(directory)
    meta = json.loads((directory / _META).read_text())
    leaves, treedef = jax.tree.flatten(template)
    if meta["num_leaves"] != len(leaves):
        raise ValueError(
            f"Checkpoint {directory} holds {meta['num_leaves']} arrays but the run's state has "
            f"{len(leaves)}: it was written by a different configuration."
        )
    abstract = {
        f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        for i, x in enumerate(leaves)
        if np.size(x) > 0
    }
    restored = ocp.StandardCheckpointer().restore((directory / "arrays").absolute(), abstract)
    out = [restored.get(f"{i:05d}", x) for i, x in enumerate(leaves)]
    for i, (a, b) in enumerate(zip(out, leaves, strict=True)):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"Checkpoint {directory}: leaf {i} has shape {np.shape(a)}, expected {np.shape(b)}."
            )
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in out])
