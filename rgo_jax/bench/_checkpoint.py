"""Task-boundary checkpoints (Orbax) so that an interrupted run resumes where it stopped.

Every checkpoint records in its ``meta.json`` the SHA-256 of each file Orbax wrote under
``arrays/``, a SHA-256 of the restored array values (dtype, shape and bytes of every leaf,
in order) and a SHA-256 of the metadata itself, and :func:`restore_checkpoint` verifies all
three: a flipped byte, a truncated file, another task's arrays copied into the folder or an
edited ``meta.json`` is a :class:`CheckpointError` naming the file. The harness resumes
from the newest checkpoint that verifies (:func:`latest_good_checkpoint`): a corrupt one
is renamed ``<name>.corrupt`` (kept for inspection, never read again), a message names it,
and the run retrains from the previous good task. Checkpoints written before checksums
existed carry none and are restored unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rgo_jax.bench._report import to_jsonable, write_json_atomic
from rgo_jax.bench._validate import RunError

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "latest_good_checkpoint",
    "prune_checkpoints",
    "restore_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

_META = "meta.json"
_ARRAYS = "arrays"
_CHECKSUMS = "checksums"
_COVERS = (
    "files: SHA-256 of every file under arrays/ (Orbax's data and metadata), by path "
    "relative to the checkpoint folder; arrays: SHA-256 over the leaves in order of each "
    "leaf's dtype, shape and C-order bytes; meta: SHA-256 of this meta.json without the "
    "'meta' entry, as sorted-key compact JSON"
)


class CheckpointError(RunError):
    """A checkpoint failed verification (names the folder and the file)."""


def _ocp():
    import orbax.checkpoint as ocp  # noqa: PLC0415  (optional dependency, imported lazily)

    return ocp


def _file_digests(directory: Path) -> dict[str, str]:
    from rgo_jax.bench.data._download import sha256_file  # noqa: PLC0415

    root = directory / _ARRAYS
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _arrays_digest(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for x in arrays:
        x = np.ascontiguousarray(x)
        digest.update(f"{x.dtype.str}{x.shape};".encode())
        digest.update(x.tobytes())
    return digest.hexdigest()


def _meta_digest(meta: dict) -> str:
    body = dict(meta)
    body[_CHECKSUMS] = {k: v for k, v in meta[_CHECKSUMS].items() if k != "meta"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(directory: str | Path, state: Any, meta: dict) -> Path:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``directory``.

    The arrays are written by Orbax; the checkpoint counts as complete only once
    ``meta.json`` exists (written atomically last), so a run killed while saving leaves an
    incomplete directory that :func:`latest_checkpoint` ignores. Zero-size leaves (the
    placeholders of unprojected parameters) are not stored: they are rebuilt from the
    template at restore time. ``meta.json`` gets a ``checksums`` entry (see the module
    docstring) that :func:`verify_checkpoint` checks.
    """
    ocp = _ocp()
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    leaves = jax.tree.leaves(state)
    arrays = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves) if np.size(x) > 0}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((directory / _ARRAYS).absolute(), arrays)
    ckptr.wait_until_finished()
    full = to_jsonable(
        {
            **meta,
            "num_leaves": len(leaves),
            _CHECKSUMS: {
                "algorithm": "sha256",
                "covers": _COVERS,
                "files": _file_digests(directory),
                "arrays": _arrays_digest(list(arrays.values())),
            },
        }
    )
    full[_CHECKSUMS]["meta"] = _meta_digest(full)
    write_json_atomic(directory / _META, full)
    return directory


def _read_meta(directory: Path) -> dict:
    path = directory / _META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}).") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a JSON object.")
    for key, kind in (("task", int), ("num_leaves", int)):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), kind):
            raise CheckpointError(
                f"{path}: {key!r} is missing or not an integer (got {meta.get(key)!r})."
            )
    if "R" in meta and not isinstance(meta["R"], list):
        raise CheckpointError(f"{path}: 'R' must be a list of rows, got {meta['R']!r}.")
    return meta


