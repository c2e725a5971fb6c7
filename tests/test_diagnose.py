"""`diagnose`: every data-free signal against a numpy re-implementation, streamed == in memory, the
alignment gap's closed form on permuted models and on the zoo, one-line errors, and the CLI end to end."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from mergescope.diagnose import signals
from mergescope.diagnose.signals import data_free, row_alignment
from mergescope.errors import MergescopeError
from mergescope.io import save

torch.set_num_threads(1)


def _states(seed: int = 0, m: int = 3, scale: float = 0.1):
    """``m`` models = a base plus noise, with a few shapes, an integer buffer and a bf16 tensor."""
    g = torch.Generator().manual_seed(seed)
    base = {"layer.0.weight": torch.randn(48, 20, generator=g), "layer.0.bias": torch.randn(48, generator=g),
            "head.weight": torch.randn(5, 48, generator=g), "conv": torch.randn(4, 3, 3, 3, generator=g),
            "half": torch.randn(30, 7, generator=g).bfloat16(), "steps": torch.tensor([7])}
    models = []
    for _ in range(m):
        s = {}
        for k, v in base.items():
            if v.is_floating_point():
                noise = scale * torch.randn(v.shape, generator=g)
                noise[torch.rand(v.shape, generator=g) < 0.2] = 0  # some zero task-vector entries
                s[k] = (v.float() + noise).to(v.dtype)
            else:
                s[k] = v.clone()
        models.append(s)
    return models, base


def _flat(state) -> np.ndarray:
    return np.concatenate([state[k].double().numpy().ravel() for k in state if state[k].is_floating_point()])


def _reference(models: list[np.ndarray], base: np.ndarray | None) -> dict:
    """The signals written out in numpy from their definitions."""
    pairs = [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]
    dist = np.mean([np.linalg.norm(models[i] - models[j]) / ((np.linalg.norm(models[i]) + np.linalg.norm(models[j])) / 2)
                    for i, j in pairs])
    cos = lambda u, v: u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    out = {"relative_distance": dist, "weight_cosine": np.mean([cos(models[i], models[j]) for i, j in pairs])}
    norms = [np.linalg.norm(m) for m in models]
    if base is None:
        out["norm_ratio"] = max(norms) / min(norms)
        return out
    tvs = np.stack([m - base for m in models])
    out["task_vector_cosine"] = np.mean([cos(tvs[i], tvs[j]) for i, j in pairs])
    elected = np.where(tvs.sum(0) >= 0, 1.0, -1.0)  # TIES: the sign of the summed task vectors
    out["sign_conflict"] = np.mean(np.any((tvs != 0) & (np.sign(tvs) != elected), axis=0))
    tv_norms = np.linalg.norm(tvs, axis=1)
    out["norm_ratio"] = tv_norms.max() / tv_norms.min()
    return out


def test_global_and_layer_signals_match_numpy_reference():
    models, base = _states()
    glob, layers = data_free(models, base, align_gap=False)
    ref = _reference([_flat(m) for m in models], _flat(base))
    for key, value in ref.items():
        assert glob[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert glob["n_parameters"] == sum(v.numel() for v in base.values() if v.is_floating_point())
    assert glob["n_models"] == 3 and glob["alignment_gap"] is None
    assert [r["name"] for r in layers] == [k for k in base if base[k].is_floating_point()]  # the int buffer skipped
    for row in layers:
        name = row["name"]
        r = _reference([m[name].double().numpy().ravel() for m in models], base[name].double().numpy().ravel())
        assert row["relative_distance"] == pytest.approx(r["relative_distance"], rel=1e-9)
        assert row["cosine"] == pytest.approx(r["task_vector_cosine"], rel=1e-9)
        assert row["sign_conflict"] == pytest.approx(r["sign_conflict"])
        assert row["norm_ratio"] == pytest.approx(r["norm_ratio"], rel=1e-9)


def test_without_base_task_vector_signals_are_none_and_norms_are_the_models():
    models, _ = _states(seed=1, m=2)
    glob, layers = data_free(models, align_gap=False)
    ref = _reference([_flat(m) for m in models], None)
    assert glob["task_vector_cosine"] is None and glob["sign_conflict"] is None
    assert glob["relative_distance"] == pytest.approx(ref["relative_distance"], rel=1e-9)
    assert glob["weight_cosine"] == pytest.approx(ref["weight_cosine"], rel=1e-9)
    assert glob["norm_ratio"] == pytest.approx(ref["norm_ratio"], rel=1e-9)
    assert layers[0]["cosine"] == pytest.approx(_reference([m["layer.0.weight"].double().numpy().ravel()
                                                             for m in models], None)["weight_cosine"], rel=1e-9)


def test_sign_conflict_of_hand_made_task_vectors():
    base = {"w": torch.zeros(6)}
    a = {"w": torch.tensor([1.0, 1.0, -1.0, 0.0, 2.0, 0.0])}
    b = {"w": torch.tensor([1.0, -3.0, -1.0, 5.0, -2.0, 0.0])}
    # elements: agree, conflict, agree, one zero (no conflict), tie (sum 0 -> elected +, b disagrees), all zero
    glob, _ = data_free([a, b], base, align_gap=False)
    assert glob["sign_conflict"] == pytest.approx(2 / 6)


def test_chunked_sums_equal_one_chunk():
    models, base = _states(seed=2)
    ts = [m["layer.0.weight"] for m in models]
    one = signals.chunk_sums(ts, base["layer.0.weight"], chunk=1 << 20)
    small = signals.chunk_sums(ts, base["layer.0.weight"], chunk=37)
    np.testing.assert_allclose(small[0], one[0], rtol=1e-12)
    np.testing.assert_allclose(small[1], one[1], rtol=1e-12)
    assert small[2] == one[2]


def test_streamed_from_files_equals_in_memory(tmp_path):
    models, base = _states(seed=3)
    paths = []
    for i, m in enumerate(models):
        paths.append(tmp_path / f"m{i}.safetensors")
        save(m, paths[-1])
    folder = tmp_path / "base"
    save(base, folder, max_shard_size="2KB")  # a sharded HF folder
    assert len(list(folder.glob("*.safetensors"))) > 1
    mem = data_free(models, base)
    disk = data_free(paths, folder, threads=2)
    for key in ("relative_distance", "task_vector_cosine", "sign_conflict", "norm_ratio", "alignment_gap"):
        assert disk[0][key] == mem[0][key], key  # the same bits
    assert disk[1] == mem[1]
    assert disk[0]["models"] == [str(p) for p in paths]


def _row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_alignment_gap_of_a_row_permutation_is_one_minus_identity_similarity():
    g = torch.Generator().manual_seed(4)
    a = {"w1": torch.randn(40, 12, generator=g), "w2": torch.randn(25, 40, generator=g)}
    perms = {k: torch.randperm(v.shape[0], generator=g) for k, v in a.items()}
    b = {k: v[perms[k]] for k, v in a.items()}
    glob, layers = data_free([a, b])
    identity = {k: _row_cos(a[k].double().numpy(), b[k].double().numpy()).mean() for k in a}
    for row in layers:
        assert row["alignment_matched"] == pytest.approx(1.0, abs=1e-12)
        assert row["alignment_identity"] == pytest.approx(identity[row["name"]], abs=1e-12)
        assert row["alignment_gap"] == pytest.approx(1 - identity[row["name"]], abs=1e-12)
    weighted = (40 * identity["w1"] + 25 * identity["w2"]) / 65  # aggregated weighted by rows
    assert glob["alignment_gap"] == pytest.approx(1 - weighted, abs=1e-12)
    same, _ = data_free([a, {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in a.items()}])
    assert abs(same["alignment_gap"]) < 1e-6


def test_row_alignment_subsample_still_finds_permuted_rows():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(300, 500)
    perm = torch.randperm(300, generator=g)
    identity, matched, rows = row_alignment(a, a[perm], torch.Generator().manual_seed(0), rows=64, cols=50)
    assert rows == 64 and matched == pytest.approx(1.0, abs=1e-12) and identity < 0.2


def test_gap_selection_is_bounded_and_spread():
    jobs = [type("J", (), {"name": f"t{i}", "shape": (8, 8), "dtype": torch.float32})() for i in range(40)]
    jobs.append(type("J", (), {"name": "embed", "shape": (signals.GAP_MAX_OUT + 1, 8), "dtype": torch.float32})())
    picked = signals.gap_selection(jobs, limit=5)
    assert picked == {"t0", "t10", "t20", "t29", "t39"}
    assert "embed" not in signals.gap_selection(jobs, limit=100)


def test_mismatched_shapes_and_names_are_one_line_errors(tmp_path):
    models, _ = _states(seed=6, m=2)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save(models[0], a)
    save({**models[1], "layer.0.bias": torch.zeros(49)}, b)
    with pytest.raises(MergescopeError) as e:
        data_free([a, b])
    assert "layer.0.bias" in str(e.value) and str(b) in str(e.value) and "\n" not in str(e.value)
    save({k: v for k, v in models[1].items() if k != "conv"}, c := tmp_path / "c.safetensors")
    with pytest.raises(MergescopeError, match="'conv'.*missing from"):
        data_free([a, c])
    with pytest.raises(MergescopeError, match="at least two"):
        data_free([a])
    with pytest.raises(MergescopeError, match="given twice"):
        data_free([a, a])
    with pytest.raises(MergescopeError, match="no such local file"):
        data_free([a, tmp_path / "nope.safetensors"])
    import mergescope as ms

    with pytest.raises(MergescopeError) as e:  # an unknown task: one line, before any tensor is read
        ms.diagnose([a, b], task="no_such_task", model="mlp")
    assert "no_such_task" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the zoo


@functools.cache
def _zoo(seed: int, parent: int | None = None, epochs: int = 3) -> dict:
    """A digits MLP trained from its own init (``parent`` None) or fine-tuned from a parent."""
    from mergescope.tasks import build, digits, train

    model = build("mlp", seed=seed, width=64)
    if parent is not None:
        model.load_state_dict(_zoo(parent))
    train(model, digits(), epochs=1 if parent is not None else epochs, lr=1e-3 if parent is not None else 3e-3,
          seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_zoo_independent_models_have_a_large_gap_finetunes_none():
    independent, _ = data_free([_zoo(0), _zoo(1)])
    finetunes, _ = data_free([_zoo(2, parent=0), _zoo(3, parent=0)], _zoo(0))
    assert independent["alignment_gap"] > 0.2
    assert abs(finetunes["alignment_gap"]) < 0.01
    assert finetunes["relative_distance"] < independent["relative_distance"]


def test_zoo_random_permutation_first_layer_is_matched_exactly():
    from mergescope import align
    from mergescope.state import example_input
    from mergescope.tasks import build, digits

    state = _zoo(0)
    spec = align.permutation_spec(build("mlp", width=64), example_input(digits()))
    permuted = align.apply(spec, align.random_permutation(spec, torch.Generator().manual_seed(0), state), state)
    glob, layers = data_free([state, permuted])
    first = layers[0]  # inputs are pixels (never permuted): the rows match one to one
    a, b = state[first["name"]].double().numpy(), permuted[first["name"]].double().numpy()
    assert first["alignment_matched"] == pytest.approx(1.0, abs=1e-9)
    assert first["alignment_gap"] == pytest.approx(1 - _row_cos(a, b).mean(), abs=1e-9)
    assert glob["alignment_gap"] > 0.3
    assert json.loads(json.dumps(glob))  # plain JSON types


# ----------------------------------------------------------------------------- with a task


def _by_hand(module, state, x, y) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, logits) of ``module`` holding ``state``: a plain forward pass."""
    import copy

    net = copy.deepcopy(module)
    net.load_state_dict({**net.state_dict(), **state})
    with torch.no_grad():
        out = net.eval()(x)
    return float(torch.nn.functional.cross_entropy(out, y)), float((out.argmax(-1) == y).double().mean()), out


