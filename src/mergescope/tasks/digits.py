"""The embedded default task: scikit-learn's bundled 8x8 digits (no download), standardized."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .base import TensorClassificationTask


@lru_cache(maxsize=4)
def _digits_arrays(seed: int, test_size: float, val_size: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=val_size / (1 - test_size), stratify=y[rest], random_state=seed)
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return {name: (x[i], y[i]) for name, i in (("train", train), ("val", val), ("test", test))}


def digits(seed: int = 0, test_size: float = 0.2, val_size: float = 0.1, classes: tuple[int, ...] | None = None
           ) -> TensorClassificationTask:
    """8x8 digits as flat 64-vectors, standardized with train statistics; fixed stratified split.

    ``classes`` keeps only those labels (labels stay 0..9, so heads stay comparable): the
    label-subset tasks used for task vectors.
    """
    arrays = _digits_arrays(seed, test_size, val_size)
    splits = {}
    for name, (x, y) in arrays.items():
        if classes is not None:
            keep = np.isin(y, classes)
            x, y = x[keep], y[keep]
        splits[name] = (torch.from_numpy(x.copy()), torch.from_numpy(y.copy()))
    suffix = "" if classes is None else "[" + ",".join(map(str, classes)) + "]"
    return TensorClassificationTask(name=f"digits{suffix}", splits=splits, num_classes=10, input_shape=(64,),
                                    info={"seed": seed, "classes": list(classes) if classes else None})
