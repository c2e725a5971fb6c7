"""Tokenizers in merges (merge/tokenizer.py) against MergeKit 0.1.5 and against the rules written out.

Tiny Llama checkpoints, each with its own word-level ``tokenizer.json`` built offline with the
``tokenizers`` library: ``base``; ``chatml`` (base's words + "fish" + two special ChatML tokens);
``extra`` (some of base's words in another order, new words, "fish", a plain added token);
``padded`` (base's tokenizer with two tokens past its embedding rows); ``notok`` (no tokenizer
files); ``tied`` (tied embeddings, no ``lm_head``). MergeKit's own tokenizer test models (BPE) too. Every recipe runs through
MergeKit in-process and through ``ms.merge``. MergeKit orders the new ids of a union by hash order
(see docs/merge.md), so vocabulary tensors are compared row by row *per token*; everything else
tensor by tensor.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

from safetensors.torch import load_file
from test_vs_mergekit import _mergekit

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.merge import tokenizer as tk

SPECIALS = ["<unk>", "<s>", "</s>"]
BASE_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far"]
MODELS = {  # name: (words after the specials, special added tokens, plain added tokens, extra tokenizer rows)
    "base": (BASE_WORDS, [], [], 0),
    "chatml": (BASE_WORDS + ["fish"], ["<|im_start|>", "<|im_end|>"], [], 0),
    "extra": (["dog", "cat", "bird", "the", "tree", "sat", "fish"], [], ["<tool>"], 0),
    "padded": (BASE_WORDS, [], ["<UNUSED_0>", "<UNUSED_1>"], 2),
    "notok": (BASE_WORDS, [], [], 0),  # its tokenizer files are removed: read as the base's (as MergeKit)
    "tied": (BASE_WORDS + ["fish"], ["<|im_start|>"], [], 0),  # tie_word_embeddings: no lm_head of its own
}
TEMPLATES = {"chatml": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
             "extra": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
             "padded": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}


def _tokenizer(folder, words, special, plain, template):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t) for t in plain])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>"}
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """The four models: Llama, 2 layers, hidden 16, untied lm_head, rows = their tokenizer's size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tok_llamas")
    for seed, (name, (words, special, plain, past)) in enumerate(MODELS.items()):
        folder = root / name
        folder.mkdir()
        n = _tokenizer(folder, words, special, plain, TEMPLATES.get(name))
        cfg = LlamaConfig(vocab_size=n - past, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                          tie_word_embeddings=name == "tied")
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "notok" / name).unlink()
    return root


RECIPES = {
    "union_linear": """
        models:
          - {model: D/base, parameters: {weight: 1.0}}
          - {model: D/chatml, parameters: {weight: 0.5}}
          - {model: D/extra, parameters: {weight: 0.25}}
        merge_method: linear
        base_model: D/base
        tokenizer_source: union
        dtype: float32
    """,
    "union_without_tokenizer": """
        models: [{model: D/notok}, {model: D/extra}]
        merge_method: karcher
        base_model: D/base
        tokenizer_source: union
    """,
    "union_tied_head": """
        models: [{model: D/base}, {model: D/tied}, {model: D/extra}]
        merge_method: linear
        parameters: {weight: 1.0}
        base_model: D/base
        tokenizer_source: union
    """,
    "union_bf16_ties_padded": """
        models:
          - {model: D/chatml, parameters: {weight: 0.6, density: 0.7}}
          - {model: D/extra, parameters: {weight: 0.5, density: 0.9}}
        merge_method: ties
        base_model: D/base
        dtype: bfloat16
        tokenizer: {source: union, pad_to_multiple_of: 4}
    """,
    "union_no_base_ta": """
        models:
          - {model: D/chatml, parameters: {weight: 0.7}}
          - {model: D/extra, parameters: {weight: 0.4}}
        merge_method: task_arithmetic
        base_model: D/base
        tokenizer_source: union
    """,
    "base_ties_padded": """
        models:
          - {model: D/chatml, parameters: {weight: 1.0, density: 0.6}}
          - {model: D/padded, parameters: {weight: 0.5, density: 0.8}}
        merge_method: ties
        base_model: D/base
        tokenizer_source: base
    """,
    "model_source": """
        models: [{model: D/base}, {model: D/chatml}, {model: D/extra}]
        merge_method: linear
        parameters: {weight: 1.0}
        base_model: D/base
        tokenizer_source: D/chatml
        chat_template: chatml
    """,
    "tokens_section": """
        models: [{model: D/base}, {model: D/chatml}, {model: D/extra}]
        merge_method: linear
        parameters: {weight: 1.0}
        base_model: D/base
        tokenizer:
          source: union
          pad_to_multiple_of: 8
          tokens:
            <|im_start|>: {source: D/chatml}
            cat: {source: D/extra, force: true}
            dog: {source: {kind: model_token, model: D/chatml, token: "<|im_end|>"}, force: true}
            <tool>: {source: {kind: model_token, model: D/base, token_id: 4}}
            tree: {source: {kind: zero}}
            <brand_new>: {source: {kind: model_token, model: D/extra, token: bird}}
        chat_template: "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}"
    """,
    "slerp_slices_union": """
        slices:
          - sources:
              - {model: D/base, layer_range: [0, 2]}
              - {model: D/chatml, layer_range: [0, 2]}
        merge_method: slerp
        base_model: D/base
        parameters: {t: [0, 0.7]}
        tokenizer_source: union
        chat_template: auto
    """,
    "chat_template_only": """
        models: [{model: D/base}, {model: D/padded}]
        merge_method: linear
        parameters: {weight: 1.0}
        base_model: D/base
        chat_template: auto
    """,
}


