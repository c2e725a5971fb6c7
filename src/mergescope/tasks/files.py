"""Tasks from the user's own data files, without writing code (docs/tasks.md).

``task_from_file`` turns a data file into a Task:

- ``.csv`` / ``.tsv`` / ``.jsonl``: text classification, tokenized with the checkpoint folder's tokenizer;
  x is a LongTensor [N, 2, L] (input_ids, attention_mask), y the labels [N];
- ``.txt``: language-model loss, masked or causal as the folder's config.json says (``TokenLMTask``);
- ``.npz``: arrays ``x`` [N, ...] (numbers) and ``y`` [N] (integer labels).

Every row (text, array row, token block) goes to train/val/test by the sha256 of its input alone, so
the split is fixed, independent of row order, and a repeated input never sits in two splits. The
files are hostile input: read through ``io/untrusted`` with a size cap, every problem one line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MergescopeError
from ..io.untrusted import (
    check_regular,
    inside_folder,
    open_regular,
    parse_json,
    read_json,
    read_text,
    short_repr,
)
from .base import SPLITS, TensorClassificationTask
from .hf import is_hf_folder, quiet_transformers, read_config, transformers_module

MAX_DATA_BYTES = 2 * 1024**3  # a data file (or one array of an .npz) is read into memory whole
MAX_TOKENIZER_FILE_BYTES = 1 << 30  # as io/writer.copy_aux_files: far above any real tokenizer.json
SUFFIXES = (".csv", ".tsv", ".jsonl", ".txt", ".npz")
TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_COLUMNS = ("label", "labels", "target")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
SPLIT_BUCKETS = 10  # sha256 of the input mod 10: 0-7 train, 8 val, 9 test
MASK_RATE = 0.15  # masked LM: share of each block's text tokens replaced by the mask token
MASK_SEED = 0
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
IGNORE = -100  # target of a token that is not scored (padding, unmasked, last position)
FILE_OPTIONS = frozenset({"max_length", "text_column", "label_column"})  # besides model_folder
_INT = re.compile(r"[+-]?[0-9]{1,18}")


def is_data_file(spec: str) -> bool:
    """Whether a --task value names a data file (by suffix, optionally followed by ``:TEXT,LABEL``)."""
    return parse_spec(spec) is not None


def parse_spec(spec: str) -> tuple[Path, str | None, str | None] | None:
    """(path, text column, label column) of ``PATH`` or ``PATH:TEXT,LABEL`` (``PATH:TEXT`` when PATH exists);
    None for other specs (a built-in task name, a ``package.module:factory``)."""
    if Path(spec).suffix.lower() in SUFFIXES:
        return Path(spec), None, None
    head, sep, columns = spec.rpartition(":")
    if not sep or Path(head).suffix.lower() not in (".csv", ".tsv", ".jsonl"):
        return None
    if "," not in columns and not os.path.isfile(head):
        return None  # ``package.csv:factory`` stays a factory: a column pair has a comma, a file exists
    text, comma, label = columns.partition(",")
    return Path(head), text.strip() or None, (label.strip() or None) if comma else None


def task_from_spec(spec: str, model_folder: str | os.PathLike | None = None, **options):
    """The task of a --task value ``PATH`` or ``PATH:TEXT,LABEL`` (columns of a .csv/.tsv/.jsonl)."""
    path, text_column, label_column = parse_spec(spec)
    unknown = sorted(set(options) - FILE_OPTIONS)
    if unknown:
        raise MergescopeError(f"{path}: unknown task option(s) {', '.join(map(short_repr, unknown))} "
                              f"(a data file takes {', '.join(sorted(FILE_OPTIONS))})")
    if text_column is not None or label_column is not None:
        options = {"text_column": text_column, "label_column": label_column, **options}
    return task_from_file(path, model_folder, **options)


def task_from_file(path: str | os.PathLike, model_folder: str | os.PathLike | None = None, *, max_length: int = 128,
                   text_column: str | None = None, label_column: str | None = None):
    """The Task a data file describes (the suffix decides; see the module docstring).

    ``model_folder`` is the Hugging Face folder whose tokenizer and config.json (head size, label
    names, masked or causal) text tasks need; ``.npz`` tasks ignore it.
    """
    if type(max_length) is not int or not 2 <= max_length <= 1_000_000:
        raise MergescopeError(f"{path}: max_length must be between 2 and 1000000, got {max_length}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MergescopeError(f"{path}: not a data file; expected one of {', '.join(SUFFIXES)}")
    if suffix == ".npz":
        return array_task(path)
    check_regular(path, "data file")  # a missing or odd file is said before what the model folder lacks
    model = ModelInfo.read(path, model_folder)
    if suffix == ".txt":
        return lm_task(path, model, max_length)
    return text_task(path, model, max_length, text_column, label_column)


# ---------------------------------------------------------------- split rule

def split_of(data: bytes) -> str:
    """train/val/test for one input: sha256 mod 10 (0-7 train, 8 val, 9 test)."""
    bucket = int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % SPLIT_BUCKETS
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def split_indices(keys: list[bytes], path: Path, what: str = "rows") -> dict[str, np.ndarray]:
    """Row indices of each split; every split must be non-empty (one line saying how many are needed)."""
    names = [split_of(k) for k in keys]
    out = {s: np.array([i for i, n in enumerate(names) if n == s], dtype=np.int64) for s in SPLITS}
    empty = [s for s in SPLITS if len(out[s]) == 0]
    if empty:
        raise MergescopeError(f"{path}: {len(keys)} {what} leave the {'/'.join(empty)} split empty; the fixed hash split "
                              f"(80/10/10) needs every split non-empty: give at least ~50 distinct {what}")
    return out


# ---------------------------------------------------------------- the model folder

@dataclass(frozen=True)
class ModelInfo:
    """What a text task needs from the checkpoint folder: its tokenizer and config.json facts."""

    folder: Path
    config: dict
    tokenizer: object

    @classmethod
    def read(cls, data: Path, folder: str | os.PathLike | None) -> ModelInfo:
        if folder is None or not is_hf_folder(folder):
            raise MergescopeError(f"{data}: a text task needs a Hugging Face model folder (config.json and tokenizer "
                                  "files) to tokenize with; the checkpoint is not one")
        folder = Path(folder)
        config = read_config(folder)
        tokenizer = load_tokenizer(folder)
        vocab = config.get("vocab_size")
        if isinstance(vocab, int) and not isinstance(vocab, bool) and len(tokenizer) > vocab:
            raise MergescopeError(f"{folder}: tokenizer mismatch: the tokenizer has {len(tokenizer)} tokens but config.json's "
                                  f"vocab_size is {vocab}")
        return cls(folder, config, tokenizer)

    def tokenize(self, texts, **options) -> dict:
        """The tokenizer called on ``texts``; its failures (a crafted vocabulary) are one line naming the folder."""
        try:
            with quiet_transformers():
                return self.tokenizer(texts, **options)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - the Rust tokenizer raises bare Exception or panics
            raise MergescopeError(f"{self.folder}: tokenizer mismatch: its tokenizer fails on the text "
                                  f"({_first_line(e)})") from None

    def architecture(self) -> str:
        """``architectures[0]`` of config.json, or '' when it names none."""
        arch = self.config.get("architectures")
        return arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else ""

    def head_labels(self) -> list[str] | None:
        """The classifier head's label names (id order), or None when the folder has no classifier head."""
        if not self.architecture().endswith("ForSequenceClassification"):
            return None
        id2label = self.config.get("id2label")
        if isinstance(id2label, dict) and id2label:
            try:
                by_id = {int(k): str(v) for k, v in id2label.items()}
            except ValueError:
                raise MergescopeError(f"{self.folder / 'config.json'}: id2label keys must be integers") from None
            if sorted(by_id) == list(range(len(by_id))):
                return [by_id[i] for i in range(len(by_id))]
            raise MergescopeError(f"{self.folder / 'config.json'}: id2label keys must be 0..{len(by_id) - 1}")
        n = self.config.get("num_labels", 2)  # transformers' default head has 2 labels
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1_000_000:
            raise MergescopeError(f"{self.folder / 'config.json'}: num_labels must be a positive integer, got {short_repr(n)}")
        return [f"LABEL_{i}" for i in range(n)]

    def lm_kind(self) -> str:
        """'masked' or 'causal', from ``architectures`` (…ForMaskedLM / …ForCausalLM / …LMHeadModel), else the
        model type (BERT-likes masked, decoders causal) as transformers' own Auto tables list it."""
        name = self.architecture()
        if name.endswith("ForMaskedLM"):
            return "masked"
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        model_type = self.config.get("model_type")
        if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return "masked"
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return "causal"
        raise MergescopeError(f"{self.folder / 'config.json'}: cannot tell whether model type {short_repr(model_type)} "
                              f"(architecture {short_repr(name)}) is a masked or a causal language model")

    def max_positions(self, max_length: int) -> int:
        """``max_length``, capped by the model's positions (each family names them its own way)."""
        limits = [self.config.get(key) for key in POSITION_KEYS]
        return min([max_length] + [n for n in limits if isinstance(n, int) and not isinstance(n, bool) and n >= 2])


