"""Reference networks of the RGO paper in Flax NNX, with feature encoding layers (FEL).

All models take NHWC ``float32`` images (the MLP flattens whatever it gets), have ReLU
activations, no batch norm and no dropout (the RGO networks have neither), and a single
shared linear head returning raw, unmasked logits ``[B, num_classes]``; masking the logits
of classes outside the current task is the training loop's business.

Every model is called as ``model(x, task, *, return_inputs=False)``. ``task`` is the task
id, a Python int or an integer scalar array (it may be traced under ``jax.jit``/``nnx.jit``:
no Python branching depends on it). A FEL (a fixed, task-keyed permutation of the feature
axis, see :class:`rgo_jax.FEL`) sits after every hidden nonlinearity; the FEL sites are
numbered ``0, 1, 2, ...`` in forward order and each uses that number as its layer id, so
distinct sites permute differently. Task 0 sees the identity. With ``fel=False`` (the
paper's RGO-2 ablation) no permutation is applied anywhere and the FEL modules are not
created, but the parameters (and, for one ``rngs`` seed, their values) are identical.

Layers are ``nnx.Linear`` (kernel ``[in, out]``) and ``nnx.Conv`` (kernel HWIO
``[kh, kw, cin, cout]``), all with biases and Flax's default initialisers: kernels
LeCun-normal (truncated normal, variance ``1 / fan_in``), biases zero.
:func:`initialize` redraws them from another framework's defaults (:data:`INIT_SCHEMES`).

``return_inputs=True`` returns ``(logits, inputs)``: ``inputs`` maps each kernel's path,
the tuple of ``str``/``int`` used by ``nnx.to_flat_state(nnx.state(model, nnx.Param))``
(e.g. ``("stages", 1, 0, "conv1", "kernel")``; :func:`param_path_str` writes it as
``"stages/1/0/conv1/kernel"``), to a 2-D matrix of that layer's inputs, in forward order:
``[B, in]`` for a dense layer and the im2col patches ``[B * H' * W', kh * kw * cin]``
(:func:`conv_patches`, rows in HWIO-kernel order) for a convolution, so that
``inputs[path] @ kernel.reshape(-1, cout)`` is the layer's output before the bias. These
are the representations GPM and OWM consume.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rgo_jax._fel import FEL
from rgo_jax._matrices import under_trace
from rgo_jax.bench._models_util import (
    InputRecorder,
    ParamPath,
    conv,
    conv_patches,
    dense,
    param_path_str,
)

__all__ = [
    "INIT_SCHEMES",
    "LINEAR_KERNELS",
    "MODEL_NAMES",
    "MLP",
    "AlexNet",
    "BasicBlock",
    "ParamPath",
    "ResNet18",
    "build_model",
    "conv_patches",
    "initialize",
    "param_path_str",
    "reduced_resnet18",
]

LINEAR_KERNELS = r"^(hidden/\d+|fc\d+|head)/kernel$"
"""A regex matching exactly the ``nnx.Linear`` kernel paths of every model here (the MLP's
``hidden/<i>``, AlexNet's ``fc1``/``fc2``, every ``head``): the layers whose RGO projection
can run on the input side (:func:`rgo_jax.use_input_projection`)."""

ModelOutput = jax.Array | tuple[jax.Array, dict[ParamPath, jax.Array]]


def _positive_int(value: Any, name: str) -> int:
    """Returns ``value`` as an int, or raises a clear error if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _fel(site: FEL | None, x: jax.Array, task: int | jax.Array) -> jax.Array:
    """Applies a FEL site, or nothing when the model was built with ``fel=False``."""
    return x if site is None else site(x, task)


def _check_images(model: str, x: jax.Array, channels: int) -> jax.Array:
    """Checks that ``x`` is an NHWC batch with ``channels`` channels."""
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{model} expects NHWC images [B, H, W, {channels}], got an array of shape {x.shape}."
        )
    return x


