"""MNIST-1D (Greydanus & Kobak 2020): the second embedded task, harder than the 8x8 digits.

The data is *generated* offline by the PyPI package ``mnist1d``: ``make_dataset(get_dataset_args())``
draws 5,000 length-40 signals (10 classes, 500 each) from a fixed seed (42) in about 2 s. Its
``get_dataset`` downloads a pickle and is never called here.

Split (fixed, documented in docs/mnist1d.md):

- test: the package's own test split, the last 1,000 generated examples;
- train / val: the package's 4,000 training examples, of which 500 (stratified, drawn with
  ``seed``) are held out as val, leaving 3,500 for train.

Inputs are float32 ``[N, 40]`` tensors with the package's values (``make_dataset`` already centres
the whole set and scales it to unit standard deviation); no further standardisation, so a signal
shifted along its length stays the same numbers shifted, which a convolution can exploit.

The generated arrays are cached in memory and on disk (``$MERGESCOPE_CACHE``, else
``$XDG_CACHE_HOME/mergescope`` or ``~/.cache/mergescope``), keyed by the package version and the
generation arguments; the file is written atomically and carries a SHA-256 of its arrays, and a
file that fails any check (size, header, hash, shapes, finite values, labels) is regenerated.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .base import TensorClassificationTask

# get_dataset_args() of mnist1d 0.0.2 (its download URL left out: nothing here downloads). Passing
# these explicitly keeps the task fixed if a later release changes its defaults, and lets a warm
# cache skip importing the package; tests check they still equal get_dataset_args().
MNIST1D_ARGS: dict = {
    "num_samples": 5000, "train_split": 0.8, "template_len": 12, "padding": [36, 60], "scale_coeff": 0.4,
    "max_translation": 48, "corr_noise_scale": 0.25, "iid_noise_scale": 2e-2, "shear_scale": 0.75,
    "shuffle_seq": False, "final_seq_length": 40, "seed": 42,
}
VAL_SIZE = 500  # carved from the package's 4,000 training examples
MAX_CACHE_BYTES = 16 * 1024 * 1024  # the real file is ~2 MB


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnist1d")
    except PackageNotFoundError:
        from ..errors import MergescopeError

        raise MergescopeError("the mnist1d task needs the 'mnist1d' package (pip install mnist1d)") from None


def cache_dir() -> Path:
    """Where generated data sets are cached: $MERGESCOPE_CACHE, else the XDG cache folder."""
    explicit = os.environ.get("MERGESCOPE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergescope"


def _key(version: str) -> str:
    blob = json.dumps({"package": "mnist1d", "version": version, "args": MNIST1D_ARGS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _layout() -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each array, in file order; fixed by the generation arguments."""
    n, length = MNIST1D_ARGS["num_samples"], MNIST1D_ARGS["final_seq_length"]
    n_train = int(n * MNIST1D_ARGS["train_split"])
    f64, i64 = np.dtype("<f8"), np.dtype("<i8")
    return [("x", f64, (n_train, length)), ("y", i64, (n_train,)), ("x_test", f64, (n - n_train, length)),
            ("y_test", i64, (n - n_train,))]


def _payload(arrays: dict[str, np.ndarray]) -> bytes:
    return b"".join(np.ascontiguousarray(arrays[name], dtype=dtype).tobytes() for name, dtype, _ in _layout())


def _header(key: str, payload: bytes) -> bytes:
    return json.dumps({"format": "mergescope-mnist1d-cache/1", "key": key, "args": MNIST1D_ARGS,
                       "sha256": hashlib.sha256(payload).hexdigest()}, sort_keys=True).encode() + b"\n"


