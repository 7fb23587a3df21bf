"""A PyTorch reference implementation of RGO (paper MLP), to time rgo_jax against.

Two flavours of the same method (Liu & Liu, ICLR 2022; per-batch curvature vectors, the
reference code's choice):

* **straightforward** (the port a researcher would write first): ``loss.backward()``, then
  ``grad <- grad @ P * d / tr P`` for every parameter; consolidation computes one
  curvature vector per batch with its own backward pass and absorbs it by the literal
  rank-one RLS step ``k = P v / (alpha + v^T P v); P <- P - k v^T P`` in a Python loop.
* **best effort** (what a skilled PyTorch user would write): the dense layers project their
  weight gradient on the input side in a custom ``autograd.Function``
  (``dW = D^T (X P) * d / tr P``, cheap when the batch is smaller than the width); the
  curvature vectors of all consolidation batches come from ONE forward/backward pass over
  every example (the per-example output gradients, averaged over the output units and
  summed per batch); the RLS runs as a Woodbury block update on blocks of 64 vectors,
  ``P <- P - (P V^T) (alpha I + V P V^T)^{-1} (V P)`` with a LAPACK Cholesky.

Both keep one P per parameter as rgo_jax does (``[in, in]`` per weight, ``[n, n]`` per
bias). Optional dependency: ``pip install torch`` (or the project's ``perf`` extra); not
used by the tests. ``python benchmarks/perf/torch_reference.py --tasks 4 --data-dir D``
runs the best-effort permuted-MNIST protocol (1000 steps of batch 10 per task, lr 0.1,
alpha 0.01, 1000 consolidation batches, FEL after each hidden ReLU) and prints the
accuracy matrix and the time since the process started; :mod:`compare_torch` times the
pieces side by side with rgo_jax.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import gzip  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

# Passive OpenMP threads: spinning ones made the MLP step 200x slower on a loaded machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ALPHA = 0.01


class MLP(nn.Module):
    """784-h-h-10 with biases and a FEL (a fixed per-task feature permutation) after each ReLU."""

    def __init__(self, hidden=(256, 256), in_features=784, classes=10, projected=None):
        super().__init__()
        dims = (in_features, *hidden)
        self.hidden = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.head = nn.Linear(dims[-1], classes)
        self.projected = projected  # {weight: P}: input-side projection in the backward pass
        self.perms = None  # [layers] of [tasks, width] permutations, or None (no FEL)

    def layers(self):
        return [*self.hidden, self.head]

    def linear(self, layer, x):
        if self.projected is None:
            return layer(x)
        return InputProjectedLinear.apply(x, layer.weight, layer.bias, self.projected[layer.weight])

    def forward(self, x, task=0):
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.hidden):
            x = torch.relu(self.linear(layer, x))
            if self.perms is not None:
                x = x[:, self.perms[i][task]]
        return self.linear(self.head, x)


class InputProjectedLinear(torch.autograd.Function):
    """``x W^T + b`` whose weight gradient comes out projected: ``D^T (X P) * d / tr P``."""

    @staticmethod
    def forward(x, weight, bias, p):
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, p = inputs
        ctx.save_for_backward(x, weight, p)

    @staticmethod
    def backward(ctx, dy):
        x, weight, p = ctx.saved_tensors
        scale = p.shape[0] / torch.diagonal(p).sum()
        dx = dy @ weight
        dw = dy.t() @ (x @ p) * scale
        return dx, dw, dy.sum(0), None


def init_projections(model):
    """One identity P per parameter: ``[in, in]`` for a weight, ``[n, n]`` for a bias."""
    out = {}
    for layer in model.layers():
        out[layer.weight] = torch.eye(layer.weight.shape[1])
        out[layer.bias] = torch.eye(layer.bias.shape[0])
    return out


# ------------------------------------------------------------------------------------------
# Train steps
# ------------------------------------------------------------------------------------------


def sgd_step(model, x, y, lr=0.1, task=0):
    """Plain SGD: forward, backward, ``w -= lr * g``."""
    loss = nn.functional.cross_entropy(model(x, task), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for w in model.parameters():
            w.sub_(w.grad, alpha=lr)
    return loss


def rgo_step_plain(model, ps, x, y, lr=0.1, task=0):
    """The straightforward step: ``grad @ P * d / tr P`` after ``backward()`` (weights
    ``[out, in] @ [in, in]``, biases ``P @ g``)."""
    loss = nn.functional.cross_entropy(model(x, task), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for w in model.parameters():
            p = ps[w]
            scale = p.shape[0] / torch.diagonal(p).sum()
            g = w.grad @ p if w.ndim == 2 else p @ w.grad
            w.sub_(g, alpha=float(lr * scale))
    return loss


def rgo_step_input_side(model, ps, x, y, lr=0.1, task=0):
    """The best-effort step: weights projected inside the backward (``model.projected``),
    biases by ``P @ g`` afterwards."""
    loss = nn.functional.cross_entropy(model(x, task), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for layer in model.layers():
            layer.weight.sub_(layer.weight.grad, alpha=lr)
            p = ps[layer.bias]
            scale = p.shape[0] / torch.diagonal(p).sum()
            layer.bias.sub_(p @ layer.bias.grad, alpha=float(lr * scale))
    return loss


# ------------------------------------------------------------------------------------------
# Consolidation
# ------------------------------------------------------------------------------------------


def _weights(z, y):
    """``sqrt(p (1 - p))`` of the true class (no gradient); all classes are the task's."""
    with torch.no_grad():
        p = torch.softmax(z, -1).gather(1, y[:, None])[:, 0]
        return torch.sqrt(p * (1 - p))


