"""Tasks from data files (tasks/files.py): the split rule, labels, tokenization, LM targets, arrays, and every
refusal as one line (API and CLI). References are written here independently: the documented hash rule
re-implemented with hashlib, the tokenizer called directly, LM targets and losses computed by hand/numpy."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hfutil import read_csv
from hostile import run_inprocess

from mergescope.errors import MergescopeError
from mergescope.io import save
from mergescope.tasks import build, get_task, train
from mergescope.tasks.checkpoints import model_metadata, task_for
from mergescope.tasks.files import IGNORE, TokenLMTask, parse_spec, task_from_file

WORDS = ["good", "bad", "fine", "great", "awful", "nice", "poor", "lovely", "dull", "bright", "grim", "superb"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def reference_split(data: bytes) -> str:
    """The documented rule: sha256 of the input, first 8 bytes big-endian, mod 10: 0-7 train, 8 val, 9 test."""
    bucket = int(hashlib.sha256(data).hexdigest()[:16], 16) % 10
    return {8: "val", 9: "test"}.get(bucket, "train")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) + f" {i}" for i in range(n)]


def write_csv(path: Path, rows, header=("text", "label"), delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def hf_folder(minilm_dir: Path, dest: Path, **config) -> Path:
    """A model folder: MiniLM's tokenizer files and a config.json (no weights needed to build a task)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, dest / name)
    base = json.loads((minilm_dir / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**base, **config}))
    return dest


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)


@pytest.fixture(scope="module")
def classifier(minilm_dir, tmp_path_factory):
    return hf_folder(minilm_dir, tmp_path_factory.mktemp("cls"), architectures=["BertForSequenceClassification"],
                     id2label={"0": "pos", "1": "neg"}, label2id={"pos": 0, "neg": 1})


@pytest.fixture(scope="module")
def masked(minilm_dir, tmp_path_factory):
    return hf_folder(minilm_dir, tmp_path_factory.mktemp("mlm"), architectures=["BertForMaskedLM"])


@pytest.fixture(scope="module")
def causal(minilm_dir, tmp_path_factory):
    return hf_folder(minilm_dir, tmp_path_factory.mktemp("clm"), architectures=["GPT2LMHeadModel"], model_type="gpt2")


# ------------------------------------------------------------------ split rule

def test_split_follows_the_documented_hash_rule_and_ignores_row_order(tmp_path, classifier, tokenizer):
    texts = sentences(120)
    rows = [(t, ["pos", "neg"][i % 2]) for i, t in enumerate(texts)]
    a = task_from_file(write_csv(tmp_path / "a.csv", rows), classifier, max_length=16)
    order = np.random.default_rng(1).permutation(len(rows))
    b = task_from_file(write_csv(tmp_path / "b.csv", [rows[i] for i in order]), classifier, max_length=16)
    for split in ("train", "val", "test"):
        expected = [t for t in texts if reference_split(t.encode()) == split]
        want = tokenizer(expected, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        x, _ = a.splits[split]
        assert torch.equal(x[:, 0], want["input_ids"]) and torch.equal(x[:, 1], want["attention_mask"])
        rows_a, rows_b = (sorted(map(tuple, t.splits[split][0][:, 0].tolist())) for t in (a, b))
        assert rows_a == rows_b  # same rows per split whatever the order in the file
    again = task_from_file(tmp_path / "a.csv", classifier, max_length=16)
    assert all(torch.equal(again.splits[s][0], a.splits[s][0]) for s in a.splits)


def test_split_proportions_and_duplicates_stay_together(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3)).astype(np.float32)
    x[1000:1100] = x[0]  # 100 duplicates of row 0
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 4, 3000))
    task = task_from_file(tmp_path / "d.npz")
    sizes = {s: task.size(s) for s in task.splits}
    assert sum(sizes.values()) == 3000
    # 2900 distinct rows: binomial sd of the train share is 0.0074; the 100 duplicates move it by at most 0.033
    assert abs(sizes["train"] / 3000 - 0.8) < 0.06 and abs(sizes["val"] / 3000 - 0.1) < 0.05
    home = reference_split(x[0].tobytes())
    held = task.splits[home][0]
    assert int((held == torch.from_numpy(x[0])).all(1).sum()) == 101  # every copy in one split