def _valid(arrays: dict[str, np.ndarray]) -> bool:
    for name, dtype, shape in _layout():
        a = arrays.get(name)
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
            return False
    return all(np.isfinite(arrays[k]).all() for k in ("x", "x_test")) and all(
        ((arrays[k] >= 0) & (arrays[k] < 10)).all() for k in ("y", "y_test"))


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is absent, not a regular file, or fails any check.

    The file is one JSON header line (format, key, arguments, SHA-256 of the payload) followed by
    the raw little-endian arrays of ``_layout()``: nothing in it is interpreted beyond that.
    """
    from ..errors import MergescopeError
    from ..io.untrusted import read_bytes

    if not path.exists():
        return None
    try:
        raw = read_bytes(path, "mnist1d cache", limit=MAX_CACHE_BYTES)
    except MergescopeError:
        return None
    head, sep, payload = raw.partition(b"\n")
    expected_size = sum(dtype.itemsize * int(np.prod(shape)) for _, dtype, shape in _layout())
    if not sep or len(payload) != expected_size or head + b"\n" != _header(key, payload):
        return None
    arrays, offset = {}, 0
    for name, dtype, shape in _layout():
        count = int(np.prod(shape))
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
        offset += count * dtype.itemsize
    return arrays if _valid(arrays) else None


def _write_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file in the same folder, fsync, rename); silently skip if impossible."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".mnist1d-", suffix=".tmp", dir=path.parent)
        payload = _payload(arrays)
        with os.fdopen(fd, "wb") as f:
            f.write(_header(key, payload))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass  # a read-only or full cache folder only costs regenerating next time
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def generate() -> dict[str, np.ndarray]:
    """``mnist1d.data.make_dataset`` with ``MNIST1D_ARGS``: x/y (4,000 train), x_test/y_test (1,000).

    The package reseeds NumPy's and Python's global generators; their states are restored after.
    """
    import random
    from types import SimpleNamespace

    from mnist1d.data import make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(SimpleNamespace(**json.loads(json.dumps(MNIST1D_ARGS))))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {name: np.ascontiguousarray(data[name], dtype=dtype) for name, dtype, _ in _layout()}


@lru_cache(maxsize=1)
def mnist1d_arrays() -> dict[str, np.ndarray]:
    """The generated data set, from the disk cache when a valid copy is there (read-only arrays)."""
    version = _package_version()
    key = _key(version)
    path = cache_dir() / f"mnist1d-{version}-{key}.bin"
    arrays = _read_cache(path, key)
    if arrays is None:
        arrays = generate()
        _write_cache(path, key, arrays)
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def val_indices(y: np.ndarray, seed: int, size: int = VAL_SIZE) -> np.ndarray:
    """Stratified val draw from the training labels ``y``: each class gets its share of ``size``
    (largest remainders break the rounding, lowest class first), picked with ``default_rng(seed)``."""
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * size / len(y)
    take = np.floor(exact).astype(int)
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - take[i]), classes[i]))
    take[order[: size - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


@lru_cache(maxsize=4)
def _split_arrays(seed: int):
    data = mnist1d_arrays()
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    val = val_indices(y, seed)
    train = np.setdiff1d(np.arange(len(y)), val)
    test = (data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": test}


def mnist1d(seed: int = 0, classes: tuple[int, ...] | None = None) -> TensorClassificationTask:
    """MNIST-1D as ``[N, 40]`` float32 signals: train 3,500 / val 500 / test 1,000, 10 classes.

    Test is the package's own test split; val is a stratified draw (``seed``) from its training
    split. ``classes`` keeps only those labels (labels stay 0..9): the label-subset tasks, named
    like ``mnist1d[0,1,2]``.
    """
    splits = {}
    for name, (x, y) in _split_arrays(seed).items():
        if classes is not None:
            keep = np.isin(y, classes)
            x, y = x[keep], y[keep]
        splits[name] = (torch.from_numpy(x.copy()), torch.from_numpy(y.copy()))
    suffix = "" if classes is None else "[" + ",".join(map(str, classes)) + "]"
    return TensorClassificationTask(name=f"mnist1d{suffix}", splits=splits, num_classes=10,
                                    input_shape=(MNIST1D_ARGS["final_seq_length"],),
                                    info={"seed": seed, "classes": list(classes) if classes else None,
                                          "source": f"mnist1d {_package_version()} make_dataset"})
