"""Zoo checkpoints remember which model they hold, so commands can rebuild it from the file."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping

import torch
from torch import nn

from ..errors import MergescopeError
from ..io.untrusted import short_repr
from .zoo import ZOO, check_zoo_options

# The only tasks a checkpoint may record: a built-in task (digits, mnist1d), or one restricted to
# some classes. Group 1 is the task, group 2 the classes.
TASK_PATTERN = re.compile(r"(digits|mnist1d)(?:\[([0-9](?:,[0-9]){0,9})\])?")


def model_metadata(name: str, options: Mapping, task: str = "digits", **extra) -> dict[str, str]:
    """Metadata entries that let ``model_for`` rebuild the architecture later."""
    return {"model": json.dumps({"name": name, "options": dict(options)}, sort_keys=True), "task": task,
            **{k: str(v) for k, v in extra.items()}}


def model_spec_of(ckpt, trusted: Collection[str] = ()) -> tuple[str, dict] | None:
    """(name, options) recorded in a checkpoint's metadata, or None.

    A file must never choose code to run: the recorded name must be a zoo model (or one of the
    factories in ``trusted``, which only the user can give); anything else is refused here,
    before it could be imported.
    """
    raw = getattr(ckpt, "metadata", {}).get("model")
    if raw is None:
        return None
    where = getattr(ckpt, "path", "checkpoint")
    try:
        spec = json.loads(raw)
        name, options = spec["name"], spec.get("options", {})
    except (ValueError, KeyError, TypeError, RecursionError):
        raise MergescopeError(f"{where}: metadata 'model' is not valid JSON with name/options") from None
    if not isinstance(name, str) or not isinstance(options, dict):
        raise MergescopeError(f"{where}: metadata 'model' must hold a name string and an options mapping")
    if name not in ZOO and name not in trusted:
        raise MergescopeError(
            f"{where}: metadata names model {short_repr(name)}, which is not a zoo model ({', '.join(ZOO)}); "
            "a checkpoint cannot choose code to run: pass --model yourself if you trust it")
    if name in ZOO:
        check_zoo_options(name, options, where=f"{where}: metadata 'model'")
    return name, dict(options)


def passed_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    """The model/task records an output may inherit from an input: only ones a later run would
    accept from the file itself (a zoo model, a digits task), so a payload never spreads."""
    out = {}
    try:
        if "model" in meta and model_spec_of(_Meta(meta)) is not None:
            out["model"] = meta["model"]
    except MergescopeError:
        pass
    if TASK_PATTERN.fullmatch(meta.get("task", "")):
        out["task"] = meta["task"]
    return out


class _Meta:
    """Just enough of a checkpoint (``metadata``, ``path``) for ``model_spec_of``."""

    def __init__(self, metadata: Mapping[str, str], path: str = "metadata"):
        self.metadata, self.path = metadata, path


def model_for(ckpt, model: str | None = None, **options) -> tuple[nn.Module, str, dict]:
    """Build the module a checkpoint belongs to: from ``model``/options if given, else its metadata.

    A ``model`` given by the user may be a ``package.module:factory`` (their own code, by
    design); the metadata may only name a zoo model (``model_spec_of``).
    """
    from . import make_model

    recorded = _recorded_unless_given(ckpt, model)
    given = {k: v for k, v in options.items() if v is not None}  # unset CLI options arrive as None
    if model is None and recorded is None and PARTIAL_ZIP in getattr(ckpt, "metadata", {}):
        return _partial_zip_model_for(ckpt, given)
    if model is None and recorded is None and hf_folder(ckpt) is not None:
        return _hf_model_for(ckpt, given)
    if model is None:
        if recorded is None:
            raise MergescopeError(f"{ckpt.path}: no model recorded in metadata; pass --model NAME or package.module:factory")
        model = recorded[0]
    base = recorded[1] if recorded is not None and recorded[0] == model else {}
    options = {**base, **given}
    return make_model(model, **options), model, options


PARTIAL_ZIP = "partial_zip"  # align --unmerged K: {"model": {name, options}, "unmerged": [unit groups], ...}
MAX_GROUPS = 10_000  # unit groups a record may name (align's --unmerged bound)


def _partial_zip_model_for(ckpt, given: Mapping) -> tuple[nn.Module, str, dict]:
    """The widened module of a partial-zip checkpoint, rebuilt from its record: the base must be a zoo
    model (options bounded as any zoo record), and its last ``len(unmerged)`` unit groups, traced on the
    recorded built-in task's inputs, must be the groups the record names."""
    from ..align.partial import widened_template
    from ..state import example_input
    from . import make_model

    where = f"{ckpt.path}: metadata {PARTIAL_ZIP!r}"
    if given:
        raise MergescopeError(f"{ckpt.path}: {', '.join(sorted(given))} cannot change a partial-zip checkpoint's "
                              "model (its record fixes the architecture)")
    try:
        record = json.loads(ckpt.metadata[PARTIAL_ZIP])
        base = json.dumps(record["model"]) if isinstance(record, dict) and isinstance(record.get("model"), dict) else None
    except (ValueError, KeyError, RecursionError):
        base = None
    unmerged = record.get("unmerged") if base is not None else None
    if base is None or not isinstance(unmerged, list) or not 0 < len(unmerged) <= MAX_GROUPS \
            or not all(isinstance(g, str) for g in unmerged):
        raise MergescopeError(f"{where} must be JSON with a model record and a non-empty list of unmerged unit groups")
    name, options = model_spec_of(_Meta({"model": base}, where))
    template = make_model(name, **options)
    try:
        module, tail = widened_template(template, example_input(task_for(ckpt)), len(unmerged))
    except MergescopeError as e:
        raise MergescopeError(f"{where}: {e}") from None
    if tail != unmerged:
        raise MergescopeError(f"{where} names unmerged groups {short_repr(unmerged)}, but the last {len(unmerged)} "
                              f"unit groups of {name} are {short_repr(tail)}")
    return module, name, options


