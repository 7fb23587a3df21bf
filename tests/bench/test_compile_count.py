"""The harness compiles each function once: nothing is recompiled for a later task.

XLA compilations are counted with the harness's own profile (a ``jax.monitoring``
listener, attributed to the phase and task in which they happen).
"""

from __future__ import annotations

import collections
import json
import time

import numpy as np
import pytest

from rgo_jax.bench import _profile, train
from tests.helpers import no_persistent_compilation_cache


def _compiles_by_task(cfg: train.Config, workdir) -> tuple[dict, collections.Counter]:
    """``{task: [compiled function names]}`` and the count of each function over the run."""
    _profile.start()
    try:
        with no_persistent_compilation_cache():
            train.run(cfg, workdir, log=lambda *a: None, progress=False)
    finally:
        _profile.finish(workdir)
    table = json.loads((workdir / "profile.json").read_text())
    by_task: dict = collections.defaultdict(list)
    for p in table["phases"]:
        by_task[p["task"]] += p["compiled"]
    counts = collections.Counter(
        c["function"] for c in table["compiles"] for _ in range(c["count"])
    )
    return by_task, counts


@pytest.mark.slow
def test_tasks_after_the_first_compile_nothing(tmp_path):
    # A class split of the digits: its tasks differ in training and test-set size (e.g.
    # 434/430/432 and 108/107/109 examples), which recompiled the training chunk at every
    # task and the evaluation once per test-set size. With checkpoints and the report on.
    # Two methods on one network (both with FEL): they share its compiled evaluation.
    cfg = train.Config(
        benchmark="split_digits",
        methods=("rgo", "rgo-alpha1"),
        hidden=(8,),
        num_tasks=3,
        steps_per_task=10,
        chunk_steps=10,
        consolidation_batches=4,
        vector_chunk=4,
        plots=False,
    )
    stream = train.build_stream(cfg, 0)
    for split in ("train", "test"):  # the premise: tasks of different sizes
        assert len({len(stream.get_split(j, split)[1]) for j in range(3)}) > 1
    train._correct_fn.cache_clear()  # no evaluation compiled by an earlier test
    by_task, counts = _compiles_by_task(cfg, tmp_path / "run")
    assert by_task[1] == [] and by_task[2] == [], {t: v for t, v in by_task.items() if t}
    assert counts["jit(correct)"] == 1  # one evaluation shape, for both methods
    assert counts["jit(single)"] == 2  # one training chunk per method
    # the RLS update compiled ahead (in the background) is the program the task's end runs
    assert counts["jit(_update_projection_program)"] == 1
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_evaluation_pads_to_one_shape_and_counts_only_real_rows():
    shapes = []

    def correct(params, x, y, mask, task):  # counts the rows whose label is x's first entry
        shapes.append((x.shape, y.shape))
        return np.sum(x[:, 0] == y)

    x = np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.array([0, 1, 9, 3, 9, 5, 6])  # rows 2 and 4 wrong: 5 of 7 right
    mask = np.ones(10, bool)
    assert train._evaluate(correct, None, x, y, mask, 0, 3) == pytest.approx(5 / 7)
    assert shapes == [((3, 3), (3,))] * 3  # 7 rows in three batches of 3: the last padded
    x0 = np.zeros((2, 3), np.float32)  # padding rows are zeros labelled -1: never right
    assert train._evaluate(correct, None, x0, np.array([0, 0]), mask, 0, 4) == 1.0


def test_writer_keeps_order_and_raises_the_first_error():
    writer = train._Writer()
    done = []
    writer.submit(time.sleep, 0.05)
    writer.submit(done.append, 1)
    writer.submit(done.append, 2)

    def fail():
        raise OSError("disk full")

    writer.submit(fail)
    writer.submit(done.append, 3)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert done == [1, 2, 3]
