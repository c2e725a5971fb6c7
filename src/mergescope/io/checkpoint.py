"""Open a checkpoint of any supported layout as one lazy ``Mapping[str, Tensor]``.

Layouts: a ``.safetensors`` file; a folder with ``model.safetensors`` or a sharded
``model.safetensors.index.json``; ``.pt/.pth/.bin`` files (and ``pytorch_model.bin`` folders),
read only through ``torch.load(weights_only=True)`` so no checkpoint can run code.
Opening reads headers only; tensors are read when accessed.

Every file is opened as an untrusted input (``untrusted``): only regular files (a FIFO never
blocks), and every file a folder's layout names - ``model.safetensors``, an index, its shards,
``pytorch_model.bin`` - must stay inside the folder, symlinks resolved (one rule for all).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import MergescopeError
from .safetensors_format import DTYPE_NAMES, SafetensorsFile, TensorInfo
from .untrusted import inside_folder, open_regular, read_json, short_repr

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
                 eager: dict[str, torch.Tensor] | None = None, sources: dict[str, "_Source"] | None = None):
        self.path = path
        self._files = files or []
        self._weight_map = weight_map or {}
        self._eager = eager
        self._sources = sources or {}  # eager tensors memory-mapped from a torch zip file: where from

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files] if self._eager is None else [self.path]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._files[0].metadata) if self._files else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._eager is not None:
            t = self._eager[name]
            self._check_source(name)
            return t
        try:
            f = self._files[self._weight_map[name]]
        except KeyError:
            raise KeyError(name) from None
        return f.get(name)

    def read(self, name: str) -> torch.Tensor:
        """Copy a tensor out of the file (no memory map kept); see ``SafetensorsFile.read``."""
        if self._eager is not None:
            t = self._eager[name]
            self._check_source(name)
            return t.clone()
        return self._files[self._weight_map[name]].read(name)

    def locate(self, name: str) -> tuple[Path, int, torch.dtype, tuple[int, ...]] | None:
        """(file, absolute byte offset, dtype, shape) of a safetensors tensor; None for torch files."""
        if self._eager is not None:
            return None
        f = self._files[self._weight_map[name]]
        info = f.tensors[name]
        return f.path, f.data_start + info.start, info.dtype, info.shape

    def _check_source(self, name: str) -> None:
        """A tensor mapped from a torch zip file whose file has shrunk since would SIGBUS when touched."""
        source = self._sources.get(name)
        if source is not None:
            source.check(name)

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


class _Source:
    """A torch zip file whose tensors are memory-mapped: its inode and size when it was loaded."""

    def __init__(self, path: Path, st: os.stat_result):
        self.path, self.inode, self.size = path, (st.st_dev, st.st_ino), st.st_size

    def check(self, name: str) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return  # removed or renamed: the map keeps the old file alive
        if (st.st_dev, st.st_ino) == self.inode and st.st_size < self.size:
            raise MergescopeError(f"{self.path}: tensor {short_repr(name)}: the file shrank from {self.size} to "
                                  f"{st.st_size} bytes while being read (truncated?)")


def _read_index(index_path: Path) -> dict[str, str]:
    index = read_json(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise MergescopeError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _open_sharded(folder: Path) -> Checkpoint:
    index_path = inside_folder(folder, SAFE_INDEX, folder)
    weight_map = _read_index(index_path)
    shard_names = sorted(set(weight_map.values()))
    files = [SafetensorsFile(inside_folder(folder, s, index_path)) for s in shard_names]
    position = {s: i for i, s in enumerate(shard_names)}
    resolved = {}
    for name, shard in weight_map.items():
        i = position[shard]
        if name not in files[i].tensors:
            raise MergescopeError(f"{index_path}: tensor {short_repr(name)} is listed in shard {short_repr(shard)} "
                                  "but not stored there")
        resolved[name] = i
    for i, f in enumerate(files):
        for name in f.tensors:
            if resolved.get(name) != i:
                raise MergescopeError(f"{f.path}: tensor {short_repr(name)} is not listed for this shard in {SAFE_INDEX}")
    return Checkpoint(folder, files, resolved)


def _reason(e: BaseException, proc_path: str, path: Path, limit: int = 300) -> str:
    """One line from an exception torch raised: its weights-only verdict or its first line, capped.

    torch's weights-only refusal opens with advice to retry with ``weights_only=False`` (exactly
    what must not be done with a stranger's file); the reason proper follows "WeightsUnpickler error:".
    """
    text = str(e).strip().replace(proc_path, str(path))
    verdict = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, re.S)
    if verdict and verdict.group(1).strip():
        line = " ".join(verdict.group(1).split())
    else:
        line = text.splitlines()[0] if text else ""
    kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
    if not isinstance(e, pickle.UnpicklingError):
        line = f"{kind}: {line}" if line else kind
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _load_pickle(path: Path) -> tuple[dict[str, torch.Tensor], _Source | None]:
    """torch.load with weights_only=True; anything that needs arbitrary pickle is refused.

    The file is opened as a regular file first (a FIFO is refused without blocking) and torch
    reads that very inode through ``/proc/self/fd``. torch's warnings (e.g. on pickle protocol
    4/5) are silenced: the refusal, if any, is the one line. A truncated or corrupt file is one
    line too, whatever exception torch's readers raise. Returns the state and, for a zip file
    (memory-mapped), the ``_Source`` to check before touching its tensors.
    """
    fd = open_regular(path, "checkpoint")
    try:
        st = os.fstat(fd)
        try:
            is_zip = os.pread(fd, 4, 0) == b"PK\x03\x04"
        except OSError as e:
            raise MergescopeError(f"{path}: cannot read ({e.strerror or e})") from None
        if st.st_size == 0:
            raise MergescopeError(f"{path}: empty file, not a torch checkpoint")
        proc_path = f"/proc/self/fd/{fd}"
        source = proc_path if os.path.exists(proc_path) else str(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(source, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as e:
            raise MergescopeError(
                f"{path}: refused: not a plain tensor checkpoint loadable with weights_only=True; "
                f"mergescope never runs arbitrary pickle code ({_reason(e, proc_path, path)})"
            ) from None
        except MemoryError:
            raise MergescopeError(f"{path}: cannot load torch checkpoint (out of memory; corrupt sizes?)") from None
        except (KeyboardInterrupt, SystemExit, MergescopeError):
            raise
        except Exception as e:  # torch's zip and legacy readers raise anything on truncated/corrupt bytes
            raise MergescopeError(f"{path}: cannot load torch checkpoint (truncated or corrupt?): "
                                  f"{_reason(e, proc_path, path)}") from None
    finally:
        os.close(fd)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise MergescopeError(f"{path}: expected a mapping of tensor names to tensors")
    return obj, (_Source(path, st) if is_zip else None)


def _open_pickle_file(path: Path, where: Path) -> Checkpoint:
    state, source = _load_pickle(path)
    return Checkpoint(where, eager=state, sources=dict.fromkeys(state, source) if source else None)


def _open_pickle_folder(folder: Path) -> Checkpoint:
    if not os.path.lexists(folder / PT_INDEX):
        return _open_pickle_file(inside_folder(folder, PT_SINGLE, folder), folder)
    index_path = inside_folder(folder, PT_INDEX, folder)
    weight_map = _read_index(index_path)
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, _Source] = {}
    for shard in sorted(set(weight_map.values())):
        part, source = _load_pickle(inside_folder(folder, shard, index_path))
        state.update(part)
        if source is not None:
            sources.update(dict.fromkeys(part, source))
    return Checkpoint(folder, eager=state, sources=sources)


def load(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint file or Hugging Face folder lazily (headers only)."""
    path = Path(path)
    try:
        return _load(path)
    except OSError as e:  # e.g. a folder without search permission
        raise MergescopeError(f"{path}: cannot read ({e.strerror or e})") from None


def _load(path: Path) -> Checkpoint:
    if not os.path.lexists(path) or not path.exists():
        raise MergescopeError(f"{path}: no such file or folder (mergescope reads local paths only; nothing is downloaded)")
    if path.is_dir():
        # lexists: a dangling or escaping symlink is named and refused by ``inside_folder``, not skipped
        if os.path.lexists(path / SAFE_INDEX):
            return _open_sharded(path)
        if os.path.lexists(path / SAFE_SINGLE):
            f = SafetensorsFile(inside_folder(path, SAFE_SINGLE, path))
            return Checkpoint(f.path, [f], dict.fromkeys(f.tensors, 0))
        if os.path.lexists(path / PT_INDEX) or os.path.lexists(path / PT_SINGLE):
            return _open_pickle_folder(path)
        raise MergescopeError(f"{path}: folder holds no {SAFE_SINGLE}, {SAFE_INDEX}, {PT_SINGLE} or {PT_INDEX}")
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        return Checkpoint(path, [f], dict.fromkeys(f.tensors, 0))
    if path.suffix in PICKLE_SUFFIXES:
        return _open_pickle_file(path, path)
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
