"""Turn saved stage results into report sections: figures (drawn from the JSON) and plain readings."""

from __future__ import annotations

from pathlib import Path

from ..report import figures as F


def convexity_section(res: dict, fig_dir: Path) -> dict:
    paths = res["paths"]
    F.paths_figure(paths, fig_dir / "convexity.png", "Mode convexity: linear interpolation between two models")
    same = paths["MLP, fine-tunes of one parent"]
    indep = paths["MLP, independent seeds"]
    reading = (f"Fine-tunes of one parent lie in one convex basin (loss barrier {same['barrier_loss']:.3f}), "
               f"so averaging their weights is safe. Independent seeds are separated by a barrier of "
               f"{indep['barrier_loss']:.3f} ({100 * indep['barrier_acc']:.1f} accuracy points): averaging them "
               f"naively destroys accuracy.")
    rows = [{"pair": k, "loss barrier": v["barrier_loss"], "accuracy barrier (pts)": 100 * v["barrier_acc"],
             "train loss barrier": v["train_barrier_loss"],
             "naive-BN loss barrier": v["naive_barrier_loss"] if v["naive_barrier_loss"] is not None else "-"}
            for k, v in paths.items()]
    return {"id": "convexity", "title": "1. Mode convexity: is there a low-loss straight line?",
            "intro": "Loss and accuracy on the test split along theta(t) = (1-t) A + t B. The barrier is the largest "
                     "rise above the straight line between the endpoint values; BatchNorm statistics are recomputed "
                     "at every point (the naive, interpolated-statistics barrier is listed too).",
            "figures": [{"file": "convexity.png", "caption": reading}],
            "tables": [{"columns": list(rows[0]), "rows": rows}]}


def merging_section(res: dict, fig_dir: Path) -> dict:
    rows = res["rows"]
    F.merge_table_figure(rows, fig_dir / "merging.png")
    table_rows = []
    for group in dict.fromkeys(r["models"] for r in rows):
        sub = [r for r in rows if r["models"] == group]
        best = {}
        for r in sub:
            if r["family"] != "single model" and r["accuracy"] > best.get(r["family"], {"accuracy": -1})["accuracy"]:
                best[r["family"]] = r
        for r in sub:
            table_rows.append({"models": group, "family": r["family"], "method": r["method"],
                               "test accuracy": r["accuracy"], "test loss": r["loss"], "seconds": r["seconds"],
                               "_best": best.get(r["family"]) is r})
    top = {g: max((r for r in rows if r["models"] == g and r["family"] != "ensembling" and r["family"] != "single model"),
                  key=lambda r: r["accuracy"]) for g in dict.fromkeys(r["models"] for r in rows)}
    reading = " ".join(f"For {g}, the best single merged model is {r['method']} ({100 * r['accuracy']:.1f}%)."
                       for g, r in top.items())
    return {"id": "merging", "title": "6. Merging outcome: every method on the same models",
            "intro": "Test accuracy of each merge (one model) and each output ensemble (N models' cost). The best of "
                     "each family is highlighted.",
            "figures": [{"file": "merging.png", "caption": reading}],
            "tables": [{"columns": ["models", "family", "method", "test accuracy", "test loss", "seconds"],
                        "rows": table_rows}]}


SECTION_BUILDERS = {
    "convexity": convexity_section,
    "merging": merging_section,
}


def summary_lines(results: dict) -> list[str]:
    """Plain-language answers drawn from the numbers: which merge to use for which models, and why."""
    lines = []
    conv = results.get("convexity", {}).get("paths", {})
    if conv:
        same = conv["MLP, fine-tunes of one parent"]["barrier_loss"]
        indep = conv["MLP, independent seeds"]["barrier_loss"]
        lines.append(f"Models fine-tuned from one parent share a basin (loss barrier {same:.3f} vs {indep:.3f} for "
                     f"independent seeds): for them, weight averaging (linear, task arithmetic, TIES) is the cheap "
                     f"and accurate choice.")
    merge = results.get("merging", {}).get("rows", [])
    for group in dict.fromkeys(r["models"] for r in merge):
        sub = [r for r in merge if r["models"] == group and r["family"] != "single model"]
        best_one = max((r for r in sub if r["family"] != "ensembling"), key=lambda r: r["accuracy"])
        best_ens = max((r for r in sub if r["family"] == "ensembling"), key=lambda r: r["accuracy"], default=None)
        line = f"{group}: best single merged model is {best_one['method']} ({100 * best_one['accuracy']:.1f}% test)"
        if best_ens is not None:
            line += (f"; the best ensemble reaches {100 * best_ens['accuracy']:.1f}% at {group.split()[0]}x the "
                     f"inference cost")
        lines.append(line + ".")
    return lines
