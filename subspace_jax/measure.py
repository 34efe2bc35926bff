"""Measurement: compiled memory, saved residuals, FLOPs, wall-clock time and peak RSS.

Every benchmark of the library measures with these functions, so each one states exactly
what it counts. Compile-time numbers come from XLA (``memory_analysis()``,
``cost_analysis()``), residuals and analytic FLOPs from the jaxpr, times from
``time.perf_counter`` around ``jax.block_until_ready``.

Arguments of ``compiled_memory``, ``flops`` and ``saved_residuals`` are pytrees whose array
leaves (``jax.Array``, ``numpy`` arrays, ``jax.ShapeDtypeStruct``) are traced. Other leaves
(Python ``bool``/``int``/``float``, strings) are closed over as constants, so a Python flag
can steer tracing. An already jitted function is lowered as it is (its own ``static_argnums``
and donation apply).

References: measured behaviour of XLA:CPU in ``research/ecosystem.md`` section 2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.ad_checkpoint
import jax.extend.core
import numpy as np

from subspace_jax import forms

__all__ = [
    "Comparison", "FlopCount", "GradReport", "MemoryStats", "Residual", "Residuals", "Timing",
    "compare", "compiled_memory", "flops", "peak_rss_bytes", "report", "saved_residuals",
    "time_fn", "tree_nbytes",
]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _nbytes(x: Any) -> int:
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return int(x.nbytes)
    return math.prod(x.shape) * int(x.dtype.itemsize)


def _close_over_static(fn: Callable, args: tuple, kwargs: dict) -> tuple[Callable, tuple, dict]:
    """Binds the non-array leaves of ``(args, kwargs)`` into ``fn``; keeps argument names."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    mask = [_is_array(leaf) for leaf in leaves]
    if all(mask):
        return fn, args, kwargs

    def bound(*dyn_args, **dyn_kwargs):
        dyn = iter(jax.tree.leaves((dyn_args, dyn_kwargs)))
        full = [next(dyn) if m else leaf for m, leaf in zip(mask, leaves)]
        a, k = jax.tree.unflatten(treedef, full)
        return fn(*a, **k)

    functools.update_wrapper(bound, fn)  # inspect.signature -> fn's names for debug info
    dyn_args, dyn_kwargs = jax.tree.map(lambda x: x if _is_array(x) else None, (args, kwargs))
    return bound, dyn_args, dyn_kwargs


def _compile(fn: Callable, args: tuple, kwargs: dict) -> jax.stages.Compiled:
    if not callable(fn):
        raise TypeError(f"expected a callable or a jax.stages.Compiled, got {type(fn).__name__}")
    if isinstance(fn, jax.stages.Compiled):
        return fn
    if hasattr(fn, "lower"):
        return fn.lower(*args, **kwargs).compile()
    bound, args, kwargs = _close_over_static(fn, args, kwargs)
    return jax.jit(bound).lower(*args, **kwargs).compile()


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Compile-time buffer sizes of one XLA executable, in bytes.

    ``total = argument + output - alias + temp`` is the footprint of one call. XLA's own
    ``peak_memory_in_bytes`` (kept as ``xla_peak``) is ``argument + output - alias`` on
    XLA:CPU and leaves out ``temp``, so never compare peaks across configurations.
    ``temp`` moves with donation (XLA reuses non-donated output buffers), so compare
    configurations with the same donation settings. For a sharded program the sizes are
    those of one device's executable. Absolute bytes change with the XLA version: compare
    configurations within one run. ``generated_code`` is the executable's code size
    (0 on CPU).
    """

    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int
    xla_peak: int | None
    total: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "total", self.argument + self.output - self.alias + self.temp)

    def __str__(self) -> str:
        parts = ("argument", "output", "alias", "temp", "total")
        return " | ".join(f"{p} {_fmt_bytes(getattr(self, p))}" for p in parts)


def compiled_memory(fn: Callable, *args, **kwargs) -> MemoryStats:
    """Reads ``memory_analysis()`` of ``jax.jit(fn)`` compiled for ``args``.

    Args:
      fn: a function, an already jitted function (lowered as it is, its donation
        respected), or a ``jax.stages.Compiled`` (``args`` are then ignored).
      *args: arrays, ``jax.ShapeDtypeStruct`` or pytrees of them (nothing is run).
      **kwargs: keyword arguments of ``fn``.

    Returns:
      A ``MemoryStats``; ``total = argument + output - alias + temp``.

    Raises:
      RuntimeError: the backend gives no memory analysis (``memory_analysis()`` is None).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((8, 16), jnp.float32)
      >>> m = compiled_memory(lambda x: jnp.tanh(x) * 2, x)
      >>> m.argument, m.output, m.total == m.argument + m.output - m.alias + m.temp
      (512, 512, True)
      >>> compiled_memory(jax.jit(lambda x: x * 2, donate_argnums=0), x).alias
      512
    """
    return _memory_stats(_compile(fn, args, kwargs))


def _memory_stats(compiled: jax.stages.Compiled) -> MemoryStats:
    mem = compiled.memory_analysis()
    if isinstance(mem, (list, tuple)):  # older jax: one entry per executable
        mem = mem[0] if mem else None
    if mem is None:
        backend = jax.default_backend()
        raise RuntimeError(f"memory_analysis() returned None on backend {backend!r}")
    return MemoryStats(
        argument=int(mem.argument_size_in_bytes), output=int(mem.output_size_in_bytes),
        alias=int(mem.alias_size_in_bytes), temp=int(mem.temp_size_in_bytes),
        generated_code=int(mem.generated_code_size_in_bytes),
        xla_peak=getattr(mem, "peak_memory_in_bytes", None))


@dataclasses.dataclass(frozen=True)
class Residual:
    """One array saved for the backward pass: its ``shape``, ``dtype``, ``nbytes`` and
    ``source`` (JAX's description, e.g. ``'output of tanh from model.py:7'``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    source: str

    @property
    def is_input(self) -> bool:
        """True for memory that is live anyway: an argument (also one excluded by
        ``argnums``), a closed-over constant, or a frozen parameter that a kernel form
        read behind :func:`subspace_jax.forms.stop_gradient` (tagged
        :data:`subspace_jax.forms.FROZEN_NAME`).

        Recognition is by name only: an activation computed under a plain
        ``jax.lax.stop_gradient`` is a new array the forward pass keeps, so it counts
        (compressed activations are exactly such arrays).
        """
        return self.source.startswith(
            ("from the argument", "from a constant", f"named '{forms.FROZEN_NAME}"))

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)} {self.source}"