class _Model(nnx.Module):
    """Shared ``__call__``: runs ``_forward`` and, if asked, collects the layer inputs."""

    def _forward(self, x: jax.Array, task: int | jax.Array, rec: InputRecorder | None) -> jax.Array:
        raise NotImplementedError

    def __call__(
        self, x: jax.Array, task: int | jax.Array, *, return_inputs: bool = False
    ) -> ModelOutput:
        """Logits ``[B, num_classes]`` for the images ``x`` of task ``task``.

        Args:
          x: a batch of inputs (NHWC images; the MLP flattens any trailing axes).
          task: the task id (int or integer scalar array, may be traced).
          return_inputs: also return the per-layer input matrices (see the module docs).

        Returns:
          ``logits``, or ``(logits, inputs)`` when ``return_inputs`` is True.
        """
        rec = InputRecorder() if return_inputs else None
        logits = self._forward(x, task, rec)
        if rec is None:
            return logits
        return logits, rec.by_path(self)


class MLP(_Model):
    """Fully connected net: ``Linear -> ReLU -> FEL`` per hidden layer, then a linear head.

    The default is the paper's MNIST network 784-256-256-10. Parameter paths:
    ``("hidden", i, "kernel" | "bias")`` and ``("head", "kernel" | "bias")``; with
    ``bias=False`` (GPM's and OWM's MNIST networks) every layer is ``x @ kernel`` and there
    are no bias paths. FEL layer ids are ``0 .. len(hidden) - 1``.

    Args:
      in_features: size of a flattened input.
      hidden: widths of the hidden layers.
      num_classes: number of logits (one shared head).
      fel: put a FEL after each hidden ReLU (``False``: RGO-2 ablation).
      fel_seed: seed of the FEL permutations.
      bias: give every layer (hidden and head) a bias (``False``: none anywhere). A bias
        draws a key from ``rngs``, so under the default initialiser the kernels after the
        first differ between ``True`` and ``False``; :func:`initialize` (``init="torch"``
        / ``"glorot"``) draws the same kernels either way.
      rngs: parameter initialisation randomness.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from rgo_jax.bench.models import MLP
      >>> model = MLP(4, (3,), 2, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((5, 4)), task=1).shape
      (5, 2)
      >>> logits, inputs = model(jnp.ones((5, 4)), task=1, return_inputs=True)
      >>> {path: m.shape for path, m in inputs.items()}
      {('hidden', 0, 'kernel'): (5, 4), ('head', 'kernel'): (5, 3)}
      >>> bias_free = MLP(4, (3,), 2, bias=False, rngs=nnx.Rngs(0))
      >>> sorted(path for path, _ in nnx.to_flat_state(nnx.state(bias_free, nnx.Param)))
      [('head', 'kernel'), ('hidden', 0, 'kernel')]
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
        *,
        fel: bool = True,
        fel_seed: int = 0,
        bias: bool = True,
        rngs: nnx.Rngs,
    ):
        self.in_features = _positive_int(in_features, "MLP in_features")
        hidden = tuple(_positive_int(h, "MLP hidden width") for h in hidden)
        self.num_classes = _positive_int(num_classes, "MLP num_classes")
        if not isinstance(bias, (bool, np.bool_)):
            raise ValueError(f"MLP bias must be True or False, got {bias!r}.")
        self.fel = bool(fel)
        dims = (self.in_features, *hidden)
        self.hidden = nnx.List(
            [
                nnx.Linear(a, b, use_bias=bool(bias), rngs=rngs)
                for a, b in zip(dims[:-1], dims[1:], strict=True)
            ]
        )
        self.fels = nnx.List([FEL(i, seed=fel_seed) for i in range(len(hidden))]) if fel else None
        self.head = nnx.Linear(dims[-1], self.num_classes, use_bias=bool(bias), rngs=rngs)

    def _forward(self, x: jax.Array, task: int | jax.Array, rec: InputRecorder | None) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(
                f"MLP expects a batch [B, ...] of {self.in_features} features per example, got "
                f"an array of shape {x.shape}."
            )
        x = x.reshape(x.shape[0], self.in_features)
        for i, layer in enumerate(self.hidden):
            x = jax.nn.relu(dense(layer, x, rec))
            x = _fel(None if self.fels is None else self.fels[i], x, task)
        return dense(self.head, x, rec)


class AlexNet(_Model):
    """The AlexNet-style CNN of HAT / GPM for CIFAR, without batch norm and dropout.

    ``conv1`` 64 4x4, ``conv2`` 128 3x3, ``conv3`` 256 2x2, all VALID (no padding), stride 1,
    each followed by ReLU, FEL and 2x2 max-pool (stride 2, floor); then ``fc1`` 2048, ``fc2``
    2048 (ReLU, FEL) and the shared ``head``. On 32x32x3 the feature map goes
    32 -> 29 -> 14 -> 12 -> 6 -> 5 -> 2, so ``fc1`` sees ``2 * 2 * 256 = 1024`` features
    (flattened in NHWC order). A channel permutation commutes with max-pooling, so FEL before
    or after the pool is the same network. FEL layer ids: ``0, 1, 2`` (convs), ``3, 4`` (fcs).
    Parameter paths: ``conv1 .. conv3``, ``fc1``, ``fc2``, ``head``.

    Args:
      input_shape: ``(H, W, C)`` of an input image, e.g. ``(32, 32, 3)`` or ``(28, 28, 1)``.
      num_classes: number of logits (one shared head).
      channels: output channels of the three convolutions.
      kernel_sizes: their (square) kernel sizes.
      hidden: widths of ``fc1`` and ``fc2``.
      fel: put a FEL after each ReLU (``False``: RGO-2 ablation).
      fel_seed: seed of the FEL permutations.
      rngs: parameter initialisation randomness.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32, 32, 3),
        num_classes: int = 100,
        *,
        channels: Sequence[int] = (64, 128, 256),
        kernel_sizes: Sequence[int] = (4, 3, 2),
        hidden: Sequence[int] = (2048, 2048),
        fel: bool = True,
        fel_seed: int = 0,
        rngs: nnx.Rngs,
    ):
        input_shape = tuple(_positive_int(d, "AlexNet input_shape entry") for d in input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"AlexNet input_shape must be (H, W, C), got {input_shape}.")
        channels = tuple(_positive_int(c, "AlexNet channels entry") for c in channels)
        kernel_sizes = tuple(_positive_int(k, "AlexNet kernel size") for k in kernel_sizes)
        hidden = tuple(_positive_int(h, "AlexNet hidden width") for h in hidden)
        if len(channels) != 3 or len(kernel_sizes) != 3 or len(hidden) != 2:
            raise ValueError(
                "AlexNet has 3 convolutions and 2 hidden dense layers: channels and kernel_sizes "
                f"need 3 entries, hidden 2; got {channels}, {kernel_sizes}, {hidden}."
            )
        self.input_shape = input_shape
        self.num_classes = _positive_int(num_classes, "AlexNet num_classes")
        self.fel = bool(fel)
        h, w, c = input_shape
        for k in kernel_sizes:
            h, w = (h - k + 1) // 2, (w - k + 1) // 2
            if h < 1 or w < 1:
                raise ValueError(
                    f"AlexNet input_shape {input_shape} is too small for kernels {kernel_sizes} "
                    "with 2x2 max-pooling."
                )
        cins = (c, *channels[:-1])
        self.conv1 = nnx.Conv(
            cins[0], channels[0], (kernel_sizes[0],) * 2, padding="VALID", rngs=rngs
        )
        self.conv2 = nnx.Conv(
            cins[1], channels[1], (kernel_sizes[1],) * 2, padding="VALID", rngs=rngs
        )
        self.conv3 = nnx.Conv(
            cins[2], channels[2], (kernel_sizes[2],) * 2, padding="VALID", rngs=rngs
        )
        self.fc1 = nnx.Linear(h * w * channels[2], hidden[0], rngs=rngs)
        self.fc2 = nnx.Linear(hidden[0], hidden[1], rngs=rngs)
        self.head = nnx.Linear(hidden[1], self.num_classes, rngs=rngs)
        sites = [FEL(i, seed=fel_seed) if fel else None for i in range(5)]
        self.fel_conv1, self.fel_conv2, self.fel_conv3, self.fel_fc1, self.fel_fc2 = sites

    def _forward(self, x: jax.Array, task: int | jax.Array, rec: InputRecorder | None) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"AlexNet expects NHWC images [B, {', '.join(map(str, self.input_shape))}], got "
                f"an array of shape {x.shape}."
            )
        for layer, site in (
            (self.conv1, self.fel_conv1),
            (self.conv2, self.fel_conv2),
            (self.conv3, self.fel_conv3),
        ):
            x = _fel(site, jax.nn.relu(conv(layer, x, rec)), task)
            x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape(x.shape[0], -1)
        x = _fel(self.fel_fc1, jax.nn.relu(dense(self.fc1, x, rec)), task)
        x = _fel(self.fel_fc2, jax.nn.relu(dense(self.fc2, x, rec)), task)
        return dense(self.head, x, rec)


