"""Fixed-shape, seeded mini-batches over numpy arrays, and group-wise splits.

A jitted training step compiles once per input shape, so :func:`batches` drops the
last, smaller batch by default: every batch it yields has exactly ``batch_size`` rows.
Each epoch visits every example at most once, in an order that depends only on
``seed`` and the epoch number.

:func:`group_split` assigns whole groups (modules, documents) to train/val/test so that
each part gets about its share of the total size while no group is cut in two.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np

__all__ = ["batches", "num_batches", "group_split", "check_split_fractions"]

Arrays = TypeVar("Arrays", np.ndarray, tuple, dict)


def _leaves(arrays: np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray],
            ) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` pairs; names are dict keys or ``[i]`` positions."""
    if isinstance(arrays, np.ndarray):
        return [("array", arrays)]
    if isinstance(arrays, Mapping):
        items = [(f"[{k!r}]", v) for k, v in arrays.items()]
    elif isinstance(arrays, Sequence) and not isinstance(arrays, (str, bytes)):
        items = [(f"[{i}]", v) for i, v in enumerate(arrays)]
    else:
        raise TypeError(f"arrays must be an array, a tuple/list or a dict of arrays, got "
                        f"{type(arrays).__name__}")
    if not items:
        raise ValueError("arrays is empty: need at least one array")
    return [(name, np.asarray(value)) for name, value in items]


def _num_examples(arrays: np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> int:
    leaves = _leaves(arrays)
    for name, value in leaves:
        if value.ndim == 0:
            raise ValueError(f"array {name} is a scalar; every array needs a leading "
                             f"example axis")
    sizes = {name: value.shape[0] for name, value in leaves}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in sizes.items())
        raise ValueError(f"arrays disagree on the number of examples (leading dim): {listed}")
    return next(iter(sizes.values()))


def _check(n: int, batch_size: int, epochs: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the number of examples "
                         f"N={n}")


def num_batches(arrays_or_n: int | np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray],
                batch_size: int, *, drop_last: bool = True, epochs: int = 1) -> int:
    """How many batches :func:`batches` yields with the same arguments.

    Args:
        arrays_or_n: The arrays, or their number of examples ``N``.
        batch_size: Rows per batch.
        drop_last: Whether the last incomplete batch of each epoch is dropped.
        epochs: Number of passes.

    Returns:
        ``epochs * (N // batch_size)``, or ``epochs * ceil(N / batch_size)`` if not
        ``drop_last``.

    Raises:
        ValueError: If ``batch_size`` is not in ``[1, N]`` or ``epochs < 1``.

    Examples:
        >>> num_batches(10, 3), num_batches(10, 3, drop_last=False, epochs=2)
        (3, 8)
    """
    if isinstance(arrays_or_n, (int, np.integer)) and not isinstance(arrays_or_n, bool):
        n = int(arrays_or_n)
    else:
        n = _num_examples(arrays_or_n)
    _check(n, batch_size, epochs)
    per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    return epochs * per_epoch


def _take(arrays, leaves: list[tuple[str, np.ndarray]], index: np.ndarray):
    """Index every array with ``index``, keeping the container type of ``arrays``."""
    taken = [value[index] for _, value in leaves]
    if isinstance(arrays, np.ndarray):
        return taken[0]
    if isinstance(arrays, Mapping):
        return dict(zip(arrays.keys(), taken))
    return tuple(taken)