def load_tokenizer(folder: Path):
    """The folder's own tokenizer, offline and without remote code; its files must stay inside the folder."""
    present = [name for name in TOKENIZER_FILES if os.path.lexists(folder / name)]
    if not present:
        raise MergescopeError(f"{folder}: tokenizer mismatch: no tokenizer files in the folder (looked for "
                              f"{', '.join(TOKENIZER_FILES[:5])}, ...)")
    for name in present:
        file = inside_folder(folder, name, folder)
        if file.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
            raise MergescopeError(f"{file}: tokenizer file is over the {MAX_TOKENIZER_FILE_BYTES}-byte limit")
    if "tokenizer_config.json" in present:
        tok_config = read_json(folder / "tokenizer_config.json", "tokenizer_config.json")
        if isinstance(tok_config, dict) and "auto_map" in tok_config:
            raise MergescopeError(f"{folder / 'tokenizer_config.json'}: names remote code (auto_map); mergescope never "
                                  "runs code a file chooses")
    transformers = transformers_module()
    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (MergescopeError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - transformers raises many kinds; a crafted tokenizer.json can make
        # the Rust tokenizer panic, and pyo3's PanicException is a BaseException
        raise MergescopeError(f"{folder}: tokenizer mismatch: cannot load its tokenizer ({_first_line(e)})") from None


def _first_line(e: BaseException, limit: int = 300) -> str:
    return " ".join(str(e).split())[:limit] or type(e).__name__


# ---------------------------------------------------------------- rows: csv / tsv / jsonl

def read_rows(path: Path, text_column: str | None, label_column: str | None) -> list[tuple[int, str, object]]:
    """(line number, text, raw label) of every row of a .csv/.tsv (header row first) or .jsonl file."""
    text = read_text(path, "data file", limit=MAX_DATA_BYTES).removeprefix("\ufeff")
    if not text.strip():
        raise MergescopeError(f"{path}: empty file")
    if path.suffix.lower() == ".jsonl":
        columns, rows = _jsonl_rows(path, text)
    else:
        columns, rows = _csv_rows(path, text, "\t" if path.suffix.lower() == ".tsv" else ",")
    if not rows:
        raise MergescopeError(f"{path}: empty file (a header but no rows)")
    text_key = _column(path, columns, text_column, TEXT_COLUMNS, "text")
    label_key = _column(path, columns, label_column, LABEL_COLUMNS, "label")
    out = []
    for line, row in rows:
        if text_key not in row or label_key not in row:
            missing = text_key if text_key not in row else label_key
            raise MergescopeError(f"{path}: line {line} has no {short_repr(missing)} (it has {_names(row)})")
        value = row[text_key]
        if not isinstance(value, str):
            raise MergescopeError(f"{path}: line {line}: {short_repr(text_key)} must be a string, got {short_repr(value)}")
        out.append((line, value, row[label_key]))
    return out


def _csv_rows(path: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[int, dict]]]:
    # TSV has no quoting (IANA text/tab-separated-values; GLUE's .tsv files hold unbalanced quotes): a quote is text
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
        rows = []
        for record in reader:
            if not record:
                continue  # blank line
            if len(record) != len(header):
                raise MergescopeError(f"{path}: line {reader.line_num} has {len(record)} fields, the header has "
                                      f"{len(header)}")
            rows.append((reader.line_num, dict(zip(header, record))))
    except csv.Error as e:
        raise MergescopeError(f"{path}: line {reader.line_num} is not valid {'TSV' if delimiter == chr(9) else 'CSV'} "
                              f"({e})") from None
    if len(set(header)) != len(header):
        raise MergescopeError(f"{path}: the header repeats a column name ({_names(header)})")
    return header, rows


