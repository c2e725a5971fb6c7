"""mergescope vs FusionBench 0.2.33 on small tensors: TSV-M, Iso-C, Iso-CTS and AdaMerging (layer-wise).

Installs nothing. FusionBench has heavy dependencies (lightning, hydra, omegaconf...); only its pure
functions are compared, so when ``import fusion_bench`` fails for a missing dependency, its files are
loaded directly from the installed package with two stand-ins for helpers that do not compute
(``timeit_context``: a timer that prints; the package's ``__init__`` that imports everything). Get it with

    .venv/bin/pip download fusion-bench==0.2.33 --no-deps -d /tmp/fb && cd /tmp/fb && unzip -q *.whl -d src
    PYTHONPATH=/tmp/fb/src .venv/bin/python bench/fusionbench_parity.py

(or ``pip install --no-deps fusion-bench==0.2.33`` into a scratch venv). Prints the max abs difference per
method (float64 and float32 inputs), and for AdaMerging the coefficients after the same Adam steps on the
same unlabeled batches (FusionBench's ``LayerWiseMergedModel`` + ``entropy_loss``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

import mergescope as ms
from mergescope.merge.adamerging import adamerge


def _load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fusion_bench_functions() -> dict | None:
    """FusionBench's iso_c, iso_cts, TSV-M, LayerWiseMergedModel and entropy_loss, or None when not installed."""
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None:
        return None
    try:
        iso = importlib.import_module("fusion_bench.method.isotropic_merging.iso_utils")
        tsvm = importlib.import_module("fusion_bench.method.task_singular_vector.utils.TSVM_utils")
        lw = importlib.import_module("fusion_bench.models.wrappers.layer_wise_fusion")
        ent = importlib.import_module("fusion_bench.method.adamerging.entropy_loss")
        how = "imported"
    except ImportError as e:
        root = Path(spec.submodule_search_locations[0])
        for pkg in ("fusion_bench", "fusion_bench.utils", "fusion_bench.models"):
            sys.modules[pkg] = types.ModuleType(pkg)
            sys.modules[pkg].__path__ = []
        sys.modules["fusion_bench.utils"].timeit_context = lambda *a, **k: contextlib.nullcontext()
        _load_file("fusion_bench.utils.type", root / "utils" / "type.py")
        _load_file("fusion_bench.utils.dict", root / "utils" / "dict.py")
        _load_file("fusion_bench.models.utils", root / "models" / "utils.py")
        iso = _load_file("fb_iso_utils", root / "method" / "isotropic_merging" / "iso_utils.py")
        tsvm = _load_file("fb_tsvm_utils", root / "method" / "task_singular_vector" / "utils" / "TSVM_utils.py")
        lw = _load_file("fb_layer_wise_fusion", root / "models" / "wrappers" / "layer_wise_fusion.py")
        ent = _load_file("fb_entropy_loss", root / "method" / "adamerging" / "entropy_loss.py")
        how = f"files loaded from {root} (import failed: {e})"
    return {"iso_c": iso.iso_c, "iso_cts": iso.iso_cts, "tsv": tsvm.compute_and_sum_svd_mem_reduction,
            "LayerWiseMergedModel": lw.LayerWiseMergedModel, "entropy_loss": ent.entropy_loss, "how": how}


def _tensors(dtype: torch.dtype, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.weight": (24, 16), "mlp.weight": (16, 40), "square.weight": (30, 30), "bias": (16,),
              "norm.weight": (40,)}
    base = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype) for k, v in base.items()}
           for _ in range(n)]
    return base, fts


def svd_parity(fb: dict, dtype: torch.dtype) -> dict[str, float]:
    """Max abs difference of the merged tensors, every tensor, each method at its FusionBench defaults."""
    base, fts = _tensors(dtype)
    tvs = [{k: f[k] - base[k] for k in base} for f in fts]
    alpha = 1.0
    with contextlib.redirect_stdout(None):
        theirs = {"tsv": fb["tsv"]([dict(t) for t in tvs], accelerator="cpu"),
                  "iso_c": fb["iso_c"]([dict(t) for t in tvs], accelerator="cpu"),
                  "iso_cts": fb["iso_cts"]([dict(t) for t in tvs], common_space_fraction=0.8, accelerator="cpu")}
    params = {"tsv": {}, "iso_c": {}, "iso_cts": {"common_space_fraction": 0.8}}
    diffs = {}
    for name, tv in theirs.items():
        ours = {k: ms.methods.get(name)([f[k] for f in fts], base[k], alpha=alpha, **params[name]) for k in base}
        diffs[name] = max(float((ours[k].double() - (base[k].double() + alpha * tv[k].double())).abs().max())
                          for k in base)
    return diffs


def adamerging_parity(fb: dict, steps: int = 50, lr: float = 1e-3, seed: int = 0, batch_size: int = 16) -> float:
    """Layer-wise AdaMerging on the digits subset fine-tunes: the max abs difference of the coefficients."""
    from mergescope.tasks import digits
    from mergescope.tasks.train import train

    torch.manual_seed(0)
    task = digits(seed=0)
    parent = ms.tasks.build("mlp", width=32, depth=2)
    train(parent, task, epochs=2, seed=0)
    fts = []
    for i, classes in enumerate(((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))):
        m = copy.deepcopy(parent)
        train(m, digits(seed=0, classes=classes), epochs=4, seed=200 + i)
        fts.append(m)
    base = {k: v.detach().clone() for k, v in parent.state_dict().items()}
    ours = adamerge(parent, base, [f.state_dict() for f in fts], task, layer_wise=True, steps=steps, lr=lr,
                    seed=seed, batch_size=batch_size)

    names = [n for n, _ in parent.named_parameters()]
    weight = torch.full((len(fts), len(names)), 0.3)
    wrapped = fb["LayerWiseMergedModel"](weight, copy.deepcopy(parent), [copy.deepcopy(f) for f in fts],
                                         clamp_weights=False)
    opt = torch.optim.Adam([wrapped.merge_weight], lr=lr)
    x = torch.cat([b for b, _ in task.batches("val")])
    generator = torch.Generator().manual_seed(seed)  # the same input order as merge/adamerging.py draws
    order, at = torch.randperm(len(x), generator=generator), 0
    for _ in range(steps):
        if at + batch_size > len(x):
            order, at = torch.randperm(len(x), generator=generator), 0
        wrapped.merge_weights()
        loss = fb["entropy_loss"](wrapped(x[order[at:at + batch_size]]))
        at += batch_size
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float((ours.coefficients - wrapped.merge_weight.detach()).abs().max())


def main() -> int:
    fb = fusion_bench_functions()
    if fb is None:
        print("fusion_bench is not importable. Nothing is installed at run time; get it with\n"
              "  .venv/bin/pip download fusion-bench==0.2.33 --no-deps -d /tmp/fb && "
              "(cd /tmp/fb && unzip -q fusion_bench-0.2.33-py3-none-any.whl -d src)\n"
              "  PYTHONPATH=/tmp/fb/src .venv/bin/python bench/fusionbench_parity.py")
        return 1
    torch.set_num_threads(1)
    print(f"fusion_bench: {fb['how']}")
    for dtype in (torch.float64, torch.float32):
        for name, diff in svd_parity(fb, dtype).items():
            print(f"{name:8s} {dtype!s:14s} max abs diff {diff:.3g}")
    print(f"adamerging layer-wise, 50 Adam steps: coefficients max abs diff {adamerging_parity(fb):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
