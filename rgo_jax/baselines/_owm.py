"""OWM: orthogonal weights modification (Zeng et al., 2019)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rgo_jax import _layout, _rls, _transform
from rgo_jax import _matrices as _common

__all__ = ["OWMState", "owm_update", "scale_by_owm"]


class OWMState(NamedTuple):
    """State of :func:`scale_by_owm`: one OWM projector P per projected parameter."""

    p: Any
    """Tree like params: ``[*batch, d, d]`` per projected leaf, ``optax.MaskedNode()``
    otherwise."""
    count: jax.Array  # int32 [], owm_update calls absorbed
    skipped: jax.Array  # int32 [], non-finite input vectors skipped (P left unchanged)


def scale_by_owm(
    layout: _layout.LayoutSpec = None,
    *,
    project_biases: bool = False,
    init_scale: float = 1.0,
    dtype: Any = None,
    input_projected: str | Callable[[str], bool] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Projects each gradient by its layer's OWM projector ``P`` (no trace normalisation).

    For a parameter viewed as ``G [d, m]`` with ``d`` its input dimension (dense
    ``[in, out]``: ``in``; HWIO conv: ``kh*kw*cin``; see :mod:`rgo_jax.layouts`) the update
    is :math:`\hat G = P G`, exactly the reference code's ``grad @ P.T`` in PyTorch's
    ``[out, in]`` layout. ``P`` starts at ``init_scale * I`` and absorbs the batch-mean layer
    input ``r`` of every training step by the RLS recursion (the shared kernel
    :func:`rgo_jax.rls_sequential`), see :func:`owm_update`:

    .. math::  P \leftarrow P - \frac{(P r)(P r)^\top}{\alpha + r^\top P r} .

    With ``P_0 = c I`` and a constant ``alpha = a`` this gives
    ``P = (I / c + \sum_t r_t r_t^\top / a)^{-1} = a (a/c\, I + \sum_t r_t r_t^\top)^{-1}``.
    The two published forms are both reachable:

    - the authors' PyTorch code: ``P_0 = I`` (``init_scale=1``, the default) and a per-layer
      ``alpha`` that decays during each task (e.g. ``alpha_l = a_l * b_l ** progress``),
      passed to :func:`owm_update` per step; P is updated *before* projecting the step's
      gradient (pass ``owm_inputs=`` to ``update`` for that order);
    - ``P_0 = I / alpha`` with a unit denominator (the authors' earlier ``OWMLayer`` code):
      ``scale_by_owm(init_scale=1 / alpha)`` and ``owm_update(..., alpha=1.0)``, giving
      ``P = (alpha I + sum r r^T)^{-1}``. It differs from the PyTorch form with the same
      constant ``alpha`` only by the factor ``alpha`` (a learning-rate scale).

    OWM stores no data. Task boundaries need no action: P simply keeps absorbing inputs.

    Input-side projection (``input_projected=``, the mechanism of
    :func:`rgo_jax.scale_by_rgo`'s): a dense kernel's gradient is ``G = X^T D`` (layer input
    ``X [B, d]``, output cotangent ``D [B, m]``), so ``P G = (P X^T) D``, which costs
    ``2 B d^2 + 2 B d m`` FLOPs instead of ``2 d^2 m`` (the paper's MLP at batch 10: ~17x
    fewer). The selected kernels' P are marked in the state; the *layer* projects their
    gradient inside its backward pass (compute the loss under
    :func:`rgo_jax.nnx.use_input_projection`, or with
    ``rgo_jax.projected_matmul(..., trace_normalised=False)``) and ``update`` passes it
    through. OWM projects with the P that has absorbed the step's inputs, so absorb them
    with :func:`owm_update` *before* computing the gradient; ``update(owm_inputs=...)`` is
    then refused (it would absorb after the layers had projected)::

      state = owm_update(state, inputs, alpha)   # inputs of this batch
      grads = grad(loss_under_use_input_projection)(params, state)
      updates, state = tx.update(grads, state)   # the same update as the plain order

    Two ways to absorb a step's inputs:

    - ``tx.update(grads, state, owm_inputs=inputs, owm_alpha=alpha)``: P absorbs ``inputs``
      first, then projects (the reference order); works through ``optax.chain`` and
      ``nnx.Optimizer.update(model, grads, owm_inputs=..., owm_alpha=...)``. Also accepts
      ``owm_batch_size`` (see :func:`owm_update`; must be a Python int).
    - :func:`owm_update` on the state, before or after ``update``.

    Args:
      layout: which leaves get a P and how they are viewed as matrices, as in
        :func:`rgo_jax.scale_by_rgo` (``None``: 2-D dense, 4-D HWIO conv; a callable
        ``(path, leaf) -> layout``; or a tree of layouts).
      project_biases: with the default rule, give 1-D leaves (biases) a ``[1, 1]`` P whose
        input is the constant 1 (a bias is a kernel row seen by the input 1). Default
        ``False``: biases are left unprojected (the reference layers are bias-free).
      init_scale: ``P_0 = init_scale * I``.
      dtype: storage dtype of P (``None``: float32); the RLS update runs in float32.
      input_projected: dense kernels whose gradient the layer projects (see above): a regex
        ``re.search``-ed against parameter paths (``r"kernel$"``) or a predicate
        ``path -> bool``. Each selected leaf must have the ``DENSE`` layout. ``None`` (the
        default): ``update`` projects every leaf.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; unknown extra arguments are ignored.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rgo_jax.baselines import owm_update, scale_by_owm
      >>> params = {"fc": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> tx = optax.chain(scale_by_owm(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> state[0].p["fc"]["kernel"].shape, state[0].p["fc"]["bias"]
      ((3, 3), MaskedNode())
      >>> inputs = {"fc/kernel": jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])}
      >>> state = owm_update(state, inputs, alpha=1.0)  # absorbs the mean input e_0
      >>> state[0].p["fc"]["kernel"][0].tolist()  # P = I - e_0 e_0^T / 2
      [0.5, 0.0, 0.0]

    References:
      Zeng, Chen, Cui & Yu, "Continual learning of context-dependent processing in neural
      networks", Nature Machine Intelligence 1, 364-372 (2019).
    """
    if not isinstance(init_scale, jax.core.Tracer) and not init_scale > 0:
        raise ValueError(f"scale_by_owm: init_scale must be positive, got {init_scale}.")
    dtype = jnp.float32 if dtype is None else dtype
    selected = None if input_projected is None else _transform._selector(input_projected)

    def init_fn(params):
        specs = _common.leaf_specs(params, layout, project_biases, bias_input=True)

        def make(spec):
            eye = init_scale * jnp.eye(spec.d, dtype=dtype)
            return jnp.broadcast_to(eye, (*spec.batch_shape, spec.d, spec.d))

        p = _common.init_matrices(params, specs, make, dtype)
        if selected is not None and not _common.is_params_stand_in(params):
            marked = _transform._input_projected_leaves(specs, selected, "OWM")
            mats = _common.projected(p)
            p = _common.with_projected(
                p, {name: _common.InputProjected(mats[name]) for name in marked}
            )
        # Two buffers, not one: a step that donates its state would donate one twice.
        zero = lambda: jnp.zeros([], jnp.int32)  # noqa: E731
        return OWMState(p=p, count=zero(), skipped=zero())

    def update_fn(
        updates,
        state,
        params=None,
        *,
        owm_inputs=None,
        owm_alpha=None,
        owm_batch_size=None,
        **extra_args,
    ):
        del params, extra_args
        if owm_inputs is not None:
            if selected is not None:
                raise ValueError(
                    "scale_by_owm(input_projected=...): owm_inputs= was given to update, but "
                    "the input-projected kernels' gradients were projected by their layers "
                    "with P before these inputs were absorbed. Absorb them with owm_update "
                    "before computing the gradient, and call update without owm_inputs."
                )
            if owm_alpha is None:
                raise ValueError("scale_by_owm: owm_inputs= was given without owm_alpha=.")
            state = owm_update(state, owm_inputs, owm_alpha, batch_size=owm_batch_size)
        specs = _common.leaf_specs(updates, layout, project_biases, bias_input=True)
        updates = _common.project_tree("OWM", updates, state.p, specs, jnp.matmul)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _owm_vectors(name: str, x: Any, p: jax.Array, batch_size: int | None) -> jax.Array:
    """The ``[n, *batch, d]`` RLS vectors of one leaf: batch means of its inputs."""
    batch_shape, d = p.shape[:-2], p.shape[-1]
    x = _common.check_input("owm_update", name, x, batch_shape, d)
    if batch_size is None:
        return jnp.mean(x, axis=-2)[None]
    rows = x.shape[-2]
    if rows % batch_size:
        raise ValueError(
            f"owm_update: the input for parameter '{name}' has {rows} rows, not a multiple of "
            f"batch_size={batch_size}."
        )
    x = x.reshape(*batch_shape, batch_size, rows // batch_size, d)
    v = jnp.mean(x, axis=-3)  # [*batch, L, d]: the batch mean at each of L positions
    return jnp.moveaxis(v, -2, 0)


@functools.partial(jax.jit, static_argnames=("batch_size", "method"))
def _absorb(
    state: OWMState, inputs: dict, alpha: Any, batch_size: int | None, method: str
) -> OWMState:
    matrices = _common.projected(state.p)
    names = list(matrices)
    new = {}
    skipped = state.skipped
    for name, p in matrices.items():
        x = inputs.get(name)
        if x is not None:
            v = _owm_vectors(name, x, p, batch_size)
        elif p.shape == (1, 1):  # a bias: its input is the constant 1
            v = jnp.ones((1, 1), jnp.float32)
        else:
            raise ValueError(
                f"owm_update: no input for projected parameter '{name}' (inputs have "
                f"{sorted(inputs)[:8]}); pass the layer input [rows, d] under this path."
            )
        d = p.shape[-1]
        a = jnp.asarray(_common.per_leaf(alpha, name, "owm_update alpha", names), jnp.float32)
        if a.shape != ():
            raise ValueError(f"owm_update: alpha for '{name}' must be a scalar, got {a.shape}.")
        pk = p.reshape(-1, d, d).astype(jnp.float32)
        vk = v.reshape(v.shape[0], -1, d).astype(jnp.float32)
        if method == "block" and vk.shape[0] > 1:
            pk, bad = _rls.rls_block(pk, vk, a)
        else:
            pk, bad = _rls.rls_sequential(pk, vk, a)
        new[name] = pk.reshape(p.shape).astype(p.dtype)
        skipped = skipped + jnp.sum(bad, dtype=jnp.int32)
    return OWMState(
        p=_common.with_projected(state.p, new),
        count=state.count + 1,
        skipped=skipped,
    )


def owm_update(
    state: Any,
    inputs: dict[str, Any],
    alpha: float | jax.Array | dict[str, float | jax.Array],
    *,
    batch_size: int | None = None,
    method: str = "sequential",
) -> Any:
    r"""Absorbs one training step's layer inputs into every OWM projector (jit-compiled).

    For each projected parameter, the batch mean ``r`` of its layer input is absorbed by the
    shared rank-one RLS kernel (:func:`rgo_jax.rls_sequential`):
    ``P <- P - (P r)(P r)^T / (alpha + r^T P r)``. A non-finite ``r`` is skipped (counted in
    ``skipped``), so a bad batch never corrupts P.

    Args:
      state: an :class:`OWMState`, or any optimizer state containing some (a chain), whose
        every :class:`OWMState` is updated.
      inputs: ``{path: [rows, d]}`` layer inputs keyed like :func:`rgo_jax.layouts.path_str`
        of the parameter (``"fc1/kernel"``, or the tuple ``("fc1", "kernel")`` as the models'
        ``return_inputs`` give): dense ``[B, in]``, conv im2col patches
        ``[B*H'*W', kh*kw*cin]`` (HWIO-flatten order); ``[*batch, rows, d]`` for a stacked
        layout. Extra keys are ignored. A projected bias needs no entry (input 1).
      alpha: the RLS denominator, a scalar or a dict ``path -> scalar`` covering every
        projected parameter (the reference code's per-layer schedule). May be traced.
      batch_size: ``None``: one vector per parameter, the mean over all rows. An int ``B``:
        the rows are read as ``[B, L, d]`` (batch-major, as an im2col of ``[B, H, W, C]``
        gives) and the ``L`` per-position batch means are absorbed in order, the reference
        code's treatment of conv layers (one RLS step per output position). Dense layers
        then have ``L = 1`` and are unaffected.
      method: ``"sequential"`` (rank-one steps in order, :func:`rgo_jax.rls_sequential`) or
        ``"block"`` (:func:`rgo_jax.rls_block`, the same P up to rounding; faster when
        ``batch_size`` gives many positions per step).

    Returns:
      The state with every P updated and ``count`` increased by one.
    """
    inputs = _common.path_keyed(inputs, "owm_update inputs")
    if isinstance(alpha, dict):
        alpha = _common.path_keyed(alpha, "owm_update alpha")
    _common.check_alpha(alpha, "OWM owm_update")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(
            f"owm_update: batch_size must be a positive Python int, got {batch_size!r}."
        )
    if method not in ("sequential", "block"):
        raise ValueError(f"owm_update: method must be 'sequential' or 'block', got {method!r}.")
    return _common.map_states(
        OWMState, lambda s: _absorb(s, inputs, alpha, batch_size, method), state, "owm_update"
    )
