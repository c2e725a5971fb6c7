"""Hugging Face folders as models: the architecture from ``config.json``, the weights from mergescope's reader.

A folder's ``config.json`` is data, not code: its ``architectures[0]`` may only name a model class
that ``transformers`` itself exports (``auto_map`` and remote code are never looked at). The built
module keeps the Hugging Face ``state_dict`` keys, so checkpoints, merges, alignment and landscape
paths line up with the files, and takes one tensor as input, so every Task works on it:
``x`` is a LongTensor ``[B, 2, L]`` (``x[:, 0]`` input ids, ``x[:, 1]`` attention mask; a ``[B, L]``
tensor is input ids alone). It returns the logits (the last hidden state for a headless model).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import MergescopeError
from ..io.untrusted import short_repr

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# what transformers raises on config values it cannot use (a zero head count divides by zero, ...)
BUILD_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, ArithmeticError,
                AssertionError, ImportError)
SUFFIX = "OnTokens"  # name of the token-tensor subclass: BertForSequenceClassificationOnTokens


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder holding a ``config.json`` (a Hugging Face model folder)."""
    path = Path(path)
    return path.is_dir() and os.path.lexists(path / CONFIG)


def folder_of(ckpt) -> Path | None:
    """The HF folder a loaded checkpoint comes from: its path, or the folder of its top-level weight file."""
    path = Path(getattr(ckpt, "path", ""))
    if is_hf_folder(path):
        return path
    if path.name in WEIGHT_FILES and is_hf_folder(path.parent):
        return path.parent
    return None


def transformers_module():
    """``transformers``, or one line saying how to get it (it is an optional dependency)."""
    try:
        import transformers
    except ImportError:
        raise MergescopeError("Hugging Face folders need the transformers package: pip install 'mergescope[hf]'") from None
    return transformers


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of ``folder`` as a dict, read as hostile input (regular file, bounded, inside the folder)."""
    from ..io.untrusted import inside_folder, read_json

    folder = Path(folder)
    path = inside_folder(folder, CONFIG, folder)
    config = read_json(path, CONFIG)
    if not isinstance(config, dict):
        raise MergescopeError(f"{path}: {CONFIG} must be a JSON object, got {type(config).__name__}")
    return config


def architecture(config: Mapping, where: str | os.PathLike) -> type:
    """The transformers model class ``architectures[0]`` names; anything else is refused by name.

    Only a class transformers exports and that subclasses ``PreTrainedModel`` qualifies, so a file
    can pick among the library's own architectures but never point at code of its own.
    """
    transformers = transformers_module()
    names = config.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise MergescopeError(f"{where}: 'architectures' must be a list naming a transformers model class")
    name = names[0]
    try:  # a class whose optional dependency is missing fails on access
        cls = getattr(transformers, name, None) if name.isidentifier() and not name.startswith("_") else None
    except (ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise MergescopeError(f"{where}: architecture {short_repr(name)} is not a model class of transformers "
                              f"{transformers.__version__}; mergescope never runs code a model folder ships (auto_map)")
    return cls


def hf_config(config: Mapping, cls: type, where: str | os.PathLike):
    """The ``PretrainedConfig`` of ``cls`` built from the file's values (``auto_map`` dropped)."""
    transformers = transformers_module()
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise MergescopeError(f"{where}: 'model_type' {short_repr(model_type)} is not a transformers model type")
    config_class = transformers.CONFIG_MAPPING[model_type]
    if not issubclass(config_class, cls.config_class):
        raise MergescopeError(f"{where}: model_type {model_type!r} does not fit architecture {cls.__name__} "
                              f"(which needs {cls.config_class.model_type!r})")
    values = {k: v for k, v in config.items() if k != "auto_map"}
    try:
        with quiet_transformers():
            return config_class.from_dict(values)
    except BUILD_ERRORS as e:
        raise MergescopeError(f"{where}: cannot build a {config_class.__name__} ({_first_line(e)})") from None


