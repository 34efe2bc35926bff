"""Handwritten digits (8x8), the dataset bundled with scikit-learn; no network needed.

1,797 grey-level images of the digits 0-9 (UCI "Optical Recognition of Handwritten
Digits", the test part), about 180 per class, split train/val/test with every class in
the same proportions in each split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from subspace_jax.data import batching

__all__ = ["ImageSplit", "ImageSplits", "load_digits", "stratified_split"]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ImageSplit:
    """One split of an image classification set.

    Attributes:
        x: float32 images ``(N, H, W, C)`` in ``[0, 1]``.
        y: int32 labels ``(N,)``.
        index: int64 ``(N,)`` positions of the examples in the source dataset.
    """

    x: np.ndarray
    y: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ImageSplits:
    """Train/val/test splits of an image classification set.

    Attributes:
        train: Training split.
        val: Validation split.
        test: Test split.
        num_classes: Number of classes.
    """

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    num_classes: int

    def splits(self) -> dict[str, ImageSplit]:
        """``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def describe(self) -> str:
        """A table of examples per class and split."""
        names = list(self.splits())
        lines = ["class " + " ".join(f"{n:>6}" for n in names)]
        counts = {n: np.bincount(s.y, minlength=self.num_classes)
                  for n, s in self.splits().items()}
        for c in range(self.num_classes):
            lines.append(f"{c:<5} " + " ".join(f"{counts[n][c]:>6}" for n in names))
        lines.append("total " + " ".join(f"{len(s):>6}" for s in self.splits().values()))
        return "\n".join(lines)

    def __str__(self) -> str:
        shape = self.train.x.shape[1:]
        return f"digits: images {shape} float32 in [0, 1], {self.num_classes} classes\n" + (
            self.describe())


def stratified_split(labels: np.ndarray, fractions: Sequence[float], *, seed: int,
                     ) -> tuple[np.ndarray, ...]:
    """Split example indices into parts with every class in the given proportions.

    Parts ``1..k-1`` take ``floor(N * fraction)`` examples each, drawn in turn from
    what is left by scikit-learn's ``train_test_split(..., stratify=labels)``;
    part 0 takes the rest. The draws use ``np.random.RandomState(seed)``, so the
    split depends only on the labels, the fractions and ``seed``. Each part's
    indices are sorted.

    Args:
        labels: ``(N,)`` integer labels.
        fractions: Share of each part; they must be >= 0 and sum to 1.
        seed: Seed of the draws.

    Returns:
        One sorted int64 index array per part; together they cover ``range(N)`` once.

    Raises:
        ValueError: If ``labels`` is not 1-D, the fractions are out of range, or a
            non-empty part would have fewer examples than there are classes.
        ImportError: If scikit-learn is not installed.

    Examples:
        >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
        >>> a, b = stratified_split(labels, (0.5, 0.5), seed=0)
        >>> np.bincount(labels[a]).tolist(), np.bincount(labels[b]).tolist()
        ([2, 2], [2, 2])
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError("stratified_split needs scikit-learn: pip install scikit-learn "
                          "(or subspace_jax[dev])") from err
    rng = np.random.RandomState(seed)
    rest, parts = np.arange(len(labels), dtype=np.int64), []
    for k, fraction in enumerate(fractions[1:], start=1):
        size = int(len(labels) * fraction + 1e-9)  # floor, blind to round-off (0.29 * 100)
        if size == 0:
            parts.append(rest[:0])
            continue
        try:
            rest, part = train_test_split(rest, test_size=size, stratify=labels[rest],
                                          random_state=rng)
        except ValueError as err:
            raise ValueError(f"part {k} (fraction {fraction}, {size} of {len(labels)} "
                             f"examples): {err}") from None
        parts.append(part)
    return tuple(np.sort(p) for p in [rest, *parts])


def load_digits(*, seed: int = 0, val_fraction: float = 0.15,
                test_fraction: float = 0.15) -> ImageSplits:
    """scikit-learn's bundled 8x8 digits as float32 ``(N, 8, 8, 1)`` images in ``[0, 1]``.

    Pixel values 0-16 are divided by 16. The split is stratified by class and depends
    only on ``seed`` and the fractions.

    Args:
        seed: Seed of the split.
        val_fraction: Share of each class in the validation split.
        test_fraction: Share of each class in the test split.

    Returns:
        The three splits (labels int32, 10 classes).

    Raises:
        ValueError: If a fraction is out of range.
        ImportError: If scikit-learn is not installed.

    Examples:
        >>> data = load_digits()
        >>> data.train.x.shape[1:], data.train.x.dtype, data.num_classes
        ((8, 8, 1), dtype('float32'), 10)
        >>> len(data.train) + len(data.val) + len(data.test)
        1797
    """
    batching.check_split_fractions(val_fraction, test_fraction)
    try:
        from sklearn import datasets
    except ImportError as err:
        raise ImportError("load_digits needs scikit-learn, which bundles the data: "
                          "pip install scikit-learn (or subspace_jax[dev])") from err
    bunch = datasets.load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[..., None]
    y = np.asarray(bunch.target, dtype=np.int32)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    parts = stratified_split(y, fractions, seed=seed)
    splits = [ImageSplit(x=x[i], y=y[i], index=i) for i in parts]
    return ImageSplits(train=splits[0], val=splits[1], test=splits[2],
                       num_classes=int(y.max()) + 1)
