"""LittleBit array maths: rank from bits, sign gradients, bit packing, Dual-SVID, Joint-ITQ.

Layer 1 of the library: arrays in, arrays out, no pytrees and no Flax. Matrices here use the
papers' layout ``W (out, in)``; a path of rank ``r`` is

    W_path = diag(h) sign(U) diag(l) sign(V)^T diag(g),   U (out, r), V (in, r),

with ``l = l_u * l_v`` (Dual-SVID fits one rank-length scale on each side). Several paths are
stacked on a leading axis ``P`` (1, or 2 with the residual path). All factor and scale maths
run in float32; rank and iteration counts are static Python ints.

Bit layout of packed signs: a sign of ``+1`` (also for ``x == 0``) is bit 0 and ``-1`` is
bit 1, packed LSB-first along one axis into ``uint8`` or ``uint32`` words; the last word of an
axis whose length is not a multiple of the word size is padded with 0 bits (``+1``).
Unpacking shifts words right (the upstream left-shift bug reads only bit 0 of each word).

References:
    LittleBit, arXiv 2506.13771; LittleBit-2, arXiv 2603.00042; Gong and Lazebnik,
    "Iterative Quantization", CVPR 2011.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import linalg

__all__ = [
    "formula_bits", "rank_for_bpw", "sign", "smooth_sign", "clipped_sign", "pack_signs",
    "unpack_signs", "padded_bits", "balanced_factors", "joint_itq", "svid", "path_dense",
    "littlebit_init",
]

_HI = jax.lax.Precision.HIGHEST
WORDS = (np.dtype(np.uint8), np.dtype(np.uint32))
ALPHA = 100.0  # SmoothSign slope (LittleBit's tanh(100 x))


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


# ---------------------------------------------------------------------------------------------
# Bits and ranks.


def formula_bits(fan_in: int, fan_out: int, rank: int, *, residual: bool = True) -> int:
    """Bits of one layer by the papers' formula: signs plus 16-bit h, g and fused l per path.

    ``paths * (rank * (in + out) + 16 * (rank + in + out))`` with ``paths = 2`` for the
    residual variant; packing padding is not part of the formula (see :func:`padded_bits`).

    Examples:
        >>> from subspace_jax.littlebit import core
        >>> core.formula_bits(384, 1536, 24)          # 2*24*(1920+16) + 32*1920
        154368

    References:
        LittleBit, Sec. 3 (bits per weight), arXiv 2506.13771.
    """
    paths = 2 if residual else 1
    return paths * (rank * (fan_in + fan_out) + 16 * (rank + fan_in + fan_out))


def padded_bits(fan_in: int, fan_out: int, rank: int, word: Any, *, residual: bool = True) -> int:
    """Padding bits added by packing each path's signs along ``in`` and ``out`` into ``word``.

    Examples:
        >>> import numpy as np
        >>> from subspace_jax.littlebit import core
        >>> core.padded_bits(12, 20, 8, np.uint8), core.padded_bits(12, 20, 8, np.uint32)
        (128, 512)
    """
    w = 8 * np.dtype(word).itemsize
    pad = (-fan_in) % w + (-fan_out) % w
    return (2 if residual else 1) * rank * pad


def rank_for_bpw(
    fan_in: int, fan_out: int, bpw: float, *, residual: bool = True, strict: bool = True
) -> int:
    """The rank per path for a target of ``bpw`` bits per weight (the official rule).

    ``s = (in*out*bpw - 16 P (in + out)) / (P (in + out + 16))`` with ``P`` paths, truncated and
    rounded down to a multiple of 8. The result is at least 8: when the budget is smaller,
    ``strict`` raises, otherwise rank 8 is used anyway (what the official code does), and the
    layer stores more than ``bpw``.

    Args:
        fan_in: input features.
        fan_out: output features.
        bpw: target bits per weight, > 0.
        residual: two paths (primary + residual) instead of one.
        strict: raise when rank 8 does not fit in the budget.

    Returns:
        The rank, a multiple of 8 in ``[8, min(in, out)]``.

    Raises:
        ValueError: ``bpw`` not positive, rank 8 does not fit (``strict``), or the rank exceeds
            ``min(in, out)`` (a bpw too high for this matrix to benefit).

    Examples:
        >>> from subspace_jax.littlebit import core
        >>> core.rank_for_bpw(384, 1536, 0.3), core.rank_for_bpw(384, 1536, 1.0)
        (24, 136)
        >>> core.rank_for_bpw(384, 384, 0.1, residual=False, strict=False)
        8

    References:
        LittleBit, arXiv 2506.13771 (rank rule of the official code).
    """
    if not (isinstance(bpw, (int, float)) and math.isfinite(bpw) and bpw > 0):
        raise ValueError(f"bpw must be a finite number > 0, got {bpw!r}")
    paths = 2 if residual else 1
    s = (fan_in * fan_out * bpw - 16 * paths * (fan_in + fan_out)) / (paths * (fan_in + fan_out + 16))
    rank = int(s) // 8 * 8 if s > 0 else 0
    if rank < 8:
        if strict:
            need = formula_bits(fan_in, fan_out, 8, residual=residual) / (fan_in * fan_out)
            raise ValueError(
                f"bpw={bpw} is too low for a ({fan_in}, {fan_out}) kernel with "
                f"{paths} path(s): rank 8 needs {need:.4f} bpw (budget gives rank {max(s, 0):.2f}); "
                "raise bpw, use residual=False, or pass strict=False to use rank 8 anyway")
        rank = 8
    if rank > min(fan_in, fan_out):
        raise ValueError(
            f"bpw={bpw} gives rank {rank} > min(in, out) = {min(fan_in, fan_out)} for a "
            f"({fan_in}, {fan_out}) kernel; use a lower bpw")
    return rank


# ---------------------------------------------------------------------------------------------
# Signs with surrogate gradients.


def sign(x: jax.Array) -> jax.Array:
    """``+1`` where ``x >= 0``, else ``-1``, in ``x``'s dtype (no gradient).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> core.sign(jnp.array([-2.0, 0.0, 3.0])).tolist()
        [-1.0, 1.0, 1.0]
    """
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@jax.custom_jvp
def smooth_sign(x: jax.Array) -> jax.Array:
    """:func:`sign` forward, SmoothSign backward: the derivative of ``tanh(100 x)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> float(core.smooth_sign(jnp.float32(-0.5))), float(jax.grad(core.smooth_sign)(0.0))
        (-1.0, 100.0)

    References:
        LittleBit, Sec. 3.3 (SmoothSign), arXiv 2506.13771.
    """
    return sign(x)


@smooth_sign.defjvp
def _smooth_sign_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    t = jnp.tanh(ALPHA * x)
    return sign(x), dx * (ALPHA * (1 - t * t)).astype(dx.dtype)


@jax.custom_jvp
def clipped_sign(x: jax.Array) -> jax.Array:
    """:func:`sign` forward, clipped straight-through backward (gradient 1 where ``|x| <= 1``).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> jax.vmap(jax.grad(core.clipped_sign))(jnp.array([-2.0, 0.5])).tolist()
        [0.0, 1.0]

    References:
        Bengio et al., arXiv 1308.3432 (straight-through estimator).
    """
    return sign(x)


@clipped_sign.defjvp
def _clipped_sign_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return sign(x), jnp.where(jnp.abs(x) <= 1, dx, jnp.zeros_like(dx))


# ---------------------------------------------------------------------------------------------
# Bit packing.


def _word_bits(word: Any) -> int:
    dt = np.dtype(word)
    if dt not in WORDS:
        raise TypeError(f"word must be uint8 or uint32, got {dt}")
    return 8 * dt.itemsize


@functools.partial(jax.jit, static_argnames=("axis", "word"))
def pack_signs(x: jax.Array, axis: int = 0, word: Any = np.uint8) -> jax.Array:
    """Pack the signs of ``x`` along ``axis`` into words (bit 1 = negative, LSB first).

    Args:
        x: any real array; ``x < 0`` gives bit 1 (``-1``), ``x >= 0`` bit 0 (``+1``).
        axis: the axis to pack; its length ``n`` becomes ``ceil(n / w)``.
        word: ``uint8`` (w = 8) or ``uint32`` (w = 32).

    Returns:
        The packed words; padding bits are 0.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> core.pack_signs(jnp.array([-1.0, 1, 1, -1, 1, 1, 1, 1, -1])).tolist()
        [9, 1]
    """
    w = _word_bits(word)
    x = jnp.moveaxis(x, axis, 0)
    n = x.shape[0]
    bits = jnp.pad((x < 0).astype(word), [(0, (-n) % w)] + [(0, 0)] * (x.ndim - 1))
    bits = bits.reshape((-1, w) + x.shape[1:])
    shifts = jnp.arange(w, dtype=word).reshape((1, w) + (1,) * (x.ndim - 1))
    words = jnp.sum(bits << shifts, axis=1, dtype=word)  # distinct powers of 2: sum == or
    return jnp.moveaxis(words, 0, axis)


def unpack_signs(words: jax.Array, n: int, axis: int = 0, dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of :func:`pack_signs`: ``+-1`` in ``dtype``, axis ``axis`` cut back to ``n``.

    Traceable (used inside the packed matmul); the word size comes from ``words.dtype``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> core.unpack_signs(jnp.array([9, 1], jnp.uint8), 9).tolist()
        [-1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0]
    """
    w = _word_bits(words.dtype)
    words = jnp.moveaxis(words, axis, 0)
    shifts = jnp.arange(w, dtype=words.dtype).reshape((1, w) + (1,) * (words.ndim - 1))
    bits = (words[:, None] >> shifts) & jnp.ones((), words.dtype)
    bits = bits.reshape((-1,) + words.shape[1:])[:n]
    signs = (1 - 2 * bits.astype(jnp.int8)).astype(dtype)
    return jnp.moveaxis(signs, 0, axis)