def verify_checkpoint(directory: str | Path) -> dict:
    """Checks a checkpoint's files against the checksums in its ``meta.json``.

    Args:
      directory: a folder written by :func:`save_checkpoint`.

    Returns:
      The metadata (unchanged).

    Raises:
      CheckpointError: naming the file: ``meta.json`` missing, unreadable, edited or
        lacking ``task``/``num_leaves``, or of another task than the folder's name
        (``task_003``) says; a file under ``arrays/`` missing, added or with another
        SHA-256 (e.g. one flipped byte, or another task's arrays copied in).

    Examples:
      >>> import os, tempfile, numpy as np
      >>> d = save_checkpoint(os.path.join(tempfile.mkdtemp(), "task_000"),
      ...                     {"p": np.eye(3, dtype=np.float32)}, {"task": 0})
      >>> verify_checkpoint(d)["task"]
      0
      >>> f = max((d / "arrays").rglob("*"), key=lambda p: p.is_file() and p.stat().st_size)
      >>> raw = bytearray(f.read_bytes()); raw[len(raw) // 2] ^= 1; _ = f.write_bytes(raw)
      >>> verify_checkpoint(d)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      rgo_jax.bench._checkpoint.CheckpointError: .../task_000/arrays/...: SHA-256 ... differs ...
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    number = directory.name.removeprefix("task_")
    if directory.name.startswith("task_") and number.isdigit() and int(number) != meta["task"]:
        raise CheckpointError(
            f"{directory / _META}: holds the checkpoint of task {meta['task']}, not of task "
            f"{int(number)} (copied from another folder?)."
        )
    sums = meta.get(_CHECKSUMS)
    if sums is None:  # written before checksums existed
        return meta
    if not isinstance(sums, dict) or not isinstance(sums.get("files"), dict):
        raise CheckpointError(f"{directory / _META}: malformed 'checksums' entry.")
    if sums.get("meta") != _meta_digest(meta):
        raise CheckpointError(
            f"{directory / _META}: its content does not match its own checksum (edited or "
            "corrupted)."
        )
    actual = _file_digests(directory)
    for name, expected in sums["files"].items():
        if name not in actual:
            raise CheckpointError(f"{directory / name}: missing from the checkpoint.")
        if actual[name] != expected:
            raise CheckpointError(
                f"{directory / name}: SHA-256 {actual[name]} differs from {expected} recorded "
                "when the checkpoint was written (corrupted, or copied from another checkpoint)."
            )
    extra = sorted(set(actual) - set(sums["files"]))
    if extra:
        raise CheckpointError(
            f"{directory / extra[0]}: not part of the checkpoint as written "
            f"({len(extra)} unexpected file(s); copied from another checkpoint?)."
        )
    return meta


def _candidates(root: Path, prefix: str) -> list[tuple[int, Path]]:
    """``(task, folder)`` of every folder with a ``meta.json`` naming a task, newest first."""
    found = []
    if not root.is_dir():
        return found
    for d in root.glob(f"{prefix}*"):
        meta_path = d / _META
        if not meta_path.is_file():
            continue
        try:
            task = json.loads(meta_path.read_text()).get("task")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            task = None
        try:
            task = int(d.name[len(prefix) :]) if task is None else task
        except ValueError:
            continue
        if isinstance(task, int) and not isinstance(task, bool):
            found.append((task, d))
    return sorted(found, key=lambda x: x[0], reverse=True)


def latest_checkpoint(root: str | Path, prefix: str = "task_") -> tuple[Path, dict] | None:
    """The complete checkpoint with the highest task number under ``root``, or None.

    Not verified; see :func:`latest_good_checkpoint`.
    """
    for _, d in _candidates(Path(root), prefix):
        try:
            return d, _read_meta(d)
        except CheckpointError:
            continue
    return None


def latest_good_checkpoint(
    root: str | Path, prefix: str = "task_", *, log: Callable[[str], Any] = print
) -> tuple[Path, dict] | None:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint`, or None.

    A checkpoint that fails is renamed ``<folder>.corrupt`` (so that it is kept for
    inspection and never picked again) and ``log`` gets one line naming it and the file
    at fault; the search goes on with the previous task.
    """
    for _, d in _candidates(Path(root), prefix):
        try:
            return d, verify_checkpoint(d)
        except CheckpointError as err:
            aside = d.with_name(d.name + ".corrupt")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(d, aside)
            log(
                f"rgo-bench: checkpoint {d} is corrupt and was moved to {aside.name}: {err} "
                "Resuming from the previous good task."
            )
    return None


def prune_checkpoints(root: str | Path, keep: int, prefix: str = "task_") -> list[Path]:
    """Deletes all but the ``keep`` highest-numbered checkpoints under ``root``.

    Folders set aside as ``.corrupt`` and anything else under ``root`` are left alone.

    Returns:
      The folders deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}.")
    found = [d for _, d in _candidates(Path(root), prefix) if d.name[len(prefix) :].isdigit()]
    gone = found[keep:]
    for d in gone:
        shutil.rmtree(d)
    return gone


def restore_checkpoint(directory: str | Path, template: Any) -> Any:
    """Restores a state saved by :func:`save_checkpoint` into the structure of ``template``.

    The checkpoint is verified first (:func:`verify_checkpoint`), and the restored values
    again against the recorded array checksum.

    Raises:
      CheckpointError: the checkpoint is corrupt (names the file).
      ValueError: it was written for a state of another structure or shape.
    """
    ocp = _ocp()
    directory = Path(directory)
    meta = verify_checkpoint(directory)
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
    restored = ocp.StandardCheckpointer().restore((directory / _ARRAYS).absolute(), abstract)
    expected = (meta.get(_CHECKSUMS) or {}).get("arrays")
    if expected is not None:
        values = [np.asarray(restored[k]) for k in sorted(abstract)]
        if _arrays_digest(values) != expected:
            raise CheckpointError(
                f"{directory / _ARRAYS}: the restored array values do not match the checksum "
                "recorded when the checkpoint was written."
            )
    out = [restored.get(f"{i:05d}", x) for i, x in enumerate(leaves)]
    for i, (a, b) in enumerate(zip(out, leaves, strict=True)):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"Checkpoint {directory}: leaf {i} has shape {np.shape(a)}, expected {np.shape(b)}."
            )
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in out])
