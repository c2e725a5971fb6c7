"""Hugging Face folders as models (tasks/hf.py): built from config.json, checked against transformers itself.

References are independent of mergescope: ``from_pretrained`` models, their logits, state dicts
averaged by hand, and softmax ensembles computed here. The models are the fine-tuned MiniLM
family of tests/hfutil.py (the ``hf_family`` fixture).
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import mergescope as ms
from mergescope.cli import main
from mergescope.errors import MergescopeError
from mergescope.tasks.hf import hf_model, is_hf_folder

TASK = "hfutil:family_task"
TOL = 1e-4


def reference(folder):
    """transformers' own loading of a classifier folder (eval mode)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()


@torch.no_grad()
def hf_logits(model, x):
    return model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def test_classifier_matches_from_pretrained(hf_family):
    x, _ = next(iter(hf_family.task.batches("test")))
    folder = hf_family.variants[0]
    module, ref = hf_model(folder), reference(folder)
    assert is_hf_folder(folder) and not is_hf_folder(folder / "model.safetensors")
    assert type(module).__mro__[1] is type(ref) and module.num_labels == 2 and module.model_type == "bert"
    assert list(module.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        assert (module(x) - hf_logits(ref, x)).abs().max().item() <= TOL
    again = pickle.loads(pickle.dumps(module))  # process pools pickle modules: the subclass is rebuilt by name
    with torch.no_grad():
        assert torch.equal(again(x), module(x))


def test_save_pretrained_names_the_transformers_class(hf_family, tmp_path):
    """A user saving the wrapped model gets a folder that names transformers' class and loads anywhere."""
    module = hf_model(hf_family.variants[0])
    module.save_pretrained(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == \
        ["BertForSequenceClassification"]
    assert type(module).__name__.endswith("OnTokens")  # the wrapper is back after saving
    x, _ = next(iter(hf_family.task.batches("test")))
    with torch.no_grad():
        assert torch.equal(hf_logits(reference(tmp_path / "saved"), x), module(x))


def test_pretrained_minilm_folder_as_is(minilm_dir):
    """The wheel's folder: a headless BertModel saved by transformers 4.8 (with the position_ids buffer)."""
    from transformers import BertModel

    module, ref = hf_model(minilm_dir), BertModel.from_pretrained(str(minilm_dir)).eval()
    assert list(module.state_dict()) == list(ref.state_dict())
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = module(torch.stack([ids, mask], 1))
        assert (out - ref(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max().item() <= TOL
        assert torch.equal(module(ids), ref(input_ids=ids).last_hidden_state)  # [B, L]: ids alone
    with pytest.raises(MergescopeError, match="integer token tensors"):
        module(torch.zeros(2, 64))


def test_tied_head_missing_from_the_file(tmp_path):
    """GPT-2 ties lm_head to the embeddings; save_pretrained leaves lm_head.weight out of the file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)).eval()
    ref.save_pretrained(str(tmp_path / "gpt2"), safe_serialization=True)
    assert "lm_head.weight" not in ms.load(tmp_path / "gpt2")
    module = hf_model(tmp_path / "gpt2")
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(module(ids), ref(input_ids=ids).logits)
    assert module.lm_head.weight is module.transformer.wte.weight


def _folder(tmp_path, source, name, **changes):
    """A copy of ``source`` whose config.json has ``changes`` (None deletes a key)."""
    folder = tmp_path / name
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_file_cannot_choose_code(hf_family, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = f"open({str(marker)!r}, 'w').write('x')\nclass EvilModel: pass\n"
    base = hf_family.variants[0]
    remote = _folder(tmp_path, base, "remote", architectures=["EvilModel"],
                     auto_map={"AutoModelForSequenceClassification": "evil.EvilModel"})
    (remote / "evil.py").write_text(evil)
    with pytest.raises(MergescopeError, match=r"remote/config.json: architecture 'EvilModel' is not a model class"):
        hf_model(remote)
    # auto_map next to a real architecture is ignored: the transformers class is built, evil.py never runs
    ignored = _folder(tmp_path, base, "ignored", auto_map={"AutoModelForSequenceClassification": "evil.EvilModel"})
    (ignored / "evil.py").write_text(evil)
    assert type(hf_model(ignored)).__name__ == "BertForSequenceClassificationOnTokens"
    for name, changes, message in [
        ("tokenizer", {"architectures": ["BertTokenizer"]}, "'BertTokenizer' is not a model class"),
        ("dunder", {"architectures": ["__class__"]}, "'__class__' is not a model class"),
        ("none", {"architectures": None}, "'architectures' must be a list"),
        ("mismatch", {"model_type": "gpt2"}, "model_type 'gpt2' does not fit architecture BertForSequenceClassification"),
        ("unknown", {"model_type": "nope"}, "'model_type' 'nope' is not a transformers model type"),
        ("shape", {"hidden_size": 120_000, "intermediate_size": 4}, r"shape \(30522, 384\), the model needs \(30522, 120000\)"),
        ("deeper", {"num_hidden_layers": 60}, r"deeper: does not fit the model \(missing \['bert\.encoder\.layer\.6\."),
        ("zero heads", {"num_attention_heads": 0}, "cannot build BertForSequenceClassification"),
    ]:
        with pytest.raises(MergescopeError, match=message):
            hf_model(_folder(tmp_path, base, name, **changes))
    outside = _folder(tmp_path, base, "outside")
    (outside / "config.json").unlink()
    (outside / "config.json").symlink_to(remote / "config.json")  # a config.json from elsewhere is refused
    with pytest.raises(MergescopeError, match=r"outside: path 'config.json' resolves outside the model folder"):
        hf_model(outside)
    assert not marker.exists()
    assert main(["landscape", "line", str(remote), str(remote), "--n", "2", "--task", TASK,
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "EvilModel" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_missing_transformers_is_one_line(hf_family, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(MergescopeError, match=r"pip install 'mergescope\[hf\]'"):
        hf_model(hf_family.variants[0])


def _average(folders):
    states = [reference(f).state_dict() for f in folders]
    return {k: sum(s[k] for s in states) / len(states) if states[0][k].is_floating_point() else states[0][k]
            for k in states[0]}


def test_landscape_line_from_folders(hf_family, tmp_path):
    a, b = hf_family.variants[:2]
    assert main(["-q", "landscape", "line", str(a), str(b), "--n", "3", "--task", TASK, "--out", str(tmp_path)]) == 0
    line = json.loads((tmp_path / "line.json").read_text())
    x, y = next(iter(hf_family.task.batches("test")))
    mid = reference(a)
    mid.load_state_dict(_average([a, b]))
    expected = [F.cross_entropy(hf_logits(m, x), y).item() for m in (reference(a), mid, reference(b))]
    assert line["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_align_undoes_a_permutation_and_writes_a_hf_folder(hf_family, tmp_path):
    """B = A with its units shuffled: same logits (the spec is right), and `align` finds A back exactly."""
    from transformers import AutoTokenizer

    from mergescope.state import example_input

    a = hf_family.variants[0]
    module = hf_model(a)
    spec = ms.align.permutation_spec(module, example_input(hf_family.task))
    assert spec.heads and len(spec.perms) > len(spec.heads)
    perm = ms.align.random_permutation(spec, generator=torch.Generator().manual_seed(0))
    shuffled = reference(a)
    shuffled.load_state_dict(ms.align.apply(spec, perm, shuffled.state_dict()))
    shuffled.save_pretrained(str(tmp_path / "shuffled"), safe_serialization=True)
    x, _ = next(iter(hf_family.task.batches("test")))
    assert (hf_logits(shuffled, x) - hf_logits(reference(a), x)).abs().max().item() <= TOL
    assert not torch.equal(shuffled.state_dict()["bert.encoder.layer.5.intermediate.dense.weight"],
                           reference(a).state_dict()["bert.encoder.layer.5.intermediate.dense.weight"])
    out = tmp_path / "aligned"
    # the text task of tasks/files.py, tokenized with A's own tokenizer (weight matching uses it for the trace only)
    assert main(["-q", "align", str(a), str(tmp_path / "shuffled"), "-o", str(out), "--task", str(hf_family.csv)]) == 0
    aligned, original = reference(out).state_dict(), reference(a).state_dict()
    assert list(aligned) == list(original) and all(torch.equal(aligned[k], original[k]) for k in original)
    assert AutoTokenizer.from_pretrained(str(out))("the movie was great")["input_ids"][0] == 101
    assert "model" not in ms.load(out).metadata  # the folder's config.json is its record


def test_ensemble_from_folders(hf_family, tmp_path):
    a, b = hf_family.variants[:2]
    assert main(["-q", "ensemble", str(a), str(b), "--task", TASK, "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())["results"][0]
    x, y = next(iter(hf_family.task.batches("test")))
    probs = torch.stack([hf_logits(reference(f), x).softmax(-1) for f in (a, b)]).mean(0)
    assert result["accuracy"] == pytest.approx((probs.argmax(-1) == y).double().mean().item())
    assert result["loss"] == pytest.approx(F.nll_loss(probs.log(), y).item(), rel=1e-4)


def test_merge_of_folders_loads_in_transformers(hf_family, tmp_path):
    recipe = tmp_path / "recipe.yml"
    models = "".join(f"  - model: {f}\n    parameters: {{weight: 1.0}}\n" for f in hf_family.variants)
    recipe.write_text(f"merge_method: linear\nmodels:\n{models}dtype: float32\n")
    assert main(["-q", "merge", str(recipe), str(tmp_path / "merged")]) == 0
    merged = reference(tmp_path / "merged")
    by_hand = reference(hf_family.base)
    by_hand.load_state_dict(_average(hf_family.variants))
    x, _ = next(iter(hf_family.task.batches("test")))
    assert (hf_logits(merged, x) - hf_logits(by_hand, x)).abs().max().item() <= TOL
    with torch.no_grad():  # and mergescope reads the merged folder back as a model, no --model
        assert (hf_model(tmp_path / "merged")(x) - hf_logits(merged, x)).abs().max().item() <= TOL


def test_custom_study_without_model(hf_family, tmp_path):
    """study --config with no 'model:' on HF folders, with the data-file task of tasks/files.py."""
    from mergescope.tasks import get_task

    a, b = hf_family.variants[:2]
    config = tmp_path / "study.yml"
    config.write_text(f"task: {hf_family.csv}\ntask_options: {{model_folder: {a}, max_length: 16}}\n"
                      f"checkpoints: {{a: {a}, b: {b}}}\npath_points: 3\n")
    assert main(["-q", "study", "--config", str(config), "--stages", "convexity", "--out", str(tmp_path / "s")]) == 0
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert results["config"]["model"] == "mergescope.tasks.hf:hf_model"
    path = results["convexity"]["replicates"][0]["paths"]["a - b"]
    x, y = next(iter(get_task(str(hf_family.csv), model_folder=a, max_length=16).batches("test")))
    mid = reference(a)
    mid.load_state_dict(_average([a, b]))
    expected = [F.cross_entropy(hf_logits(m, x), y).item() for m in (reference(a), mid, reference(b))]
    assert path["t"] == [0.0, 0.5, 1.0] and path["loss"] == pytest.approx(expected, rel=1e-4)


def test_hessian_of_a_hf_model_matches_the_dense_one(tmp_path):
    """Sharpness needs double backward through attention (fused SDPA kernels have none): the top
    eigenvalue of a tiny BERT classifier's Hessian equals that of the dense Hessian of transformers' model."""
    from transformers import BertConfig, BertForSequenceClassification

    from mergescope.tasks import TensorClassificationTask

    torch.manual_seed(0)
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                        max_position_embeddings=8, num_labels=2, attn_implementation="eager")
    ref = BertForSequenceClassification(config).eval()
    ref.save_pretrained(str(tmp_path / "tiny"), safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.randint(0, 20, (12, 6), generator=g), torch.ones(12, 6, dtype=torch.long)], 1)
    y = torch.randint(0, 2, (12,), generator=g)
    task = TensorClassificationTask("tokens", {"train": (x, y)}, num_classes=2, input_shape=(2, 6))
    module = hf_model(tmp_path / "tiny")
    got = ms.landscape.hessian_eigenvalues(module, module.state_dict(), task, k=1, tol=1e-6).eigenvalues[0]

    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    flat = torch.cat([p.detach().flatten() for _, p in ref.named_parameters()])

    def loss(v):
        params = dict(zip(names, [c.reshape(s) for c, s in zip(v.split([s.numel() for s in shapes]), shapes)]))
        logits = torch.func.functional_call(ref, params, (), {"input_ids": x[:, 0], "attention_mask": x[:, 1]}).logits
        return F.cross_entropy(logits, y)

    dense = torch.autograd.functional.hessian(loss, flat)
    assert got == pytest.approx(torch.linalg.eigvalsh(dense.double()).max().item(), rel=1e-3)


def test_uniform_soup_is_a_hf_folder_and_layer_analyses_refuse_in_one_line(hf_family, tmp_path, capsys):
    a, b = hf_family.variants[:2]
    out = tmp_path / "soup"
    assert main(["-q", "soup", str(a), str(b), "--kind", "uniform", "--task", TASK, "-o", str(out)]) == 0
    by_hand = reference(a)
    by_hand.load_state_dict(_average([a, b]))
    x, _ = next(iter(hf_family.task.batches("test")))
    assert (hf_logits(reference(out), x) - hf_logits(by_hand, x)).abs().max().item() <= TOL
    capsys.readouterr()
    assert main(["analyse", "cka", str(a), str(b), "--task", TASK, "--out", str(tmp_path / "cka")]) == 2
    err = capsys.readouterr().err
    assert "not available for Hugging Face models" in err and len(err.strip().splitlines()) == 1


def test_sweep_builds_hf_models_in_worker_processes(hf_family, tmp_path):
    """A worker process rebuilds the model from the folder (no --model, nothing pickled from the driver)."""
    a, b = hf_family.variants[:2]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({"kind": "barrier_matrix", "checkpoints": [str(a), str(b)], "points": 3, "task": TASK}))
    assert main(["-q", "sweep", str(sweep), "-w", "1", "-o", str(tmp_path / "rows.jsonl")]) == 0
    row = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])
    x, y = next(iter(hf_family.task.batches("test")))
    ends = [F.cross_entropy(hf_logits(reference(f), x), y).item() for f in (a, b)]
    assert [row["path"]["loss"][0], row["path"]["loss"][-1]] == pytest.approx(ends, rel=1e-4)


def test_fitted_state_fills_only_what_a_hf_file_may_leave_out():
    """Tied copies and declared computed buffers are filled, non-persistent buffers ignored; a missing
    parameter, or a missing buffer of a module that declares none (a zoo model), stays an error."""
    from torch import nn

    from mergescope.tasks.checkpoints import fitted_state

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.register_buffer("positions", torch.arange(4))  # persistent, computed in __init__
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    net = Net()
    weight = torch.randn(5, 3)
    with pytest.raises(MergescopeError, match=r"missing \['positions'\]"):
        fitted_state(net, {"emb.weight": weight})
    net.derived_state_keys = frozenset({"positions"})
    fitted = fitted_state(net, {"emb.weight": weight, "scratch": torch.ones(2)})
    assert list(fitted) == list(net.state_dict()) == ["positions", "emb.weight", "head.weight"]
    assert fitted["head.weight"] is weight and torch.equal(fitted["positions"], torch.arange(4))
    with pytest.raises(MergescopeError, match=r"src: does not fit the model \(missing \['emb.weight', 'head.weight'\]"):
        fitted_state(net, {"positions": torch.arange(4)}, "src")


def test_a_folder_without_task_asks_for_one(hf_family, capsys):
    """No --task on a Hugging Face folder: one line asking for the data, not a digits task it cannot read."""
    capsys.readouterr()
    assert main(["evaluate", str(hf_family.variants[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no task; pass --task" in err[0]
