"""Ensembles, soups, data-aware merges and the Rethink-Merge analyses on the default digits zoo.

Trains (or reuses, from bench/out/ensemble/zoo/) two families of 8 models per architecture:
independent seeds and fine-tunes of one parent; then writes JSON + PNG per analysis under
bench/out/ensemble/ and prints the headline numbers copied into docs/ensemble.md.

    .venv/bin/python bench/ensemble_zoo.py [--models mlp,cnn,transformer] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mergescope import ensemble, tasks
from mergescope.analysis import scaling, similarity, soups, spaces, stitching, weights
from mergescope.io import load, save
from mergescope.merge.data_aware import fisher_merge, regmean_merge

OUT = Path(__file__).parent / "out" / "ensemble"


def family(kind: str, name: str, n: int, task, epochs: int | None = None) -> list[dict]:
    """Train a family once; later runs read it back from safetensors files."""
    folder = OUT / "zoo"
    paths = [folder / f"{name}_{kind}_{i}.safetensors" for i in range(n)]
    if not all(p.exists() for p in paths):
        t = time.time()
        states = spaces.train_family(kind, name, n, task, epochs=epochs)
        for p, s in zip(paths, states):
            save(s, p, force=True)
        print(f"trained {name} {kind} x{n} in {time.time() - t:.0f}s", flush=True)
    return [{k: v.clone() for k, v in load(p).items()} for p in paths]


def dump(name: str, result, plot=None) -> dict:
    data = json.loads(json.dumps(result.to_dict() if hasattr(result, "to_dict") else result))
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=1))
    if plot is not None:
        plot(json.loads((OUT / f"{name}.json").read_text()), OUT / f"{name}.png")
    return data


def accuracy(model, state, task) -> float:
    model.load_state_dict(state)
    return task.evaluate(model)["accuracy"]


def run(name: str, n: int, task, headline: dict, epochs: int | None = None) -> None:
    model = tasks.build(name)
    seeds, tunes = family("seeds", name, n, task, epochs), family("finetunes", name, n, task, epochs)
    example = next(task.batches("test"))[0][:8]
    aligned = spaces.align_family(model, seeds, example) if spaces.alignment_available() else None
    fams = {"finetunes": tunes, "seeds": seeds, **({"seeds aligned": aligned} if aligned else {})}
    t = time.time()
    sp = dump(f"{name}_spaces", spaces.compare(model, fams, task, model_name=name), spaces.plot)
    headline[name] = {"spaces": {f: {s: c[s][-1] for s in (*spaces.SPACES, "best_member")}
                                 for f, c in sp["families"].items()}, "sizes": sp["sizes"]}
    ens = {m: ensemble.evaluate(model, seeds, task, method=m).to_dict() for m in ensemble.METHODS}
    ens["weight-average"] = ensemble.evaluate_weight_average(model, seeds, task).to_dict()
    ens_t = {m: ensemble.evaluate(model, tunes, task, method=m).to_dict() for m in ("probs", "logits", "vote")}
    ens_t["weight-average"] = ensemble.evaluate_weight_average(model, tunes, task).to_dict()
    dump(f"{name}_ensembles", {"seeds": ens, "finetunes": ens_t})
    headline[name]["ensembles_seeds"] = {m: (r["accuracy"], r["loss"], r["ece"], r["params"], r["flops"])
                                         for m, r in ens.items()}
    headline[name]["ensembles_finetunes"] = {m: (r["accuracy"], r["loss"], r["ece"]) for m, r in ens_t.items()}
    soup_rows = {}
    for fam_name, fam in (("finetunes", tunes), ("seeds", seeds)):
        for kind in ("uniform", "greedy"):
            r = soups.soup(model, fam, task, kind=kind)
            soup_rows[f"{fam_name} {kind}"] = {**r.to_dict(), "best_member_test": max(r.member_test_accuracy)}
    dump(f"{name}_soups", soup_rows)
    headline[name]["soups"] = {k: (v["test_accuracy"], len(v["included"]), v["best_member_test"])
                               for k, v in soup_rows.items()}
    merges = {}
    for label, fam in (("finetunes x8", tunes), ("seeds x2", seeds[:2]),
                       *((("seeds aligned x2", aligned[:2]),) if aligned else ())):
        merges[label] = {"average": accuracy(model, ensemble.weight_average(model, fam, task), task),
                         "fisher": accuracy(model, ensemble.reset_batchnorm(
                             model, fisher_merge(model, fam, task), ensemble.split_tensors(task, "train")[0]), task),
                         "regmean": accuracy(model, ensemble.reset_batchnorm(
                             model, regmean_merge(model, fam, task), ensemble.split_tensors(task, "train")[0]), task),
                         "best member": max(accuracy(model, s, task) for s in fam)}
    dump(f"{name}_data_aware", merges)
    headline[name]["data_aware"] = merges
    cka = similarity.compare(model, seeds[0], seeds[1], task, state_b_aligned=aligned[1] if aligned else None)
    dump(f"{name}_cka", cka, similarity.plot)
    headline[name]["cka_diag"] = [round(cka.cka[i][i], 3) for i in range(len(cka.layers))]
    headline[name]["unit_corr"] = [round(v, 3) for v in cka.unit_correlation]
    headline[name]["unit_corr_aligned"] = [round(v, 3) for v in cka.aligned_unit_correlation or ()]
    st = stitching.stitch(model, seeds[0], seeds[1], task)
    dump(f"{name}_stitch", st, stitching.plot)
    headline[name]["stitch"] = {"layers": st.layers, "identity": st.identity_accuracy, "trained": st.stitched_accuracy,
                                "penalty": st.penalty}
    named = {"seed0": seeds[0], "seed1": seeds[1]}
    dump(f"{name}_weights", weights.analyse(model, named, task), weights.plot)
    if aligned:
        dump(f"{name}_weights_aligned", weights.analyse(model, {"seed0": seeds[0], "seed1 aligned": aligned[1]}, task),
             weights.plot)
    dump(f"{name}_weights_finetunes", weights.analyse(model, {"tune0": tunes[0], "tune1": tunes[1]}, task),
         weights.plot)
    pairs = {"seeds": named, **({"seeds aligned": {"seed0": seeds[0], "seed1 aligned": aligned[1]}} if aligned else {}),
             "finetunes": {"tune0": tunes[0], "tune1": tunes[1]}}
    headline[name]["scaling"] = {}
    for label, pair in pairs.items():
        sc = scaling.analyse(model, pair, task)
        dump(f"{name}_scaling_{label.replace(' ', '_')}", sc, scaling.plot)
        headline[name]["scaling"][label] = {
            "norms": sc.norms, "accuracy_at_1": {k: v["accuracy"][sc.factors.index(1.0)] for k, v in sc.global_scaling.items()},
            **{f"kl_at_{c:g}": {k: v["kl"][sc.factors.index(c)] for k, v in sc.global_scaling.items()} for c in (0.5, 1.1, 2.0)}}
    print(f"{name}: analyses in {time.time() - t:.0f}s", flush=True)


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None, help="Override training epochs (smoke runs).")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    OUT = args.out
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    task = tasks.digits()
    headline = {}
    for name in args.models.split(","):
        run(name, args.n, task, headline, args.epochs)
        (OUT / "headline.json").write_text(json.dumps(headline, indent=1))
    print(json.dumps(headline, indent=1))


if __name__ == "__main__":
    main()