def batches(arrays: Arrays, batch_size: int, *, seed: int, shuffle: bool = True,
            drop_last: bool = True, epochs: int = 1) -> Iterator[Arrays]:
    """Yield mini-batches of ``arrays`` along their leading (example) axis.

    Args:
        arrays: One array, a tuple/list of arrays or a dict of arrays, all with the same
            leading dimension ``N``.
        batch_size: Rows per batch.
        seed: Seed of the per-epoch permutations (epoch ``e`` uses the ``e``-th
            permutation of ``np.random.default_rng(seed)``).
        shuffle: Permute the examples each epoch; if false, yield them in order.
        drop_last: Drop the last incomplete batch of each epoch, so every batch has
            exactly ``batch_size`` rows (one compiled shape for a jitted step).
        epochs: Number of passes over the data.

    Returns:
        An iterator of batches with the container type of ``arrays`` (a list becomes a
        tuple): ``num_batches(arrays, batch_size, drop_last=..., epochs=...)`` of them.

    Raises:
        ValueError: If the leading dimensions disagree, ``batch_size`` is not in
            ``[1, N]``, or ``epochs < 1``.

    Examples:
        >>> import numpy as np
        >>> x, y = np.arange(10).reshape(5, 2), np.arange(5)
        >>> [b[1].tolist() for b in batches((x, y), 2, seed=0, shuffle=False)]
        [[0, 1], [2, 3]]
        >>> [b["y"].shape for b in batches({"x": x, "y": y}, 2, seed=0)]
        [(2,), (2,)]
    """
    leaves = _leaves(arrays)
    n = _num_examples(arrays)
    _check(n, batch_size, epochs)
    return _generate(arrays, leaves, n, batch_size, seed, shuffle, drop_last, epochs)


def _generate(arrays, leaves, n, batch_size, seed, shuffle, drop_last, epochs):
    rng = np.random.default_rng(seed)
    stop = n - n % batch_size if drop_last else n
    for _ in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, stop, batch_size):
            yield _take(arrays, leaves, order[start:start + batch_size])


def group_split(sizes: Mapping[str, int], fractions: Sequence[float], *,
                seed: int | Sequence[int], slack: float = 0.1) -> dict[str, int]:
    """Assign whole groups to parts so that each part gets about its share of the size.

    Groups are visited largest first (ties in a seeded random order). Each goes to a
    part drawn with probability proportional to how far that part is below its target
    (``fraction * total``), among the parts it fits in: a group fits part ``k > 0`` if its
    size is at most the part's shortfall plus ``slack`` times its target; part 0 (train)
    takes every group. Groups too big for the small parts thus land in part 0, and the
    small groups visited last even out the parts.

    Args:
        sizes: Group name -> size (examples, bytes, ...), all >= 0.
        fractions: Target share of each part, >= 0, summing to 1; part 0 must be > 0.
        seed: Seed (or seed sequence) of the order and the draws.
        slack: Allowed overshoot of a part ``k > 0``, as a fraction of its target.

    Returns:
        Group name -> part index.

    Examples:
        >>> parts = group_split({f"m{i}": 10 for i in range(20)}, (0.5, 0.5), seed=0)
        >>> sorted(np.bincount(list(parts.values())).tolist())
        [10, 10]
    """
    if len(fractions) < 1 or any(f < 0 for f in fractions) or fractions[0] <= 0:
        raise ValueError(f"fractions must be >= 0 with fractions[0] > 0, got {tuple(fractions)}")
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)}")
    if any(v < 0 for v in sizes.values()):
        raise ValueError("group sizes must be >= 0")
    names = sorted(sizes)
    rng = np.random.default_rng(seed)
    total = float(sum(sizes.values()))
    targets = [f * total for f in fractions]
    filled = [0.0] * len(fractions)
    assignment = {}
    shuffled = rng.permutation(len(names))
    order = sorted(shuffled, key=lambda i: -sizes[names[i]])  # stable: ties stay shuffled
    for i in order:
        size = sizes[names[i]]
        short = [t - f for t, f in zip(targets, filled)]
        fits = [k for k in range(len(fractions))
                if k == 0 or (targets[k] > 0 and size <= short[k] + slack * targets[k])]
        weights = np.array([max(short[k], 0.0) for k in fits])
        u = rng.random()
        part = 0
        if weights.sum() > 0:
            cumulative = np.cumsum(weights) / weights.sum()
            part = fits[min(int(np.searchsorted(cumulative, u, side="right")), len(fits) - 1)]
        assignment[names[i]] = part
        filled[part] += size
    return assignment


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions lie in ``[0, 1)`` and sum to less than 1.

    Examples:
        >>> check_split_fractions(0.15, 0.15)
        >>> check_split_fractions(0.5, 0.5)
        Traceback (most recent call last):
        ...
        ValueError: val_fraction + test_fraction must be < 1, got 0.5 + 0.5
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got "
                         f"{val_fraction} + {test_fraction}")
