"""Helpers for the reference models: im2col patches, parameter paths, layer-input recording."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "ParamPath",
    "conv_patches",
    "param_path_str",
]

ParamPath = tuple[str | int, ...]
"""A parameter's path as in ``nnx.to_flat_state(nnx.state(model, nnx.Param))``."""


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int]:
    """Normalises an int (``None`` is 1) or a length-2 sequence of positive ints to a pair."""
    if value is None:
        value = 1
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    value = tuple(int(v) for v in value)
    if len(value) != 2 or any(v < 1 for v in value):
        raise ValueError(f"conv_patches: {name} must be a positive int or a pair, got {value}.")
    return value  # type: ignore[return-value]


def _pads(padding: Any) -> str | list[tuple[int, int]]:
    """Accepts 'SAME', 'VALID', an int, or two (low, high) pairs, like ``nnx.Conv``."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"conv_patches: padding must be 'SAME', 'VALID', an int or two (low, high) pairs, "
                f"got {padding!r}."
            )
        return padding.upper()
    if isinstance(padding, (int, np.integer)):
        return [(int(padding), int(padding))] * 2
    pads = [(p, p) if isinstance(p, (int, np.integer)) else tuple(p) for p in padding]
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        raise ValueError(f"conv_patches: cannot read padding {padding!r} for a 2-D convolution.")
    return [(int(lo), int(hi)) for lo, hi in pads]


def conv_patches(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: str | int | Sequence[Any] = "SAME",
) -> jax.Array:
    """The im2col matrix of a 2-D convolution's input, rows ordered like the HWIO kernel.

    ``jax.lax.conv_general_dilated_patches`` orders each patch channel-major
    (``cin, kh, kw``); this function reorders it to ``kh, kw, cin``, the order in which an
    HWIO kernel ``[kh, kw, cin, cout]`` flattens its first three axes. So, for a convolution
    without bias, ``conv(x) == (conv_patches(x, ...) @ kernel.reshape(-1, cout))`` reshaped
    to ``[B, H', W', cout]``. Padding follows ``jax.lax`` (as ``nnx.Conv`` does): ``'SAME'``
    pads ``total // 2`` before and the rest after.

    Args:
      x: input images ``[B, H, W, cin]`` (NHWC).
      kernel_size: ``kh`` and ``kw`` (an int for a square kernel).
      strides: the convolution's strides.
      padding: ``'SAME'``, ``'VALID'``, an int, or two ``(low, high)`` pairs.

    Returns:
      ``[B * H' * W', kh * kw * cin]``: one row per output position (batch-major, then row,
      then column), the patch values in ``(kh, kw, cin)`` order.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax.bench.models import conv_patches
      >>> x = jnp.arange(2 * 3 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 3, 2)
      >>> conv_patches(x, 2, padding="VALID").shape
      (8, 8)
      >>> conv_patches(x, 2, padding="VALID")[0].tolist()  # x[0, 0:2, 0:2, :] flattened
      [0.0, 1.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0]
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"conv_patches expects NHWC images [B, H, W, C], got shape {x.shape}.")
    kh, kw = _pair(kernel_size, "kernel_size")
    strides = _pair(strides, "strides")
    pads = _pads(padding)
    cin = x.shape[-1]
    patches = jax.lax.conv_general_dilated_patches(
        x,
        (kh, kw),
        strides,
        pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    b, ho, wo, _ = patches.shape
    patches = patches.reshape(b, ho, wo, cin, kh, kw).transpose(0, 1, 2, 4, 5, 3)
    return patches.reshape(b * ho * wo, kh * kw * cin)


def param_path_str(path: Sequence[Any]) -> str:
    """Writes a parameter path as ``"stages/0/1/conv1/kernel"``.

    Accepts the tuples of ``str``/``int`` used by ``nnx.to_flat_state`` (and by the models'
    ``return_inputs`` dictionaries) as well as ``jax.tree_util`` key paths (``DictKey``,
    ``SequenceKey``, ``GetAttrKey``, ``FlattenedIndexKey``). A trailing
    ``GetAttrKey('value')``, which ``jax.tree_util`` adds inside an NNX ``Variable``, is
    dropped, so both spellings of one parameter give the same string.

    Examples:
      >>> from rgo_jax.bench.models import param_path_str
      >>> param_path_str(("stages", 0, 1, "conv1", "kernel"))
      'stages/0/1/conv1/kernel'
    """
    entries = list(path)
    if entries and isinstance(entries[-1], jax.tree_util.GetAttrKey):
        if entries[-1].name == "value":
            entries = entries[:-1]
    parts = []
    for entry in entries:
        if isinstance(entry, jax.tree_util.DictKey):
            entry = entry.key
        elif isinstance(entry, jax.tree_util.SequenceKey):
            entry = entry.idx
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            entry = entry.name
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            entry = entry.key
        if not isinstance(entry, (str, int, np.integer)):
            raise TypeError(f"param_path_str: cannot write path entry {entry!r} in {path!r}.")
        parts.append(str(entry))
    return "/".join(parts)


class InputRecorder:
    """Collects each Linear/Conv layer's input matrix during one forward pass (internal)."""

    def __init__(self) -> None:
        self._records: dict[int, tuple[nnx.Module, jax.Array]] = {}

    def add(self, layer: nnx.Module, matrix: jax.Array) -> None:
        if id(layer) in self._records:
            raise ValueError(
                f"return_inputs: layer {type(layer).__name__} was applied twice in one forward "
                "pass; its input matrix would be ambiguous."
            )
        self._records[id(layer)] = (layer, matrix)

    def by_path(self, model: nnx.Module) -> dict[ParamPath, jax.Array]:
        """Maps the recorded layers to their kernels' paths in ``model``, in forward order."""
        paths = {
            id(node): tuple(path)
            for path, node in nnx.iter_graph(model)
            if isinstance(node, (nnx.Linear, nnx.Conv))
        }
        out: dict[ParamPath, jax.Array] = {}
        for key, (layer, matrix) in self._records.items():
            if key not in paths:
                raise ValueError(
                    f"return_inputs: a {type(layer).__name__} layer used in the forward pass is "
                    "not an attribute of the model."
                )
            out[paths[key] + ("kernel",)] = matrix
        return out


def dense(layer: nnx.Linear, x: jax.Array, rec: InputRecorder | None) -> jax.Array:
    """Applies ``layer`` to ``x`` ``[B, in]``, recording ``x`` when ``rec`` is given."""
    if rec is not None:
        rec.add(layer, x)
    return layer(x)


def conv(layer: nnx.Conv, x: jax.Array, rec: InputRecorder | None) -> jax.Array:
    """Applies ``layer`` to NHWC ``x``, recording its im2col patches when ``rec`` is given."""
    if rec is not None:
        if layer.feature_group_count != 1 or layer.kernel_dilation not in (1, (1, 1)):
            raise ValueError("return_inputs supports plain convolutions only (no groups/dilation).")
        if layer.input_dilation not in (1, (1, 1)):
            raise ValueError("return_inputs supports plain convolutions only (no input dilation).")
        rec.add(layer, conv_patches(x, layer.kernel_size, layer.strides, layer.padding))
    return layer(x)