def _jsonl_rows(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict]]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}: line {n}", "row")
        if not isinstance(row, dict):
            raise MergescopeError(f"{path}: line {n} must be a JSON object with text and label, got {type(row).__name__}")
        rows.append((n, row))
    return (list(rows[0][1]) if rows else []), rows


def _column(path: Path, columns: list, given: str | None, defaults: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given in columns:
            return given
        raise MergescopeError(f"{path}: no column {short_repr(given)} (the file has {_names(columns)})")
    for name in defaults:
        if name in columns:
            return name
    raise MergescopeError(f"{path}: no {what} column (looked for {', '.join(defaults)}; the file has {_names(columns)}); "
                          f"name it with {path.name}:TEXT_COLUMN,LABEL_COLUMN")


def _names(columns) -> str:
    names = [short_repr(c) for c in list(columns)[:12]]
    return ", ".join(names) + (", ..." if len(columns) > 12 else "") if names else "no columns"


# ---------------------------------------------------------------- labels

def label_ids(path: Path, rows: list[tuple[int, str, object]], head: list[str] | None) -> tuple[list[int], list[str]]:
    """Each row's label id and the label names (id order).

    Integers (ints in JSON, integer strings in CSV) are ids; otherwise labels are names, looked up
    in the head's id2label when it names its labels, else numbered in sorted order.
    """
    raw = [label for _, _, label in rows]
    for (line, _, label) in rows:
        if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
            raise MergescopeError(f"{path}: line {line}: label must be an integer or a string, got {short_repr(label)}")
    if all(isinstance(v, int) or _INT.fullmatch(v.strip()) for v in raw):
        ids = [int(v) for v in raw]
        names = head if head is not None else [str(i) for i in range(max(ids) + 1)]
    else:
        names = head if head is not None and not _default_names(head) else sorted({str(v) for v in raw})
        index = {name: i for i, name in enumerate(names)}
        bad = next(((line, v) for line, _, v in rows if str(v) not in index), None)
        if bad is not None:
            raise MergescopeError(f"{path}: line {bad[0]}: label {short_repr(bad[1])} is not one of the model's labels "
                                  f"({_names(names)})")
        ids = [index[str(v)] for v in raw]
    limit = len(head) if head is not None else None
    for (line, _, label), i in zip(rows, ids):
        if i < 0 or (limit is not None and i >= limit):
            shown = str(i) if isinstance(label, int) or _INT.fullmatch(label.strip()) else f"{short_repr(label)} (class {i})"
            where = f"the model's {limit} classes" if limit is not None else "0..K-1 (labels must be 0 or more)"
            raise MergescopeError(f"{path}: line {line}: label {shown} in {path.name} is outside {where}")
    if head is None and len(names) < 2:
        names = names + [str(len(names))]  # a one-class file still needs a 2-way head
    return ids, names


def _default_names(names: list[str]) -> bool:
    return all(n == f"LABEL_{i}" for i, n in enumerate(names))


# ---------------------------------------------------------------- text classification

@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode for a block, its training flag restored after (a probe must not touch BN stats)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class FileClassificationTask(TensorClassificationTask):
    """A TensorClassificationTask read from a file: a model whose outputs are too narrow for the labels, or
    that cannot take the inputs, is a one-line error naming the file (not an IndexError deep in torch)."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._check_outputs(outputs, int(targets.max()) if targets.numel() else 0)
        return super().loss(outputs, targets)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str = "test") -> dict[str, float]:
        self.check_model(model)
        return super().evaluate(model, split)

    @torch.no_grad()
    def check_model(self, model: torch.nn.Module) -> None:
        """Run two train examples through ``model`` (eval mode, restored after): it must take the inputs
        and give one output per class, up to the file's largest label."""
        x, _ = self._split("train")
        try:
            with eval_mode(model):
                probe = model(x[:2])
        except (RuntimeError, IndexError, ValueError, TypeError) as e:
            raise MergescopeError(f"{self.name}: the model cannot take this file's inputs of shape "
                                  f"{list(x.shape[1:])} ({_first_line(e, 200)})") from None
        self._check_outputs(probe, max(int(y.max()) for _, y in self.splits.values()))

    def _check_outputs(self, outputs: torch.Tensor, top: int) -> None:
        if outputs.dim() != 2 or outputs.shape[-1] <= top:
            width = outputs.shape[-1] if outputs.dim() else 0
            raise MergescopeError(f"{self.name}: label {top} in {self.name} is outside the model's {width} classes "
                                  f"(outputs of shape {list(outputs.shape)})")


def text_task(path: Path, model: ModelInfo, max_length: int, text_column: str | None = None,
              label_column: str | None = None) -> FileClassificationTask:
    """Text classification: rows tokenized with the folder's tokenizer (padded/truncated to max_length)."""
    rows = read_rows(path, text_column, label_column)
    head = model.head_labels()
    ids, names = label_ids(path, rows, head)
    texts = [text for _, text, _ in rows]
    parts = split_indices([t.encode("utf-8") for t in texts], path)
    length = model.max_positions(max_length)
    x = encode_texts(model, texts, length)
    y = torch.tensor(ids, dtype=torch.long)
    splits = {s: (x[torch.from_numpy(i)], y[torch.from_numpy(i)]) for s, i in parts.items()}
    return FileClassificationTask(
        name=path.name, splits=splits, num_classes=len(names), input_shape=(2, length), eval_batch_size=64,
        info={"file": str(path), "kind": "text classification", "labels": names, "max_length": length,
              "split": "sha256(text) mod 10: 0-7 train, 8 val, 9 test", "rows": len(rows)})


def encode_texts(model: ModelInfo, texts: list[str], max_length: int) -> torch.Tensor:
    """[N, 2, L]: input_ids and attention_mask, padded and truncated to ``max_length``."""
    enc = model.tokenize(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"].long(), enc["attention_mask"].long()], dim=1)


# ---------------------------------------------------------------- language modelling

class TokenLMTask(TensorClassificationTask):
    """Language-model loss on token blocks: x [N, 2, L] (ids, mask), y [N, L] targets (-100 = not scored).

    loss is the mean token cross-entropy over scored targets, accuracy the share of scored tokens
    predicted exactly (the model returns logits [B, L, vocab]).
    """

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._check_outputs(outputs, targets)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str = "test") -> dict[str, float]:
        """Token loss and accuracy over every scored token of the split (not a mean of batch means)."""
        with eval_mode(model):
            sums = sum((self.token_sums(model(x), y) for x, y in self.batches(split)), torch.zeros(3, dtype=torch.float64))
        return {"loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2])}

    def token_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[summed cross-entropy, correct, scored tokens] of one batch."""
        self._check_outputs(outputs, targets)
        keep = targets != IGNORE
        scored, target = outputs[keep], targets[keep]
        return torch.stack([F.cross_entropy(scored, target, reduction="sum").double(),
                            (scored.argmax(-1) == target).sum().double(), keep.sum().double()])

    def _check_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if outputs.dim() != 3 or tuple(outputs.shape[:2]) != tuple(targets.shape) or outputs.shape[-1] <= int(targets.max()):
            raise MergescopeError(f"{self.name}: the model returns outputs of shape {list(outputs.shape)}, not token logits "
                                  f"[batch, {targets.shape[-1]}, vocab of {self.num_classes}]: is it a language model "
                                  "(…ForMaskedLM / …ForCausalLM)?")


def lm_task(path: Path, model: ModelInfo, max_length: int) -> TokenLMTask:
    """Blocks of ``max_length`` tokens of a plain-text file, with masked or causal targets."""
    kind = model.lm_kind()
    tok = model.tokenizer
    text = read_text(path, "data file", limit=MAX_DATA_BYTES).removeprefix("\ufeff")
    if not text.strip():
        raise MergescopeError(f"{path}: empty file")
    length = model.max_positions(max_length)
    prefix, suffix = special_tokens(model)
    room = length - len(prefix) - len(suffix)
    if room < 2:
        raise MergescopeError(f"{path}: max_length {length} leaves no room for text next to the tokenizer's "
                              f"{len(prefix) + len(suffix)} special tokens")
    stream = token_stream(model, text)
    chunks = [stream[i:i + room] for i in range(0, len(stream), room)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise MergescopeError(f"{path}: no text to score (fewer than 2 tokens)")
    keys = [np.asarray(c, dtype=np.int64).tobytes() for c in chunks]
    parts = split_indices(keys, path, what=f"blocks of {room} tokens")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if kind == "masked" and tok.mask_token_id is None:
        raise MergescopeError(f"{model.folder}: tokenizer mismatch: a masked language model's tokenizer has no mask token")
    blocks = [block(c, k, prefix, suffix, length, pad, kind, tok.mask_token_id) for c, k in zip(chunks, keys)]
    x = torch.from_numpy(np.stack([b[0] for b in blocks]))
    y = torch.from_numpy(np.stack([b[1] for b in blocks]))
    splits = {s: (x[torch.from_numpy(i)], y[torch.from_numpy(i)]) for s, i in parts.items()}
    return TokenLMTask(
        name=path.name, splits=splits, num_classes=len(tok), input_shape=(2, length), eval_batch_size=16,
        info={"file": str(path), "kind": f"{kind} language model", "max_length": length, "blocks": len(chunks),
              "split": "sha256(block token ids) mod 10: 0-7 train, 8 val, 9 test",
              "mask_rate": MASK_RATE if kind == "masked" else None})


def special_tokens(model: ModelInfo) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] / [SEP], a BOS), found by encoding
    a probe with and without special tokens (works across tokenizer classes and transformers versions)."""
    bare = model.tokenize("a b", add_special_tokens=False)["input_ids"]
    full = model.tokenize("a b", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare):])
    return [], []


