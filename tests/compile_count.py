"""Counting XLA compiles with public JAX API (``jax.monitoring``), not a jitted function's
private cache.

A trace counter (a Python side effect in the traced function, ``counting`` in conftest)
misses a recompile without a retrace, e.g. for arguments committed to a device; every
compile, retraced or not, records JAX's backend-compile event (or, with a persistent
compilation cache, a cache hit), which :class:`Compiles` counts.
"""

from __future__ import annotations

import functools

import jax

#: ``jax.monitoring`` duration event of one XLA compile (jax._src.dispatch.BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
#: ``jax.monitoring`` event of an executable read from the persistent compilation cache.
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Compiles:
    """``with counter: ...`` or ``counter.wrap(fn)(...)``: ``counter.count`` grows by one
    for every XLA compile inside (nested blocks count once)."""

    def __init__(self):
        self.count = 0
        self._depth = 0

    def _duration(self, event, duration, **kwargs):
        if event == COMPILE_EVENT:
            self.count += 1

    def _event(self, event, **kwargs):
        if event == CACHE_HIT_EVENT:
            self.count += 1

    def __enter__(self) -> "Compiles":
        if not self._depth:
            jax.monitoring.register_event_duration_secs_listener(self._duration)
            jax.monitoring.register_event_listener(self._event)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if not self._depth:
            jax.monitoring.unregister_event_duration_listener(self._duration)
            jax.monitoring.unregister_event_listener(self._event)

    def wrap(self, fn):
        """``fn`` whose calls are counted."""

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return counted