def test_measured_figures_match_a_plain_forward_pass(task):
    import mergescope as ms
    from mergescope.diagnose.measured import SampleTask
    from mergescope.tasks import build

    module = build("mlp", width=64)
    parent, a, b = _zoo(0), _zoo(2, parent=0), _zoo(3, parent=0)
    d = ms.diagnose([a, b], base=parent, task=task, model=module, points=3, sample=100, seed=1)
    m = d.measured
    sample = SampleTask(task, 100, seed=1)
    x = torch.cat([xb for xb, _ in sample.batches("val")])
    y = torch.cat([yb for _, yb in sample.batches("val")])
    val_x, _ = next(task.batches("val", batch_size=10**6))
    assert m["sample_size"] == len(y) == 100 and m["split"] == "val"
    assert all(bool((val_x == row).all(1).any()) for row in x)  # every example is from val
    floats = {k for k, v in a.items() if v.is_floating_point()}
    mid = {k: (a[k] + b[k]) / 2 for k in floats}
    path = [_by_hand(module, s, x, y) for s in (a, mid, b)]
    assert m["path"]["loss"] == pytest.approx([p[0] for p in path], rel=1e-5)
    assert m["barrier_loss"] == pytest.approx(max(0.0, path[1][0] - (path[0][0] + path[2][0]) / 2), abs=1e-6)
    assert m["average_loss"] == pytest.approx(path[1][0], rel=1e-5)
    assert m["members_accuracy"] == pytest.approx((path[0][1] + path[2][1]) / 2)
    probs = (path[0][2].softmax(-1) + path[2][2].softmax(-1)) / 2
    assert m["ensemble_accuracy"] == pytest.approx(float((probs.argmax(-1) == y).double().mean()))
    assert m["ensemble_loss"] == pytest.approx(float(-probs[torch.arange(len(y)), y].log().mean()), rel=1e-5)
    lam = m["task_arithmetic_lambda"]
    ta = {k: parent[k] + lam * ((a[k] - parent[k]) + (b[k] - parent[k])) for k in floats}
    assert m["task_arithmetic_loss"] == pytest.approx(_by_hand(module, ta, x, y)[0], rel=1e-5)
    assert 0 <= m["ties_accuracy"] <= 1 and m["aligned_accuracy"] is not None
    assert d.recommendation is None or d.recommendation["family"] in ("average", "task_vectors", "align", "ensemble",
                                                                       "none")
    assert json.dumps(d.to_dict(), allow_nan=False)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    """`mergescope train` checkpoints: a parent, two fine-tunes of it (--from) and an independent model."""
    from mergescope.cli import main

    folder = tmp_path_factory.mktemp("zoo")
    common = ["-q", "train", "--model", "mlp", "--width", "32", "--epochs", "2"]
    paths = {name: folder / f"{name}.safetensors" for name in ("parent", "ft1", "ft2", "other")}
    assert main([*common, "--seed", "0", "-o", str(paths["parent"])]) == 0
    assert main([*common, "--seed", "5", "-o", str(paths["other"])]) == 0
    for i, name in ((1, "ft1"), (2, "ft2")):
        assert main([*common, "--epochs", "1", "--seed", str(i), "--from", str(paths["parent"]), "-o",
                     str(paths[name])]) == 0
    return paths