@dataclasses.dataclass(frozen=True)
class Residuals:
    """The residuals of one VJP (``items``).

    ``nbytes`` sums all of them; ``nbytes_excluding_arguments`` leaves out arguments,
    closed-over constants and tagged frozen parameters (``Residual.is_input``), which are
    live anyway, so it is the extra memory that the forward pass keeps for the backward pass.
    """

    items: tuple[Residual, ...]
    nbytes: int = dataclasses.field(init=False)
    nbytes_excluding_arguments: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "nbytes", sum(r.nbytes for r in self.items))
        extra = sum(r.nbytes for r in self.items if not r.is_input)
        object.__setattr__(self, "nbytes_excluding_arguments", extra)

    def __len__(self) -> int:
        return len(self.items)

    def table(self) -> str:
        """One line per residual, then the totals."""
        lines = [f"{_fmt_bytes(r.nbytes):>12}  {r}" for r in self.items]
        lines.append(f"{_fmt_bytes(self.nbytes):>12}  total, "
                     f"{_fmt_bytes(self.nbytes_excluding_arguments)} excluding arguments")
        return "\n".join(lines)


_NO_GRAD = f"{forms.FROZEN_NAME}: non-differentiated argument"


def _no_grad(index: int, tree: Any) -> Any:
    """``stop_gradient`` on each leaf, named so that a saved copy is recognised as an input."""

    def leaf(path, x):
        if not isinstance(x, jax.Array):  # a static Python leaf, closed over
            return x
        name = f"{_NO_GRAD} {index}{jax.tree_util.keystr(path)}"
        return jax.ad_checkpoint.checkpoint_name(jax.lax.stop_gradient(x), name)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _private_saved_residuals() -> Callable:
    try:
        from jax._src.ad_checkpoint import saved_residuals as private
    except ImportError as e:  # private API: fail loudly if jax renames it
        raise ImportError(
            "subspace_jax.measure.saved_residuals needs jax._src.ad_checkpoint.saved_residuals, "
            f"which this jax ({jax.__version__}) does not have; the public "
            "jax.ad_checkpoint.print_saved_residuals prints the same list") from e
    return private