# ------------------------------------------------------------------ labels

def test_string_labels_follow_the_heads_id2label(tmp_path, classifier):
    texts = sentences(80)
    labels = ["neg" if "good" in t else "pos" for t in texts]
    task = task_from_file(write_csv(tmp_path / "d.csv", list(zip(texts, labels))), classifier, max_length=16)
    assert task.info["labels"] == ["pos", "neg"] and task.num_classes == 2  # id order of config.json, not sorted
    for split in task.splits:
        expected = [{"pos": 0, "neg": 1}[lab] for t, lab in zip(texts, labels) if reference_split(t.encode()) == split]
        assert task.splits[split][1].tolist() == expected


def test_labels_without_a_head_are_sorted_names_or_integers(tmp_path, masked):
    texts = sentences(80)
    names = ["zebra", "apple", "mango"]
    task = task_from_file(write_csv(tmp_path / "s.csv", [(t, names[i % 3]) for i, t in enumerate(texts)]), masked,
                          max_length=16)
    assert task.info["labels"] == ["apple", "mango", "zebra"] and task.num_classes == 3
    train = [names[i % 3] for i, t in enumerate(texts) if reference_split(t.encode()) == "train"]
    assert task.splits["train"][1].tolist() == [["apple", "mango", "zebra"].index(n) for n in train]
    lines = [json.dumps({"sentence": t, "target": i % 4}) for i, t in enumerate(texts)]
    (tmp_path / "i.jsonl").write_text("\n".join(lines) + "\n\n")
    task = task_from_file(tmp_path / "i.jsonl", masked, max_length=16)
    assert task.num_classes == 4
    assert task.splits["val"][1].tolist() == [i % 4 for i, t in enumerate(texts) if reference_split(t.encode()) == "val"]


def test_column_syntax_and_tsv(tmp_path, classifier):
    texts = sentences(60)
    path = write_csv(tmp_path / "d.tsv", [(lab, t) for t, lab in zip(texts, [0, 1] * 30)], header=("stars", "review"),
                     delimiter="\t")
    assert parse_spec(f"{path}:review,stars") == (path, "review", "stars")
    assert parse_spec("pkg.module:factory") is None and parse_spec("digits") is None
    assert parse_spec("pkg.csv:factory") is None and parse_spec(f"{path}:review") == (path, "review", None)
    with pytest.raises(MergescopeError, match=r"d\.tsv: unknown task option\(s\) 'seed' \(a data file takes label_column, "
                                              r"max_length, text_column\)"):
        get_task(str(path), seed=0)
    with pytest.raises(MergescopeError, match=r"d\.tsv: max_length must be between 2 and 1000000, got 1"):
        get_task(str(path), max_length=1)
    task = get_task(f"{path}:review,stars", model_folder=classifier, max_length=16)
    assert sum(task.size(s) for s in task.splits) == 60
    (tmp_path / "q.tsv").write_text("text\tlabel\n" + "".join(f'"quoted {t}\t{i % 2}\n' for i, t in enumerate(texts)))
    quoted = get_task(str(tmp_path / "q.tsv"), model_folder=classifier, max_length=16)  # TSV quotes are text
    assert sum(quoted.size(s) for s in quoted.splits) == 60
    with pytest.raises(MergescopeError, match=r"d\.tsv: no text column \(looked for text, sentence, content; the "
                                              r"file has 'stars', 'review'\)"):
        get_task(str(path), model_folder=classifier)


# ------------------------------------------------------------------ language-model targets

def stream(tokenizer, text: str) -> list[int]:
    return [i for line in text.splitlines(keepends=True) for i in tokenizer(line, add_special_tokens=False)["input_ids"]]


