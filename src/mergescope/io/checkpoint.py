"""Open a checkpoint of any supported layout as one lazy ``Mapping[str, Tensor]``.

Layouts: a ``.safetensors`` file; a folder with ``model.safetensors`` or a sharded
``model.safetensors.index.json``; ``.pt/.pth/.bin`` files (and ``pytorch_model.bin`` folders),
read only through ``torch.load(weights_only=True)`` so no checkpoint can run code.
Opening reads headers only; tensors are read when accessed.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import MergescopeError
from .safetensors_format import DTYPE_NAMES, SafetensorsFile, TensorInfo

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PT_INDEX = "pytorch_model.bin.index.json"
PT_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class Checkpoint(Mapping):
    """Lazy mapping name -> tensor over one or more files.

    ``info(name)`` gives dtype/shape/bytes without reading data; ``metadata`` is the
    safetensors ``__metadata__`` of the first file; ``files`` the files it spans.
    """

    def __init__(self, path: Path, files: list[SafetensorsFile] | None = None, weight_map: dict[str, int] | None = None,
                 eager: dict[str, torch.Tensor] | None = None):
        self.path = path
        self._files = files or []
        self._weight_map = weight_map or {}
        self._eager = eager

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files] if self._eager is None else [self.path]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._files[0].metadata) if self._files else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._eager is not None:
            return self._eager[name]
        try:
            return self._files[self._weight_map[name]].get(name)
        except KeyError:
            raise KeyError(name) from None

    def read(self, name: str) -> torch.Tensor:
        """Copy a tensor out of the file (no memory map kept); see ``SafetensorsFile.read``."""
        if self._eager is not None:
            return self._eager[name].clone()
        return self._files[self._weight_map[name]].read(name)

    def info(self, name: str) -> TensorInfo:
        if self._eager is not None:
            t = self._eager[name]
            return TensorInfo(t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
        return self._files[self._weight_map[name]].tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._eager if self._eager is not None else self._weight_map)

    def __len__(self) -> int:
        return len(self._eager if self._eager is not None else self._weight_map)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"

    def close(self) -> None:
        for f in self._files:
            f.close()


def _inside(folder: Path, shard: str, index_path: Path) -> Path:
    """Resolve a shard name from an index, refusing anything that leaves the folder."""
    if os.path.isabs(shard) or ".." in Path(shard).parts or not shard:
        raise MergescopeError(f"{index_path}: shard path {shard!r} leaves the model folder")
    target = (folder / shard).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise MergescopeError(f"{index_path}: shard path {shard!r} resolves outside the model folder (symlink?)")
    if not target.is_file():
        raise MergescopeError(f"{index_path}: shard {shard!r} is missing")
    return folder / shard


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergescopeError(f"{index_path}: cannot read index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise MergescopeError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _open_sharded(folder: Path) -> Checkpoint:
    index_path = folder / SAFE_INDEX
    weight_map = _read_index(index_path)
    shard_names = sorted(set(weight_map.values()))
    files = [SafetensorsFile(_inside(folder, s, index_path)) for s in shard_names]
    position = {s: i for i, s in enumerate(shard_names)}
    resolved = {}
    for name, shard in weight_map.items():
        i = position[shard]
        if name not in files[i].tensors:
            raise MergescopeError(f"{index_path}: tensor {name!r} is listed in shard {shard!r} but not stored there")
        resolved[name] = i
    for i, f in enumerate(files):
        for name in f.tensors:
            if resolved.get(name) != i:
                raise MergescopeError(f"{f.path}: tensor {name!r} is not listed for this shard in {SAFE_INDEX}")
    return Checkpoint(folder, files, resolved)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; anything that needs arbitrary pickle is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergescopeError(
            f"{path}: refused: not a plain tensor checkpoint loadable with weights_only=True; "
            f"mergescope never runs arbitrary pickle code ({first})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise MergescopeError(f"{path}: expected a mapping of tensor names to tensors")
    return obj


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _open_pickle_folder(folder: Path) -> Checkpoint:
    index_path = folder / PT_INDEX
    if index_path.exists():
        weight_map = _read_index(index_path)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_pickle(_inside(folder, shard, index_path)))
        return Checkpoint(folder, eager=state)
    return Checkpoint(folder, eager=_load_pickle(folder / PT_SINGLE))


def load(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint file or Hugging Face folder lazily (headers only)."""
    path = Path(path)
    if not path.exists():
        raise MergescopeError(f"{path}: no such file or folder (mergescope reads local paths only; nothing is downloaded)")
    if path.is_dir():
        if (path / SAFE_INDEX).exists():
            return _open_sharded(path)
        if (path / SAFE_SINGLE).exists():
            return load(path / SAFE_SINGLE)
        if (path / PT_INDEX).exists() or (path / PT_SINGLE).exists():
            return _open_pickle_folder(path)
        raise MergescopeError(f"{path}: folder holds no {SAFE_SINGLE}, {SAFE_INDEX}, {PT_SINGLE} or {PT_INDEX}")
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        return Checkpoint(path, [f], dict.fromkeys(f.tensors, 0))
    if path.suffix in PICKLE_SUFFIXES:
        return Checkpoint(path, eager=_load_pickle(path))
    raise MergescopeError(f"{path}: unknown checkpoint type (expected .safetensors, {', '.join(PICKLE_SUFFIXES)} or a folder)")


def summarize(ckpt: Checkpoint, top: int = 10) -> dict:
    """Figures for `mergescope inspect`: counts, dtypes, bytes, largest tensors, metadata."""
    dtypes: dict[str, int] = {}
    params = total = 0
    rows = []
    for name in ckpt:
        info = ckpt.info(name)
        key = DTYPE_NAMES.get(info.dtype, str(info.dtype))
        dtypes[key] = dtypes.get(key, 0) + 1
        params += info.numel
        total += info.nbytes
        rows.append((info.nbytes, name, list(info.shape), key))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return {
        "path": str(ckpt.path),
        "files": len(ckpt.files),
        "tensors": len(ckpt),
        "parameters": params,
        "bytes": total,
        "dtypes": dict(sorted(dtypes.items())),
        "largest": [{"name": n, "shape": s, "dtype": d, "bytes": b} for b, n, s, d in rows[:top]],
        "metadata": ckpt.metadata,
    }