# ---------------------------------------------------------------------------------------------
# Dual-SVID and Joint-ITQ (paper layout: W is (out, in)).


def _top_svd(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Leading ``rank`` singular triplets from the eigendecomposition of the smaller Gram matrix.

    About 4x faster than a full SVD of a (1536, 384) kernel on CPU; in float32 the singular
    vectors are accurate while ``s_k / s_1`` stays well above ``sqrt(eps) ~ 3e-4``. Signs are
    fixed (each right vector's largest entry is positive): LAPACK's eigenvector signs differ
    between CPUs (x86 and aarch64 were seen to), and Joint-ITQ's result depends on them.
    """
    if w.shape[0] < w.shape[1]:
        q, s, p = _top_svd(w.T, rank)
        return p, s, q
    lam, vecs = jnp.linalg.eigh(_mm(w.T, w))  # ascending
    lam, vecs = lam[::-1][:rank], vecs[:, ::-1][:, :rank]
    peak = jnp.take_along_axis(vecs, jnp.argmax(jnp.abs(vecs), axis=0)[None], axis=0)
    vecs = vecs * jnp.where(peak < 0, -1.0, 1.0).astype(vecs.dtype)
    s = jnp.sqrt(jnp.maximum(lam, 0.0))
    p = _mm(w, vecs) / jnp.where(s > 0, s, 1.0)
    return p, s, vecs


@functools.partial(jax.jit, static_argnames="rank")
def balanced_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``U' = P sqrt(S)`` (out, r) and ``V' = Q sqrt(S)`` (in, r) from the rank-r SVD of ``w``.

    The truncated SVD comes from the eigendecomposition of the smaller Gram matrix in float32
    (deterministic; the official code uses a randomized ``svd_lowrank``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> u, v = core.balanced_factors(jnp.diag(jnp.array([4.0, 1.0])), 1)
        >>> (u @ v.T).round(5).tolist()
        [[4.0, 0.0], [0.0, 0.0]]
    """
    if w.ndim != 2 or not 1 <= rank <= min(w.shape):
        raise ValueError(f"balanced_factors needs a 2-D matrix and 1 <= rank <= min(shape); "
                         f"got shape {w.shape}, rank {rank}")
    p, s, q = _top_svd(w.astype(jnp.float32), rank)
    root = jnp.sqrt(s)
    return p * root, q * root


def _random_orthogonal(key: jax.Array, n: int) -> jax.Array:
    q, _ = linalg.qr_positive(jax.random.normal(key, (n, n), jnp.float32))
    return q


@functools.partial(jax.jit, static_argnames="iters")
def joint_itq(u: jax.Array, v: jax.Array, key: jax.Array, iters: int = 50) -> jax.Array:
    """One orthogonal ``R`` (r, r) for both factors, by ITQ on the stacked rows ``[U; V]``.

    From a random orthogonal start, ``iters`` times: ``B = sign(X R)``, then ``R`` is the
    Procrustes solution of ``min ||X R - B||``. Since ``(U R)(V R)^T = U V^T``, folding ``R``
    into both factors changes only their signs' quality, not their product.

    Args:
        u: (out, r) output-side factor.
        v: (in, r) input-side factor.
        key: PRNG key of the random start.
        iters: number of alternations (static).

    Returns:
        Float32 orthogonal (r, r).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> u, v = jax.random.normal(jax.random.key(0), (2, 30, 8))
        >>> r = core.joint_itq(u, v, jax.random.key(1), iters=10)
        >>> bool(jnp.allclose((u @ r) @ (v @ r).T, u @ v.T, atol=1e-4))
        True

    References:
        LittleBit-2 (Joint-ITQ), arXiv 2603.00042; Gong and Lazebnik, CVPR 2011.
    """
    x = jnp.concatenate([u, v]).astype(jnp.float32)
    r0 = _random_orthogonal(key, x.shape[1])
    return jax.lax.fori_loop(0, iters, lambda _, r: linalg.procrustes(x, sign(_mm(x, r))), r0)


@jax.jit
def svid(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rank-1 fit of ``|a|``: non-negative ``(p, q)`` with ``|a| ~ outer(p, q)``, sqrt(s1) each.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> p, q = core.svid(jnp.array([[-2.0, 4.0], [1.0, -2.0]]))
        >>> jnp.outer(p, q).round(3).tolist()
        [[2.0, 4.0], [1.0, 2.0]]

    References:
        OneBit (SVID), arXiv 2402.11295; LittleBit (Dual-SVID), arXiv 2506.13771.
    """
    p, s, q = _top_svd(jnp.abs(a).astype(jnp.float32), 1)
    root = jnp.sqrt(s[0])  # Perron vectors of |a| are one-signed: abs fixes the sign
    return jnp.abs(p[:, 0] * root), jnp.abs(q[:, 0] * root)


def path_dense(u, v, h, g, l) -> jax.Array:
    """``diag(h) sign(U) diag(l) sign(V)^T diag(g)`` (out, in) of one path, in float32.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.littlebit import core
        >>> core.path_dense(jnp.array([[1.0]]), jnp.array([[-3.0], [2.0]]), jnp.array([2.0]),
        ...                 jnp.array([1.0, 0.5]), jnp.array([3.0])).tolist()
        [[-6.0, 3.0]]
    """
    su = sign(u.astype(jnp.float32)) * (h[:, None] * l[None, :])
    return _mm(su, (sign(v.astype(jnp.float32)) * g[:, None]).T)


@functools.partial(jax.jit, static_argnames=("rank", "residual", "itq_iters"))
def littlebit_init(
    w: jax.Array, key: jax.Array, *, rank: int, residual: bool = True, itq_iters: int = 50
) -> dict[str, jax.Array]:
    """Dual-SVID (+ Joint-ITQ when ``itq_iters > 0``) of ``w`` (out, in), paths stacked.

    Per path: balanced rank-r SVD of the target, Joint-ITQ rotation folded into both factors,
    then SVID magnitudes ``(h, l_u)`` of ``|U|`` and ``(l_v, g)`` of ``|V|``. The residual
    path's target is ``w`` minus the *binarised* primary path.

    Args:
        w: (out, in) matrix, any float dtype (maths in float32).
        key: PRNG key (ITQ's random starts; one fold per path).
        rank: rank per path (static).
        residual: add the residual path.
        itq_iters: Joint-ITQ alternations; 0 is plain Dual-SVID.

    Returns:
        Float32 ``u (P, out, r)``, ``v (P, in, r)``, ``h (P, out)``, ``g (P, in)``,
        ``lu (P, r)``, ``lv (P, r)`` with ``P = 2`` if ``residual`` else 1.

    Examples:
        >>> import jax
        >>> from subspace_jax.littlebit import core
        >>> w = jax.random.normal(jax.random.key(0), (24, 40))
        >>> f = core.littlebit_init(w, jax.random.key(1), rank=8, itq_iters=5)
        >>> f["u"].shape, f["v"].shape, f["g"].shape, f["lu"].shape
        ((2, 24, 8), (2, 40, 8), (2, 40), (2, 8))

    References:
        LittleBit (Dual-SVID, residual), arXiv 2506.13771; LittleBit-2 (Joint-ITQ),
        arXiv 2603.00042.
    """
    target = w.astype(jnp.float32)
    paths = []
    for p in range(2 if residual else 1):
        u, v = balanced_factors(target, rank)
        if itq_iters:
            rot = joint_itq(u, v, jax.random.fold_in(key, p), itq_iters)
            u, v = _mm(u, rot), _mm(v, rot)
        h, lu = svid(u)
        g, lv = svid(v)
        paths.append(dict(u=u, v=v, h=h, g=g, lu=lu, lv=lv))
        target = target - path_dense(u, v, h, g, lu * lv)
    return {k: jnp.stack([path[k] for path in paths]) for k in paths[0]}