class BasicBlock(nnx.Module):
    """ResNet basic block without batch norm, with the RGO FEL placements.

    ``h = FEL_a(relu(conv1(x)))``; ``h = FEL_b(conv2(h))``;
    ``out = relu(h + shortcut(x))``. Both convolutions are 3x3 ``'SAME'`` (``conv1`` with
    ``stride``); the shortcut is the identity, or a 1x1 convolution with ``stride`` when the
    shape changes; it is never permuted.

    Args:
      in_channels: channels of ``x``.
      out_channels: channels of the output.
      stride: stride of ``conv1`` and of the shortcut.
      fel_layers: layer ids of the two FEL sites, or ``None`` for no FEL.
      fel_seed: seed of the FEL permutations.
      rngs: parameter initialisation randomness.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        fel_layers: tuple[int, int] | None = None,
        fel_seed: int = 0,
        rngs: nnx.Rngs,
    ):
        in_channels = _positive_int(in_channels, "BasicBlock in_channels")
        out_channels = _positive_int(out_channels, "BasicBlock out_channels")
        stride = _positive_int(stride, "BasicBlock stride")
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), strides=stride, rngs=rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), rngs=rngs)
        self.shortcut = (
            nnx.Conv(in_channels, out_channels, (1, 1), strides=stride, padding="VALID", rngs=rngs)
            if stride != 1 or in_channels != out_channels
            else None
        )
        if fel_layers is None:
            self.fel1, self.fel2 = None, None
        else:
            self.fel1 = FEL(fel_layers[0], seed=fel_seed)
            self.fel2 = FEL(fel_layers[1], seed=fel_seed)

    def __call__(self, x: jax.Array, task: int | jax.Array) -> jax.Array:
        """The block's output for NHWC ``x`` of task ``task``."""
        return self._forward(x, task, None)

    def _forward(self, x: jax.Array, task: int | jax.Array, rec: InputRecorder | None) -> jax.Array:
        h = _fel(self.fel1, jax.nn.relu(conv(self.conv1, x, rec)), task)
        h = _fel(self.fel2, conv(self.conv2, h, rec), task)
        skip = x if self.shortcut is None else conv(self.shortcut, x, rec)
        return jax.nn.relu(h + skip)


