"""WASI's kernel form: factored weights and the activation basis, in any Flax layer.

:class:`WasiKernel` stands where a dense kernel stood (a 2-D ``Dense``/``Linear`` kernel, or
an N-D ``DenseGeneral``/``LinearGeneral``/``Einsum`` kernel folded into its ``(in, out)``
matrix), so the model's own code runs it through the one call path
(:func:`subspace_jax.contraction.form_call`). It carries

* the factors ``a`` ``(in, K)`` and ``b`` ``(K, out)`` (``b`` orthonormal rows: WASI's basis
  ``L^T``; ``a = R^T``), which train (``factored`` variant);
* the activation basis: the previous step's Tucker factors of the layer's folded input
  ``(..., in)``, one float32 ``(dim_n, r_n)`` matrix per mode, frozen (no gradient, no
  optimizer state) and refreshed by every training forward, which
  :func:`~subspace_jax.forms.emit`\\ s them under :attr:`state_key` (the kernel's path) for
  the shared train step to :func:`~subspace_jax.forms.absorb`;
* static settings: the gradient contraction ``order`` and the ``key``.

The refreshed basis leaves the forward through :func:`subspace_jax.forms.emit`, a side channel:
inside ``jax.checkpoint``/``nnx.remat`` (or a scan), collect it within the transformed
function, return it, and emit it again outside (as ``rematerialised`` of
``subspace_lab.wasi_eval`` does); a value may not leave a JAX transform otherwise.

:class:`WasiMasterKernel` is the ``master`` variant: a full master matrix ``w`` trains, and
``a``, ``b`` are frozen and re-derived from it after every step by
:func:`subspace_jax.wasi.post_update`.

References:
    WASI, arXiv 2510.09160.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from subspace_jax import forms
from subspace_jax.wasi import core

Array = jax.Array

__all__ = ["WasiKernel", "WasiMasterKernel", "VARIANTS"]

#: The two weight-side variants.
VARIANTS = ("factored", "master")


def _shape(x: Any) -> tuple[int, ...] | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def _nbytes(x: Any) -> int:
    return 0 if x is None else forms.nbytes(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WasiKernel(forms.LowRank):
    """WASI's kernel (``factored`` variant): a :class:`~subspace_jax.forms.LowRank` ``a @ b``
    with ``b`` orthonormal, plus the activation basis that the custom-VJP op refreshes (see
    the module docstring); its rank, shapes, dense matrix and FLOPs are ``LowRank``'s.

    Attributes:
        a: ``(in, K)`` factor (trains).
        b: ``(K, out)`` factor with orthonormal rows (trains; re-orthonormalised by
            :func:`subspace_jax.wasi.post_update`).
        basis: the activation's Tucker factors, a tuple of float32 ``(dim_n, r_n)``
            matrices, one per mode of the folded input ``(..., in)`` (frozen).
        key: the :attr:`state_key` (the kernel's path; static), also named in errors.
        order: the weight-gradient contraction order (``"auto"``, ``"paper"``,
            ``"project"``; static).
        fold: how an N-D kernel folds into ``(in, out)`` (see
            :class:`subspace_jax.forms.Fold`).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import forms, linalg, wasi
        >>> low = forms.LowRank.from_dense(jax.random.normal(jax.random.key(0), (6, 4)),
        ...                                rank=2, split=1.0)
        >>> x = jax.random.normal(jax.random.key(1), (3, 5, 6))
        >>> basis = linalg.hosvd(x, ranks=(2, 3, 4)).factors
        >>> k = wasi.WasiKernel(low.a, low.b, tuple(basis), key="mlp/up/kernel")
        >>> k.shape, k.rank, k.state_key, bool(jnp.allclose(k.matmul(x), x @ low.a @ low.b))
        ((6, 4), 2, 'mlp/up/kernel', True)
        >>> with forms.collect() as got:                 # a training forward emits the basis
        ...     _ = jax.grad(lambda k: k.matmul(x).sum())(k)
        >>> [u.shape for u in got["mlp/up/kernel"]]
        [(3, 2), (5, 3), (6, 4)]
        >>> k.absorb(got["mlp/up/kernel"]).basis[0].shape
        (3, 2)

    References:
        WASI, Sec. 3 and Algorithm 1, arXiv 2510.09160.
    """

    a: Array
    b: Array
    basis: tuple[Array, ...]
    key: str = dataclasses.field(default="wasi", metadata=dict(static=True))
    order: str = dataclasses.field(default="auto", metadata=dict(static=True))

    #: The activation basis never trains; the factors do.
    frozen_fields: ClassVar[tuple[str, ...]] = ("basis",)
    #: ``"factored"`` or ``"master"``.
    variant: ClassVar[str] = "factored"

    def __post_init__(self):
        # Light checks only: pytree maps rebuild forms with other leaves (bools, None,
        # scalars), so only full-size arrays are checked.
        if not isinstance(self.basis, tuple):
            object.__setattr__(self, "basis", tuple(self.basis))
        if self.order not in core.ORDERS:
            raise ValueError(f"WASI kernel {self.key!r}: order must be one of {core.ORDERS}, "
                             f"got {self.order!r}")
        a, b = _shape(self.a), _shape(self.b)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return
        if a[1] != b[0]:
            raise ValueError(f"WASI kernel {self.key!r} needs a (in, rank) and b (rank, out); "
                             f"got a {a} and b {b}")
        last = _shape(self.basis[-1]) if self.basis else None
        if last is not None and len(last) == 2 and last[0] != a[0]:
            raise ValueError(f"WASI kernel {self.key!r}: the activation basis's last factor "
                             f"{last} must span the input features ({a[0]})")

    # --- the activation ---------------------------------------------------------------
    @property
    def act_shape(self) -> tuple[int, ...]:
        """The calibrated shape of the folded input ``(..., in)`` (training keeps it)."""
        return tuple(int(u.shape[0]) for u in self.basis)

    @property
    def act_ranks(self) -> tuple[int, ...]:
        """The Tucker rank of each mode of the input."""
        return tuple(int(u.shape[1]) for u in self.basis)

    @property
    def state_key(self) -> str:
        return self.key

    def absorb(self, value: Any) -> "WasiKernel":
        """This kernel with the refreshed activation basis ``value`` put back."""
        return dataclasses.replace(self, basis=tuple(value))

    # --- the op -------------------------------------------------------------------------
    def _operands(self) -> tuple[Array | None, Array, Array]:
        return None, self.a, self.b

    def matmul(self, x: Array, *, dtype: Any = None, precision: Any = None,
               dot_general: Callable | None = None) -> Array:
        """``(x @ a) @ b`` by :func:`subspace_jax.wasi.core.wasi_matmul`.

        Differentiated (training), the op refreshes the activation basis from ``x`` (whose
        shape must be the calibrated :attr:`act_shape`), emits it under :attr:`state_key`
        and keeps only the Tucker-compressed ``x`` for backward. Undifferentiated, it is two
        thin matmuls for any batch shape.
        """
        w, a, b = self._operands()
        x, a, b = forms.promote((x, a, b), dtype)
        cfg = core.OpConfig(variant=self.variant, order=self.order, name=self.key,
                            precision=precision, dot_general=dot_general,
                            w_dtype=None if w is None else jnp.dtype(w.dtype))
        y, factors = core.wasi_matmul(cfg, x, w, a, b, tuple(self.basis))
        forms.emit(self.key, factors)
        return y

    # --- accounting ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the factors, the activation basis and (master) the master matrix."""
        return (_nbytes(self.a) + _nbytes(self.b) + sum(_nbytes(u) for u in self.basis)
                + _nbytes(getattr(self, "w", None)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WasiMasterKernel(WasiKernel):
    """WASI's ``master`` variant (the paper code's): the master matrix ``w`` trains, and the
    forward reads the frozen float32 factors ``a``, ``b`` (re-derived from ``w`` after every
    step by one warm-started subspace-iteration step, :func:`subspace_jax.wasi.post_update`).

    Attributes:
        w: the master ``(in, out)`` matrix (the folded kernel, in the kernel's dtype; trains).
        a: ``(in, K)`` float32 factor (frozen).
        b: ``(K, out)`` float32 factor with orthonormal rows (frozen).
        basis: the activation's Tucker factors (frozen), as in :class:`WasiKernel`.
        key: the state key (static).
        order: the weight-gradient contraction order (static).
        fold: how an N-D kernel folds into ``(in, out)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import forms, linalg, train, wasi
        >>> w = jax.random.normal(jax.random.key(0), (6, 4))
        >>> low = forms.LowRank.from_dense(w, rank=2, split=1.0)
        >>> x = jax.random.normal(jax.random.key(1), (3, 6))
        >>> k = wasi.WasiMasterKernel(low.a, low.b, tuple(linalg.hosvd(x, ranks=(3, 6)).factors),
        ...                           w=w)
        >>> train.trainable_mask({"k": k})["k"].w, train.trainable_mask({"k": k})["k"].a
        (True, False)
        >>> jax.grad(lambda k: k.matmul(x).sum())(k).w.shape   # the master matrix's gradient
        (6, 4)
    """

    w: Array = dataclasses.field(kw_only=True)

    frozen_fields: ClassVar[tuple[str, ...]] = ("a", "b", "basis")
    variant: ClassVar[str] = "master"

    @property
    def dtype(self) -> Any:
        """The master matrix's dtype: the forward runs the float32 factors in it, as the
        exported inference form does (:func:`subspace_jax.wasi.export`)."""
        return self.w.dtype

    def matrix(self) -> Array:
        return jnp.matmul(self.a.astype(self.w.dtype), self.b.astype(self.w.dtype))

    def _operands(self) -> tuple[Array | None, Array, Array]:
        dtype = self.w.dtype
        return (self.w, forms.stop_gradient(self.a.astype(dtype)),
                forms.stop_gradient(self.b.astype(dtype)))
