"""Reading files a stranger may have crafted: regular files only, bounded sizes, one-line errors.

Every text input mergescope parses (safetensors headers and indexes, ``config.json``, recipes,
sweep and study YAML) goes through these helpers, so one place decides what a hostile file can
do: a FIFO or device never blocks (opened non-blocking, refused unless it is a regular file), a
file is never read past a size cap, JSON nested too deeply or holding an integer of thousands of
digits is an error rather than a traceback, and YAML aliases cannot expand into a billion nodes.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat
from pathlib import Path

from ..errors import MergescopeError

MAX_TEXT_BYTES = 64 * 1024 * 1024  # recipes, configs, indexes: far above any real one
MAX_YAML_NODES = 100_000  # nodes after alias expansion (a real recipe has hundreds)


_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxdict = 8
_SHORT.maxlevel = 3
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def short_repr(value) -> str:
    """A bounded ``repr`` for error messages (a hostile header or metadata entry can hold megabyte-long
    values); control characters come out escaped, as in any ``repr``."""
    try:
        return _SHORT.repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def open_regular(path: str | os.PathLike, what: str = "file") -> int:
    """An O_RDONLY descriptor of ``path``, refusing anything but a regular file without blocking.

    ``O_NONBLOCK`` makes opening a FIFO return at once (instead of waiting for a writer); the
    ``fstat`` afterwards refuses it, devices and sockets. The flag is cleared for regular files.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise MergescopeError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise MergescopeError(f"{path}: {what} is {kind}; only regular files are read")
    os.set_blocking(fd, True)
    return fd


def check_regular(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse (without blocking) a path that is not a regular file."""
    os.close(open_regular(path, what))


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise MergescopeError(f"{path}: {what} is {size} bytes, over the {limit}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise MergescopeError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise MergescopeError(f"{path}: {what} grew past the {limit}-byte limit while being read")
    return data


def read_text(path: str | os.PathLike, what: str = "file", limit: int = MAX_TEXT_BYTES) -> str:
    """A regular file's text, which must be UTF-8."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergescopeError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None


def parse_json(text: str | bytes, where: str, what: str = "JSON", **kwargs):
    """``json.loads`` whose every failure (syntax, depth, huge integers, bad UTF-8) is one line."""
    try:
        return json.loads(text, **kwargs)
    except MergescopeError:
        raise
    except RecursionError:
        raise MergescopeError(f"{where}: {what} is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergescopeError(f"{where}: {what} is not valid JSON ({e})") from None
    except ValueError as e:  # integer string conversion limit (over 4,300 digits)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MergescopeError(f"{where}: {what} is not valid JSON ({first})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", limit: int = MAX_TEXT_BYTES):
    """Parse a regular JSON file with one-line errors."""
    return parse_json(read_text(path, what, limit), str(path), what)


def parse_yaml(text: str, where: str, max_nodes: int = MAX_YAML_NODES):
    """``yaml.safe_load`` that refuses alias bombs, deep nesting and integer overflow in one line.

    The document is composed first (aliases stay shared, so this is linear in the text); its
    expanded size is counted with memoisation before anything is constructed, because the
    constructed object shares the aliases too but every consumer (validation, dumping for a hash)
    walks it expanded.
    """
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None
        size = _expanded_size(node, {}, max_nodes)
        if size > max_nodes:
            raise MergescopeError(f"{where}: YAML expands to more than {max_nodes} nodes (alias bomb?)")
        return yaml.safe_load(text)
    except MergescopeError:
        raise
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MergescopeError(f"{where}: not valid YAML ({first})") from None
    except RecursionError:
        raise MergescopeError(f"{where}: YAML is nested too deeply") from None
    except (ValueError, OverflowError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MergescopeError(f"{where}: not valid YAML ({first})") from None


def _expanded_size(node, memo: dict, cap: int) -> int:
    """Number of nodes ``node`` stands for once aliases are expanded (stops counting past ``cap``)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = cap + 1  # a node reached again while being counted is a cycle: count it as too big
    if isinstance(node, yaml.SequenceNode):
        total = 1 + _sum_capped((_expanded_size(child, memo, cap) for child in node.value), cap)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + _sum_capped((_expanded_size(k, memo, cap) + _expanded_size(v, memo, cap) for k, v in node.value), cap)
    else:
        total = 1
    memo[key] = min(total, cap + 1)
    return memo[key]


def _sum_capped(values, cap: int) -> int:
    total = 0
    for v in values:
        total += v
        if total > cap:
            return cap + 1
    return total


def read_yaml(path: str | os.PathLike, what: str = "YAML file", limit: int = MAX_TEXT_BYTES):
    """Parse a regular YAML file (UTF-8, size-capped, alias-bounded) with one-line errors."""
    return parse_yaml(read_text(path, what, limit), str(path))


def link_allowed(folder: Path, item: Path, strict: bool = False) -> bool:
    """Whether ``item`` (inside ``folder``) may be read: it resolves inside the folder, or the folder is a
    Hugging Face cache snapshot (``.../snapshots/REV``) and it resolves into that repository's ``blobs/``.

    One rule for every file a model folder holds: top-level weights, index shards, config and
    tokenizer files. A link anywhere else (``/etc/passwd``, ``/dev/zero``, another user's model)
    is refused, so a crafted folder cannot pull a local file into a merged output. A link that cannot
    be resolved (a loop) is not allowed; with ``strict`` the resolution error is raised instead.
    """
    try:
        real_folder = folder.resolve()
        target = item.resolve()
    except (RuntimeError, OSError):
        if strict:
            raise
        return False
    if target.is_relative_to(real_folder):
        return True
    if real_folder.parent.name == "snapshots":
        return target.is_relative_to(real_folder.parent.parent / "blobs")
    return False


def inside_folder(folder: Path, name: str, where: str | os.PathLike) -> Path:
    """``folder / name`` if it is a regular file that stays inside ``folder`` (``link_allowed``);
    every failure (leaving the folder, a symlink loop, a NUL byte, a name too long) is one line."""
    if os.path.isabs(name) or ".." in Path(name).parts or not name:
        raise MergescopeError(f"{where}: path {short_repr(name)} leaves the model folder")
    try:
        if not link_allowed(folder, folder / name, strict=True):
            raise MergescopeError(f"{where}: path {short_repr(name)} resolves outside the model folder (symlink?)")
        if not (folder / name).exists():
            raise MergescopeError(f"{where}: {short_repr(name)} is missing")
    except RuntimeError as e:  # pathlib: "Symlink loop from ..."
        raise MergescopeError(f"{where}: path {short_repr(name)} cannot be resolved ({e})") from None
    except (OSError, ValueError) as e:  # name too long, embedded NUL byte, permission denied
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise MergescopeError(f"{where}: path {short_repr(name)} cannot be read ({reason})") from None
    check_regular(folder / name, name)
    return folder / name