class ResNet18(_Model):
    """ResNet-18 of the RGO paper: no batch norm, no max-pool, FEL after every nonlinearity.

    ``conv1`` ``stem_kernel`` x ``stem_kernel`` / ``width``, stride ``stem_stride``,
    ``'SAME'``, ReLU; four stages of two :class:`BasicBlock` (widths ``w, 2w, 4w, 8w``;
    stride 2 in the first block of stages 2-4; 1x1 convolution shortcut when the shape
    changes); global mean pool; linear ``head``. All convolutions pad ``'SAME'`` the
    ``jax.lax`` (TensorFlow) way. FEL sites, in forward order (their layer ids): after
    ``conv1`` + ReLU (0); in each block after ``relu(conv1)`` and after ``conv2`` before
    the residual add; after each stage; after global pooling (21, the last).

    Parameter paths: ``("conv1", ...)``, ``("stages", s, b, "conv1" | "conv2" | "shortcut",
    ...)`` for stage ``s`` and block ``b``, ``("head", ...)``.

    Args:
      num_classes: number of logits (one shared head).
      width: channels of the first stage.
      in_channels: channels of the input images.
      stem_kernel: kernel size of ``conv1`` (7 in the RGO paper, 3 in the reduced network).
      stem_stride: stride of ``conv1`` (1 in the RGO paper).
      fel: put the FEL sites in (``False``: RGO-2 ablation).
      fel_seed: seed of the FEL permutations.
      rngs: parameter initialisation randomness.
    """

    def __init__(
        self,
        num_classes: int = 100,
        width: int = 64,
        *,
        in_channels: int = 3,
        stem_kernel: int = 7,
        stem_stride: int = 1,
        fel: bool = True,
        fel_seed: int = 0,
        rngs: nnx.Rngs,
    ):
        self.num_classes = _positive_int(num_classes, "ResNet18 num_classes")
        width = _positive_int(width, "ResNet18 width")
        self.in_channels = _positive_int(in_channels, "ResNet18 in_channels")
        stem_kernel = _positive_int(stem_kernel, "ResNet18 stem_kernel")
        stem_stride = _positive_int(stem_stride, "ResNet18 stem_stride")
        self.fel = bool(fel)
        ids = itertools.count()

        def site() -> FEL | None:
            return FEL(next(ids), seed=fel_seed) if fel else None

        self.conv1 = nnx.Conv(
            self.in_channels, width, (stem_kernel, stem_kernel), strides=stem_stride, rngs=rngs
        )
        self.fel_conv1 = site()
        stages, stage_fels = [], []
        cin = width
        for s, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            blocks = []
            for b in range(2):
                layers = (next(ids), next(ids)) if fel else None
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(
                    BasicBlock(cin, cout, stride, fel_layers=layers, fel_seed=fel_seed, rngs=rngs)
                )
                cin = cout
            stages.append(nnx.List(blocks))
            stage_fels.append(site())
        self.stages = nnx.List(stages)
        self.stage_fels = nnx.List(stage_fels) if fel else None
        self.fel_pool = site()
        self.head = nnx.Linear(cin, self.num_classes, rngs=rngs)

    def _forward(self, x: jax.Array, task: int | jax.Array, rec: InputRecorder | None) -> jax.Array:
        x = _check_images("ResNet18", x, self.in_channels)
        x = _fel(self.fel_conv1, jax.nn.relu(conv(self.conv1, x, rec)), task)
        for s, stage in enumerate(self.stages):
            for block in stage:
                x = block._forward(x, task, rec)
            x = _fel(None if self.stage_fels is None else self.stage_fels[s], x, task)
        x = jnp.mean(x, axis=(1, 2))
        x = _fel(self.fel_pool, x, task)
        return dense(self.head, x, rec)