def saved_residuals(fn: Callable, *args, argnums: int | Sequence[int] | None = None) -> Residuals:
    """The arrays JAX saves for the backward pass of ``fn`` at ``args``.

    Traces ``jax.vjp(fn, *args)`` (nothing runs) and lists its residuals, as
    ``jax.ad_checkpoint.print_saved_residuals`` prints them. This is the jaxpr-level view:
    XLA may still change what is live at run time (on CPU it undoes unrolled
    ``jax.checkpoint``; see ``compiled_memory`` of the grad for the compiled view), and a
    slice of an argument (``ws[i]`` in an unrolled loop) is a new array here, so it counts
    as extra. ``argnums`` keeps an argument out of the VJP; if it is still saved it is
    listed as ``named 'frozen parameter: non-differentiated argument i...'`` and counted as
    an input.

    Args:
      fn: the function, usually a scalar loss.
      *args: pytrees of arrays or ``jax.ShapeDtypeStruct``; non-array leaves (Python
        scalars, bools) are closed over as constants.
      argnums: positional arguments to differentiate; the others pass through
        ``lax.stop_gradient``. ``None`` (default) differentiates all of them.

    Returns:
      A ``Residuals`` with one ``Residual`` per saved array.

    Raises:
      ImportError: the private ``jax._src.ad_checkpoint.saved_residuals`` is gone.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((4, 8), jnp.float32)
      >>> res = saved_residuals(lambda w, x: jnp.tanh(x @ w).sum(), jnp.ones((8, 3)), x)
      >>> print(res.table())  # doctest: +ELLIPSIS
              96 B  float32[8, 3] from the argument w
             128 B  float32[4, 8] from the argument x
      ...float32[4, 3] output of tanh from ...
      ... total, ... excluding arguments
    """
    private = _private_saved_residuals()
    if argnums is not None:
        keep = {argnums} if isinstance(argnums, int) else set(argnums)
        if not keep <= set(range(len(args))):
            raise ValueError(f"argnums {argnums!r} out of range for {len(args)} arguments")
        base = fn

        def fn(*a):
            return base(*(x if i in keep else _no_grad(i, x) for i, x in enumerate(a)))

        functools.update_wrapper(fn, base)
    bound, args, _ = _close_over_static(fn, args, {})
    items = []
    for aval, source in private(bound, *args):
        shape, dtype = tuple(aval.shape), aval.dtype
        items.append(Residual(shape, dtype, math.prod(shape) * int(dtype.itemsize), source))
    return Residuals(tuple(items))


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one call, counted two ways.

    ``matmul`` is exact and analytic: ``2*M*N*K`` (batch dims included) per ``dot_general``
    of the dead-code-eliminated jaxpr, times scan trip counts (times the mesh size for a
    ``shard_map`` body), the largest branch of a ``cond``, one trip of a ``while`` (then
    ``has_while`` is True: the total is a lower bound). ``conv`` is the same for
    ``conv_general_dilated`` (``2 * out.size * in_features_per_group * window``, with
    dilated zeros counted as dense). ``xla`` is ``cost_analysis()['flops']`` of the
    compiled program: it includes elementwise ops but counts a scan/while body ONCE, and is
    per device for sharded programs (``None`` where the backend gives nothing).
    """

    matmul: int
    conv: int
    xla: float | None
    has_while: bool

    def __str__(self) -> str:
        xla = "n/a" if self.xla is None else f"{self.xla:.4g}"
        loop = " (while: one trip counted)" if self.has_while else ""
        return f"matmul {self.matmul:.4g} | conv {self.conv:.4g} | xla {xla}{loop}"


def _sub_jaxprs(value: Any) -> list:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _eqn_flops(eqn) -> tuple[int, int]:
    name = eqn.primitive.name
    if name == "dot_general":
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        (_, rc), (_, rb) = eqn.params["dimension_numbers"]
        rhs_free = [d for i, d in enumerate(rhs) if i not in set(rc) | set(rb)]
        return 2 * math.prod(lhs) * math.prod(rhs_free), 0
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *window)
        window = math.prod(rhs[d] for d in spec[2:])
        return 0, 2 * math.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * window
    return 0, 0


def _count(jaxpr) -> tuple[int, int, bool]:
    matmul, conv, has_while = 0, 0, False
    for eqn in jaxpr.eqns:
        m, c = _eqn_flops(eqn)
        subs = [_count(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        name, factor = eqn.primitive.name, 1
        if name == "cond" and subs:
            subs = [max(subs, key=lambda s: s[0] + s[1])] + [(0, 0, any(s[2] for s in subs))]
        elif name == "scan":
            factor = int(eqn.params["length"])
        elif name == "shard_map":
            mesh = eqn.params["mesh"]
            axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes")
            factor = math.prod(mesh.shape[a] for a in (axes or mesh.axis_names))
        has_while |= name == "while" or any(s[2] for s in subs)
        matmul += m + factor * sum(s[0] for s in subs)
        conv += c + factor * sum(s[1] for s in subs)
    return matmul, conv, has_while


def _dce(jaxpr):
    try:
        from jax._src.interpreters.partial_eval import dce_jaxpr
    except ImportError:  # private API: without DCE, dead dots are counted too
        warnings.warn(f"jax {jax.__version__} has no partial_eval.dce_jaxpr: FlopCount.matmul "
                      "also counts dead code", RuntimeWarning, stacklevel=3)
        return jaxpr
    return dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)[0]


def flops(fn: Callable, *args, **kwargs) -> FlopCount:
    """Analytic matmul/conv FLOPs of ``fn`` and XLA's own count (see ``FlopCount``).

    Args:
      fn: a function or a jitted function (not a ``Compiled``: the jaxpr is needed).
      *args: arrays, ``jax.ShapeDtypeStruct`` or pytrees of them (nothing is run).
      **kwargs: keyword arguments of ``fn``.

    Returns:
      A ``FlopCount``. Differentiate first for a training step:
      ``flops(jax.grad(loss), params, batch)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x, w = jnp.ones((32, 64), jnp.float32), jnp.ones((64, 16), jnp.float32)
      >>> f = flops(lambda x, w: x @ w, x, w)
      >>> f.matmul == 2 * 32 * 64 * 16, f.has_while
      (True, False)
      >>> body = lambda h, w: (h @ w, None)
      >>> flops(lambda h, ws: jax.lax.scan(body, h, ws)[0], x, jnp.ones((5, 64, 64))).matmul
      1310720
    """
    if isinstance(fn, jax.stages.Compiled):
        raise TypeError("flops() needs the function, not a jax.stages.Compiled (no jaxpr)")
    return _flops(fn, args, kwargs, _compile(fn, args, kwargs))


def _flops(fn: Callable, args: tuple, kwargs: dict, compiled: jax.stages.Compiled) -> FlopCount:
    bound, dyn_args, dyn_kwargs = (
        (fn, args, kwargs) if hasattr(fn, "lower") else _close_over_static(fn, args, kwargs))
    closed = jax.make_jaxpr(bound)(*dyn_args, **dyn_kwargs)
    matmul, conv, has_while = _count(_dce(closed.jaxpr))
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per executable
        cost = cost[0] if cost else None
    xla = float(cost["flops"]) if cost and "flops" in cost else None
    return FlopCount(matmul=matmul, conv=conv, xla=xla, has_while=has_while)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of ``repeats`` calls after warm-up: ``median``, ``min``, ``times``."""

    median: float
    min: float
    times: tuple[float, ...]

    def __str__(self) -> str:
        n = len(self.times)
        return f"median {self.median * 1e3:.3f} ms, min {self.min * 1e3:.3f} ms (n={n})"