def hf_folder(ckpt) -> os.PathLike | None:
    """The Hugging Face folder (with ``config.json``) a checkpoint was read from, or None."""
    from .hf import folder_of

    return folder_of(ckpt)


def _hf_model_for(ckpt, given: Mapping) -> tuple[nn.Module, None, dict]:
    """model_for's answer for a HF folder: the transformers model its config.json names (name None:
    there is no zoo record to write; the folder's config.json is the record)."""
    from .hf import hf_model

    if given:
        raise MergescopeError(f"{ckpt.path}: {', '.join(sorted(given))} apply to zoo models; a Hugging Face folder's "
                              "architecture comes from its config.json")
    return hf_model(hf_folder(ckpt), ckpt), None, {}


def _recorded_unless_given(ckpt, model: str | None) -> tuple[str, dict] | None:
    """The metadata's model record; when the user names the model, a record the file got wrong
    (or a factory other than the one named) is ignored rather than fatal."""
    if model is None:
        return model_spec_of(ckpt)
    try:
        return model_spec_of(ckpt, trusted=(model,))
    except MergescopeError:
        return None


def load_state_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike = "state") -> nn.Module:
    """Load a state strictly (see ``fitted_state``), turning key/shape mismatches into one-line errors."""
    module.load_state_dict(fitted_state(module, state, source), strict=True)
    return module


def fitted_state(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike = "state"
                 ) -> dict[str, torch.Tensor]:
    """``state`` under exactly the module's ``state_dict`` keys, with every key and shape checked.

    Strict except for what a Hugging Face file legitimately differs in: a tied copy the file leaves
    out (``lm_head.weight`` of a tied model) is taken from its twin, a buffer the module computes
    itself (``derived_state_keys``, set by ``tasks.hf``) from the module, and a non-persistent
    buffer an older library saved (BERT's ``position_ids``) is ignored.
    """
    expected = module.state_dict()
    twins = tied_twins(module)
    derived = getattr(module, "derived_state_keys", frozenset())
    fitted = {}
    for k, t in expected.items():
        if k in state:
            fitted[k] = state[k]
        elif any(o in state for o in twins.get(k, ())):
            fitted[k] = state[next(o for o in twins[k] if o in state)]
        elif k in derived:
            fitted[k] = t
    unsaved = {k for k, _ in module.named_buffers()} - set(expected)
    missing = [k for k in expected if k not in fitted]
    extra = [k for k in state if k not in expected and k not in unsaved]
    if missing or extra:
        raise MergescopeError(
            f"{source}: does not fit the model (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for k, t in expected.items():
        if tuple(fitted[k].shape) != tuple(t.shape):
            raise MergescopeError(f"{source}: tensor {k!r} has shape {tuple(fitted[k].shape)}, the model needs {tuple(t.shape)}")
    return fitted


def tied_twins(module: nn.Module) -> dict[str, list[str]]:
    """For each parameter name that shares its tensor with others (tied weights): those other names."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: [o for o in names if o != n] for names in groups.values() if len(names) > 1 for n in names}


def task_for(ckpt, spec: str | None = None):
    """The task named on the command line, else the one `mergescope train` recorded (built-in or a subset).

    A data file (``tasks.files``) is tokenized with the checkpoint's own folder when it is a Hugging Face folder.
    """
    from . import get_task
    from .files import is_data_file

    if spec and is_data_file(spec):
        return _checked_file_task(ckpt, get_task(spec, model_folder=hf_folder(ckpt)))
    if spec and TASK_PATTERN.fullmatch(spec):  # digits[0,1]: a built-in task restricted to some classes
        return builtin_task(spec)
    if spec:
        return get_task(spec)
    if "task" not in getattr(ckpt, "metadata", {}) and "model" not in getattr(ckpt, "metadata", {}) \
            and hf_folder(ckpt) is not None:
        raise MergescopeError(f"{ckpt.path}: a Hugging Face folder records no task; pass --task with your data "
                              "(.csv/.tsv/.jsonl text classification, .txt language-model loss, .npz; docs/tasks.md)")
    recorded = getattr(ckpt, "metadata", {}).get("task", "digits")
    if TASK_PATTERN.fullmatch(recorded) is None:
        raise MergescopeError(f"{ckpt.path}: records task {short_repr(recorded)}, which is not a built-in task; "
                              "a checkpoint cannot choose code to run: pass --task yourself")
    return builtin_task(recorded)


def builtin_task(spec: str):
    """The built-in task a ``TASK_PATTERN`` string names (``digits``, ``mnist1d[0,1]``: some classes only)."""
    from . import digits, mnist1d

    match = TASK_PATTERN.fullmatch(spec)
    build = {"digits": digits, "mnist1d": mnist1d}[match.group(1)]
    return build(classes=tuple(int(c) for c in match.group(2).split(","))) if match.group(2) else build()


def _checked_file_task(ckpt, task):
    """A data-file task, checked against the zoo model the checkpoint records (built with its recorded
    options; weights do not change shapes), so a file the model cannot take is one line before any work."""
    from . import build

    try:
        recorded = model_spec_of(ckpt)
    except MergescopeError:
        return task  # model_for reports a bad record
    if recorded is not None and recorded[0] in ZOO:
        task.check_model(build(recorded[0], **recorded[1]))
    return task