def reduced_resnet18(
    num_classes: int = 100,
    *,
    width: int = 20,
    in_channels: int = 3,
    fel: bool = True,
    fel_seed: int = 0,
    rngs: nnx.Rngs,
) -> ResNet18:
    """The reduced ResNet-18 of GPM / TRGP: :class:`ResNet18` with width 20 and a 3x3 stem.

    As in GPM's reduced ResNet-18 for 32x32 inputs, ``conv1`` is 3x3, stride 1, padding 1
    (``'SAME'``), with no max-pool. Two differences from GPM, both kept from the RGO
    ResNet-18: biases and no batch norm, and global mean pooling before the head (GPM
    average-pools 2x2 and flattens, a head input of ``4 * 8 * width``; here ``8 * width``).

    Examples:
      >>> from flax import nnx
      >>> from rgo_jax.bench.models import reduced_resnet18
      >>> model = nnx.eval_shape(lambda: reduced_resnet18(10, rngs=nnx.Rngs(0)))  # shapes only
      >>> model.conv1.kernel.shape, model.head.kernel.shape
      ((3, 3, 3, 20), (160, 10))
    """
    return ResNet18(
        num_classes,
        width,
        in_channels=in_channels,
        stem_kernel=3,
        stem_stride=1,
        fel=fel,
        fel_seed=fel_seed,
        rngs=rngs,
    )


MODEL_NAMES = ("mlp", "alexnet", "resnet18", "reduced_resnet18")


INIT_SCHEMES = {
    "lecun": "Flax's default: LeCun-normal kernels (truncated normal, variance 1/fan_in), "
    "zero biases",
    "torch": "PyTorch's nn.Linear / nn.Conv2d default: kernels and biases uniform in "
    "+-1/sqrt(fan_in) (variance 1/(3 fan_in))",
    "glorot": "Keras / TensorFlow's default: Glorot-uniform kernels "
    "(variance 2/(fan_in + fan_out)), zero biases",
    "normal0.1": "the TensorFlow code of GEM / A-GEM (weight_variable, bias_variable): "
    "kernels truncated normal with std 0.1 (cut at 2 std) whatever the fan-in, biases 0.1",
}
"""The parameter initialisations :func:`initialize` draws, by name (``"lecun"`` the default).
Fan-in of a kernel is the product of all its axes but the last (``in`` for a dense kernel,
``kh * kw * cin`` for a conv kernel)."""


def _check_scheme(scheme: str) -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"Unknown initialisation {scheme!r}; valid: {', '.join(INIT_SCHEMES)}.")