def _check_counts(warmup: int, repeats: int) -> None:
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")


def _time_once(fn: Callable, args: tuple) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _timing(times: list[float]) -> Timing:
    return Timing(median=statistics.median(times), min=min(times), times=tuple(times))


def time_fn(fn: Callable, *args, warmup: int = 2, repeats: int = 10) -> Timing:
    """Times ``fn(*args)`` (blocking on its outputs) after ``warmup`` untimed calls.

    The warm-up calls absorb compilation, so pass a jitted ``fn``; with ``warmup=0`` the
    first time includes the compile. Dispatch overhead is part of every time.

    Args:
      fn: the function to call.
      *args: its positional arguments.
      warmup: untimed calls first (>= 0).
      repeats: timed calls (>= 1).

    Returns:
      A ``Timing`` in seconds.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> t = time_fn(jax.jit(jnp.sin), jnp.ones(8), repeats=3)
      >>> len(t.times), t.min <= t.median
      (3, True)
    """
    _check_counts(warmup, repeats)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    return _timing([_time_once(fn, args) for _ in range(repeats)])


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Timings measured side by side; ``timings`` keeps the order given to ``compare``."""

    timings: Mapping[str, Timing]

    def median(self, name: str) -> float:
        """Median seconds of ``name``."""
        return self.timings[name].median

    def ratio(self, a: str, b: str) -> float:
        """``median(a) / median(b)``: above 1 means ``a`` is slower."""
        return self.median(a) / self.median(b)

    def table(self) -> str:
        """One row per function: median, min and the ratio of medians to the first entry."""
        first = next(iter(self.timings))
        rows = [f"{'name':<20} {'median ms':>10} {'min ms':>10} {'vs ' + first:>12}"]
        for name, t in self.timings.items():
            rows.append(f"{name:<20} {t.median * 1e3:>10.3f} {t.min * 1e3:>10.3f} "
                        f"{self.ratio(name, first):>11.3f}x")
        return "\n".join(rows)

    __str__ = table


def compare(fns: Mapping[str, tuple[Callable, tuple]], *, warmup: int = 2,
            repeats: int = 10) -> Comparison:
    """Times several functions round-robin (a, b, a, b, ...) so that noise hits all alike.

    Args:
      fns: name -> ``(fn, args)``; the first entry is the baseline of ``table()``.
      warmup: untimed rounds first (>= 0); they absorb compilation.
      repeats: timed rounds (>= 1).

    Returns:
      A ``Comparison``; ``ratio(a, b) == median(a) / median(b)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones(8)
      >>> c = compare({"sin": (jax.jit(jnp.sin), (x,)), "cos": (jax.jit(jnp.cos), (x,))},
      ...             repeats=3)
      >>> list(c.timings), c.ratio("sin", "sin")
      (['sin', 'cos'], 1.0)
    """
    _check_counts(warmup, repeats)
    if not fns:
        raise ValueError("compare() needs at least one function")
    for name, entry in fns.items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0])):
            raise TypeError(f"fns[{name!r}] must be a (callable, args tuple) pair, got {entry!r}")
    for _ in range(warmup):
        for fn, args in fns.values():
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            times[name].append(_time_once(fn, tuple(args)))
    return Comparison({name: _timing(ts) for name, ts in times.items()})


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    From ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which Linux reports in KiB and macOS
    in bytes. It never goes down: measure a job in a fresh process to attribute the peak.

    Returns:
      Bytes, as an int.

    Examples:
      >>> peak_rss_bytes() > 0
      True
    """
    try:
        import resource
    except ImportError as e:  # Windows
        raise RuntimeError("peak_rss_bytes() needs the POSIX 'resource' module") from e
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def tree_nbytes(tree: Any) -> int:
    """Sum of the bytes of the array leaves of ``tree``.

    Registered pytree dataclasses are flattened into their array fields; a
    ``jax.ShapeDtypeStruct`` counts ``size * itemsize``. Leaves that are not arrays (Python
    scalars, strings) count 0.

    Args:
      tree: any pytree.

    Returns:
      Bytes, as an int.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> tree = {"w": jnp.ones((4, 4), jnp.bfloat16), "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
      >>> tree_nbytes(tree)
      48
    """
    return sum(_nbytes(leaf) for leaf in jax.tree.leaves(tree) if _is_array(leaf))