def lm_text(n: int = 900) -> str:
    rng = np.random.default_rng(3)
    return "\n".join(" ".join(rng.choice(WORDS, 9)) for _ in range(n // 9)) + "\n"


def blocks(task):
    x = torch.cat([task.splits[s][0] for s in task.splits])
    y = torch.cat([task.splits[s][1] for s in task.splits])
    return x, y


def test_masked_lm_targets(tmp_path, masked, tokenizer):
    text = lm_text()
    (tmp_path / "t.txt").write_text(text)
    task = task_from_file(tmp_path / "t.txt", masked, max_length=12)
    assert isinstance(task, TokenLMTask) and task.info["kind"] == "masked language model"
    ids = stream(tokenizer, text)
    chunks = [ids[i:i + 10] for i in range(0, len(ids), 10)]  # 12 minus [CLS] and [SEP]
    chunks = [c for c in chunks if len(c) >= 2]
    for split in task.splits:
        expected = [c for c in chunks if reference_split(np.asarray(c, dtype=np.int64).tobytes()) == split]
        x, y = task.splits[split]
        assert len(x) == len(expected)
        for row, target, chunk in zip(x, y, expected):
            n = len(chunk) + 2
            original = torch.tensor([tokenizer.cls_token_id, *chunk, tokenizer.sep_token_id] + [0] * (12 - n))
            masked_at = row[0] == tokenizer.mask_token_id
            assert masked_at.any() and not masked_at[0] and not masked_at[n - 1:].any()  # never specials/padding
            assert torch.equal(target[masked_at], original[masked_at])
            assert (target[~masked_at] == IGNORE).all() and torch.equal(row[0][~masked_at], original[~masked_at])
            assert row[1].tolist() == [1] * n + [0] * (12 - n)
    (tmp_path / "big.txt").write_text(lm_text(20_000))
    x, y = blocks(task_from_file(tmp_path / "big.txt", masked, max_length=66))
    rate = (y != IGNORE).sum().item() / (x[:, 1].sum().item() - 2 * len(x))
    assert abs(rate - 0.15) < 0.015, rate  # ~20,000 text tokens: binomial sd 0.0025 (+0.85^64 for the one forced)


def test_causal_lm_targets(tmp_path, causal, tokenizer):
    text = lm_text(300)
    (tmp_path / "t.txt").write_text(text)
    task = task_from_file(tmp_path / "t.txt", causal, max_length=8)
    assert task.info["kind"] == "causal language model"
    ids = stream(tokenizer, text)
    x, y = blocks(task)
    seen = []
    for row, target in zip(x, y):
        n = int(row[1].sum())
        real = row[0][:n].tolist()
        assert real[0] == tokenizer.cls_token_id and real[-1] == tokenizer.sep_token_id  # the tokenizer's own specials
        seen.append(tuple(real[1:-1]))
        assert target[:n - 1].tolist() == real[1:] and (target[n - 1:] == IGNORE).all()
    chunks = [tuple(ids[i:i + 6]) for i in range(0, len(ids), 6)]
    assert sorted(seen) == sorted(c for c in chunks if len(c) >= 2)


class FixedLogits(torch.nn.Module):
    """Logits that depend only on the token id (a rank-4 table), so a numpy reference is easy."""

    def __init__(self, vocab: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(vocab, 4, generator=g), torch.randn(4, vocab, generator=g)

    def table(self) -> np.ndarray:
        return (self.a @ self.b).numpy()

    def forward(self, x):
        return self.a[x[:, 0]] @ self.b


class Pooled(torch.nn.Module):
    """A classifier-shaped output [B, 3]: not token logits."""

    def forward(self, x):
        return x[:, 0, :3].float()


def test_token_loss_and_accuracy_against_numpy(tmp_path, causal):
    (tmp_path / "t.txt").write_text(lm_text(300))
    task = task_from_file(tmp_path / "t.txt", causal, max_length=8)
    x, y = task.splits["train"]
    vocab = int(x[:, 0].max()) + 1
    task.num_classes = vocab
    model = FixedLogits(vocab)
    logits = model.table()[x[:, 0].numpy()]  # [N, L, V]
    target = y.numpy()
    keep = target != IGNORE
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.where(keep, target, 0)[..., None], -1)[..., 0]
    nll = (lse - picked)[keep]
    acc = (logits.argmax(-1) == target)[keep].mean()
    got = task.evaluate(model, "train")
    assert got["loss"] == pytest.approx(nll.mean(), rel=1e-5) and got["accuracy"] == pytest.approx(acc)
    assert task.loss(model(x), y).item() == pytest.approx(nll.mean(), rel=1e-5)
    with pytest.raises(MergescopeError, match=r"t\.txt: the model returns outputs of shape \[.*\]: is it a language model"):
        task.evaluate(Pooled(), "train")


# ------------------------------------------------------------------ arrays

def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(200, 2, 3)).astype(np.uint8)  # integers are taken as numbers
    y = rng.integers(0, 5, 200).astype(np.int32)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=y)
    task = get_task(str(tmp_path / "d.npz"))
    assert task.input_shape == (2, 3) and task.num_classes == 5
    for split in task.splits:
        rows = [i for i in range(200) if reference_split(x[i].astype(np.float32).tobytes()) == split]
        xs, ys = task.splits[split]
        assert xs.dtype == torch.float32 and torch.equal(xs, torch.from_numpy(x[rows].astype(np.float32)))
        assert ys.dtype == torch.long and ys.tolist() == y[rows].tolist()


