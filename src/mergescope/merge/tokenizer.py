"""Tokenizers in merges: the output vocabulary, each model's token-id map, embedding rows remapped.

Models fine-tuned from one base often differ only by a few added tokens (ChatML markers, padding
rows), so their embedding matrices differ in rows. MergeKit 0.1.5 reconciles them before merging,
and so does this module, with the same rules:

* the output vocabulary is the base model's (``base``: tokens whose id is past the model's
  ``vocab_size`` dropped), another model's (a path), or the ``union``: the base's tokens and ids,
  then every other token of any model appended (a token some model added keeps its settings);
  tokens named under ``tokenizer: tokens:`` are appended when missing;
* each model's embedding-like tensor (rows indexed by token id) is rebuilt in the output order.
  A token the model has keeps its own row. A token it lacks gets: the one model's row when only one
  model has it; the base's row when the base has it; else the mean over the models that have it
  (zero when none has it). ``tokens:`` overrides this per token (a model's row, another token's row
  ``kind: model_token``, ``kind: zero``; ``force`` for every model, not only those lacking it);
* ``pad_to_multiple_of`` adds rows, each the mean of the real rows of that model's tensor;
* ``chat_template``: a built-in name, a Jinja text, or ``auto`` (the most common among the inputs).

Tokenizer files are data, never code: ``tokenizer.json`` is read through ``io.untrusted`` and parsed
by the ``tokenizers`` library; transformers is never asked to pick a tokenizer class. Of
``tokenizer_config.json`` only the special-token entries are read (they add tokens when missing,
as transformers does when it loads the folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io.untrusted import inside_folder, parse_json, read_text, short_repr

# Tensors indexed by token id along dim 0 (input embeddings, output heads and their biases): the names
# MergeKit 0.1.5's architecture definitions give a ``vocabulary_axis`` (all 0), as name suffixes.
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|embed_out|tok_embeddings|wte|word_embeddings|shared|"
                          r"output_layer|vocab_projector|lm_head|lm_head\.linear|lm_head\.decoder|cls\.predictions|"
                          r"cls\.predictions\.decoder|backbone\.embeddings)\.(?:weight|bias)$|^output\.weight$")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EXTRA_SPECIAL_KEYS = ("additional_special_tokens", "extra_special_tokens")
# Files a rebuilt tokenizer replaces: a stale slow-tokenizer file or template would disagree with it.
REPLACED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                  "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model",
                  "chat_template.jinja", "chat_template.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a template is attached to these
MAX_PAD_MULTIPLE = 1 << 16
TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Fill:
    """Where a token's row comes from when a model lacks it (or, with ``force``, for every model).

    ``kind``: ``model`` (that model's row for the same token), ``model_token`` (row ``row`` of that
    model's own tensor), ``zero``, ``average`` (mean over the models that have the token).
    """

    kind: str
    model: str | None = None
    row: int | None = None
    token: str | None = None  # model_token given by name: looked up in the model's vocabulary
    force: bool = False


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """The output vocabulary and, per model path, output id -> the model's row (-1: the model lacks it)."""

    tokenizer: object  # tokenizers.Tokenizer
    tokens: dict[str, int]
    rows: int
    maps: dict[str, torch.Tensor]
    vocabs: dict[str, dict[str, int]]  # each model's own vocabulary (``model_token`` by name)
    settings: dict[str, Fill]
    folder: Path  # whose tokenizer_config.json / special_tokens_map.json go with the output


@dataclass(frozen=True, eq=False)
class TokenizerPlan:
    """What the recipe asks of tokenizers: a rebuilt vocabulary and/or a chat template."""

    vocabulary: Vocabulary | None
    chat_template: str | None
    bases: dict[str, str | None] = field(default_factory=dict)  # remapped tensor -> its slice's base model


# ----------------------------------------------------------------------------- reading tokenizers


def read_tokenizer(folder: Path):
    """A model folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` with the special tokens its
    ``tokenizer_config.json`` names added (transformers adds them on load); None when the folder has none."""
    from tokenizers import Tokenizer

    if not folder.is_dir() or not os.path.lexists(folder / "tokenizer.json"):
        return None
    path = inside_folder(folder, "tokenizer.json", folder)
    text = read_text(path, "tokenizer.json", limit=1 << 30)
    parse_json(text, str(path), "tokenizer.json")  # one-line errors for garbage, depth, huge integers
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the Rust parser raises plain Exception (unknown model type, missing field)
        raise MergescopeError(f"{path}: not a tokenizers file ({_first_line(e)})") from None
    _add_configured_tokens(tok, read_config(folder))
    return tok


def read_config(folder: Path) -> dict:
    """``tokenizer_config.json`` of ``folder`` as a dict ({} when absent)."""
    if not folder.is_dir() or not os.path.lexists(folder / "tokenizer_config.json"):
        return {}
    path = inside_folder(folder, "tokenizer_config.json", folder)
    data = parse_json(read_text(path, "tokenizer_config.json"), str(path), "tokenizer_config.json")
    if not isinstance(data, dict):
        raise MergescopeError(f"{path}: tokenizer_config.json must be a JSON object, got {type(data).__name__}")
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return short_repr(text.splitlines()[0]) if text else type(e).__name__


def _added_token(entry, special: bool):
    """A tokenizers.AddedToken from a config entry (a string or a {content, ...} mapping), or None."""
    from tokenizers import AddedToken

    if isinstance(entry, str) and entry:
        return AddedToken(entry, special=special, normalized=not special)
    if isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"]:
        flags = {k: bool(entry[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
        return AddedToken(entry["content"], special=bool(entry.get("special", special)), **flags)
    return None


def _add_configured_tokens(tok, config: dict) -> None:
    """Register what ``tokenizer_config.json`` declares: ``added_tokens_decoder`` entries (in id order),
    the named special tokens, the extra special tokens; each gets a new id only when missing."""
    entries = []
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        def order(key):
            return int(key) if isinstance(key, str) and key.isdigit() and len(key) < 20 else 1 << 62
        entries += [_added_token(v, True) for _, v in sorted(decoder.items(), key=lambda kv: order(kv[0]))]
    entries += [_added_token(config.get(k), True) for k in SPECIAL_KEYS]
    for key in EXTRA_SPECIAL_KEYS:
        extra = config.get(key)
        if isinstance(extra, dict):
            extra = list(extra.values())
        if isinstance(extra, list):
            entries += [_added_token(e, True) for e in extra]
    for token in entries:
        if token is not None:
            (tok.add_special_tokens if token.special else tok.add_tokens)([token])


def vocab_rows(folder: Path, vocab: dict[str, int] | None) -> int | None:
    """The embedding rows a model declares (``config.json`` ``vocab_size``, also under ``text_config``),
    else the size of its vocabulary; None when neither is known."""
    from ..io.untrusted import read_json

    config = {}
    if folder.is_dir() and os.path.lexists(folder / "config.json"):
        config = read_json(inside_folder(folder, "config.json", folder), "config.json")
    for scope in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(scope, dict) and isinstance(scope.get("vocab_size"), int) and scope["vocab_size"] > 0:
            return scope["vocab_size"]
    return len(vocab) if vocab is not None else None


def strip_unused(tok, rows: int, where: str):
    """The tokenizer without tokens whose id is ``rows`` or more (ids the model has no embedding for).

    Works on the JSON form: the model's vocabulary, the added tokens and BPE merges that use them."""
    from tokenizers import Tokenizer

    unused = {t for t, i in tok.get_vocab(with_added_tokens=True).items() if i >= rows}
    if not unused:
        return tok
    data = json.loads(tok.to_str())
    model = data.get("model", {})
    if not isinstance(model.get("vocab"), dict):
        raise MergescopeError(f"{where}: tokenizer has {len(unused)} token(s) past the model's {rows} embedding rows, "
                              f"and its {model.get('type')} vocabulary cannot be cut (only BPE/WordLevel/WordPiece)")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < rows]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in unused}
    if isinstance(model.get("merges"), list):
        model["merges"] = [m for m in model["merges"] if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    return Tokenizer.from_str(json.dumps(data))


# ----------------------------------------------------------------------------- the output vocabulary


def union(base_tok, toks: list[tuple[object, int]]):
    """The base tokenizer plus every token of ``toks`` ((tokenizer, rows) in recipe order, base first)
    below its model's rows: plain tokens first (as non-special added tokens), then added tokens with
    their own settings. Ids of the base never change; new ids follow in this order (MergeKit's order
    depends on hash seeds, see docs/merge.md)."""
    from tokenizers import Tokenizer

    out = Tokenizer.from_str(base_tok.to_str())
    base_vocab = out.get_vocab(with_added_tokens=True)
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for tok, rows in toks:
        vocab = tok.get_vocab(with_added_tokens=True)
        for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            if idx < rows:
                plain.setdefault(token)
        for idx, info in sorted(tok.get_added_tokens_decoder().items()):
            if idx < rows:
                added.setdefault(info.content, info)
    new = [t for t in plain if t not in added and t not in base_vocab]
    if new:
        out.add_tokens(new)
    if added:
        out.add_tokens(list(added.values()))
    return out


def token_map(tokens: dict[str, int], vocab: dict[str, int], rows: int, where: str) -> torch.Tensor:
    """Output id -> the model's row for that token, -1 where the model lacks it."""
    out = torch.full((len(tokens),), -1, dtype=torch.int64)
    for token, new in tokens.items():
        old = vocab.get(token)
        if old is None:
            continue
        if old >= rows:
            raise MergescopeError(f"{where}: token {short_repr(token)} has id {old}, past the model's {rows} "
                                  "embedding rows (a padded tokenizer as the output vocabulary?)")
        out[new] = old
    return out


def padded(n: int, multiple: int | None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (unchanged without one)."""
    return n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple


# ----------------------------------------------------------------------------- building the plan


def settings(recipe) -> tuple[str | None, dict, int | None]:
    """(vocabulary source, per-token settings, pad multiple) from ``tokenizer_source`` or ``tokenizer:``."""
    section = recipe.tokenizer
    if section is not None:
        return section.source, dict(section.tokens or {}), section.pad_to_multiple_of or None
    return recipe.tokenizer_source, {}, None


def _fill(setting) -> Fill:
    """A recipe's ``tokens:`` entry as a Fill."""
    source = setting.source
    if source is None:
        return Fill("none", force=setting.force)
    if isinstance(source, str):
        return Fill("model", model=source, force=setting.force)
    if source.kind == "zero":
        return Fill("zero", force=setting.force)
    return Fill("model_token", model=source.model, row=source.token_id, token=source.token, force=setting.force)


def _source_folder(path: str, where: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise MergescopeError(f"{where}: model {path!r}: no such local file or folder (mergescope reads local paths "
                              "only; nothing is downloaded)")
    return folder


def build_vocabulary(recipe, models: list[str]) -> Vocabulary | None:
    """The output vocabulary and every referenced model's token map (None: the recipe keeps vocabularies)."""
    source, tokens, pad = settings(recipe)
    if source is None:
        return None
    where = f"{recipe.source}: tokenizer"
    base = recipe.base_model or models[0]
    toks = {m: read_tokenizer(Path(m)) for m in models}
    if toks[base] is None:
        raise MergescopeError(f"{where}: the base model {base!r} has no tokenizer.json (a vocabulary is built from it)")
    rows = {m: vocab_rows(Path(m), toks[m].get_vocab(with_added_tokens=True) if toks[m] else None) for m in models}
    toks[base] = strip_unused(toks[base], rows[base], base)
    out, folder = _output_tokenizer(source, base, toks, rows, where)
    existing = out.get_vocab(with_added_tokens=True)
    new = [t for t in tokens if t not in existing]
    if new:
        out.add_tokens(new)
    vocab = dict(sorted(out.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))  # id order
    if list(vocab.values()) != list(range(len(vocab))):
        raise MergescopeError(f"{where}: the output vocabulary's ids are not 0..{len(vocab) - 1} without gaps")
    vocabs = {m: (toks[m] or toks[base]).get_vocab(with_added_tokens=True) for m in models}
    limit = sum(rows[m] or len(vocabs[m]) for m in models) + len(tokens)
    if len(vocab) > limit:  # checked before any row is allocated: a crafted tokenizer cannot size the output
        raise MergescopeError(f"{where}: the output vocabulary has {len(vocab)} tokens, more than the models' "
                              f"{limit - len(tokens)} embedding rows and {len(tokens)} named tokens together")
    maps = {m: token_map(vocab, vocabs[m], rows[m] or len(vocabs[m]), f"{where}: model {m!r}") for m in models}
    fills = {t: _fill(s) for t, s in tokens.items()}
    return Vocabulary(out, vocab, padded(len(vocab), pad), maps, {m: vocabs[m] for m in models if toks[m]}, fills,
                      folder)


def _output_tokenizer(source: str, base: str, toks: dict, rows: dict, where: str) -> tuple:
    """(the output tokenizer, the folder whose tokenizer_config.json goes with it). Always a new object: the
    base's own vocabulary must not see tokens added to the output (MergeKit's ``source: base`` does)."""
    from tokenizers import Tokenizer

    if source == "base":
        return Tokenizer.from_str(toks[base].to_str()), Path(base)
    if source == "union":
        return union(toks[base], [(toks[m], rows[m]) for m in [base, *toks] if toks[m] is not None]), Path(base)
    folder = _source_folder(source, where)
    out = read_tokenizer(folder)
    if out is None:
        raise MergescopeError(f"{where}: source model {source!r} has no tokenizer.json")
    return out, folder


def prepare(recipe, models: list[str]) -> TokenizerPlan | None:
    """Everything tokenizer-related a recipe asks for, checked before any tensor is merged."""
    vocabulary = build_vocabulary(recipe, models)
    template = resolve_template(recipe.chat_template, models, recipe.source) if recipe.chat_template else None
    if vocabulary is None and template is None:
        return None
    donor = Path(recipe.base_model or models[0])
    if vocabulary is None and donor.is_dir() and not any(os.path.lexists(donor / n) for n in TOKENIZER_FILES):
        raise MergescopeError(f"{recipe.source}: chat_template: the base model {str(donor)!r} has no tokenizer files "
                              "to attach the template to")
    return TokenizerPlan(vocabulary, template)


def attach(plan, recipe):
    """The plan with its tokenizer work: vocabulary tensors get the output's rows (the hook the engine
    reads them through), and the rebuilt vocabulary / chat template travel with it."""
    tok = prepare(recipe, list(plan.models))
    if tok is None or tok.vocabulary is None:
        return dataclasses.replace(plan, tokenizer=tok)
    jobs, bases = [], {}
    for job in plan.jobs:
        if is_vocab_tensor(job.name) and job.dtype.is_floating_point and job.shape:
            job = dataclasses.replace(job, shape=(tok.vocabulary.rows, *job.shape[1:]))
            bases[job.name] = _tensor_base(recipe, job.name)
            models = [plan.models[i] for i, _ in job.inputs]  # the recipe's token settings, checked now
            fill_rules(tok.vocabulary, [tok.vocabulary.maps[m] for m in models], models, bases[job.name],
                       f"tensor {job.name!r}")
        jobs.append(job)
    return dataclasses.replace(plan, jobs=tuple(jobs), tokenizer=dataclasses.replace(tok, bases=bases))


def _tensor_base(recipe, name: str) -> str | None:
    """The base model of the slice a non-layer tensor comes from (the plan's rule: embeddings from the
    first slice, the rest from the last)."""
    from .plan import PRE

    if not recipe.slices:
        return recipe.base_model
    sl = recipe.slices[0] if PRE.search(name) else recipe.slices[-1]
    return sl.base_model or recipe.base_model


def rebuilds_vocabulary(recipe) -> bool:
    """Whether the recipe rebuilds vocabularies (embedding rows may then differ between models)."""
    return settings(recipe)[0] is not None


def remap_job(plan, job, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The engine's hook: a vocabulary tensor's inputs rebuilt in output order; others unchanged."""
    tok = getattr(plan, "tokenizer", None)
    if tok is None or tok.vocabulary is None or job.name not in tok.bases:
        return tensors
    models = [plan.models[i] for i, _ in job.inputs]
    return remap(tok.vocabulary, job.name, models, tensors, tok.bases[job.name])


# ----------------------------------------------------------------------------- remapping rows


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor is indexed by token id along dim 0 (embeddings, output heads)."""
    return VOCAB_TENSOR.search(name) is not None


def fill_rules(vocab: Vocabulary, maps: list[torch.Tensor], models: list[str], base: str | None,
               where: str) -> dict[int, Fill]:
    """Output id -> how to fill it, for the ids some model lacks (or that a forced setting names)."""
    have = torch.stack(maps) >= 0 if maps else torch.zeros((0, len(vocab.tokens)), dtype=torch.bool)
    complete = have.all(0).tolist()
    rules: dict[int, Fill] = {}
    for token, tid in vocab.tokens.items():
        fill = vocab.settings.get(token)
        if fill is not None:
            if fill.force or not complete[tid]:
                rules[tid] = _check_fill(vocab, fill, token, tid, maps, models, where)
            continue
        if complete[tid]:
            continue
        holders = [i for i in range(len(models)) if maps[i][tid] >= 0]
        if len(holders) == 1:
            rules[tid] = Fill("model", model=models[holders[0]])
        elif not holders:
            rules[tid] = Fill("zero")
        elif base in models and maps[models.index(base)][tid] >= 0:
            rules[tid] = Fill("model", model=base)
        else:
            rules[tid] = Fill("average")
    return rules


def _check_fill(vocab: Vocabulary, fill: Fill, token: str, tid: int, maps, models, where: str) -> Fill:
    """A user's setting checked against this tensor's inputs (MergeKit fails on each of these); a
    ``model_token`` given by name becomes its row."""
    label = f"{where}: token {short_repr(token)}"
    if fill.kind == "none":
        raise MergescopeError(f"{label}: some model lacks it and its setting names no source")
    if fill.kind in ("model", "model_token") and fill.model not in models:
        raise MergescopeError(f"{label}: source model {fill.model!r} is not among this tensor's inputs")
    if fill.kind == "model" and maps[models.index(fill.model)][tid] < 0:
        raise MergescopeError(f"{label}: source model {fill.model!r} does not have this token")
    if fill.kind == "model_token" and fill.row is None:
        own = vocab.vocabs.get(fill.model)
        if own is None or fill.token not in own:
            raise MergescopeError(f"{label}: its source token {short_repr(fill.token)} is not in model "
                                  f"{fill.model!r}'s tokenizer")
        return dataclasses.replace(fill, row=own[fill.token])
    return fill


def remap(vocab: Vocabulary, name: str, models: list[str], tensors: list[torch.Tensor],
          base: str | None) -> list[torch.Tensor]:
    """Each model's tensor rebuilt in the output vocabulary's order (rows = ``vocab.rows``).

    ``tensors[i]`` belongs to ``models[i]``; all share one dtype (the engine promotes them first)."""
    where = f"tensor {name!r}"
    maps = [vocab.maps[m] for m in models]
    for m, t, mp in zip(models, tensors, maps):
        if t.dim() == 0 or (mp.numel() and int(mp.max()) >= t.shape[0]):
            raise MergescopeError(f"{where}: model {m!r} has {t.shape[0] if t.dim() else 0} rows, fewer than its "
                                  f"tokenizer needs ({int(mp.max()) + 1})")
    rules = fill_rules(vocab, maps, models, base, where)
    defaults = {tid: _default_row(fill, tid, models, tensors, maps, where) for tid, fill in rules.items()}
    return [_rebuild(vocab, t, mp, rules, defaults) for t, mp in zip(tensors, maps)]


def _default_row(fill: Fill, tid: int, models, tensors, maps, where: str) -> torch.Tensor:
    """The row a model lacking token ``tid`` receives (the same for every model)."""
    if fill.kind == "zero":
        return tensors[0].new_zeros(tensors[0].shape[1:])
    if fill.kind == "average":
        embed = torch.zeros(tensors[0].shape[1:], dtype=tensors[0].dtype)
        count = 0
        for t, mp in zip(tensors, maps):
            if mp[tid] >= 0:
                embed = embed + t[mp[tid]]
                count += 1
        embed /= count
        return embed
    i = models.index(fill.model)
    if fill.kind == "model":
        return tensors[i][maps[i][tid]]
    row = fill.row  # a model_token (by name: resolved by _check_fill)
    if not 0 <= row < tensors[i].shape[0]:
        raise MergescopeError(f"{where}: token id {short_repr(row)} is out of range for model {fill.model!r} "
                              f"({tensors[i].shape[0]} rows)")
    return tensors[i][row]


def _rebuild(vocab: Vocabulary, tensor: torch.Tensor, mp: torch.Tensor, rules: dict[int, Fill],
             defaults: dict[int, torch.Tensor]) -> torch.Tensor:
    """One model's rows in output order: its own row where it has the token (unless forced), else the default."""
    n = len(vocab.tokens)
    out = tensor.new_zeros((vocab.rows, *tensor.shape[1:]))
    own = mp >= 0
    forced = [tid for tid, fill in rules.items() if fill.force]
    if forced:
        own[forced] = False
    ids = own.nonzero().flatten()
    out[ids] = tensor.index_select(0, mp[ids])
    fill_ids = [tid for tid in defaults if not own[tid]]
    if fill_ids:
        out[fill_ids] = torch.stack([defaults[tid] for tid in fill_ids])
    if vocab.rows > n:
        out[n:] = torch.mean(out[:n], dim=0)
    return out


# ----------------------------------------------------------------------------- chat templates


def _builtin_templates() -> Path | None:
    """MergeKit's template folder when MergeKit is installed (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "_data" / "chat_templates"


def resolve_template(value: str, models: list[str], where: str) -> str | None:
    """The template text for ``chat_template``: ``auto``, a built-in name, or Jinja text."""
    if value == "auto":
        return auto_template(models)
    if len(value) < 256 and "\n" not in value and "{" not in value:
        folder = _builtin_templates()
        if TEMPLATE_NAME.match(value) and folder is not None and (folder / f"{value}.jinja").is_file():
            return read_text(folder / f"{value}.jinja", "chat template")
        if folder is None and TEMPLATE_NAME.match(value):
            raise MergescopeError(f"{where}: chat_template {value!r}: built-in templates are read from an installed "
                                  "MergeKit, which is missing; give the Jinja text instead")
    if len(value) < 20 or "{" not in value:
        raise MergescopeError(f"{where}: chat_template {short_repr(value)} is neither 'auto', a built-in template "
                              f"name ({', '.join(template_names()) or 'none installed'}) nor a Jinja template")
    return value


def template_names() -> list[str]:
    folder = _builtin_templates()
    return sorted(p.stem for p in folder.glob("*.jinja")) if folder is not None and folder.is_dir() else []


def model_template(folder: Path) -> str | None:
    """A model folder's chat template (``chat_template.jinja`` first, as transformers reads it), stripped."""
    if not folder.is_dir():
        return None
    if os.path.lexists(folder / "chat_template.jinja"):
        text = read_text(inside_folder(folder, "chat_template.jinja", folder), "chat_template.jinja")
    else:
        text = read_config(folder).get("chat_template")
        if isinstance(text, list):  # named templates: the default one
            text = next((e.get("template") for e in text if isinstance(e, dict) and e.get("name") == "default"), None)
    return text.strip() if isinstance(text, str) and text.strip() else None


def auto_template(models: list[str]) -> str | None:
    """The most common template among the inputs (the first seen wins a tie); None when none has one."""
    found = [t for t in (model_template(Path(m)) for m in models) if t]
    return Counter(found).most_common(1)[0][0] if found else None


# ----------------------------------------------------------------------------- writing the output


def write_files(folder: Path, plan: TokenizerPlan, copied: bool) -> None:
    """Write the rebuilt tokenizer and/or the chat template into the output ``folder``.

    ``copied``: the donor's tokenizer files were copied into ``folder`` (a template goes into those)."""
    vocab = plan.vocabulary
    if vocab is not None:
        for name in REPLACED_FILES:
            if os.path.lexists(folder / name):
                (folder / name).unlink()
        config = _output_config(read_config(vocab.folder), vocab.tokenizer)
        (folder / "tokenizer.json").write_text(vocab.tokenizer.to_str(pretty=True))
        special = vocab.folder / "special_tokens_map.json"
        if os.path.lexists(special):
            data = parse_json(read_text(inside_folder(vocab.folder, special.name, vocab.folder), special.name),
                              str(special), special.name)
            (folder / special.name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    elif copied and plan.chat_template is not None:  # the donor's files (checked by ``prepare``)
        config = read_config(folder)
    else:
        return
    if plan.chat_template is not None:
        config["chat_template"] = plan.chat_template
        for name in TEMPLATE_FILES:
            if os.path.lexists(folder / name):
                (folder / name).unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _output_config(config: dict, tok) -> dict:
    """The source's tokenizer_config.json, its ``added_tokens_decoder`` (when it has one) rewritten
    from the output tokenizer so ids and entries agree."""
    config = dict(config)
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}
    return config


def fix_config(config: dict, plan: TokenizerPlan | None) -> None:
    """Set the output config's vocabulary size to the rebuilt embedding rows."""
    if plan is None or plan.vocabulary is None:
        return
    scope = config
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
        scope = config["text_config"]
    scope["vocab_size"] = plan.vocabulary.rows