@contextmanager
def quiet_transformers():
    """transformers' own warnings off while it reads a stranger's config (mergescope reports in one line)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def on_tokens(cls: type) -> type:
    """The subclass of ``cls`` whose ``forward(x)`` takes the token tensor and returns a tensor.

    Only the forward changes: parameters, buffers and ``state_dict`` keys are the HF model's. The
    class lives in this module under ``<cls>OnTokens`` (see ``__getattr__``), so it pickles.
    """
    name = cls.__name__ + SUFFIX
    made = _CLASSES.get(name)
    if made is None:
        made = type(name, (cls,), {"forward": _forward_on_tokens, "save_pretrained": _save_as_transformers_class,
                                   "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"{cls.__name__} on a [B, 2, L] token tensor (mergescope.tasks.hf)."})
        _CLASSES[name] = made
    return made


_CLASSES: dict[str, type] = {}


def _save_as_transformers_class(self, *args, **kwargs):
    """``save_pretrained`` as the transformers class it wraps: the saved config.json names that class
    (transformers writes ``type(self).__name__`` into ``architectures``), so the folder loads anywhere."""
    made = type(self)
    self.__class__ = made.__mro__[1]
    try:
        return self.save_pretrained(*args, **kwargs)
    finally:
        self.__class__ = made


def _forward_on_tokens(self, x: torch.Tensor) -> torch.Tensor:
    ids, mask = split_tokens(x)
    with _twice_differentiable():
        out = super(type(self), self).forward(input_ids=ids, attention_mask=mask, return_dict=True)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _twice_differentiable():
    """With grad on, attention runs on SDPA's math kernel: the fused CPU/GPU kernels have no double
    backward, which Hessian-vector products (``landscape sharpness``) need. Inference keeps the fast ones."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if torch.is_grad_enabled() else nullcontext()


def split_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input ids, attention mask) of the input contract: ``[B, 2, L]``, or ``[B, L]`` ids without a mask."""
    if x.is_floating_point() or x.is_complex() or x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[1] != 2):
        raise MergescopeError(f"a Hugging Face model takes integer token tensors [B, 2, L] (ids, mask) or [B, L], "
                              f"got {str(x.dtype).removeprefix('torch.')} {list(x.shape)} (pass --task with text data)")
    if x.dim() == 3:
        return x[:, 0].long(), x[:, 1].long()
    return x.long(), None


def __getattr__(name: str) -> type:
    """Rebuild ``<cls>OnTokens`` on demand (unpickling in a fresh process), for transformers' own classes only."""
    if name.endswith(SUFFIX) and len(name) > len(SUFFIX):
        return on_tokens(architecture({"architectures": [name[:-len(SUFFIX)]]}, __name__))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(config: Mapping, where: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The module ``config`` describes, random init skipped (the weights come from the file), in eval mode."""
    cls = on_tokens(architecture(config, where))
    cfg = hf_config(config, cls, where)
    try:
        with quiet_transformers(), _no_init(), torch.device(device):
            module = cls(cfg)
        module.tie_weights()  # skipped with the init; ties what the config ties (lm_head to the embeddings)
    except BUILD_ERRORS as e:
        raise MergescopeError(f"{where}: cannot build {cls.__name__.removesuffix(SUFFIX)} ({_first_line(e)})") from None
    module.hf_config = cfg
    module.num_labels = getattr(cfg, "num_labels", None)
    module.model_type = cfg.model_type
    module.derived_state_keys = derived_buffers(module)
    return module.eval()


def derived_buffers(module: nn.Module) -> frozenset[str]:
    """Persistent buffers the module computes in ``__init__`` (position ids, ...): a file may leave them out.
    BatchNorm statistics are learned, not computed, so a file must hold them."""
    params = {k for k, _ in module.named_parameters(remove_duplicate=False)}
    learned = {f"{n}.{s}".lstrip(".") for n, m in module.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) for s in ("running_mean", "running_var", "num_batches_tracked")}
    return frozenset(k for k in module.state_dict() if k not in params and k not in learned)


def _no_init():
    """transformers' context that skips random initialisation (module path differs between v4 and v5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def check_fits(config: Mapping, ckpt, folder: Path) -> None:
    """The file's tensors fit the model ``config.json`` describes (``tasks.checkpoints.fitted_state``
    on names and shapes only), checked on a meta-device build before the real one allocates: a config
    that claims a huge model next to small weights is one line, not a full memory."""
    from .checkpoints import fitted_state

    meta = build(config, folder / CONFIG, device="meta")
    shapes = {k: torch.empty(tuple(ckpt.info(k).shape) if hasattr(ckpt, "info") else ckpt[k].shape, device="meta")
              for k in ckpt}
    fitted_state(meta, shapes, folder)


def hf_model(folder: str | os.PathLike, ckpt=None) -> nn.Module:
    """The model of a Hugging Face folder, built from ``config.json`` and holding the folder's weights.

    ``ckpt``: the folder already opened with ``mergescope.io.load`` (opened here when None). The
    weights load through ``tasks.checkpoints.load_state_into``: keys and shapes must fit, buffers
    the module computes itself and tied copies the file leaves out are filled in.
    """
    from ..io import load
    from .checkpoints import load_state_into

    folder = Path(folder)
    config = read_config(folder)
    ckpt = load(folder) if ckpt is None else ckpt
    check_fits(config, ckpt, folder)
    module = build(config, folder / CONFIG)
    return load_state_into(module, ckpt, folder)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return short_repr(text[0] if text else type(e).__name__).strip("'\"")

