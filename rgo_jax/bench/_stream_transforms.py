"""Transforms of a task stream applied by the harness (the streams themselves are in
:mod:`rgo_jax.bench.data`)."""

from __future__ import annotations

import numpy as np

from rgo_jax.bench import data

__all__ = ["MultiHead"]


class MultiHead:
    """A stream whose tasks get disjoint output units: task ``t``'s labels move by ``t * C``.

    With the masked loss this is the multi-head setting (one head per task); for streams
    whose tasks already have disjoint classes (class splits) it changes nothing.
    """

    def __init__(self, stream: data.TaskStream):
        self.stream = stream
        classes = [stream.task_classes(t) for t in range(len(stream))]
        overlap = len(np.unique(np.concatenate(classes))) < sum(len(c) for c in classes)
        self.offset = stream.num_classes if overlap else 0
        self.num_classes = stream.num_classes + self.offset * (len(stream) - 1)
        self.input_shape = stream.input_shape

    def __len__(self):
        return len(self.stream)

    @property
    def meta(self) -> dict:
        """The wrapped stream's metadata (e.g. its tasks' ``train_sizes``)."""
        return self.stream.meta

    def class_masks(self) -> np.ndarray:
        masks = np.zeros((len(self), self.num_classes), bool)
        for t in range(len(self)):
            masks[t, self.stream.task_classes(t) + t * self.offset] = True
        return masks

    def get_split(self, t: int, split: str):
        x, y = self.stream.get_split(t, split)
        return x, y + np.int32(t * self.offset)
