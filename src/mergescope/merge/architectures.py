"""Per-architecture facts the planner and the output config need, as data (no code per model).

Learned from MergeKit 0.1.5's architecture definitions (``mergekit/_data/architectures/*.json``:
``num_layers_config_key`` and ``tied_names``) and from transformers' configs (``attribute_map``):

* ``LAYER_COUNT_KEYS``: the ``config.json`` key holding the layer count, by ``model_type``. A stacked
  output must rewrite it, or transformers loads only the old number of layers and silently ignores
  the rest (GPT-2's ``n_layer``: a 12 + 12 stack loaded as 12 layers, 132 tensors unused).
* ``TIED``: an output embedding a checkpoint may omit because it is tied to the input embedding
  (``tie_word_embeddings``); such a model's value is the tied tensor, as MergeKit reads it.
"""

from __future__ import annotations

import re

# model_type -> the key (dotted for a nested config) whose value is the number of layers.
LAYER_COUNT_KEYS: dict[str, str] = {
    **dict.fromkeys(("gpt2", "gpt_bigcode", "jais", "mixformer-sequential", "phi-msft", "gptj", "bloom", "codegen",
                     "ctrl", "RefinedWebModel", "RefinedWeb"), "n_layer"),
    **dict.fromkeys(("distilbert", "mpt", "dbrx"), "n_layers"),
    **dict.fromkeys(("gpt_neo", "chatglm", "t5", "mt5", "umt5"), "num_layers"),
    **dict.fromkeys(("llava", "llava_next", "mistral3", "gemma3", "llama4", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                     "qwen3_vl_moe"), "text_config.num_hidden_layers"),
}
# Keys tried, in order, for a model_type not in the table (the first one the config has is rewritten).
LAYER_COUNT_FALLBACK = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")

# output tensor -> tensors that hold its value in a checkpoint with tied embeddings (first present wins).
TIED: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "wte.weight",
                       "model.language_model.embed_tokens.weight", "backbone.embeddings.weight", "shared.weight",
                       "model.lm_head.weight"),
    "output.weight": ("model.tok_embeddings.weight",),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight",),
    "vocab_projector.weight": ("distilbert.embeddings.word_embeddings.weight",),
}


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def layer_count_key(config: dict) -> str | None:
    """The config key holding the layer count (dotted when nested), or None when the config has none.

    The table's key for the config's ``model_type`` wins when present; otherwise the first of
    ``LAYER_COUNT_FALLBACK`` present at the top level.
    """
    known = LAYER_COUNT_KEYS.get(str(config.get("model_type")))
    if known is not None and isinstance(_lookup(config, known), int):
        return known
    return next((k for k in LAYER_COUNT_FALLBACK if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)),
                None)


def set_layer_count(config: dict, layers: int) -> str | None:
    """Write ``layers`` under the config's layer-count key (in place); returns the key, None if it has none."""
    key = layer_count_key(config)
    if key is None:
        return None
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = layers
    return key


def tied_source(name: str, has) -> str | None:
    """The tensor holding ``name``'s value in a checkpoint that lacks it (tied embeddings), or None.

    ``has(tensor_name) -> bool`` asks the checkpoint."""
    return next((t for t in TIED.get(name, ()) if has(t)), None)


# Tensors a checkpoint may lack and still be whole (MergeKit marks them ``optional``): output heads that
# may be tied, buffers newer transformers no longer save (BERT/RoBERTa ``position_ids``, GPT-2's causal
# ``attn.bias`` / ``attn.masked_bias``, rotary ``inv_freq``), T5's relative attention bias past layer 0,
# a classifier's bias. Missing anything else means a broken or different model, and stays an error.
OPTIONAL = re.compile(r"(?:^|\.)(?:position_ids|inv_freq|masked_bias|token_type_ids|relative_attention_bias\.weight)$"
                      r"|(?:^|\.)h\.\d+\.attn\.bias$|^score\.bias$")


def optional(name: str) -> bool:
    """Whether a model may lack the tensor ``name`` (see ``OPTIONAL``; tied output heads count too)."""
    return name in TIED or OPTIONAL.search(name) is not None


# Buffers checkpoints carry beside the weights: they are state, not trained parameters (position and
# token-type id tables, rotary frequencies, GPT-2's causal-mask ``attn.bias`` / ``attn.masked_bias``).
BUFFER = re.compile(r"(?:^|\.)(?:position_ids|token_type_ids|inv_freq|masked_bias)$|(?:^|\.)h\.\d+\.attn\.bias$")


def is_buffer(name: str, floating: bool = True) -> bool:
    """Whether a checkpoint tensor is a buffer rather than a parameter: integer/bool tensors, and the
    floating buffers ``BUFFER`` names."""
    return not floating or BUFFER.search(name) is not None
