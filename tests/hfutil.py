"""A small family of fine-tuned MiniLM classifiers saved as Hugging Face folders, for tests.

The real pretrained all-MiniLM-L6-v2 (BertModel) gets a fresh 2-label head (the base) and is
fine-tuned for a few steps on a sentiment-like text task built here from word lists, once per
seed (different data order and subset). Only the last two encoder layers, the pooler and the
head train (the rest is frozen to stay fast), so several layers really change. Every folder is
``save_pretrained(safe_serialization=True)`` plus the tokenizer files; the text task is also
written as ``data.csv`` (columns text,label) next to them.

``family_task`` is a ``package.module:factory`` for the CLI (``--task hfutil:family_task``): the
token task of the family built last in this process.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_LENGTH = 16
SPLIT_SIZES = {"train": 48, "val": 16, "test": 32}
SUBJECTS = ("the movie", "this film", "the plot", "the acting", "the ending", "the music", "the story", "the cast")
ADVERBS = ("", "really ", "quite ", "truly ", "very ", "rather ")
GOOD = ("great", "wonderful", "excellent", "brilliant", "lovely", "superb", "charming", "delightful")
BAD = ("awful", "terrible", "boring", "dreadful", "poor", "horrible", "dull", "painful")
TRAINABLE = ("bert.encoder.layer.4.", "bert.encoder.layer.5.", "bert.pooler.", "classifier.")

_LAST: dict = {}
FAMILY_ENV = "MERGESCOPE_TEST_HF_FAMILY"


@dataclass(frozen=True)
class HFFamily:
    """Folders of one fine-tuned family and its data (all under ``root``)."""

    root: Path
    base: Path
    variants: tuple[Path, ...]
    csv: Path
    task: object  # tasks.TensorClassificationTask on [B, 2, L] token tensors


def sentences(seed: int, n: int) -> list[tuple[str, int]]:
    """``n`` labelled sentences "<subject> was <adverb><adjective>" (label 1: a good adjective), seeded."""
    combos = list(itertools.product(SUBJECTS, ADVERBS, GOOD + BAD))
    rows = random.Random(seed).sample(combos, n)
    return [(f"{s} was {a}{w}", int(w in GOOD)) for s, a, w in rows]


def write_csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f)]


def tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    """The input contract of mergescope.tasks.hf: [B, 2, L] (input ids, attention mask)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)


def text_task(csv_path: Path, tokenizer_dir: Path):
    """The CSV as a token classification task: consecutive rows are train, val, test (SPLIT_SIZES)."""
    from transformers import AutoTokenizer

    from mergescope.tasks import TensorClassificationTask

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = read_csv(csv_path)
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        part = rows[start:start + size]
        splits[name] = (tokens(tokenizer, [t for t, _ in part]), torch.tensor([y for _, y in part]))
        start += size
    return TensorClassificationTask("text", splits, num_classes=2, input_shape=(2, MAX_LENGTH))


def finetune(model, task, seed: int, steps: int = 12, batch: int = 16, lr: float = 1e-4):
    """A few AdamW steps on the train split (dropout off, only TRAINABLE tensors), data order from ``seed``."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = next(iter(task.batches("train")))
    g = torch.Generator().manual_seed(seed)
    model.eval()
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=g)[:batch]
        loss = torch.nn.functional.cross_entropy(model(input_ids=x[idx, 0], attention_mask=x[idx, 1]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def build_family(root: Path, minilm_dir: Path, seeds: tuple[int, ...] = (1, 2, 3), steps: int = 12) -> HFFamily:
    """Base (MiniLM + fresh head, seed 0) and one fine-tune per seed, saved as HF folders under ``root``."""
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(root / "data.csv", sentences(0, sum(SPLIT_SIZES.values())))
    task = text_task(csv_path, minilm_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2).eval()
    folders = []
    for name, seed in [("base", None), *[(f"ft{s}", s) for s in seeds]]:
        model = base if seed is None else finetune(BertForSequenceClassification.from_pretrained(
            str(root / "base")).eval(), task, seed, steps=steps)
        model.save_pretrained(str(root / name), safe_serialization=True)
        tokenizer.save_pretrained(str(root / name))
        folders.append(root / name)
    family = HFFamily(root, folders[0], tuple(folders[1:]), csv_path, task)
    _LAST["family"] = family
    os.environ[FAMILY_ENV] = str(root)  # worker processes (sweeps) rebuild the task from the files
    return family


def family_task():
    """``--task hfutil:family_task``: the token task of the family built last (build_family first)."""
    if "family" not in _LAST:
        root = Path(os.environ[FAMILY_ENV])
        return text_task(root / "data.csv", root / "base")
    return _LAST["family"].task
