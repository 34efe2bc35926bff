"""Test configuration shared by every test module.

Four forced CPU devices (for sharding tests), strict dtype promotion (a silent
float32/bfloat16 mix is a bug), float32 matmuls at full precision (a GPU's default TF32
would break the exact checks; no change on CPU), and fixed seeds through
``jax.random.key(n)``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402
from compile_count import Compiles  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    """A fixed PRNG key; tests split it as they need."""
    return jax.random.key(0)


@pytest.fixture
def four_devices():
    """Four devices for the sharding tests: the default backend's when it has four, else the
    forced host CPU devices (a machine with one GPU still runs these tests, on its CPU)."""
    devices = jax.devices()
    if len(devices) < 4:
        devices = jax.devices("cpu")
    return devices[:4]


@pytest.fixture(scope="session")
def counting():
    """``fn, traces = counting(loss_fn)``: ``fn`` is ``loss_fn`` plus a list that grows by one
    at every trace (once per compile of a jitted caller)."""

    def wrap(loss_fn):
        traces = []

        def wrapped(*args):
            traces.append(1)
            return loss_fn(*args)

        return wrapped, traces

    return wrap


@pytest.fixture
def compiles():
    """A fresh :class:`compile_count.Compiles`: ``with compiles: ...`` counts the XLA
    compiles inside (``compiles.count``), retraced or not (public ``jax.monitoring`` events)."""
    return Compiles()
