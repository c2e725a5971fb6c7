"""Multi-stage recipes (MergeKit's ``mergekit-multi``): YAML documents separated by ``---``, run in order.

Each document is one recipe with an optional ``name``. A later stage may name an earlier stage
wherever it names a model (``base_model``, ``models[].model``, ``slices[].sources[].model``,
``slices[].base_model``): that stage's output folder is used. Named stages are written to
``intermediate_dir/NAME``; the unnamed stage (at most one, the last), or else the last stage, is
written to ``out``.

Resume per stage: a stage whose folder already holds a finished merge of the same resolved recipe
(its ``mergescope_recipe.yml``) is reused, unless a stage before it ran again in this invocation;
``resume=True`` also lets the stage that was interrupted reuse its verified shards (``engine.merge``).
A finished stage folder from another recipe is an error unless ``force``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergescopeError

MAX_STAGES = 100  # far past any published multi-stage merge; bounds the work a file can ask for
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class Stage:
    """One document: its ``name`` (None for the final unnamed merge) and its recipe mapping."""

    name: str | None
    data: dict


def split_documents(text: str, where: str) -> list[str]:
    """The texts of the YAML documents in ``text`` (parsed with YAML's own event parser, so a ``---``
    inside a string never splits); each is later parsed with the bounded parser."""
    import yaml

    starts, spans = [], []
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.DocumentStartEvent):
                starts.append(event.end_mark.index)
            elif isinstance(event, yaml.DocumentEndEvent):
                spans.append((starts[-1], event.start_mark.index))
                if len(spans) > MAX_STAGES:
                    raise MergescopeError(f"{where}: more than {MAX_STAGES} YAML documents (stages)")
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MergescopeError(f"{where}: not valid YAML ({first})") from None
    except RecursionError:
        raise MergescopeError(f"{where}: YAML is nested too deeply") from None
    return [text[a:b] for a, b in spans]


DOCUMENT_MARKER = re.compile(r"^(?:---|\.\.\.)(?:\s|$)", re.MULTILINE)


def is_multistage(text: str, where: str = "recipe") -> bool:
    """Whether a recipe text holds more than one YAML document (a second document needs a ``---`` or
    ``...`` line, so most recipes are answered without parsing)."""
    return DOCUMENT_MARKER.search(text) is not None and len(split_documents(text, where)) > 1


def read_stages(text: str, where: str) -> list[Stage]:
    """The stages of a multi-document recipe, names checked (unique, usable as folder names, only the
    last may be unnamed)."""
    from ..io.untrusted import parse_yaml

    stages = []
    for i, doc in enumerate(split_documents(text, where)):
        data = parse_yaml(doc, f"{where} (document {i + 1})")
        if not isinstance(data, dict):
            raise MergescopeError(f"{where}: document {i + 1} must be a YAML mapping (a recipe), "
                                  f"got {type(data).__name__}")
        data = dict(data)
        name = data.pop("name", None)
        if name is not None and (not isinstance(name, str) or not NAME.match(name)):
            raise MergescopeError(f"{where}: document {i + 1}: stage name must be letters, digits, '.', '_' or '-' "
                                  f"(at most 200, not starting with '.' or '-'), got {name!r:.80}")
        stages.append(Stage(name, data))
    names = [s.name for s in stages if s.name is not None]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MergescopeError(f"{where}: stage name {dup!r} is used twice")
    if any(s.name is None for s in stages[:-1]):
        raise MergescopeError(f"{where}: only the last stage may be unnamed (the others are referred to by name)")
    return stages


def resolve_names(data: dict, outputs: dict[str, Path]) -> dict:
    """The recipe mapping with every model reference that names an earlier stage replaced by its folder."""

    def sub(value):
        return str(outputs[value]) if isinstance(value, str) and value in outputs else value

    data = dict(data)
    if "base_model" in data:
        data["base_model"] = sub(data["base_model"])
    if isinstance(data.get("models"), list):
        data["models"] = [{**m, "model": sub(m.get("model"))} if isinstance(m, dict) else m for m in data["models"]]
    if isinstance(data.get("slices"), list):
        data["slices"] = [_resolve_slice(s, sub) if isinstance(s, dict) else s for s in data["slices"]]
    return data


def _resolve_slice(sl: dict, sub) -> dict:
    sl = dict(sl)
    if "base_model" in sl:
        sl["base_model"] = sub(sl["base_model"])
    if isinstance(sl.get("sources"), list):
        sl["sources"] = [{**s, "model": sub(s.get("model"))} if isinstance(s, dict) else s for s in sl["sources"]]
    return sl


def _finished(folder: Path, recipe_text: str) -> bool | None:
    """True: ``folder`` holds a finished merge of this recipe; False: of another; None: nothing there."""
    if not os.path.lexists(folder):
        return None
    saved = folder / "mergescope_recipe.yml"
    if not saved.is_file() or saved.is_symlink():
        return False
    from ..io.untrusted import read_text

    return read_text(saved, "mergescope_recipe.yml") == recipe_text


def run(path: str | os.PathLike, out: str | os.PathLike, intermediate_dir: str | os.PathLike | None = None,
        force: bool = False, resume: bool = False, on_stage=None, **merge_options) -> list:
    """Run a multi-stage recipe file; returns each stage's ``MergeResult`` (None for a reused stage).

    ``on_stage(index, count, name, reused)`` is called before each stage. ``merge_options`` go to
    ``engine.merge`` (seed, threads, max_shard_size, copy_tokenizer, ...).
    """
    import yaml

    from ..io.untrusted import read_text
    from ..recipe import parse
    from .engine import merge

    where = str(path)
    stages = read_stages(read_text(Path(path), "recipe"), where)
    out = Path(out)
    inter = Path(intermediate_dir) if intermediate_dir is not None else out.parent / f"{out.name}.stages"
    outputs: dict[str, Path] = {}
    results, upstream_ran = [], False
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        target = out if last else inter / stage.name
        data = resolve_names(stage.data, outputs)
        text = yaml.safe_dump(data, sort_keys=True)
        recipe = parse(data, text=text, where=f"{where} (stage {stage.name or i + 1})")
        done = _finished(target, text)
        reuse = done is True and not upstream_ran and not force
        if on_stage is not None:
            on_stage(i, len(stages), stage.name, reuse)
        if done is False and not force:
            raise MergescopeError(f"{target}: already exists and is not this stage's merge; pass --force to replace it")
        if reuse:
            results.append(None)
        else:
            if not last:
                inter.mkdir(parents=True, exist_ok=True)
            results.append(merge(recipe, target, force=force or done is True, resume=resume, **merge_options))
            upstream_ran = True
        if stage.name is not None:
            outputs[stage.name] = target
    return results