def _recipe(name: str, root) -> str:
    return textwrap.dedent(RECIPES[name]).replace("D/", f"{root}/")


def _both(text: str, folder) -> tuple:
    """MergeKit's and mergescope's outputs of one recipe, under ``folder``."""
    _mergekit(text, folder / "mk")
    ms.merge(text, folder / "ms")
    return folder / "mk", folder / "ms"


@pytest.fixture(scope="module")
def outputs(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_out")
    return {name: _both(_recipe(name, zoo), root / name) for name in RECIPES}


def _assert_same_tokenizer_json(mk_dir, ms_dir):
    """The tokenizers transformers loads from both outputs: the same pipeline (model, normalizer,
    pre-tokenizer, decoder, post-processor) and the same settings per added token (ids aside)."""
    from transformers import AutoTokenizer

    theirs, ours = (json.loads(AutoTokenizer.from_pretrained(d).backend_tokenizer.to_str()) for d in (mk_dir, ms_dir))
    for key in ("model", "normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert theirs[key] == ours[key], key
    assert {e["content"]: {**e, "id": 0} for e in theirs["added_tokens"]} == \
        {e["content"]: {**e, "id": 0} for e in ours["added_tokens"]}


def _vocab(folder) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_tensors_as_mergekit(outputs, name):
    _assert_same(*outputs[name], name)


def _assert_same(mk_dir, ms_dir, name):
    """Same tokens; each token's row equal to MergeKit's row for that token; padding rows and every other
    tensor equal. (MergeKit writes no tokenizer when none is rebuilt and copy_tokenizer is off: rows keep ids.)"""
    theirs, ours = load_file(mk_dir / "model.safetensors"), dict(ms.load(ms_dir).items())
    assert sorted(theirs) == sorted(ours)
    rebuilt = (mk_dir / "tokenizer.json").exists()
    v_ms = _vocab(ms_dir)
    if rebuilt:
        v_mk = _vocab(mk_dir)
        assert sorted(v_mk) == sorted(v_ms)
        order_mk = torch.tensor([v_mk[t] for t in sorted(v_ms, key=v_ms.get)])
        _assert_same_tokenizer_json(mk_dir, ms_dir)
    for key, expected in theirs.items():
        got = ours[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if tk.is_vocab_tensor(key) and rebuilt:
            n = len(v_ms)
            assert torch.allclose(got[n:].double(), expected[n:].double(), atol=1e-6), f"{name}: padding of {key}"
            got, expected = got[:n], expected[order_mk]
        diff = (got.double() - expected.double()).abs().max().item()
        assert diff <= 1e-6, f"{name}: {key} differs by {diff}"


def test_ids_match_mergekit_where_it_is_deterministic(outputs):
    """A base or model tokenizer keeps its ids in both tools (only a union's new ids are hash-ordered)."""
    for name in ("base_ties_padded", "model_source"):
        mk_dir, ms_dir = outputs[name]
        assert _vocab(mk_dir) == _vocab(ms_dir)


def test_model_vocabularies_read_as_transformers_does(zoo):
    assert tk.read_tokenizer(zoo / "notok") is None
    for name in set(MODELS) - {"notok"}:
        assert tk.read_tokenizer(zoo / name).get_vocab(with_added_tokens=True) == _vocab(zoo / name)


def _rows(folder, key="model.embed_tokens.weight"):
    return load_file(folder / "model.safetensors")[key]


def test_union_rows_follow_the_words(outputs, zoo):
    """Each word encodes (transformers) to the id whose row is the weighted mean of the models' rows for that
    word, each model lacking the word filled by the rule (one holder -> its row; else the base's; else the
    holders' mean), recomputed here from the inputs' own tokenizers."""
    from transformers import AutoTokenizer

    out = outputs["union_linear"][1]
    merged, tok = _rows(out), AutoTokenizer.from_pretrained(out)
    weights = {"base": 1.0, "chatml": 0.5, "extra": 0.25}
    vocabs = {m: _vocab(zoo / m) for m in weights}
    inputs = {m: _rows(zoo / m) for m in weights}
    words = {w for m in weights for w in vocabs[m]} - set(SPECIALS)
    assert len(tok.get_vocab()) == merged.shape[0] == 17
    for word in sorted(words):
        ids = tok.encode(word, add_special_tokens=False)
        assert len(ids) == 1, word
        holders = [m for m in weights if word in vocabs[m]]
        fill = (inputs[holders[0]][vocabs[holders[0]][word]] if len(holders) == 1
                else inputs["base"][vocabs["base"][word]] if "base" in holders
                else sum(inputs[m][vocabs[m][word]] for m in holders) / len(holders))
        rows = [inputs[m][vocabs[m][word]] if word in vocabs[m] else fill for m in weights]
        expected = sum(w * r for w, r in zip(weights.values(), rows)) / sum(weights.values())
        assert torch.allclose(merged[ids[0]], expected, atol=1e-6), word
    sentence = tok.encode("the bird sat on the mat", add_special_tokens=False)
    assert sentence == [tok.get_vocab()[w] for w in ("the", "bird", "sat", "on", "the", "mat")]


def test_output_loads_with_its_vocabulary(outputs):
    from transformers import AutoModelForCausalLM

    for name in ("union_linear", "tokens_section", "slerp_slices_union"):
        out = outputs[name][1]
        config = json.loads((out / "config.json").read_text())
        rows = _rows(out).shape[0]
        assert config["vocab_size"] == rows == _rows(out, "lm_head.weight").shape[0]
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.get_input_embeddings().weight.shape[0] == rows


def test_tokens_section_rules(outputs, zoo):
    """Forced rows, a model_token by name and by id, a zero row, a brand-new token, padding to 8."""
    out = outputs["tokens_section"][1]
    merged, vocab = _rows(out), _vocab(out)
    v = {m: _vocab(zoo / m) for m in ("base", "chatml", "extra")}
    e = {m: _rows(zoo / m) for m in v}
    assert merged.shape[0] == 24 and len(vocab) == 18  # 17 tokens of the union + <brand_new>, padded to 24
    assert torch.allclose(merged[vocab["cat"]], e["extra"][v["extra"]["cat"]], atol=1e-6)
    assert torch.allclose(merged[vocab["dog"]], e["chatml"][v["chatml"]["<|im_end|>"]], atol=1e-6)
    assert torch.allclose(merged[vocab["<brand_new>"]], e["extra"][v["extra"]["bird"]], atol=1e-6)
    assert torch.allclose(merged[vocab["<|im_start|>"]], e["chatml"][v["chatml"]["<|im_start|>"]], atol=1e-6)
    tool = (e["base"][4] * 2 + e["extra"][v["extra"]["<tool>"]]) / 3  # base and chatml lack it: base row 4
    assert torch.allclose(merged[vocab["<tool>"]], tool, atol=1e-6)
    tree = e["extra"][v["extra"]["tree"]] / 3  # the two models lacking it get zeros
    assert torch.allclose(merged[vocab["tree"]], tree, atol=1e-6)
    assert torch.allclose(merged[18:], merged[:18].mean(0).expand(6, -1), atol=1e-6)


def _template(folder) -> str | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).chat_template


def test_chat_templates(outputs):
    """The template MergeKit writes, read back by transformers from tokenizer_config.json. (MergeKit with
    copy_tokenizer=False writes no tokenizer for chat_template_only: checked against the input's template.)"""
    for name in ("model_source", "tokens_section", "slerp_slices_union", "chat_template_only"):
        mk_dir, ms_dir = outputs[name]
        config = json.loads((ms_dir / "tokenizer_config.json").read_text())
        assert config["chat_template"] == _template(ms_dir), name
        if name != "chat_template_only":
            assert _template(ms_dir) == _template(mk_dir), name
    assert "<|im_start|>" in _template(outputs["model_source"][1])
    assert _template(outputs["slerp_slices_union"][1]) == TEMPLATES["chatml"]  # the only one among base/chatml
    assert _template(outputs["chat_template_only"][1]) == TEMPLATES["padded"]


def test_refusals_are_one_line(zoo, tmp_path):
    def refused(extra: str, match: str, other: str = "chatml"):
        text = f"models: [{{model: {zoo}/base}}, {{model: {zoo}/{other}}}]\nmerge_method: linear\n" \
               "parameters: {weight: 1.0}\n" \
               f"base_model: {zoo}/base\n{extra}\n"
        with pytest.raises(MergescopeError, match=match) as info:
            ms.merge(text, tmp_path / "out")
        assert "\n" not in str(info.value)
        assert not (tmp_path / "out").exists()
        return text

    refused("tokenizer_source: union\nchat_template: nosuchtemplate", "chat_template 'nosuchtemplate' is neither")
    refused("tokenizer_source: union\ntokenizer: {source: base}", "either tokenizer_source or tokenizer")
    refused("tokenizer: {source: union, bogus: 1}", "unknown key 'bogus'.*valid keys: source, tokens, pad_to")
    refused("tokenizer: {tokens: {fish: {force: true}}}", "token 'fish': some model lacks it and its setting names no")
    refused(f"tokenizer: {{tokens: {{fish: {{source: {zoo}/base}}}}}}", "source model .* does not have this token")
    refused("tokenizer: {pad_to_multiple_of: -8}", "pad_to_multiple_of must be in")
    refused(f"tokenizer: {{tokens: {{fish: {{source: {{kind: model_token, model: {zoo}/base, token: nope}}}}}}}}",
            "its source token 'nope' is not in model")
    huge = tmp_path / "huge"
    huge.mkdir()
    _tokenizer(huge, [f"w{i}" for i in range(40)], [], [], None)
    refused(f"tokenizer_source: {huge}", "the output vocabulary has 43 tokens, more than the models' 25 embedding rows")
    text = refused(f"tokenizer_source: {zoo}/padded", "token '<UNUSED_0>' has id 11, past the model's 11 embedding",
                   other="padded")
    with pytest.raises(KeyError):  # MergeKit fails there too (its permutation has no entry for the token)
        _mergekit(text, tmp_path / "mk")


def test_vocabulary_tensor_names_are_mergekits(zoo):
    """Every tensor MergeKit's architecture files give a vocabulary axis is remapped, and no other one
    (except Phi-1's head, numbered like a layer: ``layers.N.linear``)."""
    import importlib.util
    from pathlib import Path

    folder = Path(next(iter(importlib.util.find_spec("mergekit").submodule_search_locations))) / "_data"
    vocab, other = set(), set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str):
                (vocab if "vocabulary_axis" in node or node.get("is_embed") else other).add(node["name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in (folder / "architectures").glob("*.json"):
        walk(json.loads(path.read_text()))
    assert len(vocab) > 20
    assert sorted(n for n in vocab if not tk.is_vocab_tensor(n)) == ["layers.${num_layers}.linear.bias",
                                                                     "layers.${num_layers}.linear.weight"]
    assert [n for n in other - vocab if tk.is_vocab_tensor(n)] == []


def test_new_token_with_base_source(zoo, tmp_path):
    """``source: base`` plus a token the base lacks: MergeKit fails (its base permutation has no entry for the
    new id); mergescope appends it with the row its setting names, every model alike."""
    text = (f"models: [{{model: {zoo}/base}}, {{model: {zoo}/chatml}}]\nmerge_method: linear\n"
            f"parameters: {{weight: 1.0}}\nbase_model: {zoo}/base\ntokenizer:\n  source: base\n  tokens:\n"
            f"    <new>: {{source: {{kind: model_token, model: {zoo}/chatml, token: <|im_start|>}}}}\n")
    with pytest.raises(KeyError):
        _mergekit(text, tmp_path / "mk")
    ms.merge(text, tmp_path / "ms")
    vocab, merged = _vocab(tmp_path / "ms"), _rows(tmp_path / "ms")
    assert vocab["<new>"] == 11 == merged.shape[0] - 1
    chatml = _rows(zoo / "chatml")
    assert torch.equal(merged[11], chatml[_vocab(zoo / "chatml")["<|im_start|>"]])
    assert torch.allclose(merged[3], (_rows(zoo / "base")[3] + chatml[3]) / 2, atol=1e-6)


@pytest.mark.parametrize("content", ["not json", '{"model": {"type": "Nope"}}', "[1, 2]"])
def test_hostile_tokenizer_files_are_one_line(zoo, tmp_path, content):
    import shutil

    shutil.copytree(zoo / "chatml", tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").write_text(content)
    text = (f"models: [{{model: {zoo}/base}}, {{model: {tmp_path}/bad}}]\nmerge_method: linear\n"
            f"parameters: {{weight: 1.0}}\nbase_model: {zoo}/base\ntokenizer_source: union\n")
    with pytest.raises(MergescopeError, match="bad/tokenizer.json") as info:
        ms.merge(text, tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_tokenizer_symlink_out_of_the_folder_is_refused(zoo, tmp_path):
    import shutil

    shutil.copytree(zoo / "chatml", tmp_path / "linked")
    (tmp_path / "secret.json").write_text((zoo / "chatml" / "tokenizer.json").read_text())
    (tmp_path / "linked" / "tokenizer.json").unlink()
    (tmp_path / "linked" / "tokenizer.json").symlink_to(tmp_path / "secret.json")
    text = (f"models: [{{model: {zoo}/base}}, {{model: {tmp_path}/linked}}]\nmerge_method: linear\n"
            f"parameters: {{weight: 1.0}}\nbase_model: {zoo}/base\ntokenizer_source: union\n")
    with pytest.raises(MergescopeError, match="resolves outside the model folder"):
        ms.merge(text, tmp_path / "out")


def test_cli_exit_code_2(zoo, tmp_path, capsys):
    from mergescope.cli import main

    recipe = tmp_path / "r.yml"
    recipe.write_text(f"models: [{{model: {zoo}/base}}, {{model: {zoo}/chatml}}]\nmerge_method: linear\n"
                      f"parameters: {{weight: 1.0}}\ntokenizer_source: union\nchat_template: nosuch\n")
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "chat_template 'nosuch'" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    recipe.write_text(recipe.read_text().replace("chat_template: nosuch", "chat_template: auto"))
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    assert len(_vocab(tmp_path / "out")) == 14 and _template(tmp_path / "out") == TEMPLATES["chatml"]
    recipe.write_text(f"models: [{{model: {zoo}/notok}}, {{model: {zoo}/padded}}]\nmerge_method: linear\n"
                      f"parameters: {{weight: 1.0}}\nchat_template: auto\n")
    assert main(["merge", str(recipe), str(tmp_path / "out2")]) == 2
    assert "has no tokenizer files to attach the template to" in capsys.readouterr().err


# ----------------------------------------------------------------------------- MergeKit's own test recipes
# tests/test_tokenizer.py of MergeKit: BPE tokenizers "_tok_N" saved by transformers' LlamaTokenizerFast;
# base (64 rows), chatml (66 rows, two added tokens), padded (64 rows, 4 added tokens past them).
UPSTREAM = {  # name: (models, base, method + parameters, tokenizer lines, (vocabulary, added tokens))
    "source_base": ("base padded chatml", "base", "linear", "tokenizer_source: base", (64, 3)),
    "source_union": ("base padded chatml", "base", "linear", "tokenizer_source: union", (66, 5)),
    "source_model": ("base padded chatml", "base", "linear", "tokenizer_source: D/chatml", (66, None)),
    "slerp_union": ("base chatml", "base", "slerp\nparameters: {t: 0.5}", "tokenizer_source: union", (66, None)),
    "force_token": ("base chatml", "base", "linear", ("tokenizer:\n  source: union\n  tokens:\n"
                    "    _tok_10: {source: D/chatml, force: true}\n    _tok_11: {source: D/base, force: true}"),
                    (66, None)),
    "model_token_id": ("base chatml", "base", "linear", ("tokenizer:\n  source: base\n  tokens:\n"
                       "    _tok_20: {source: {kind: model_token, model: D/chatml, token_id: 64}, force: true}\n"
                       "    _tok_21: {source: {kind: model_token, model: D/base, token: <s>}, force: true}"), (64, None)),
    "padded_base_union": ("padded chatml", "padded", "linear", "tokenizer_source: union", (66, 5)),  # base cut
    "pad_to_multiple_of": ("chatml", "chatml", "linear", "tokenizer: {source: base, pad_to_multiple_of: 16}",
                           (66, None)),
}


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    import tempfile

    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    root = tmp_path_factory.mktemp("tok_upstream")
    for seed, (name, rows, added) in enumerate([("base", 64, []), ("chatml", 66, ["<|im_start|>", "<|im_end|>"]),
                                               ("padded", 64, [f"<UNUSED_{i}>" for i in range(4)])]):
        tokens = SPECIALS + [f"_tok_{i}" for i in range(3, 64)]
        bpe = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(64))), "merges": []},
               "added_tokens": []}
        with tempfile.TemporaryDirectory() as tmp:
            Tokenizer.from_str(json.dumps(bpe)).save(f"{tmp}/tokenizer.json")
            tok = LlamaTokenizerFast(tokenizer_file=f"{tmp}/tokenizer.json")
        tok.add_tokens(added)
        torch.manual_seed(10 + seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _upstream_recipe(root, name: str) -> str:
    models, base, method, tokenizer, _ = UPSTREAM[name]
    listing = "".join(f"  - {{model: D/{m}, parameters: {{weight: 1.0}}}}\n" for m in models.split())
    return (f"models:\n{listing}merge_method: {method}\nbase_model: D/{base}\ndtype: float32\n{tokenizer}\n"
            ).replace("D/", f"{root}/")


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_mergekit_test_recipes(upstream, tmp_path, name):
    """Each of MergeKit's tokenizer test configurations: same tensors as MergeKit, and MergeKit's own checks."""
    from transformers import AutoTokenizer

    _assert_same(*_both(_upstream_recipe(upstream, name), tmp_path), name)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ms")
    size, added = UPSTREAM[name][4]
    assert len(tok.get_vocab()) == size and (added is None or len(tok.added_tokens_decoder) == added)
    assert not any(t.startswith("<UNUSED") for t in tok.get_vocab())
    merged, vocab = _rows(tmp_path / "ms"), tok.get_vocab()
    base, chatml = _rows(upstream / "base"), _rows(upstream / "chatml")
    if name == "force_token":
        assert torch.equal(merged[vocab["_tok_10"]], chatml[10]) and torch.equal(merged[vocab["_tok_11"]], base[11])
    if name == "model_token_id":
        assert torch.equal(merged[vocab["_tok_20"]], chatml[64]) and torch.equal(merged[vocab["_tok_21"]], base[1])
    if name == "pad_to_multiple_of":
        assert merged.shape[0] == 80 == json.loads((tmp_path / "ms" / "config.json").read_text())["vocab_size"]


def test_mergekit_legacy_recipe_is_refused_like_mergekit(upstream, tmp_path):
    """No tokenizer setting with 64- and 66-row models: MergeKit raises a size mismatch, mergescope one line."""
    text = _upstream_recipe(upstream, "source_base").replace("tokenizer_source: base\n", "")
    with pytest.raises(ValueError, match="size mismatch"):
        _mergekit(text, tmp_path / "mk")
    with pytest.raises(MergescopeError, match="vocabulary sizes differ"):
        ms.merge(text, tmp_path / "ms")



@pytest.mark.parametrize("template", ["chatml", "{{messages[0]['content']}}"])
def test_mergekit_chat_template_recipes(upstream, tmp_path, template):
    """MergeKit's tests/test_chat_template.py: a built-in name (the text MergeKit ships) or literal Jinja,
    on a merge whose second model has no tokenizer; the output tokenizer is the base's, with the template."""
    import importlib.util
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    (tmp_path / "b").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(upstream / "padded" / name, tmp_path / "b" / name)
    text = (f"merge_method: linear\nmodels:\n  - {{model: {upstream}/base, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {tmp_path}/b, parameters: {{weight: 0.5}}}}\nbase_model: {upstream}/base\n"
            f"dtype: bfloat16\nchat_template: \"{template}\"\n")
    ms.merge(text, tmp_path / "out")
    shipped = Path(next(iter(importlib.util.find_spec("mergekit").submodule_search_locations))) / "_data"
    expected = (shipped / "chat_templates" / "chatml.jinja").read_text() if template == "chatml" else template
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == expected and tok.get_vocab() == _vocab(upstream / "base")
    assert "<|im_start|>" in expected or expected == template


def test_word_level_base_with_unused_tokens_is_cut(zoo, tmp_path):
    """A base whose tokenizer has tokens past its rows: MergeKit cuts only BPE ones (RuntimeError here);
    mergescope cuts any vocabulary held as a mapping (WordLevel here)."""
    text = (f"models: [{{model: {zoo}/padded}}, {{model: {zoo}/chatml}}]\nmerge_method: linear\n"
            f"parameters: {{weight: 1.0}}\nbase_model: {zoo}/padded\ntokenizer_source: union\n")
    with pytest.raises(RuntimeError, match="only BPE"):
        _mergekit(text, tmp_path / "mk")
    ms.merge(text, tmp_path / "ms")
    vocab, merged = _vocab(tmp_path / "ms"), _rows(tmp_path / "ms")
    assert len(vocab) == merged.shape[0] == 14 and not any(t.startswith("<UNUSED") for t in vocab)
    padded, chatml = _rows(zoo / "padded"), _rows(zoo / "chatml")
    assert torch.allclose(merged[vocab["cat"]], (padded[4] + chatml[4]) / 2, atol=1e-6)
    assert torch.equal(merged[vocab["<|im_end|>"]], chatml[_vocab(zoo / "chatml")["<|im_end|>"]])


def test_remap_rows_by_hand():
    """The row rules on a 1-D bias and a 3-D tensor, against values written out: output tokens a, b, c, d
    (+2 padding rows); model x has a, b; model y has b, c (in another order); nobody has d."""
    from tokenizers import Tokenizer, models

    tokens = {"a": 0, "b": 1, "c": 2, "d": 3}
    maps = {"x": torch.tensor([0, 1, -1, -1]), "y": torch.tensor([-1, 1, 0, -1])}
    vocab = tk.Vocabulary(Tokenizer(models.WordLevel(tokens, unk_token="a")), tokens, 6, maps, {}, {}, None)
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([30.0, 20.0])  # y: row 0 is c, row 1 is b
    rx, ry = tk.remap(vocab, "lm_head.bias", ["x", "y"], [x, y], base="x")
    # a: only x has it -> y gets x's; c: only y -> x gets y's; d: nobody -> 0; padding: mean of the 4 rows
    assert rx.tolist() == [1.0, 2.0, 30.0, 0.0, 33 / 4, 33 / 4]
    assert ry.tolist() == [1.0, 20.0, 30.0, 0.0, 51 / 4, 51 / 4]
    vocab3 = tk.Vocabulary(vocab.tokenizer, tokens, 4, {"x": maps["x"], "y": maps["y"], "z": torch.tensor(
        [-1, 0, 1, -1])}, {}, {}, None)
    cube = [torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3) + 100 * i for i in range(3)]
    out = tk.remap(vocab3, "model.embed_tokens.weight", ["x", "y", "z"], cube, base=None)
    # c: y and z have it, no base -> x gets the mean of y's row 0 and z's row 1
    assert torch.equal(out[0][2], (cube[1][0] + cube[2][1]) / 2)
    assert torch.equal(out[2][0], cube[0][0]) and torch.equal(out[1][3], torch.zeros(2, 3))