_ZERO_BIAS_KERNEL_INIT = {
    "lecun": jax.nn.initializers.lecun_normal(),
    "glorot": jax.nn.initializers.glorot_uniform(),
}


def _draw(scheme: str, key: jax.Array, kernel: jax.Array, bias: jax.Array | None):
    """New ``(kernel, bias)`` for one layer (``bias`` ``None`` when the layer has none)."""
    k_kernel, k_bias = jax.random.split(key)
    if scheme in _ZERO_BIAS_KERNEL_INIT:
        new_kernel = _ZERO_BIAS_KERNEL_INIT[scheme](k_kernel, kernel.shape, kernel.dtype)
        return new_kernel, None if bias is None else jnp.zeros_like(bias)
    if scheme == "normal0.1":  # tf.truncated_normal_initializer(stddev=0.1): cut at 2 std
        cut = jax.random.truncated_normal(k_kernel, -2.0, 2.0, kernel.shape, kernel.dtype)
        return 0.1 * cut, None if bias is None else jnp.full_like(bias, 0.1)
    bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))  # torch: +-1/sqrt(fan_in)

    def uniform(k, like):
        return jax.random.uniform(k, like.shape, like.dtype, minval=-bound, maxval=bound)

    return uniform(k_kernel, kernel), None if bias is None else uniform(k_bias, bias)


def _weight_layers(model: nnx.Module) -> list:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, (nnx.Linear, nnx.Conv))]


def initialize(model: nnx.Module, scheme: str, *, seed: int = 0) -> nnx.Module:
    """Redraws the kernel and bias of every ``nnx.Linear`` / ``nnx.Conv`` of ``model`` in place.

    Layer ``i`` (in the order ``nnx.iter_graph`` visits them) draws from
    ``fold_in(key(seed), i)``, so the result is a pure function of ``(model structure, scheme,
    seed)``. Other parameters are left alone. The initialisation changes how much a network
    forgets under RGO (``benchmarks/REPRODUCIBILITY.md``): it is part of a protocol.

    Args:
      model: a model whose layers are ``nnx.Linear`` / ``nnx.Conv`` (kernel ``[..., out]``).
      scheme: a key of :data:`INIT_SCHEMES`.
      seed: seed of the new draws.

    Returns:
      ``model`` (changed in place).

    Examples:
      >>> from flax import nnx
      >>> from rgo_jax.bench.models import MLP, initialize
      >>> model = initialize(MLP(4, (3,), 2, rngs=nnx.Rngs(0)), "torch", seed=1)
      >>> bool(abs(model.hidden[0].kernel[...]).max() <= 0.5)  # bound 1 / sqrt(4)
      True
    """
    _check_scheme(scheme)
    layers = _weight_layers(model)
    old = [(layer.kernel[...], None if layer.bias is None else layer.bias[...]) for layer in layers]
    # Outside a trace, every layer's draw in one compiled program (eagerly, each draw and
    # shape compiled on its own: AlexNet ~10 s on a CPU); inside one (build_model's
    # construction, a user's jit), inlined.
    draw = _draw_layers if under_trace(old) else _draw_layers_compiled
    for layer, (kernel, bias) in zip(layers, draw(scheme, seed, old), strict=True):
        layer.kernel[...] = kernel
        if bias is not None:
            layer.bias[...] = bias
    return model


def _draw_layers(scheme: str, seed, old: list) -> list:
    """New ``(kernel, bias)`` of each layer ``i``, drawn from ``fold_in(key(seed), i)``."""
    key = jax.random.key(seed)
    return [_draw(scheme, jax.random.fold_in(key, i), k, b) for i, (k, b) in enumerate(old)]