def curvature_vectors_loop(model, xs, ys, task=0):
    """Straightforward: one backward pass per batch; ``{param: [n, d]}`` vectors."""
    out = {w: [] for w in model.parameters()}
    for x, y in zip(xs, ys, strict=True):
        z = model(x, task)
        f = (_weights(z, y) * z.gather(1, y[:, None])[:, 0]).sum()
        model.zero_grad(set_to_none=True)
        f.backward()
        for w in model.parameters():
            out[w].append(w.grad.mean(0) if w.ndim == 2 else w.grad.clone())
    return {w: torch.stack(v) for w, v in out.items()}


def curvature_vectors_batched(model, xs, ys, task=0):
    """Best effort: one forward/backward over all ``[n, B]`` examples.

    For a dense layer the batch's vector is ``sum_b mean_o(delta_b[o]) x_b`` (the weight
    gradient averaged over its output units); for its bias ``sum_b delta_b``.
    """
    n, b = ys.shape
    x = xs.reshape(n * b, -1)
    y = ys.reshape(-1)
    inputs, outs = [], []
    h = x
    for i, layer in enumerate(model.layers()):
        inputs.append(h)
        zi = h @ layer.weight.t() + layer.bias
        zi.retain_grad()
        outs.append(zi)
        if i < len(model.hidden):
            h = torch.relu(zi)
            if model.perms is not None:
                h = h[:, model.perms[i][task]]
        else:
            z = zi
    f = (_weights(z, y) * z.gather(1, y[:, None])[:, 0]).sum()
    f.backward()
    vecs = {}
    with torch.no_grad():
        for layer, xi, zi in zip(model.layers(), inputs, outs, strict=True):
            delta = zi.grad  # [n B, out]
            vecs[layer.weight] = (delta.mean(1, keepdim=True) * xi).reshape(n, b, -1).sum(1)
            vecs[layer.bias] = delta.reshape(n, b, -1).sum(1)
    return vecs


def rls_loop(p, v, alpha=ALPHA):
    """The literal rank-one RLS over the rows of ``v [n, d]``."""
    for vi in v:
        pv = p @ vi
        k = pv / (alpha + vi @ pv)
        p = p - torch.outer(k, pv)
    return p