def token_stream(model: ModelInfo, text: str) -> list[int]:
    """The text's token ids without special tokens, encoded line by line (newlines kept) so no single
    call sees the whole file."""
    lines = text.splitlines(keepends=True)
    encoded = model.tokenize(lines, add_special_tokens=False)["input_ids"] if lines else []
    return [i for ids in encoded for i in ids]


def block(chunk: list[int], key: bytes, prefix: list[int], suffix: list[int], length: int, pad: int, kind: str,
          mask_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One block: x [2, L] (ids with specials and padding, attention mask) and targets [L].

    causal: target t is the id at t+1 (the last real position and padding are -100).
    masked: a seeded 15% (at least one) of the text tokens, never specials or padding, become the mask
    token and are the only targets; the draw is seeded by the block's content, so it does not depend
    on where the block sits in the file.
    """
    ids = np.full(length, pad, dtype=np.int64)
    real = prefix + list(chunk) + suffix
    ids[:len(real)] = real
    attention = np.zeros(length, dtype=np.int64)
    attention[:len(real)] = 1
    target = np.full(length, IGNORE, dtype=np.int64)
    if kind == "causal":
        target[:len(real) - 1] = ids[1:len(real)]
    else:
        digest = hashlib.sha256(key).digest()
        draw = np.random.default_rng([MASK_SEED, int.from_bytes(digest[8:16], "big")]).random(len(chunk))
        chosen = np.flatnonzero(draw < MASK_RATE) if (draw < MASK_RATE).any() else np.array([int(draw.argmin())])
        positions = chosen + len(prefix)
        target[positions] = ids[positions]
        ids[positions] = mask_id
    return np.stack([ids, attention]), target


# ---------------------------------------------------------------- arrays

def array_task(path: Path) -> FileClassificationTask:
    """Classification on an .npz's ``x`` [N, ...] (numbers, finite) and ``y`` [N] (integers >= 0)."""
    x, y = read_npz(path)
    if len(y) == 0:
        raise MergescopeError(f"{path}: empty file (x and y have no rows)")
    if x.shape[0] != y.shape[0]:
        raise MergescopeError(f"{path}: x has {x.shape[0]} rows but y has {y.shape[0]}")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise MergescopeError(f"{path}: x has non-finite values (NaN/Inf) in {int(bad.sum())} row(s), first row "
                              f"{int(np.flatnonzero(bad)[0])}")
    if (y < 0).any():
        raise MergescopeError(f"{path}: label {int(y.min())} in y is negative; labels are 0..K-1")
    x = np.ascontiguousarray(x)
    parts = split_indices([row.tobytes() for row in x], path)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    splits = {s: (xt[torch.from_numpy(i)], yt[torch.from_numpy(i)]) for s, i in parts.items()}
    return FileClassificationTask(
        name=path.name, splits=splits, num_classes=max(int(y.max()) + 1, 2), input_shape=tuple(x.shape[1:]),
        info={"file": str(path), "kind": "array classification", "rows": len(y),
              "split": "sha256(x row as float32) mod 10: 0-7 train, 8 val, 9 test"})


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of an .npz, each array's header checked (dtype, size) before its data is read."""
    fd = open_regular(path, "data file")
    with os.fdopen(fd, "rb") as f:
        try:
            with zipfile.ZipFile(f) as archive:
                names = set(archive.namelist())
                missing = [k for k in ("x", "y") if f"{k}.npy" not in names]
                if missing:
                    have = sorted(n.removesuffix(".npy") for n in names)
                    raise MergescopeError(f"{path}: no array {' or '.join(map(repr, missing))} (the file has "
                                          f"{_names(have)}); an .npz task needs x (inputs) and y (integer labels)")
                return _npy(path, archive, "x", "fiub"), _npy(path, archive, "y", "iu")
        except MergescopeError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise MergescopeError(f"{path}: not a valid .npz file ({' '.join(str(e).split())[:200]})") from None


def _npy(path: Path, archive: zipfile.ZipFile, key: str, kinds: str) -> np.ndarray:
    fmt = np.lib.format
    with archive.open(f"{key}.npy") as member:
        version = fmt.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise MergescopeError(f"{path}: {key} uses .npy format version {version}, expected 1.0 or 2.0")
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(member)
        if dtype.kind not in kinds or dtype.hasobject or dtype.fields is not None:
            want = "integer labels" if key == "y" else "numbers"
            raise MergescopeError(f"{path}: {key} has dtype {dtype}, expected {want}")
        if key == "y" and len(shape) != 1:
            raise MergescopeError(f"{path}: y must be 1-D (one label per row), has shape {list(shape)}")
        if key == "x" and len(shape) < 1:
            raise MergescopeError(f"{path}: x must have a row axis, has shape {list(shape)}")
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if size > MAX_DATA_BYTES:
            raise MergescopeError(f"{path}: {key} would take {size} bytes, over the {MAX_DATA_BYTES}-byte limit")
    with archive.open(f"{key}.npy") as member:
        array = fmt.read_array(member, allow_pickle=False)
    if array.dtype.kind == "b" and key == "x":
        array = array.astype(np.float32)
    return array
