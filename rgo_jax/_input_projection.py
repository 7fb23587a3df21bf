"""Layer products whose kernel cotangent is replaced: input-side projection, reduced vectors.

Both act inside a dense (or conv) layer's backward pass, where the layer input ``X [n, d]``
and the output cotangent ``D [n, m]`` are still separate (the kernel gradient is
``G = X^T D``). One custom VJP serves both; :mod:`rgo_jax.nnx` patches NNX layers with it.

- ``"projected"``: the cotangent is RGO's projected gradient ``(d / tr P) P X^T D``, formed
  as ``(P X^T) D`` when the batch ``n`` is smaller than the width ``m`` (``d^2 n + d n m``
  multiply-adds instead of ``d^2 m``; the paper's MLP: ``n = 10``, ``m = 256``). The
  optimizer then leaves those leaves alone (``scale_by_rgo(input_projected=...)``).
- ``"unscaled"``: the same product without the trace factor, ``P X^T D``: OWM's projected
  gradient (``scale_by_owm(input_projected=...)``).
- ``"reduced"``: the cotangent is ``broadcast(X^T D 1 / m)``, the kernel gradient already
  averaged over the output axis, which is all a curvature vector needs
  (:func:`rgo_jax.curvature_vectors` averages it again and gets the same vector): XLA never
  forms the ``[d, m]`` gradient per example. Such cotangents are *not* gradients.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rgo_jax import _transform

__all__ = ["projected_matmul"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def kernel_matmul(x, kernel, p, precision, mode):
    """``x @ kernel`` whose kernel cotangent is ``mode``'s (``"projected"``, ``"unscaled"``:
    P needed)."""
    return jnp.matmul(x, kernel, precision=precision)


def _km_fwd(x, kernel, p, precision, mode):
    return jnp.matmul(x, kernel, precision=precision), (x, kernel, p)


def _km_bwd(precision, mode, res, dy):
    x, kernel, p = res
    d, m = kernel.shape
    xs, dys = x.reshape(-1, d), dy.reshape(-1, m)
    dx = jnp.matmul(dy, kernel.T, precision=precision)
    if mode == "reduced":
        r = jnp.matmul(xs.T, jnp.mean(dys, axis=-1), precision=precision)  # [d]
        dk = jnp.broadcast_to(r[:, None], (d, m))
    else:
        pm = p.astype(xs.dtype)
        scaled = mode == "projected"
        scale = _transform.trace_scale(pm).astype(xs.dtype) if scaled else None
        if xs.shape[0] < m:  # input side: (s P X^T) D = (s X P^T)^T D
            # X P^T rather than P X^T: the same numbers, and measured faster on CPU.
            xp = jnp.matmul(xs * scale if scaled else xs, pm.T, precision=precision)
            dk = jnp.matmul(xp.T, dys, precision=precision)
        else:  # output side: s P (X^T D)
            dk = jnp.matmul(pm, jnp.matmul(xs.T, dys, precision=precision), precision=precision)
            dk = dk * scale if scaled else dk
    return dx.astype(x.dtype), dk.astype(kernel.dtype), jnp.zeros_like(p)


kernel_matmul.defvjp(_km_fwd, _km_bwd)


def _conv(x, k, conv_fn, kwargs):
    return conv_fn(x, k, **dict(kwargs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def reduced_conv(x, kernel, conv_fn, kwargs):
    """A convolution whose kernel cotangent is averaged over output channels (broadcast)."""
    return _conv(x, kernel, conv_fn, kwargs)


def _rc_fwd(x, kernel, conv_fn, kwargs):
    return _conv(x, kernel, conv_fn, kwargs), (x, kernel)


def _rc_bwd(conv_fn, kwargs, res, dy):
    x, kernel = res
    dn = jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, dict(kwargs).get("dimension_numbers")
    )
    k_out, y_feat = dn.rhs_spec[0], dn.out_spec[1]
    _, vjp_x = jax.vjp(lambda x: _conv(x, kernel, conv_fn, kwargs), x)
    (dx,) = vjp_x(dy)
    # Sum of the kernel gradient over output channels = the gradient of a one-channel conv
    # at the channel-summed cotangent (each output channel depends on its own filter only).
    k1 = jax.lax.slice_in_dim(kernel, 0, 1, axis=k_out)
    _, vjp_k = jax.vjp(lambda k: _conv(x, k, conv_fn, kwargs), k1)
    (dk1,) = vjp_k(jnp.sum(dy, axis=y_feat, keepdims=True))
    cout = kernel.shape[k_out]
    return dx, jnp.broadcast_to(dk1 / cout, kernel.shape).astype(kernel.dtype)


reduced_conv.defvjp(_rc_fwd, _rc_bwd)


def projected_matmul(
    x: jax.Array,
    kernel: jax.Array,
    p: jax.Array,
    *,
    precision: jax.lax.PrecisionLike = None,
    trace_normalised: bool = True,
) -> jax.Array:
    r"""``x @ kernel`` whose kernel gradient comes out RGO-projected.

    The forward value is ``x @ kernel``. In the backward pass the kernel's cotangent is

    .. math::  \frac{d}{\operatorname{tr} P}\, P X^\top D

    (``X = x`` reshaped to ``[n, d]``, ``D`` the output cotangent ``[n, m]``), computed as
    ``(P X^T) D`` when ``n < m`` and as ``P (X^T D)`` otherwise, whichever is cheaper; the
    cotangent of ``x`` is the ordinary ``D kernel^T``. ``P`` is a constant: its cotangent is
    zero (it changes only by consolidation). The trace is taken from ``P`` itself on every
    call (``O(d)``), so it can never be stale. NNX models get this for their dense layers
    from :func:`rgo_jax.nnx.use_input_projection`.

    Args:
      x: inputs ``[..., d]``.
      kernel: ``[d, m]``.
      p: the layer's RGO matrix ``[d, d]`` (any float dtype; used in ``x``'s dtype).
      precision: passed to the matrix products.
      trace_normalised: apply the factor ``d / tr P`` (RGO). ``False``: the cotangent is
        ``P X^T D`` (OWM's projection, :func:`rgo_jax.baselines.scale_by_owm`).

    Returns:
      ``x @ kernel``, shape ``[..., m]``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from rgo_jax import projected_matmul
      >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
      >>> p = jnp.diag(jnp.array([2.0, 1.0, 0.0]))  # d / tr P = 1
      >>> jax.grad(lambda w: projected_matmul(x, w, p).sum())(w)[:, 0].tolist()
      [4.0, 2.0, 0.0]
    """
    x, kernel, p = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(p)
    if kernel.ndim != 2:
        raise ValueError(f"projected_matmul: kernel must be [d, m], got shape {kernel.shape}.")
    d = kernel.shape[0]
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(
            f"projected_matmul: x of shape {x.shape} does not end in the kernel's input size {d}."
        )
    if p.shape != (d, d):
        raise ValueError(
            f"projected_matmul: P has shape {p.shape}, expected ({d}, {d}) for a kernel of "
            f"shape {kernel.shape}."
        )
    mode = "projected" if trace_normalised else "unscaled"
    return kernel_matmul(x, kernel, jax.lax.stop_gradient(p), precision, mode)


def reduced_matmul(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """``x @ kernel`` whose kernel cotangent is pre-averaged over the output axis."""
    return kernel_matmul(x, kernel, jnp.zeros((), x.dtype), precision, "reduced")