def test_cli_writes_json_png_html_and_prints_the_recommendation(zoo_files, tmp_path, capsys):
    import mergescope as ms
    from mergescope.cli import main

    out = tmp_path / "diag"
    args = ["diagnose", str(zoo_files["ft1"]), str(zoo_files["ft2"]), "--base", str(zoo_files["parent"]), "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "diagnosis.json").read_text())
    api = ms.diagnose([zoo_files["ft1"], zoo_files["ft2"]], base=zoo_files["parent"])
    assert data["signals"]["sign_conflict"] == api.signals["sign_conflict"]
    assert data["layers"] == json.loads(json.dumps(api.layers))
    assert data["measured"] is None
    assert f"{api.signals['sign_conflict']:.4f}" in printed and "relative distance" in printed
    assert (out / "diagnosis.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "diagnosis.html").read_text()
    assert "data:image/png;base64," in page and "layers.0.weight" in page
    if api.recommendation is not None:
        assert "recommendation:" in printed and api.recommendation["method"] in printed
        assert data["recommendation"] == json.loads(json.dumps(api.recommendation))
        assert all(r in page for r in map(__import__("html").escape, api.recommendation["reasons"]))


def test_cli_with_a_task_measures_on_val(zoo_files, tmp_path, capsys):
    from mergescope.cli import main

    out = tmp_path / "diag"
    assert main(["diagnose", str(zoo_files["parent"]), str(zoo_files["other"]), "--task", "digits", "--points", "3",
                 "--sample", "64", "-o", str(out), "--json", str(tmp_path / "copy.json")]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "diagnosis.json").read_text())
    m = data["measured"]
    assert m["split"] == "val" and m["sample_size"] == 64 and len(m["path"]["t"]) == 3
    assert m["ensemble_accuracy"] is not None and m["task_arithmetic_accuracy"] is None  # no base
    assert "measured on a val sample of 64" in printed
    assert json.loads((tmp_path / "copy.json").read_text()) == data
    assert data["signals"]["alignment_gap"] > 0.1  # independently trained


def test_cli_bad_input_is_one_line_exit_2_without_outputs(zoo_files, tmp_path, capsys):
    from mergescope.cli import main
    from mergescope.io import load

    wide = tmp_path / "wide.safetensors"
    state = {k: load(zoo_files["parent"])[k] for k in load(zoo_files["parent"])}
    save({**state, "head.bias": torch.zeros(3)}, wide)
    out = tmp_path / "diag"
    assert main(["diagnose", str(zoo_files["parent"]), str(wide), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "head.bias" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["diagnose", str(zoo_files["parent"]), str(zoo_files["ft1"]), "-o", str(zoo_files["ft2"])]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_on_finetuned_minilm_folders_with_a_csv(minilm_dir, tmp_path, capsys):
    """As a new user would: two Hugging Face folders and a CSV."""
    pytest.importorskip("transformers")
    pytest.importorskip("mergescope.tasks.files")
    from hfutil import build_family

    from mergescope.cli import main

    family = build_family(tmp_path, minilm_dir, seeds=(1, 2), steps=4)
    out = tmp_path / "diag"
    a, b = family.variants
    assert main(["diagnose", str(a), str(b), "--base", str(family.base), "--task", str(family.csv), "--points", "3",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "diagnosis.json").read_text())
    m = data["measured"]
    assert m["split"] == "val" and m["sample_size"] > 0 and m["ties_accuracy"] is not None
    assert data["signals"]["task_vector_cosine"] is not None
    frozen = [r for r in data["layers"] if r["name"].startswith("bert.encoder.layer.0.")]
    assert frozen and all(r["relative_distance"] == 0 for r in frozen)  # hfutil trains only the last layers
    assert (out / "diagnosis.png").exists() and (out / "diagnosis.html").exists()
    assert "recommendation" in printed


def test_cli_outputs_are_reproducible_and_thread_independent(zoo_files, tmp_path):
    from mergescope.cli import main

    args = ["-q", "diagnose", str(zoo_files["ft1"]), str(zoo_files["ft2"]), "--base", str(zoo_files["parent"])]
    assert main([*args, "-o", str(tmp_path / "one"), "--threads", "2"]) == 0
    assert main([*args, "-o", str(tmp_path / "two"), "--threads", "2"]) == 0
    assert main([*args, "-o", str(tmp_path / "solo"), "--threads", "1", "--no-align-gap"]) == 0
    for name in ("diagnosis.json", "diagnosis.png", "diagnosis.html"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    one, solo = (json.loads((tmp_path / d / "diagnosis.json").read_text())["signals"] for d in ("one", "solo"))
    assert solo["alignment_gap"] is None and one["alignment_gap"] is not None
    for key in ("relative_distance", "task_vector_cosine", "sign_conflict", "norm_ratio", "model_norms"):
        assert solo[key] == one[key], key


class _ToyLM:
    """A language-model task by hand: token batches [B, L], targets with ignored (-100) positions,
    ``token_sums`` as tasks.files.TokenLMTask defines it (summed loss, correct, scored tokens)."""

    name = "toy-lm"

    def __init__(self, vocab: int = 11, n: int = 40, length: int = 6):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, length), generator=g)
        self.y = torch.roll(self.x, -1, dims=1)
        self.y[:, -1] = -100

    def batches(self, split, batch_size=None, shuffle=False, generator=None):
        order = torch.randperm(len(self.x), generator=generator) if shuffle else torch.arange(len(self.x))
        for s in range(0, len(order), 16):
            yield self.x[order[s:s + 16]], self.y[order[s:s + 16]]

    def loss(self, out, y):
        return torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100)

    def token_sums(self, out, y):
        keep = y != -100
        return torch.stack([torch.nn.functional.cross_entropy(out[keep], y[keep], reduction="sum").double(),
                            (out[keep].argmax(-1) == y[keep]).sum().double(), keep.sum().double()])


def test_measured_on_a_language_model_task_averages_over_tokens():
    import mergescope as ms

    lm = _ToyLM()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    a = {k: v.clone() for k, v in module.state_dict().items()}
    b = {k: v + 0.3 * torch.randn_like(v) for k, v in a.items()}
    m = ms.diagnose([a, b], task=lm, model=module, points=2, sample=20).measured
    assert m["ensemble_accuracy"] is None and m["sample_size"] == 20  # no output ensemble of token distributions
    from mergescope.diagnose.measured import SampleTask

    x = torch.cat([xb for xb, _ in SampleTask(lm, 20).batches("val")])
    y = torch.cat([yb for _, yb in SampleTask(lm, 20).batches("val")])
    for state, loss in ((a, m["path"]["loss"][0]), (b, m["path"]["loss"][1])):
        module.load_state_dict(state)
        with torch.no_grad():
            by_hand = float(lm.loss(module(x), y))  # mean over the scored tokens
        assert loss == pytest.approx(by_hand, rel=1e-5)
