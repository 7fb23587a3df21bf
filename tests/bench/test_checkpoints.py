"""Checkpoint integrity: checksums written with every checkpoint, verified on restore, and a
run that meets a corrupt checkpoint resumes from the previous good task."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from rgo_jax.bench import _checkpoint as ckpt
from rgo_jax.bench import train

STATE = {
    "p": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32),
    "b": jnp.arange(5, dtype=jnp.int32),
    "empty": jnp.zeros((0, 3)),
}


def _save(tmp_path, name="task_000", task=0, scale=1.0):
    state = {**STATE, "p": STATE["p"] * scale}
    return ckpt.save_checkpoint(tmp_path / name, state, {"task": task, "R": [[0.5]]})


def _largest_file(directory):
    files = [p for p in (directory / "arrays").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_middle_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_round_trip_and_recorded_checksums(tmp_path):
    d = _save(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    sums = meta["checksums"]
    assert sums["algorithm"] == "sha256" and "arrays/" in sums["covers"]
    on_disk = {p.relative_to(d).as_posix() for p in (d / "arrays").rglob("*") if p.is_file()}
    assert set(sums["files"]) == on_disk
    out = ckpt.restore_checkpoint(d, STATE)
    np.testing.assert_array_equal(np.asarray(out["p"]), np.asarray(STATE["p"]))
    np.testing.assert_array_equal(np.asarray(out["b"]), np.arange(5))
    assert out["empty"].shape == (0, 3)


def test_one_flipped_byte_is_an_error_naming_the_file(tmp_path):
    d = _save(tmp_path)
    victim = _largest_file(d)
    _flip_middle_byte(victim)
    with pytest.raises(ckpt.CheckpointError, match=str(victim.relative_to(tmp_path))):
        ckpt.restore_checkpoint(d, STATE)


def test_another_tasks_arrays_copied_in_are_refused(tmp_path):
    a = _save(tmp_path, "task_000", 0)
    b = _save(tmp_path, "task_001", 1, scale=2.0)
    shutil.rmtree(b / "arrays")
    shutil.copytree(a / "arrays", b / "arrays")
    with pytest.raises(ckpt.CheckpointError, match="task_001"):
        ckpt.restore_checkpoint(b, STATE)


def test_another_tasks_whole_folder_copied_in_is_refused(tmp_path):
    a = _save(tmp_path, "task_000", 0)
    shutil.copytree(a, tmp_path / "task_001")
    with pytest.raises(ckpt.CheckpointError, match="holds the checkpoint of task 0, not of task 1"):
        ckpt.verify_checkpoint(tmp_path / "task_001")


def test_an_edited_meta_json_is_refused(tmp_path):
    d = _save(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["R"] = [[0.99]]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="meta.json"):
        ckpt.verify_checkpoint(d)


@pytest.mark.parametrize(
    "meta, message",
    [({"R": [[0.5]], "num_leaves": 3}, "'task'"), ({"task": 0, "num_leaves": 3, "R": None}, "'R'")],
)
def test_a_meta_json_without_task_or_with_null_R_names_the_file(tmp_path, meta, message):
    d = tmp_path / "task_000"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=message) as err:
        ckpt.restore_checkpoint(d, STATE)
    assert "meta.json" in str(err.value)


def test_checkpoints_without_checksums_still_restore(tmp_path):
    d = _save(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    del meta["checksums"]  # as written before checksums existed
    (d / "meta.json").write_text(json.dumps(meta))
    out = ckpt.restore_checkpoint(d, STATE)
    np.testing.assert_array_equal(np.asarray(out["p"]), np.asarray(STATE["p"]))


def test_latest_good_checkpoint_moves_a_corrupt_one_aside(tmp_path):
    _save(tmp_path, "task_000", 0)
    bad = _save(tmp_path, "task_001", 1)
    _flip_middle_byte(_largest_file(bad))
    lines = []
    found = ckpt.latest_good_checkpoint(tmp_path, log=lines.append)
    assert found is not None and found[0].name == "task_000" and found[1]["task"] == 0
    assert (tmp_path / "task_001.corrupt").is_dir() and not bad.exists()
    assert len(lines) == 1 and "task_001" in lines[0] and "previous good task" in lines[0]


# SGD: the integrity check does not depend on the method (the unit tests above cover
# arbitrary arrays), and it compiles in a fraction of RGO's time.
QUICK = dict(
    benchmark="permuted_digits",
    methods=("sgd",),
    num_tasks=2,
    steps_per_task=20,
    chunk_steps=20,
    consolidation_batches=10,
    hidden=(32,),
    plots=False,
)


@pytest.mark.slow
def test_a_run_resumes_from_the_task_before_a_corrupt_checkpoint(tmp_path):
    cfg = train.Config(**QUICK)
    quiet = dict(log=lambda *a: None)
    full = train.run(cfg, tmp_path / "full", **quiet)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    seed_dir = part / "checkpoints" / "sgd" / "seed0"
    _flip_middle_byte(_largest_file(seed_dir / "task_001"))
    lines = []
    out = train.run(cfg, part, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "task_001" in text and "corrupt" in text and "resumed after task 0" in text
    np.testing.assert_array_equal(out["matrices"]["sgd"][0], full["matrices"]["sgd"][0])
    assert (seed_dir / "task_001.corrupt").is_dir()
    ckpt.verify_checkpoint(seed_dir / "task_001")  # rewritten, good