# ------------------------------------------------------------------ refusals: one line each

def bad_files(tmp: Path, classifier: Path) -> dict:
    """name -> (path, expected message regex)."""
    texts = sentences(60)
    cases = {}
    cases["missing column"] = (write_csv(tmp / "m.csv", [(t, 0) for t in texts], header=("body", "label")),
                               r"m\.csv: no text column .*the file has 'body', 'label'")
    (tmp / "e.csv").write_text("")
    cases["empty file"] = (tmp / "e.csv", r"e\.csv: empty file")
    (tmp / "h.csv").write_text("text,label\n")
    cases["header only"] = (tmp / "h.csv", r"h\.csv: empty file \(a header but no rows\)")
    (tmp / "f.csv").write_text("text,label\nhello,0\nhi,there,1\n")
    cases["bad csv line"] = (tmp / "f.csv", r"f\.csv: line 3 has 3 fields, the header has 2")
    (tmp / "q.csv").write_text('text,label\n"a"b,0\n' + "x" * 200_000 + ",1\n")
    cases["csv too long field"] = (tmp / "q.csv", r"q\.csv: line \d+ is not valid CSV")
    (tmp / "j.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    cases["bad json line"] = (tmp / "j.jsonl", r"j\.jsonl: line 2: row is not valid JSON")
    (tmp / "k.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    cases["jsonl row missing label"] = (tmp / "k.jsonl", r"k\.jsonl: line 2 has no 'label' \(it has 'text'\)")
    cases["label outside head"] = (write_csv(tmp / "o.csv", [(t, i % 2 if i != 7 else 5) for i, t in enumerate(texts)]),
                                   r"o\.csv: line 9: label 5 in o\.csv is outside the model's 2 classes")
    cases["unknown label name"] = (write_csv(tmp / "u.csv", [(t, ["pos", "neg", "meh"][i % 3]) for i, t in enumerate(texts)]),
                                   r"u\.csv: line 4: label 'meh' is not one of the model's labels \('pos', 'neg'\)")
    cases["negative label"] = (write_csv(tmp / "n.csv", [(t, -1) for t in texts]), r"n\.csv: line 2: label -1 in n\.csv")
    cases["too few rows"] = (write_csv(tmp / "t.csv", [(t, 0) for t in texts[:4]]),
                             r"t\.csv: 4 rows leave the (train/)?(val/)?test split empty.* at least ~50 distinct rows")
    os.mkfifo(tmp / "p.csv")
    cases["fifo"] = (tmp / "p.csv", r"p\.csv: data file is a FIFO")
    cases["missing file"] = (tmp / "nope.csv", r"nope\.csv: cannot read data file \(No such file")
    np.savez(tmp / "noy.npz", x=np.zeros((50, 2)), labels=np.zeros(50, dtype=int))
    cases["npz without y"] = (tmp / "noy.npz", r"noy\.npz: no array 'y' \(the file has 'labels', 'x'\)")
    x = np.random.default_rng(0).normal(size=(80, 3))
    x[17, 1] = np.nan
    np.savez(tmp / "nan.npz", x=x, y=np.zeros(80, dtype=int))
    cases["non-finite x"] = (tmp / "nan.npz", r"nan\.npz: x has non-finite values \(NaN/Inf\) in 1 row\(s\), first row 17")
    np.savez(tmp / "fy.npz", x=x, y=np.zeros(80))
    cases["float y"] = (tmp / "fy.npz", r"fy\.npz: y has dtype float64, expected integer labels")
    np.savez(tmp / "obj.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3, dtype=int))
    cases["object x"] = (tmp / "obj.npz", r"obj\.npz: x has dtype object, expected numbers")
    np.savez(tmp / "rows.npz", x=np.zeros((5, 2)), y=np.zeros(4, dtype=int))
    cases["row mismatch"] = (tmp / "rows.npz", r"rows\.npz: x has 5 rows but y has 4")
    (tmp / "zip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    cases["not a zip"] = (tmp / "zip.npz", r"zip\.npz: not a valid \.npz file")
    return cases


def test_every_bad_file_is_one_line(tmp_path, classifier):
    for name, (path, pattern) in bad_files(tmp_path, classifier).items():
        with pytest.raises(MergescopeError) as info:
            task_from_file(path, classifier, max_length=16)
        message = str(info.value)
        assert "\n" not in message, name
        assert __import__("re").search(pattern, message), f"{name}: {message}"


def test_text_task_needs_a_matching_tokenizer_folder(tmp_path, minilm_dir):
    data = write_csv(tmp_path / "d.csv", [(t, i % 2) for i, t in enumerate(sentences(60))])
    with pytest.raises(MergescopeError, match=r"d\.csv: a text task needs a Hugging Face model folder"):
        task_from_file(data, None)
    small = hf_folder(minilm_dir, tmp_path / "small", vocab_size=1000)
    with pytest.raises(MergescopeError, match=r"small: tokenizer mismatch: the tokenizer has 30522 tokens but "
                                              r"config.json's vocab_size is 1000"):
        task_from_file(data, small)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(minilm_dir / "config.json", bare / "config.json")
    with pytest.raises(MergescopeError, match=r"bare: tokenizer mismatch: no tokenizer files in the folder"):
        task_from_file(data, bare)
    remote = hf_folder(minilm_dir, tmp_path / "remote")
    config = json.loads((remote / "tokenizer_config.json").read_text())
    (remote / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": "evil.Tok"}}))
    with pytest.raises(MergescopeError, match=r"tokenizer_config.json: names remote code \(auto_map\)"):
        task_from_file(data, remote)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(minilm_dir / "config.json", broken / "config.json")
    (broken / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MergescopeError, match=r"broken: tokenizer mismatch: cannot load its tokenizer \(.*recursion"):
        task_from_file(data, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.txt").write_text("a\nb\n")  # loads, but WordPiece fails on text: no [UNK]
    with pytest.raises(MergescopeError, match=r"broken: tokenizer mismatch: its tokenizer fails on the text "
                                              r"\(WordPiece error: Missing \[UNK\] token"):
        task_from_file(data, broken)
    outside = tmp_path / "outside.txt"
    outside.write_text("[PAD]\n")
    linked = hf_folder(minilm_dir, tmp_path / "linked")
    (linked / "vocab.txt").unlink()
    (linked / "vocab.txt").symlink_to(outside)
    with pytest.raises(MergescopeError, match=r"linked: path 'vocab.txt' resolves outside the model folder"):
        task_from_file(data, linked)


# ------------------------------------------------------------------ end to end

def zoo_pair(tmp_path: Path, task) -> list[Path]:
    """Two zoo MLPs (10 inputs, the zoo's 10 classes) trained on an .npz task and saved as `mergescope train` saves."""
    options = {"in_features": 10, "width": 16, "depth": 1}
    paths = []
    for seed in (0, 1):
        module = train(build("mlp", seed=seed, **options), task, epochs=10, lr=1e-2, seed=seed)
        path = tmp_path / f"m{seed}.safetensors"
        save(module.state_dict(), path, metadata=model_metadata("mlp", options))
        paths.append(path)
    return paths


def test_npz_task_end_to_end_through_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 10)) * 3
    y = rng.integers(0, 3, 400)
    np.savez(tmp_path / "d.npz", x=(centers[y] + rng.normal(size=(400, 10))).astype(np.float32), y=y)
    task = get_task(str(tmp_path / "d.npz"))
    paths = zoo_pair(tmp_path, task)
    from mergescope.cli import main

    assert main(["-q", "landscape", "line", str(paths[0]), str(paths[1]), "--n", "3", "--task", str(tmp_path / "d.npz"),
                 "-o", str(tmp_path / "line")]) == 0
    data = json.loads((tmp_path / "line" / "line.json").read_text())
    from mergescope.io import load
    from mergescope.tasks.checkpoints import load_state_into

    end = load_state_into(build("mlp", in_features=10, width=16, depth=1), load(paths[1]))
    assert data["accuracy"][-1] == pytest.approx(task.evaluate(end, "test")["accuracy"]) and data["accuracy"][-1] > 0.8
    # the same checkpoints on files they cannot take: one line, exit 2
    np.savez(tmp_path / "wide.npz", x=rng.normal(size=(200, 7)), y=rng.integers(0, 3, 200))
    np.savez(tmp_path / "many.npz", x=rng.normal(size=(200, 10)), y=np.arange(200) % 13)
    np.savez(tmp_path / "bad.npz", x=rng.normal(size=(200, 10)), z=rng.integers(0, 3, 200))
    for data_file, pattern in (("wide.npz", "wide.npz: the model cannot take this file's inputs of shape [7]"),
                               ("many.npz", "many.npz: label 12 in many.npz is outside the model's 10 classes"),
                               ("bad.npz", "bad.npz: no array 'y'")):
        out = run_inprocess(["ensemble", str(paths[0]), str(paths[1]), "--task", data_file], tmp_path, capsys)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.code == 2 and len(lines) == 1 and pattern in lines[0], out.stderr
        assert "Traceback" not in out.stderr and not out.changed


def test_fine_tuned_bert_folders_on_a_csv_task(hf_family, tmp_path, capsys):
    """task_for + tasks.hf.hf_model agree with transformers' own model on the tokenizer's own encoding,
    and the CLI runs on the folders with --task data.csv (a label the head lacks: one line, exit 2)."""
    transformers = pytest.importorskip("transformers")
    from mergescope.cli import main
    from mergescope.io import load
    from mergescope.tasks.hf import hf_model

    folder, other = hf_family.variants[:2]
    task = task_for(load(folder), str(hf_family.csv))
    got = task.evaluate(hf_model(folder), "test")
    rows = read_csv(hf_family.csv)
    test = [(t, lab) for t, lab in rows if reference_split(t.encode()) == "test"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True).eval()
    enc = tokenizer([t for t, _ in test], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = reference(**enc).logits.double().numpy()
    target = np.array([lab for _, lab in test])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert got["loss"] == pytest.approx(-logp[np.arange(len(target)), target].mean(), rel=1e-4)
    assert got["accuracy"] == pytest.approx((logits.argmax(1) == target).mean())

    out = tmp_path / "line"
    assert main(["-q", "landscape", "line", str(folder), str(other), "--n", "3", "--task", str(hf_family.csv),
                 "-o", str(out)]) == 0
    line = json.loads((out / "line.json").read_text())
    assert line["accuracy"][0] == pytest.approx(got["accuracy"]) and line["loss"][0] == pytest.approx(got["loss"], rel=1e-4)
    write_csv(tmp_path / "o.csv", [(t, 3 if i == 5 else lab) for i, (t, lab) in enumerate(rows)])
    write_csv(tmp_path / "c.csv", rows, header=("body", "label"))
    (tmp_path / "e.jsonl").write_text("\n\n")
    for data, message in (("o.csv", "o.csv: line 7: label 3 in o.csv is outside the model's 2 classes"),
                          ("c.csv", "c.csv: no text column (looked for text, sentence, content; the file has 'body'"),
                          ("e.jsonl", "e.jsonl: empty file")):
        outcome = run_inprocess(["ensemble", str(folder), str(other), "--task", data], tmp_path, capsys, timeout=60)
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        assert outcome.code == 2 and len(lines) == 1 and "Traceback" not in outcome.stderr, outcome.stderr
        assert message in lines[0] and not outcome.changed


def lm_folder(kind: str, minilm_dir: Path, dest: Path) -> Path:
    """A real transformers LM saved as a folder with MiniLM's tokenizer: BertForMaskedLM from MiniLM (fresh
    MLM head), or a one-layer GPT-2 of MiniLM's vocabulary (random init)."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "masked":
            model = transformers.BertForMaskedLM.from_pretrained(str(minilm_dir), local_files_only=True)
        else:
            config = transformers.GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                             bos_token_id=None, eos_token_id=None)
            model = transformers.GPT2LMHeadModel(config)
    model.eval().save_pretrained(str(dest), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, dest / name)
    return dest


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_lm_loss_equals_transformers_own_loss(kind, tmp_path, minilm_dir, capsys):
    """TokenLMTask.evaluate on tasks.hf's model == the loss transformers computes from labels itself (it shifts
    causal labels on its own: labels are the block's ids, padding -100)."""
    transformers = pytest.importorskip("transformers")
    from mergescope.tasks.hf import hf_model

    folder = lm_folder(kind, minilm_dir, tmp_path / kind)
    (tmp_path / "t.txt").write_text(lm_text(1500))
    task = task_from_file(tmp_path / "t.txt", folder, max_length=24)
    got = task.evaluate(hf_model(folder), "val")
    x, y = task.splits["val"]
    reference = transformers.AutoModelForMaskedLM if kind == "masked" else transformers.AutoModelForCausalLM
    model = reference.from_pretrained(str(folder), local_files_only=True).eval()
    labels = y if kind == "masked" else x[:, 0].masked_fill(x[:, 1] == 0, IGNORE)
    with torch.no_grad():
        out = model(input_ids=x[:, 0], attention_mask=x[:, 1], labels=labels)
    assert got["loss"] == pytest.approx(out.loss.item(), rel=1e-4)  # both: mean over every scored token of the split
    logits = out.logits if kind == "masked" else out.logits[:, :-1]
    target = y if kind == "masked" else y[:, :-1]
    keep = target != IGNORE
    assert got["accuracy"] == pytest.approx((logits.argmax(-1)[keep] == target[keep]).double().mean().item())
    if kind == "causal":  # GPT-2 names its positions n_positions (64 here): blocks are capped to them
        assert task_from_file(tmp_path / "t.txt", folder).input_shape == (2, 64)
        outcome = run_inprocess(["ensemble", str(folder), str(folder), "--task", "t.txt"], tmp_path, capsys)
        assert outcome.code == 2 and outcome.stderr.strip().count("\n") == 0, outcome.stderr
        assert "t.txt: a language-model task (per-token loss); ensembles" in outcome.stderr


def test_landscape_line_on_language_model_folders_and_a_text_file(tmp_path, minilm_dir):
    """Tied GPT-2 folders (lm_head = wte) along a linear path with a .txt task: every point's token loss
    equals TokenLMTask.evaluate of transformers' model holding the interpolated weights."""
    pytest.importorskip("transformers")
    from mergescope.cli import main
    from mergescope.io import load
    from mergescope.tasks.hf import hf_model

    a = lm_folder("causal", minilm_dir, tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    import transformers

    model_b = transformers.GPT2LMHeadModel.from_pretrained(str(b), local_files_only=True)
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model_b.save_pretrained(str(b), safe_serialization=True)
    (tmp_path / "t.txt").write_text(lm_text(1500))
    assert main(["-q", "landscape", "line", str(a), str(b), "--task", str(tmp_path / "t.txt"), "--n", "3",
                 "--split", "val", "-o", str(tmp_path / "out")]) == 0
    line = json.loads((tmp_path / "out" / "line.json").read_text())
    task = task_for(load(a), str(tmp_path / "t.txt"))
    sa, sb = hf_model(a).state_dict(), hf_model(b).state_dict()
    assert line["split"] == "val" and line["t"] == [0.0, 0.5, 1.0]
    for t, loss in zip(line["t"], line["loss"]):
        point = hf_model(a)
        point.load_state_dict({k: (1 - t) * sa[k] + t * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa})
        assert loss == pytest.approx(task.evaluate(point, "val")["loss"], rel=1e-4)


def test_size_caps_are_checked_before_reading(tmp_path, monkeypatch, classifier):
    import io
    import time
    import zipfile

    from mergescope.tasks import files

    header = io.BytesIO()  # an x.npy that claims 2**40 x 1000 float32 (4 PB) and holds 16 bytes
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 1000)})
    y = io.BytesIO()
    np.save(y, np.zeros(3, dtype=np.int64))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 16)
        z.writestr("y.npy", y.getvalue())
    start = time.monotonic()
    with pytest.raises(MergescopeError, match=r"bomb\.npz: x would take 4398046511104000 bytes, over the "
                                              r"2147483648-byte limit"):
        task_from_file(tmp_path / "bomb.npz")
    assert time.monotonic() - start < 5
    monkeypatch.setattr(files, "MAX_DATA_BYTES", 1000)
    big = write_csv(tmp_path / "big.csv", [(t, 0) for t in sentences(100)])
    with pytest.raises(MergescopeError, match=r"big\.csv: data file is \d+ bytes, over the 1000-byte limit"):
        task_from_file(big, classifier)


def test_hostile_data_files_through_the_cli(tmp_path):
    """In a subprocess (hostile.attack): a FIFO named as the data file and an .npz claiming petabytes are refused
    in one line, without blocking, allocating or touching any file."""
    from hostile import assert_refused, attack

    for seed in (0, 1):
        save(build("mlp", seed=seed, width=8, depth=1).state_dict(), tmp_path / f"m{seed}.safetensors",
             metadata=model_metadata("mlp", {"width": 8, "depth": 1}))
    os.mkfifo(tmp_path / "fifo.npz")
    header = __import__("io").BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**50, 64)})
    import zipfile

    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue())
        z.writestr("y.npy", b"")
    for data, names in (("fifo.npz", ("fifo.npz", "FIFO")), ("bomb.npz", ("bomb.npz", "over the", "limit"))):
        out = attack(["landscape", "line", "m0.safetensors", "m1.safetensors", "--task", data, "-o", "out"], tmp_path)
        assert_refused(out, *names, max_rss_mb=1000, max_seconds=60)


def test_a_missing_data_file_says_so_first(tmp_path, capsys):
    """Not 'needs a Hugging Face folder': the file itself is missing, whatever the checkpoint is."""
    for name in ("nope.csv", "nope.txt", "nope.npz"):  # no model folder given: the file is still named first
        with pytest.raises(MergescopeError, match=rf"{name}: cannot read data file \(No such file"):
            task_from_file(tmp_path / name)
