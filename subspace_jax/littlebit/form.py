"""LittleBit kernel forms: binary low-rank factors with scales, for training and deployed.

In Flax layout (``kernel (in, out)``, ``y = x @ kernel``) one path of rank ``r`` is

    kernel_path = diag(g) sign(V) diag(l) sign(U)^T diag(h)

with ``V (in, r)``, ``U (out, r)``, column scale ``g (in)``, row scale ``h (out)`` and latent
scale ``l (r)``; the kernel is the sum of ``P`` such paths (``P = 2`` with the residual path),
stored stacked on a leading axis. An N-D kernel (``DenseGeneral``/``LinearGeneral``/``Einsum``)
is folded into its ``(in, out)`` matrix first; the forms factor that matrix (``matrix_shape``,
``matrix()``) and record the static :class:`~subspace_jax.forms.Fold`, so ``shape`` and
``materialize()`` are the N-D kernel's. Two forms hold it:

* :class:`BinaryLowRank` (training): real latent ``u``, ``v`` whose signs are used, with a
  SmoothSign (``tanh(100 x)``) or clipped straight-through gradient, and the latent scale
  as the two Dual-SVID factors ``lu * lv`` (trained as a product, as in LittleBit).
* :class:`PackedBinaryLowRank` (deployed): signs bit-packed LSB-first along ``in``/``out``
  into ``uint8`` or ``uint32`` words, ``h``, ``g`` and the fused ``l = lu * lv`` in 16 bits.

Both compute ``x @ kernel`` as two thin matmuls for all paths at once: the ``+-1`` signs are
unpacked (or taken) in the compute dtype, the scales folded into these thin ``(in, P r)`` and
``(P r, out)`` matrices, then ``(x @ A) @ B``. The dense kernel is never formed.

References:
    LittleBit, arXiv 2506.13771; LittleBit-2, arXiv 2603.00042.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import forms
from subspace_jax.littlebit import core

__all__ = ["BinaryLowRank", "PackedBinaryLowRank"]

_SIGNS = {"smooth": core.smooth_sign, "clipped": core.clipped_sign}


def _thin(sv, su, g, h, l):
    """``A = diag(g) sign(V) diag(l)`` (in, P r) and ``B = sign(U)^T diag(h)`` (P r, out)."""
    paths, fan_in, rank = sv.shape
    a = jnp.moveaxis(sv * g[..., None] * l[:, None, :], 0, 1).reshape(fan_in, paths * rank)
    b = jnp.moveaxis(su * h[..., None], 0, 1).reshape(su.shape[1], paths * rank).T
    return a, b


def _matmul(x, sv, su, g, h, l, precision, dot_general):
    a, b = _thin(sv, su, g, h, l)
    h = forms.dot(x, a, precision=precision, dot_general=dot_general)
    return forms.dot(h, b, precision=precision, dot_general=dot_general)


def _dense(sv, su, g, h, l, dtype):
    a, b = _thin(*(t.astype(jnp.float32) for t in (sv, su, g, h, l)))
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).astype(dtype)


def _shaped(*xs) -> bool:
    return all(hasattr(x, "shape") and hasattr(x, "dtype") for x in xs)


def _check(name, shapes: dict[str, tuple[int, ...]], expect: dict[str, tuple[int, ...]]):
    bad = {k: v for k, v in shapes.items() if tuple(v) != expect[k]}
    if bad:
        raise ValueError(f"{name}: inconsistent shapes {shapes} (expected {expect})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BinaryLowRank(forms.KernelForm):
    """Training state of a LittleBit kernel: latent factors whose signs are used, and scales.

    Attributes:
        u: ``(P, out, r)`` output-side latent factor; its signs are used.
        v: ``(P, in, r)`` input-side latent factor; its signs are used.
        h: ``(P, out)`` row (output) scale.
        g: ``(P, in)`` column (input) scale.
        lu: ``(P, r)`` latent scale from ``|U|``; the path uses ``l = lu * lv``.
        lv: ``(P, r)`` latent scale from ``|V|``.
        grad: ``"smooth"`` (SmoothSign, derivative of ``tanh(100 x)``) or ``"clipped"``
            (straight-through where ``|x| <= 1``), static.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import littlebit
        >>> w = jax.random.normal(jax.random.key(0), (64, 48))
        >>> k = littlebit.BinaryLowRank.from_dense(w, rank=8)
        >>> k.shape, k.rank, k.paths, k.u.shape, k.flops(tokens=1)
        ((64, 48), 8, 2, (2, 48, 8), 3584)
        >>> k.matmul(jnp.ones((3, 64))).shape
        (3, 48)
        >>> err = jnp.linalg.norm(k.materialize() - w) / jnp.linalg.norm(w)
        >>> bool(err < 1.0)
        True
    """

    u: jax.Array
    v: jax.Array
    h: jax.Array
    g: jax.Array
    lu: jax.Array
    lv: jax.Array
    grad: str = dataclasses.field(default="smooth", metadata=dict(static=True))

    frozen_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if self.grad not in _SIGNS:
            raise ValueError(f"BinaryLowRank.grad must be one of {sorted(_SIGNS)}, got {self.grad!r}")
        if _shaped(self.u, self.v, self.h, self.g, self.lu, self.lv) and len(self.u.shape) == 3:
            p, n_out, r = self.u.shape
            n_in = self.v.shape[1] if len(self.v.shape) == 3 else -1
            _check("BinaryLowRank",
                   dict(v=self.v.shape, h=self.h.shape, g=self.g.shape, lu=self.lu.shape,
                        lv=self.lv.shape),
                   dict(v=(p, n_in, r), h=(p, n_out), g=(p, n_in), lu=(p, r), lv=(p, r)))

    @classmethod
    def from_dense(
        cls,
        kernel: jax.Array,
        *,
        rank: int,
        residual: bool = True,
        itq_iters: int = 50,
        key: jax.Array | None = None,
        grad: str = "smooth",
        dtype: Any = None,
        in_axes: int | tuple[int, ...] | None = None,
    ) -> "BinaryLowRank":
        """Initialise from a dense ``(in, out)`` (or N-D, folded) kernel by Dual-SVID and Joint-ITQ.

        An N-D kernel (``DenseGeneral``/``LinearGeneral``/``Einsum``) is folded into its
        ``(in, out)`` matrix by :func:`subspace_jax.forms.fold_kernel`; that matrix is what the
        paths factor, and the form records the :class:`~subspace_jax.forms.Fold`, so
        :meth:`materialize` returns the N-D kernel.

        Args:
            kernel: finite 2-D ``(in, out)`` array, or an N-D one with ``in_axes``.
            rank: rank per path, ``1 <= rank <= min(in, out)`` of the (folded) matrix.
            residual: add the residual path (fitted to what the binarised primary leaves).
            itq_iters: Joint-ITQ alternations; 0 gives plain Dual-SVID.
            key: PRNG key of ITQ's random start (default ``jax.random.key(0)``).
            grad: the sign's surrogate gradient, ``"smooth"`` or ``"clipped"``.
            dtype: dtype of the stored arrays (default: the kernel's); maths in float32.
            in_axes: for an N-D kernel, the kernel axes that contract with the input (see
                :class:`subspace_jax.forms.Fold`); None for a 2-D ``(in, out)`` kernel.

        Returns:
            The training form.

        Raises:
            ValueError: a kernel that is not 2-D and has no fitting ``in_axes``, NaN/Inf
                entries, or a rank out of range.

        Examples:
            >>> import jax, jax.numpy as jnp
            >>> from subspace_jax import littlebit
            >>> k = littlebit.BinaryLowRank.from_dense(jnp.eye(16), rank=8, residual=False)
            >>> k.paths, k.dtype
            (1, dtype('float32'))
            >>> w = jax.random.normal(jax.random.key(0), (2, 16, 8))   # Einsum (heads, d, head_dim)
            >>> k3 = littlebit.BinaryLowRank.from_dense(w, rank=8, in_axes=(1,), itq_iters=2)
            >>> k3.shape, k3.matrix_shape, k3.materialize().shape
            ((2, 16, 8), (16, 16), (2, 16, 8))
        """
        ndim = getattr(kernel, "ndim", None)
        if ndim is None or ndim < 2:
            raise ValueError(f"expected a 2-D (in, out) or an N-D kernel, got shape "
                             f"{tuple(jnp.shape(kernel))}")
        matrix, fold = forms.fold_kernel(kernel, in_axes)
        low = min(matrix.shape)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= low:
            folded = f" (kernel {tuple(kernel.shape)} folded)" if fold is not None else ""
            raise ValueError(f"rank must be an int in [1, {low}] for "
                             f"{tuple(matrix.shape)}{folded}, got {rank!r}")
        if not bool(jnp.isfinite(matrix).all()):
            bad = int(matrix.size - jnp.isfinite(matrix).sum())
            raise ValueError(f"kernel contains NaN or Inf ({bad} non-finite entries)")
        key = jax.random.key(0) if key is None else key
        parts = core.littlebit_init(matrix.T, key, rank=rank, residual=residual,
                                    itq_iters=itq_iters)
        dtype = jnp.dtype(dtype if dtype is not None else kernel.dtype)
        return cls(**{k: t.astype(dtype) for k, t in parts.items()}, grad=grad, fold=fold)

    @property
    def rank(self) -> int:
        """Rank of each path."""
        return int(self.u.shape[2])

    @property
    def paths(self) -> int:
        """Number of paths: 1, or 2 with the residual path."""
        return int(self.u.shape[0])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (int(self.v.shape[1]), int(self.u.shape[1]))

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.u.dtype)

    def _parts(self, dtype: Any):
        signfn = _SIGNS[self.grad]
        u, v, h, g, lu, lv = forms.promote((self.u, self.v, self.h, self.g, self.lu, self.lv), dtype)
        return signfn(v), signfn(u), g, h, lu * lv

    def matrix(self) -> jax.Array:
        return _dense(*self._parts(jnp.float32), self.dtype)

    def matmul(self, x, *, dtype: Any = None, precision: Any = None, dot_general: Any = None):
        dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x.dtype, self.dtype)
        return _matmul(jnp.asarray(x, dtype), *self._parts(dtype), precision, dot_general)

    @property
    def nbytes(self) -> int:
        return sum(forms.nbytes(t) for t in (self.u, self.v, self.h, self.g, self.lu, self.lv))

    def flops(self, tokens: int) -> int:
        return 2 * int(tokens) * self.paths * self.rank * sum(self.matrix_shape)

    def deploy(self, *, word: Any = np.uint8, scale_dtype: Any = jnp.float16) -> "PackedBinaryLowRank":
        """The deployed form: packed signs, 16-bit ``h``, ``g`` and fused ``l = lu * lv``.

        Args:
            word: ``uint8`` or ``uint32`` packing words.
            scale_dtype: ``float16`` or ``bfloat16``.

        Raises:
            ValueError: a scale is not finite in ``scale_dtype`` (overflow).
            TypeError: a bad ``word`` or ``scale_dtype``.

        Examples:
            >>> import jax, jax.numpy as jnp
            >>> from subspace_jax import littlebit
            >>> k = littlebit.BinaryLowRank.from_dense(jnp.eye(20), rank=8).deploy()
            >>> k.v_bits.shape, k.v_bits.dtype, k.l.shape, k.l.dtype, k.bits
            ((2, 3, 8), dtype('uint8'), (2, 8), dtype('float16'), 2304)
        """
        if jnp.dtype(scale_dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
            raise TypeError(f"scale_dtype must be float16 or bfloat16, got {jnp.dtype(scale_dtype)}")
        scales = dict(h=self.h, g=self.g, l=self.lu.astype(jnp.float32) * self.lv.astype(jnp.float32))
        scales = {k: jnp.asarray(t, jnp.float32).astype(scale_dtype) for k, t in scales.items()}
        for name, t in scales.items():
            if not bool(jnp.isfinite(t).all()):
                raise ValueError(
                    f"scale {name} does not fit in {jnp.dtype(scale_dtype)} (overflow or NaN)")
        return PackedBinaryLowRank(
            v_bits=core.pack_signs(self.v, axis=1, word=np.dtype(word).type),
            u_bits=core.pack_signs(self.u, axis=1, word=np.dtype(word).type),
            param_dtype=str(self.dtype), fold=self.fold, **scales)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBinaryLowRank(forms.KernelForm):
    """Deployed LittleBit kernel: bit-packed signs and 16-bit scales, evaluated from the bits.

    Attributes:
        v_bits: ``(P, ceil(in / w), r)`` signs of ``V`` packed along ``in`` (bit 1 = -1, LSB
            first, ``w`` = 8 or 32 by dtype ``uint8``/``uint32``, padding bits 0).
        u_bits: ``(P, ceil(out / w), r)`` signs of ``U`` packed along ``out``.
        h: ``(P, out)`` 16-bit row scale.
        g: ``(P, in)`` 16-bit column scale.
        l: ``(P, r)`` 16-bit fused latent scale.
        param_dtype: dtype name of the kernel it stands for (outputs), static.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import littlebit
        >>> w = jax.random.normal(jax.random.key(0), (40, 24))
        >>> train = littlebit.BinaryLowRank.from_dense(w, rank=8)
        >>> k = train.deploy(word=jnp.uint32)
        >>> k.shape, k.dtype, k.u_bits.shape, k.nbytes
        ((40, 24), dtype('float32'), (2, 1, 8), 480)
        >>> x = jnp.ones((2, 40))
        >>> bool(jnp.allclose(k.matmul(x), x @ k.materialize(), rtol=1e-5, atol=1e-4))
        True
    """

    v_bits: jax.Array
    u_bits: jax.Array
    h: jax.Array
    g: jax.Array
    l: jax.Array  # noqa: E741  (the papers' name)
    param_dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

    frozen_fields: ClassVar[tuple[str, ...]] = ("h", "g", "l")

    def __post_init__(self):
        if _shaped(self.v_bits, self.u_bits, self.h, self.g, self.l) and len(self.v_bits.shape) == 3:
            p, _, r = self.v_bits.shape
            w = 8 * jnp.dtype(self.v_bits.dtype).itemsize
            n_in, n_out = self.g.shape[-1], self.h.shape[-1]
            _check("PackedBinaryLowRank",
                   dict(u_bits=self.u_bits.shape, v_bits=self.v_bits.shape, h=self.h.shape,
                        g=self.g.shape, l=self.l.shape),
                   dict(u_bits=(p, -(-n_out // w), r), v_bits=(p, -(-n_in // w), r), h=(p, n_out),
                        g=(p, n_in), l=(p, r)))
            if jnp.dtype(self.u_bits.dtype) != jnp.dtype(self.v_bits.dtype):
                raise ValueError(f"u_bits {self.u_bits.dtype} and v_bits {self.v_bits.dtype} differ")

    @property
    def rank(self) -> int:
        """Rank of each path."""
        return int(self.l.shape[1])

    @property
    def paths(self) -> int:
        """Number of paths: 1, or 2 with the residual path."""
        return int(self.l.shape[0])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (int(self.g.shape[1]), int(self.h.shape[1]))

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def _parts(self, dtype: Any):
        fan_in, fan_out = self.matrix_shape
        sv = core.unpack_signs(self.v_bits, fan_in, axis=1, dtype=dtype)
        su = core.unpack_signs(self.u_bits, fan_out, axis=1, dtype=dtype)
        return sv, su, self.g.astype(dtype), self.h.astype(dtype), self.l.astype(dtype)

    def matrix(self) -> jax.Array:
        return _dense(*self._parts(jnp.float32), self.dtype)

    def matmul(self, x, *, dtype: Any = None, precision: Any = None, dot_general: Any = None):
        dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x.dtype, self.dtype)
        return _matmul(jnp.asarray(x, dtype), *self._parts(dtype), precision, dot_general)

    @property
    def nbytes(self) -> int:
        return sum(forms.nbytes(t) for t in (self.v_bits, self.u_bits, self.h, self.g, self.l))

    @property
    def bits(self) -> int:
        """Exact stored bits: packed signs with their padding, plus the 16-bit scales."""
        return 8 * self.nbytes

    def flops(self, tokens: int) -> int:
        return 2 * int(tokens) * self.paths * self.rank * sum(self.matrix_shape)

