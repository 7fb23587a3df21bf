"""The RLS block kernel in several forms, side by side with PyTorch's Woodbury update.

One ``[d, d]`` P (the identity) absorbs ``n`` vectors in Woodbury blocks of ``block``
(``P <- P - P V^T (alpha I + V P V^T)^{-1} V P`` per block, one symmetrisation at the end),
for each width ``d`` of the sweep. The forms, timed in interleaved rounds per width
(``_common.time_calls``; JAX compiled ahead of time, PyTorch eager):

* ``library``: :func:`rgo_jax.rls_block`, the kernel the library runs: ``W = L^{-1} V P``
  with ``L^{-1}`` from a hand-written recursive blocked Cholesky and triangle inverse
  (matrix products only, no LAPACK call), then ``P - W^T W``;
* ``cho_solve``: ``jax.scipy.linalg.cho_factor`` / ``cho_solve`` of ``M`` against the
  ``[b, d]`` right-hand side ``V P``, then ``P - (V P)^T M^{-1} (V P)``;
* ``trsm``: ``jnp.linalg.cholesky`` + ``jax.scipy.linalg.solve_triangular`` against
  ``V P`` (``W = L^{-1} V P``), then ``P - W^T W`` (the form of the PyTorch reference);
* ``trinv``: ``jnp.linalg.cholesky`` + ``solve_triangular`` against the ``b x b``
  identity (LAPACK only on the small system), ``W = L^{-1} (V P)`` as a matrix product;
* ``torch``: ``torch_reference.rls_woodbury`` (``torch.linalg.cholesky`` +
  ``solve_triangular``).

What :func:`rgo_jax.update_projection` runs is the kernel plus a positive-definiteness
check of the result (``_rls.rls_checked``: a float32 Cholesky factorisation of each new P,
hand-written, ``2 d^3`` flops below ``d = 2048`` and ``0.47 d^3`` from there); it is
timed too (``library_checked``), with the check alone in its two forms
(``check_library``: ``_rls._factor_checked``; ``check_lapack``: ``jnp.linalg.cholesky``
with the same pivot test) on the library's result.

Every form's P is compared with the float64 closed form ``alpha (alpha I + V^T V)^{-1}``
at widths up to ``check_max_d`` (maximum entry error relative to the largest entry).
Run through ``compare_torch.py --rls-sweep-only``; needs ``torch``. Run it twice: on one
core with both libraries single-threaded (``taskset -c 1 env
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
OMP_NUM_THREADS=1``), and with the default threads on every core (what a user gets):
on 2 shared cores at a load average of 8-10 the LAPACK-backed forms took 5-35x longer
than the library kernel with the default threads (and ``jnp.linalg.cholesky`` of a
784-wide P 1 s instead of 5 ms), but not on one core.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import _common as C
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import torch_reference as T  # sets OMP_WAIT_POLICY before torch loads

import rgo_jax
from rgo_jax import _rls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rls_drift import closed_form  # noqa: E402 - alpha (alpha I + S)^-1 in float64

torch = T.torch

ALPHA = 0.01
WIDTHS = (64, 256, 784, 1024, 2304, 4608)
_HI = jax.lax.Precision.HIGHEST


def default_vectors(d: int) -> int:
    """Vectors per width: 1024, and 256 from ``d >= 2304`` (so that the sweep stays quick)."""
    return 256 if d >= 2304 else 1024


def _woodbury(p: jax.Array, v: jax.Array, alpha: float, block: int, step) -> jax.Array:
    """The library's block loop (zero-padded blocks, a ``lax.scan``, one symmetrisation) with
    the solve of each block done by ``step(p, u, m)``, ``u = V P``, ``m = alpha I + V P V^T``."""
    n, d = v.shape
    b = min(block, n)
    pad = (-n) % b
    if pad:
        v = jnp.concatenate([v, jnp.zeros((pad, d), v.dtype)], axis=0)
    eye = jnp.eye(b, dtype=p.dtype)

    def body(p, vb):
        u = jnp.matmul(vb, p, precision=_HI)
        m = jnp.matmul(u, vb.T, precision=_HI)
        return step(p, u, 0.5 * (m + m.T) + alpha * eye), None

    p, _ = jax.lax.scan(body, p, v.reshape(-1, b, d))
    return 0.5 * (p + p.T)


def _step_cho_solve(p, u, m):
    factor = jsl.cho_factor(m, lower=True)
    return p - jnp.matmul(u.T, jsl.cho_solve(factor, u), precision=_HI)


def _step_trsm(p, u, m):
    w = jsl.solve_triangular(jnp.linalg.cholesky(m), u, lower=True)
    return p - jnp.matmul(w.T, w, precision=_HI)


def _step_trinv(p, u, m):
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    linv = jsl.solve_triangular(jnp.linalg.cholesky(m), eye, lower=True)
    w = jnp.matmul(linv, u, precision=_HI)
    return p - jnp.matmul(w.T, w, precision=_HI)


def jax_forms(alpha: float, block: int) -> dict:
    """name -> ``fn(p [d, d], v [n, d]) -> p_new [d, d]`` (each to be jitted)."""

    def library(p, v):
        return rgo_jax.rls_block(p[None], v[:, None], alpha, block_size=block)[0][0]

    def library_checked(p, v):  # what update_projection runs: kernel + PD check
        fast, _, ok = _rls.rls_checked(p[None], v[:, None], alpha, block_size=block)
        return jnp.where(ok[0], fast[0], p)

    return {
        "library": library,
        "cho_solve": lambda p, v: _woodbury(p, v, alpha, block, _step_cho_solve),
        "trsm": lambda p, v: _woodbury(p, v, alpha, block, _step_trsm),
        "trinv": lambda p, v: _woodbury(p, v, alpha, block, _step_trinv),
        "library_checked": library_checked,
    }


def _check_library(p):
    floor = jnp.full((1,), jnp.finfo(p.dtype).tiny)
    return _rls._factor_checked(p[None], floor)[1][0]


def _check_lapack(p):
    """The pivot test of ``_rls._factor_checked`` on LAPACK's Cholesky factor (NaN where it
    fails)."""
    low = jnp.linalg.cholesky(p)
    least = jnp.min(jnp.diagonal(low)) ** 2
    finite = jnp.all(jnp.isfinite(low))
    return finite & (least > _rls._pd_floor(p))


KERNELS = ("library", "cho_solve", "trsm", "trinv", "torch")
LAPACK = ("cho_solve", "trsm", "trinv")


def one_width(
    d: int,
    n: int,
    *,
    block: int = 64,
    alpha: float = ALPHA,
    rounds: int = 15,
    budget: float = 30.0,
    check: bool = True,
    seed: int = 0,
    keep: bool = False,
) -> dict:
    """Timings (``_common.summarize`` plus ``compile_s``) and, with ``check``, the error of
    every form against the float64 closed form, for one width ``d`` and ``n`` vectors.

    With ``keep``, also ``p``: every form's P (float64 NumPy) and ``vectors``.
    """
    rng = np.random.default_rng(seed)
    v_np = (rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)  # |v|^2 ~ 1
    p0, v = jnp.eye(d, dtype=jnp.float32), jnp.asarray(v_np)
    built = {k: C._Case(fn, (p0, v)) for k, fn in jax_forms(alpha, block).items()}
    lib_p = built["library"].last
    built["check_library"] = C._Case(_check_library, (lib_p,))
    built["check_lapack"] = C._Case(_check_lapack, (lib_p,))
    tp, tv = torch.eye(d), torch.from_numpy(v_np)

    def t_woodbury():
        with torch.no_grad():
            return T.rls_woodbury(tp, tv, alpha, block=block)

    calls = {k: c.call for k, c in built.items()} | {"torch": t_woodbury}
    samples, inner = C.time_calls(calls, rounds=rounds, max_total_s=budget)
    out: dict = {"d": d, "n": n, "block": block, "times": {}}
    for k, s in samples.items():
        out["times"][k] = C.summarize(s) | {"inner": inner[k]}
        if k in built:
            out["times"][k]["compile_s"] = built[k].compile_s
    out["check_agrees"] = bool(built["check_library"].last) == bool(built["check_lapack"].last)
    out["check_passed"] = bool(built["check_library"].last)
    got = {k: np.asarray(built[k].last, np.float64) for k in (*KERNELS[:-1], "library_checked")}
    got["torch"] = t_woodbury().numpy().astype(np.float64)
    if check:
        v64 = v_np.astype(np.float64)
        ref = closed_form(v64.T @ v64, alpha)
        scale = np.max(np.abs(ref))
        out["max_rel_err"] = {k: float(np.max(np.abs(g - ref)) / scale) for k, g in got.items()}
    if keep:
        out["p"], out["vectors"] = got, v_np
    return out


def sweep(
    widths: Sequence[int] = WIDTHS,
    *,
    vectors: int | None = None,
    block: int = 64,
    rounds: int = 15,
    budget: float = 30.0,
    check_max_d: int = 1024,
    log=print,
) -> list[dict]:
    """:func:`one_width` for every width (``vectors`` per width, default
    :func:`default_vectors`)."""
    out = []
    for d in widths:
        n = vectors or default_vectors(d)
        row = one_width(d, n, block=block, rounds=rounds, budget=budget, check=d <= check_max_d)
        row["loadavg"] = os.getloadavg()[0]
        if log is not None:
            log(
                f"  [rls sweep] d {d:5d} n {n:5d}: "
                + ", ".join(f"{k} {C.fmt_s(t['median_s'])}" for k, t in row["times"].items())
                + f" (load {row['loadavg']:.1f})"
            )
        out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    """The sweep's two tables: the kernel forms against PyTorch, and the check."""

    def t(row, k):
        s = row["times"][k]
        return f"{C.fmt_s(s['median_s'])} ({C.fmt_s(s['min_s'])})"

    def med(row, k):
        return row["times"][k]["median_s"]

    kern, chk, errs = [], [], []
    for r in rows:
        best = min(LAPACK, key=lambda k: med(r, k))
        kern.append(
            [
                r["d"],
                r["n"],
                t(r, "library"),
                *(t(r, k) for k in LAPACK),
                t(r, "torch"),
                f"{med(r, 'library') / med(r, 'torch'):.2f}",
                f"{med(r, best) / med(r, 'torch'):.2f} ({best})",
            ]
        )
        chk.append(
            [
                r["d"],
                t(r, "check_library"),
                t(r, "check_lapack"),
                f"{med(r, 'check_library') / med(r, 'check_lapack'):.2f}",
                t(r, "library_checked"),
                f"{med(r, 'library_checked') / med(r, 'torch'):.2f}",
                "yes" if r["check_agrees"] else "NO",
            ]
        )
        if "max_rel_err" in r:
            errs.append([r["d"], *(f"{r['max_rel_err'][k]:.1e}" for k in KERNELS)])
    block = rows[0]["block"] if rows else 64
    loads = [r["loadavg"] for r in rows if "loadavg" in r]
    load = f" Load average (1-minute) after each width: {', '.join(f'{x:.1f}' for x in loads)}."
    return "\n".join(
        [
            f"### RLS block kernel, width sweep (one d x d P, block {block})",
            "",
            "Medians of interleaved samples (min in brackets) per width; ratios of the medians "
            "(below 1: JAX ahead). `library`: `rgo_jax.rls_block` (hand-written blocked "
            "Cholesky, no LAPACK call); `cho_solve`: `jax.scipy.linalg.cho_factor`/`cho_solve` "
            "against V P; `trsm`: `jnp.linalg.cholesky` + `solve_triangular` against V P; "
            "`trinv`: the same against the b x b identity, then a product; PyTorch: "
            "`torch_reference.rls_woodbury`." + (load if loads else ""),
            "",
            C.md_table(
                [
                    "d",
                    "vectors",
                    "jax library kernel",
                    "jax cho_solve",
                    "jax cholesky + trsm",
                    "jax cholesky + tri inverse",
                    "torch Woodbury",
                    "library / torch",
                    "best LAPACK / torch",
                ],
                kern,
            ),
            "",
            "The positive-definiteness check `update_projection` runs on every new P "
            "(`_rls._factor_checked`, hand-written, 2 d^3 flops below d = 2048, 0.47 d^3 "
            "from there) against `jnp.linalg.cholesky` "
            "with the same pivot test, on the library kernel's P; and the kernel with its check "
            "(`_rls.rls_checked`, what `update_projection` runs) against PyTorch's unchecked "
            "update:",
            "",
            C.md_table(
                [
                    "d",
                    "library check",
                    "LAPACK check",
                    "library / LAPACK",
                    "library kernel + check",
                    "(kernel + check) / torch",
                    "same verdict",
                ],
                chk,
            ),
            "",
            "Maximum entry error against the float64 closed form alpha (alpha I + V^T V)^-1, "
            "relative to its largest entry:",
            "",
            C.md_table(["d", *KERNELS], errs),
            "",
        ]
    )