def rls_woodbury(p, v, alpha=ALPHA, block=64):
    """Blocks of ``block`` vectors at once: ``P - (P V^T) (alpha I + V P V^T)^{-1} (V P)``."""
    for lo in range(0, v.shape[0], block):
        vb = v[lo : lo + block]
        vp = vb @ p  # [b, d]
        s = vp @ vb.t()
        s.diagonal().add_(alpha)
        c = torch.linalg.cholesky(s)
        w = torch.linalg.solve_triangular(c, vp, upper=False)  # L^{-1} V P
        p = p - w.t() @ w
    return 0.5 * (p + p.t())


def consolidate(model, ps, xs, ys, *, best_effort=True, task=0, alpha=ALPHA):
    """One task's consolidation: curvature vectors of every batch, then RLS into every P."""
    if best_effort:
        vecs = curvature_vectors_batched(model, xs, ys, task)
        rls = rls_woodbury
    else:
        vecs = curvature_vectors_loop(model, xs, ys, task)
        rls = rls_loop
    with torch.no_grad():
        for w, v in vecs.items():
            ps[w].copy_(rls(ps[w], v, alpha))
    return ps


# ------------------------------------------------------------------------------------------
# Permuted MNIST, time to result
# ------------------------------------------------------------------------------------------


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(data_dir: str):
    """``(x_train, y_train, x_test, y_test)``: float32 in [0, 1] ``[n, 784]``, int64 labels."""
    root = Path(data_dir) / "mnist"
    f = lambda name: _idx(root / name)  # noqa: E731
    xtr = f("train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255
    xte = f("t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255
    ytr = f("train-labels-idx1-ubyte.gz").astype(np.int64)
    yte = f("t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return xtr, ytr, xte, yte


def run_permuted_mnist(
    data_dir: str, tasks: int, steps: int = 1000, batches: int = 1000, seed: int = 0
) -> np.ndarray:
    """The best-effort RGO run; returns the ``[tasks, tasks]`` accuracy matrix."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xtr, ytr, xte, yte = load_mnist(data_dir)
    perms = [np.arange(784)] + [rng.permutation(784) for _ in range(tasks - 1)]
    model = MLP()
    model.perms = [
        torch.stack([torch.arange(256)] + [torch.randperm(256) for _ in range(tasks - 1)])
        for _ in model.hidden
    ]
    ps = init_projections(model)
    model.projected = ps
    xte_t, yte_t = torch.from_numpy(xte), torch.from_numpy(yte)
    acc = np.zeros((tasks, tasks))
    for t in range(tasks):
        x_t = torch.from_numpy(xtr[:, perms[t]])
        y_t = torch.from_numpy(ytr)
        idx = torch.from_numpy(rng.integers(0, len(x_t), size=(steps, 10)))
        for s in range(steps):
            rgo_step_input_side(model, ps, x_t[idx[s]], y_t[idx[s]], task=t)
        cidx = torch.from_numpy(rng.integers(0, len(x_t), size=(batches, 10)))
        model.projected = None
        consolidate(model, ps, x_t[cidx], y_t[cidx], task=t)
        model.projected = ps
        with torch.no_grad():
            for j in range(t + 1):
                z = model(xte_t[:, perms[j]], j)
                acc[t, j] = float((z.argmax(1) == yte_t).float().mean())
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with mnist/*.gz")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=1000, help="consolidation batches")
    args = ap.parse_args()
    acc = run_permuted_mnist(args.data_dir, args.tasks, args.steps, args.batches)
    np.set_printoptions(precision=4, suppress=True)
    print(acc)
    print(f"ACC {acc[-1].mean():.4f}")
    print(f"time_to_result_s {time.perf_counter() - _T_START:.2f}")


if __name__ == "__main__":
    main()


__all__ = [
    "MLP",
    "consolidate",
    "curvature_vectors_batched",
    "curvature_vectors_loop",
    "init_projections",
    "rgo_step_input_side",
    "rgo_step_plain",
    "rls_loop",
    "rls_woodbury",
    "run_permuted_mnist",
    "sgd_step",
]