@dataclasses.dataclass(frozen=True)
class GradReport:
    """Memory and FLOPs of ``jax.value_and_grad(loss)``, and the residuals of ``loss``.

    Attributes:
        memory: compiled memory of the gradient computation.
        residuals: arrays the forward pass saves for the backward pass.
        flops: FLOPs of the gradient computation.
    """

    memory: MemoryStats
    residuals: Residuals
    flops: FlopCount

    def table(self) -> str:
        """Three lines: memory, residuals, FLOPs."""
        res = self.residuals
        return "\n".join([
            f"memory    {self.memory}",
            f"residuals {len(res)} arrays, {_fmt_bytes(res.nbytes)} "
            f"({_fmt_bytes(res.nbytes_excluding_arguments)} excluding arguments)",
            f"flops     {self.flops}"])

    __str__ = table


def report(loss_fn: Callable, *args, argnums: int | Sequence[int] = 0) -> GradReport:
    """Bundles ``compiled_memory``, ``saved_residuals`` and ``flops`` of a gradient step.

    Args:
      loss_fn: scalar loss ``loss_fn(*args)``.
      *args: its arguments (arrays, ``jax.ShapeDtypeStruct`` or pytrees of them).
      argnums: the arguments differentiated, as in ``jax.grad``.

    Returns:
      A ``GradReport`` of ``jax.value_and_grad(loss_fn, argnums)`` (no donation).

    Examples:
      >>> import jax.numpy as jnp
      >>> r = report(lambda w, x: (x @ w).sum(), jnp.ones((8, 3)), jnp.ones((4, 8)))
      >>> r.flops.matmul == 2 * (2 * 4 * 8 * 3), r.residuals.nbytes_excluding_arguments
      (True, 0)
    """
    step = jax.value_and_grad(loss_fn, argnums=argnums)
    compiled = _compile(step, args, {})  # once for memory and flops
    return GradReport(memory=_memory_stats(compiled),
                      residuals=saved_residuals(loss_fn, *args, argnums=argnums),
                      flops=_flops(step, args, {}, compiled))