def build_model(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    fel: bool = True,
    fel_seed: int = 0,
    seed: int = 0,
    init: str = "lecun",
    init_scale: float = 1.0,
    **model_kwargs: Any,
) -> nnx.Module:
    """Builds a reference model by name, initialised from ``nnx.Rngs(seed)``.

    Args:
      name: one of ``"mlp"``, ``"alexnet"``, ``"resnet18"``, ``"reduced_resnet18"``.
      num_classes: number of logits (one shared head).
      input_shape: shape of one input without the batch axis, ``(H, W, C)`` (the MLP takes
        the product as its ``in_features``; the ResNets use ``C``).
      fel: put the FEL sites in (``False``: RGO-2 ablation).
      fel_seed: seed of the FEL permutations.
      seed: seed of the parameter initialisation.
      init: a key of :data:`INIT_SCHEMES`. ``"lecun"`` (the default) keeps the layers'
        own Flax initialisers, drawn from ``nnx.Rngs(seed)``; another scheme redraws every
        kernel and bias with :func:`initialize` (seed ``seed``).
      init_scale: every kernel is multiplied by this after it is drawn (biases are not):
        ``0.5`` halves the scale of the initial weights.
      **model_kwargs: further constructor arguments (e.g. ``hidden`` for the MLP, ``width``
        for the ResNets).

    Returns:
      The model.

    Examples:
      >>> from rgo_jax.bench.models import build_model
      >>> model = build_model("mlp", num_classes=10, input_shape=(28, 28, 1), hidden=(32,))
      >>> model.hidden[0].kernel.shape, model.head.kernel.shape
      ((784, 32), (32, 10))
    """
    _check_scheme(init)
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale!r}.")

    input_shape = tuple(int(d) for d in input_shape)
    options = tuple(sorted(model_kwargs.items()))
    static = (name, num_classes, input_shape, bool(fel), fel_seed, init, init_scale, options)
    try:
        hash(static)
    except TypeError:  # an unhashable model option: build eagerly
        return _construct(*static, seed)
    if under_trace(seed):  # inside a trace (jit, eval_shape): inline
        return _construct(*static, seed)
    state = _construct_state(*static, np.int32(seed))
    return nnx.merge(_GRAPHDEFS[static], state)


def _construct(name, num_classes, input_shape, fel, fel_seed, init, init_scale, options, seed):
    """The model of :func:`build_model`, its parameters drawn from ``seed``."""
    # nnx.Rngs(int) draws from jax.random.key(int): the same key from a traced seed.
    model = _build(
        name, num_classes, input_shape, fel, fel_seed, jax.random.key(seed), dict(options)
    )
    if init != "lecun":
        initialize(model, init, seed=seed)
    if init_scale != 1.0:
        for layer in _weight_layers(model):
            layer.kernel[...] = layer.kernel[...] * init_scale
    return model


# One compiled program draws every parameter, for any seed: eagerly, each initialiser,
# shape and rescaling compiled on its own, and a scheme that redraws the layers compiled
# Flax's default draws only to discard them (inside one program they are dead code).
# The program runs once per model, so it is compiled at LLVM optimisation level 1: 2-4x
# less compile time than the default level (ResNet-18: ~8 s -> ~2 s on one CPU core) for
# the same parameters bit for bit (threefry is integer arithmetic; the draws' float ops
# are the same, ``tests/bench/test_models.py`` checks the values against the default level).
# On CPU, XLA's classic loop emitters instead of its fusion emitters take another third off
# (one core: paper MLP 0.65 -> 0.44 s, AlexNet 1.32 -> 0.86 s, ResNet-18 level at ~3 s);
# other backends ignore that option.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
_GRAPHDEFS: dict = {}  # static arguments -> the model's graph definition (set when traced)


@functools.partial(jax.jit, static_argnums=tuple(range(8)), compiler_options=_INIT_COMPILER_OPTIONS)
def _construct_state(*args):
    """The state of :func:`_construct`'s model (its graph definition kept in ``_GRAPHDEFS``)."""
    graphdef, state = nnx.split(_construct(*args))
    _GRAPHDEFS[args[:8]] = graphdef
    return state


# The redraw of :func:`initialize` (outside a trace) as one program, at the same level.
_draw_layers_compiled = jax.jit(
    _draw_layers, static_argnums=0, compiler_options=_INIT_COMPILER_OPTIONS
)


def _build(name, num_classes, input_shape, fel, fel_seed, seed, model_kwargs) -> nnx.Module:
    input_shape = tuple(int(d) for d in input_shape)
    common = dict(fel=fel, fel_seed=fel_seed, rngs=nnx.Rngs(seed), **model_kwargs)
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes=num_classes, **common)
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}.")
    if len(input_shape) != 3:
        raise ValueError(f"Model {name!r} needs input_shape (H, W, C), got {input_shape}.")
    if name == "alexnet":
        return AlexNet(input_shape, num_classes, **common)
    if name == "resnet18":
        return ResNet18(num_classes, in_channels=input_shape[-1], **common)
    return reduced_resnet18(num_classes, in_channels=input_shape[-1], **common)
