"""Markdown tables for docs/ensemble.md from bench/out/ensemble/*.json (written by ensemble_zoo.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "out" / "ensemble"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    h = json.loads((OUT / "headline.json").read_text())
    models = list(h)
    print("### Output ensembles of 8 independent seeds (test)\n")
    rows = []
    for m in models:
        for method, (acc, loss, ece, params, flops) in h[m]["ensembles_seeds"].items():
            rows.append([m, method, pct(acc), f"{loss:.3f}", f"{ece:.3f}", f"{params:,}", f"{flops:,}"])
    print(table(["model", "combination", "acc %", "NLL", "ECE", "params", "FLOPs/example"], rows))
    print("\n### Weight vs feature vs output space, 8 models (test accuracy %)\n")
    rows = []
    for m in models:
        for fam, c in h[m]["spaces"].items():
            rows.append([m, fam, *(pct(c[s]) for s in ("weight_average", "features", "probs", "logits", "best_member"))])
    print(table(["model", "family", "weight avg", "feature avg", "probs", "logits", "best member"], rows))
    for m in models:
        sp = json.loads((OUT / f"{m}_spaces.json").read_text())
        print(f"\n{m}, weight average by number of models: " + "; ".join(
            f"{fam}: " + " ".join(pct(v) for v in c["weight_average"]) for fam, c in sp["families"].items()))
    print("\n### Soups (test accuracy %, models included)\n")
    rows = [[m, k, pct(acc), str(n), pct(best)] for m in models for k, (acc, n, best) in h[m]["soups"].items()]
    print(table(["model", "soup", "acc %", "included", "best member"], rows))
    print("\n### Data-aware merging (test accuracy %)\n")
    rows = [[m, k, *(pct(v[c]) for c in ("average", "fisher", "regmean", "best member"))]
            for m in models for k, v in h[m]["data_aware"].items()]
    print(table(["model", "models", "average", "Fisher", "RegMean", "best member"], rows))
    print("\n### Similarity and stitching (seed 0 vs seed 1)\n")
    for m in models:
        st = h[m]["stitch"]
        print(f"- {m}: CKA of matching layers {h[m]['cka_diag']}; unit correlation {h[m]['unit_corr']} -> "
              f"aligned {h[m]['unit_corr_aligned']}; stitching after {st['layers']}: identity map "
              f"{[pct(v) for v in st['identity']]}, trained {[pct(v) for v in st['trained']]} "
              f"(penalty {[pct(v) for v in st['penalty']]})")
    print("\n### Scaling (global factor c; KL(p_1 || p_c))\n")
    rows = []
    for m in models:
        for label, sc in h[m]["scaling"].items():
            for name in sc["norms"]:
                rows.append([m, label, name, f"{sc['norms'][name]:.1f}", pct(sc["accuracy_at_1"][name]),
                             f"{sc['kl_at_0.5'][name]:.3f}", f"{sc['kl_at_1.1'][name]:.4f}", f"{sc['kl_at_2'][name]:.3f}"])
    print(table(["model", "pair", "model", "norm", "acc %", "KL c=0.5", "KL c=1.1", "KL c=2"], rows))


if __name__ == "__main__":
    main()
