"""The built-in model zoo: MLP, CNN with BatchNorm, small ResNet, tiny ViT, and a 1-D CNN.

The image models take flat 64-vectors (the digits task's input) and reshape inside, so one task
serves all of them. For 1-D signals (MNIST-1D, length 40) there are ``mlp`` with
``in_features=40`` and ``cnn1d`` (any length: global pooling). Built by name with
``build(name, **options)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import MergescopeError
from ..io.untrusted import short_repr


class MLP(nn.Module):
    """``depth`` hidden ReLU layers of ``width`` units."""

    def __init__(self, in_features: int = 64, width: int = 512, depth: int = 2, num_classes: int = 10):
        super().__init__()
        dims = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def conv_bn(cin: int, cout: int, kernel: int = 3, batchnorm: bool = True) -> nn.Sequential:
    """conv + BN + ReLU; without BN the conv gets a bias instead (conv + ReLU)."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not batchnorm)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU()) if batchnorm else nn.Sequential(conv, nn.ReLU())


class CNN(nn.Module):
    """Three conv+BN+ReLU blocks on the 8x8 image, max-pooled to 2x2, flattened into a linear head.

    ``batchnorm=False`` drops the BN layers (biased convs): a net where a BN reset is impossible and
    only REPAIR can undo the variance collapse of interpolation (Jordan et al. 2023).
    """

    def __init__(self, width: int = 32, num_classes: int = 10, batchnorm: bool = True):
        super().__init__()
        block = lambda cin, cout: conv_bn(cin, cout, batchnorm=batchnorm)  # noqa: E731
        self.features = nn.Sequential(
            block(1, width), block(width, 2 * width), nn.MaxPool2d(2), block(2 * width, 2 * width), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.reshape(-1, 1, 8, 8))
        return self.head(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with an identity (or 1x1 conv+BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem + two residual stages (second downsamples) + global average pool + linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(1, width)
        self.stage1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.stage2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x.reshape(-1, 1, 8, 8))))
        return self.head(x.mean(dim=(2, 3)))


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with separate q/k/v/o projections, so heads are visible to alignment."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise MergescopeError(f"transformer: dim {dim} must be divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.o((attn @ v).transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """ViT on 2x2 patches of the 8x8 digit (16 tokens), mean-pooled into a linear head."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        h = self.embed(patches) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


def conv_bn1d(cin: int, cout: int, kernel: int = 3, batchnorm: bool = True) -> nn.Sequential:
    """conv1d + BN + ReLU; without BN the conv gets a bias instead (conv1d + ReLU)."""
    conv = nn.Conv1d(cin, cout, kernel, padding=kernel // 2, bias=not batchnorm)
    return nn.Sequential(conv, nn.BatchNorm1d(cout), nn.ReLU()) if batchnorm else nn.Sequential(conv, nn.ReLU())


class CNN1d(nn.Module):
    """1-D CNN for signals (MNIST-1D): four conv(+BN)+ReLU blocks, two max-pools, global average
    pool, linear head. Reads ``[N, L]`` (one channel) or ``[N, C=1, L]``; any length L >= 4.

    Kernels 5, 5, 3, 3; channels ``width``, ``width``, ``2*width``, ``2*width``; ``batchnorm=False``
    gives biased convs without BN (as for ``cnn``).
    """

    def __init__(self, width: int = 32, num_classes: int = 10, batchnorm: bool = True):
        super().__init__()
        block = lambda cin, cout, k: conv_bn1d(cin, cout, k, batchnorm=batchnorm)  # noqa: E731
        self.features = nn.Sequential(
            block(1, width, 5), block(width, width, 5), nn.MaxPool1d(2), block(width, 2 * width, 3), nn.MaxPool1d(2),
            block(2 * width, 2 * width, 3),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.reshape(x.shape[0], 1, -1))
        return self.head(x.mean(dim=2))


# name -> (class, {option: default}); the defaults reach the accuracy targets on digits (cnn1d: on
# MNIST-1D). A checkpoint's metadata records these defaults, so they never change.
ZOO: dict[str, tuple[type[nn.Module], dict]] = {
    "mlp": (MLP, {"width": 512, "depth": 2}),
    "cnn": (CNN, {"width": 32, "batchnorm": True}),
    "resnet": (ResNet, {"width": 16}),
    "transformer": (TinyViT, {"dim": 32, "depth": 2, "heads": 4}),
    "cnn1d": (CNN1d, {"width": 32, "batchnorm": True}),
}
# Options added to a model after its checkpoints existed: accepted, defaulted by the class (mlp's
# in_features=64 is the digits input), recorded only when given, so ``model_options`` and the
# metadata of existing and new digits checkpoints stay exactly as they were.
EXTRA_OPTIONS: dict[str, dict] = {"mlp": {"in_features": 64, "num_classes": 10}, "cnn": {"num_classes": 10},
                                   "resnet": {"num_classes": 10}, "transformer": {"num_classes": 10},
                                   "cnn1d": {"num_classes": 10}}
# Training defaults per model, chosen on digits (bench/zoo_accuracy.py checks them on several seeds);
# cnn1d's on MNIST-1D (bench/mnist1d_determinism.py --accuracy).
TRAIN_DEFAULTS: dict[str, dict] = {
    "mlp": {"epochs": 20, "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 32},
    "cnn": {"epochs": 20, "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64},
    "resnet": {"epochs": 20, "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64},
    "transformer": {"epochs": 80, "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 32},
    # chosen on MNIST-1D (docs/mnist1d.md): 98.6-98.7% test over seeds 0-2, ~5 s each on 1 thread
    "cnn1d": {"epochs": 10, "lr": 1e-2, "weight_decay": 1e-4, "batch_size": 64},
}
# Settings for a model outside the zoo (a user's package.module:factory): the one fallback every
# command uses (`train` has always trained such models with it).
FALLBACK_TRAIN: dict = {"epochs": 30, "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64}


def train_defaults(model: str) -> dict:
    """Training settings for a model spec: the zoo model's ``TRAIN_DEFAULTS``, else ``FALLBACK_TRAIN``."""
    return dict(TRAIN_DEFAULTS.get(model, FALLBACK_TRAIN))


# Bounds on zoo options: any value inside builds in well under a GB; a checkpoint's metadata or a
# command line asking for more (``--width 10**9``) is refused before anything is allocated.
OPTION_BOUNDS: dict[str, tuple[int, int]] = {"width": (1, 16384), "depth": (1, 64), "dim": (1, 4096), "heads": (1, 64),
                                             "in_features": (1, 4096), "num_classes": (2, 100_000)}


def options_for_task(name: str, task, given: dict) -> dict:
    """Zoo options a task's data decide unless the user gave them: an mlp reads a flat input of the
    task's size, every head has the task's classes (only values that differ from the defaults, so
    digits checkpoints record exactly what they always did)."""
    if name not in ZOO:
        return {}
    defaults = {**ZOO[name][1], **EXTRA_OPTIONS.get(name, {})}
    shape = tuple(getattr(task, "input_shape", ()) or ())
    decided = {"num_classes": getattr(task, "num_classes", None)}
    if name == "mlp" and len(shape) == 1:
        decided["in_features"] = shape[0]
    return {k: v for k, v in decided.items() if v is not None and k not in given and v != defaults.get(k)}


# The zoo is for small models: options may not ask for more (a checkpoint's metadata naming
# cnn width 16384 would otherwise allocate ~13 GB before its tensors are even compared).
MAX_PARAMETERS = 100_000_000


def check_zoo_options(name: str, options: dict, where: str | None = None) -> None:
    """Refuse unknown options, values of the wrong type and sizes outside ``OPTION_BOUNDS``."""
    where = where or f"model {name!r}"
    defaults = {**ZOO[name][1], **EXTRA_OPTIONS.get(name, {})}
    unknown = set(options) - set(defaults)
    if unknown:
        shown = ", ".join(sorted(str(k)[:40] for k in unknown))
        raise MergescopeError(f"{where}: unknown option(s) {shown} (valid: {', '.join(defaults)})")
    for key, value in options.items():
        if value is not None:
            _check_option(key, value, defaults[key], where)
    dim, heads = options.get("dim") or defaults.get("dim"), options.get("heads") or defaults.get("heads")
    if dim is not None and heads is not None and dim % heads:
        raise MergescopeError(f"{where}: dim {dim} must be a multiple of heads {heads}")
    given = {k: v for k, v in options.items() if v is not None}
    larger = any(type(v) is int and v > defaults[k] for k, v in given.items() if not isinstance(defaults[k], bool))
    if larger and parameter_count(name, given) > MAX_PARAMETERS:  # default sizes are known to be small
        count = parameter_count(name, given)
        raise MergescopeError(f"{where}: these options give {count:,} parameters, over the zoo's limit of "
                              f"{MAX_PARAMETERS:,}; use your own model (--model package.module:factory) for that size")


def _check_option(key: str, value, default, where: str) -> None:
    """One option: a bool where the default is a bool, else an integer inside ``OPTION_BOUNDS``."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise MergescopeError(f"{where}: option {key!r} must be true or false, got {short_repr(value)}")
        return
    lo, hi = OPTION_BOUNDS.get(key, (1, 2**31 - 1))
    if type(value) is not int or not lo <= value <= hi:
        raise MergescopeError(f"{where}: option {key!r} must be an integer in [{lo}, {hi}], got {short_repr(value)}")


def parameter_count(name: str, options: dict) -> int:
    """Parameters the zoo model would have, counted on the meta device (nothing is allocated)."""
    cls = ZOO[name][0]
    with torch.device("meta"):
        module = cls(**{**ZOO[name][1], **options})
    return sum(p.numel() for p in module.parameters())


def build(name: str, seed: int | None = None, **options) -> nn.Module:
    """Build a zoo model by name; unknown names/options are clear errors. ``seed`` fixes init."""
    if name not in ZOO:
        raise MergescopeError(f"unknown model {name!r} (zoo: {', '.join(ZOO)}; or give package.module:factory)")
    cls, defaults = ZOO[name]
    check_zoo_options(name, options)
    kwargs = {**defaults, **{k: v for k, v in options.items() if v is not None}}
    if seed is None:
        return cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kwargs)


def model_options(name: str) -> dict:
    """Default options of a zoo model (what ``build`` fills in)."""
    return dict(ZOO[name][1])
