"""Turn saved stage results into report sections: figures (drawn from the JSON) and plain readings."""

from __future__ import annotations

from pathlib import Path

from ..report import figures as F


def _mean_off_diagonal(m) -> float:
    k = len(m)
    return sum(m[i][j] for i in range(k) for j in range(k) if i != j) / (k * (k - 1))


def convexity_section(res: dict, fig_dir: Path) -> dict:
    paths = res["paths"]
    F.paths_figure(paths, fig_dir / "convexity.png", "Mode convexity: linear interpolation between two models")
    if res.get("same_basin") and res.get("independent"):
        same, indep = paths[res["same_basin"]], paths[res["independent"]]
        cost = (f"averaging them naively destroys accuracy" if indep["barrier_acc"] > 0.10 else
                f"averaging them naively costs up to {100 * indep['barrier_acc']:.1f} accuracy points")
        reading = (f"Fine-tunes of one parent: loss barrier {same['barrier_loss']:.3f}"
                   + (" (one convex basin, so averaging their weights is safe)" if same["barrier_loss"] < 0.05 else "")
                   + f". Independent seeds: barrier {indep['barrier_loss']:.3f} "
                   f"({100 * indep['barrier_acc']:.1f} accuracy points): {cost}.")
    else:
        reading = "Loss barriers along the straight lines: " + "; ".join(
            f"{k} {v['barrier_loss']:.3f} ({100 * v['barrier_acc']:.1f} pts)" for k, v in paths.items()) + (
            ". A barrier near 0 means the two models share a convex basin and can be averaged directly.")
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


def connectivity_section(res: dict, fig_dir: Path) -> dict:
    matrices, curves = res["matrices"], res["curves"]
    F.heatmaps_figure(matrices, fig_dir / "connectivity_matrix.png", "barrier_loss",
                      "Pairwise loss barriers between independent seeds: naive vs after neuron alignment")
    un, al = curves["unaligned"], curves["aligned"]
    pair = " and ".join(res.get("pair", ["A", "B"]))
    F.paths_figure({"straight line": un["line"], "Bezier curve": un["curve"],
                    "line after alignment": al["aligned_line"], "Bezier curve after alignment": al["curve"]},
                   fig_dir / "connectivity_curves.png", "Connectivity: fitted curves vs straight lines")

    means = {name: _mean_off_diagonal(m["barrier_loss"]) for name, m in matrices.items()}
    best = min(means, key=means.get)
    reading = "Mean pairwise loss barrier: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()) + ". "
    reading += (f"Undoing the permutation symmetry ({best}) removes most of the barrier: independent runs land in "
                f"the same basin up to a relabelling of their hidden units." if means[best] < means["naive"] / 2 else
                "Alignment does not remove most of the barrier for these models.")
    curve_reading = _curve_reading(pair, un, al)
    rows = [{"paths": k, "mean loss barrier": v,
             "mean accuracy barrier (pts)": 100 * _mean_off_diagonal(matrices[k]["barrier_acc"])} for k, v in means.items()]
    rows += [{"paths": f"Bezier curve ({k})", "mean loss barrier": c["barrier_loss"],
              "mean accuracy barrier (pts)": 100 * c["barrier_acc"]} for k, c in curves.items()]
    return {"id": "connectivity", "title": "2. Connectivity: are minima joined by low-loss paths?",
            "intro": "Barriers between every pair of independently trained MLPs, before and after aligning each to "
                     "the first (weight matching, activation matching); then a quadratic Bezier curve fitted between "
                     "two of them (Garipov et al. 2018), without and with alignment (Tatro et al. 2020).",
            "figures": [{"file": "connectivity_matrix.png", "caption": reading},
                        {"file": "connectivity_curves.png", "caption": curve_reading}],
            "tables": [{"columns": list(rows[0]), "rows": rows}]}


def _curve_reading(pair: str, un: dict, al: dict) -> str:
    """Say what the curve numbers show, without claiming more than they do."""
    line = un["line"]["barrier_loss"]
    text = (f"Between {pair}: straight line {line:.3f}, fitted Bezier curve {un['barrier_loss']:.3f}; after "
            f"activation matching, line {al['aligned_line']['barrier_loss']:.3f} and curve {al['barrier_loss']:.3f}. ")
    if un["barrier_loss"] < line / 5:
        text += "The minima are joined by a low-loss curve even without alignment (connectivity)"
    else:
        text += "Without alignment no low-loss curve was found in this budget"
    best_aligned = min(al["barrier_loss"], al["aligned_line"]["barrier_loss"])
    text += ("; after alignment even the straight path is (nearly) barrier-free." if best_aligned < line / 5 else
             "; alignment does not remove the barrier here.")
    return text


def determinism_section(res: dict, fig_dir: Path) -> dict:
    F.stability_figure(res, fig_dir / "determinism.png")
    ks, barriers = res["ks"], res["barrier_loss"]
    stable = [k for k, b in zip(ks, barriers) if b < 0.05]
    reading = (f"Children spawned at epoch {ks[0]} are separated by a loss barrier of {barriers[0]:.3f}; "
               f"spawned at epoch {ks[-1]}, by {barriers[-1]:.3f}. "
               + (f"From epoch {stable[0]} on, runs are stable to SGD noise (barrier < 0.05): their fate is "
                  f"decided early, and their weights can be averaged." if stable else
                  "No spawn point here gives a barrier under 0.05: training noise still moves runs to different basins."))
    rows = [{"spawn epoch k": k, "loss barrier": b, "accuracy barrier (pts)": 100 * a,
             "child A accuracy": c[0], "child B accuracy": c[1]}
            for k, b, a, c in zip(ks, barriers, res["barrier_acc"], res["child_accuracy"])]
    return {"id": "determinism", "title": "3. Determinism: when does a run commit to its basin?",
            "intro": "Instability analysis (Frankle et al. 2020) on the MLP: train a parent for k epochs, copy it, train both copies "
                     "to the end with different data orders, and measure the barrier between them.",
            "figures": [{"file": "determinism.png", "caption": reading}],
            "tables": [{"columns": list(rows[0]), "rows": rows}]}


def directedness_section(res: dict, fig_dir: Path) -> dict:
    F.task_vector_figure(res, fig_dir / "directedness.png")
    names = res["names"]
    off = [res["cosine"][i][j] for i in range(len(names)) for j in range(len(names)) if i < j]
    shape = ("nearly orthogonal" if max(abs(c) for c in off) < 0.3 else "far from parallel" if max(off) < 0.7
             else "largely aligned")
    reading = (f"Task vectors (fine-tune minus parent) are {shape} (cosine {min(off):.2f} to {max(off):.2f}). Adding them with lambda {res['chosen_scale']:g} "
               f"(chosen on validation) gives " + ", ".join(f"{n} {100 * res['chosen_test'][n]:.1f}%" for n in names)
               + " vs the fine-tunes' " + ", ".join(f"{100 * res['individual_test'][n]:.1f}%" for n in names) + ".")
    if res["negation"]:
        reading += " Subtracting a task vector (scale chosen on validation): " + "; ".join(
            f"{n}: {100 * v['chosen_target_test']:.1f}% on it, {100 * v['chosen_control_test']:.1f}% on the rest"
            for n, v in res["negation"].items()) + "."
    rows = [{"task": n, "parent": res["base_test"][n], "fine-tune": res["individual_test"][n],
             "task arithmetic": res["chosen_test"][n], "norm of tau": res["norms"][i]} for i, n in enumerate(names)]
    return {"id": "directedness", "title": "4. Directedness: do task-specific directions exist?",
            "intro": "Fine-tune the parent on disjoint label subsets; the task vectors tau = theta_ft - theta_parent "
                     "are added (task arithmetic) or subtracted (negation) with a scale chosen on the validation split.",
            "figures": [{"file": "directedness.png", "caption": reading}],
            "tables": [{"columns": list(rows[0]), "rows": rows}]}


def why_section(res: dict, fig_dir: Path) -> dict:
    from ..analysis import scaling, spaces, weights

    weights.plot(res["weights"], fig_dir / "why_weights.png")
    spaces.plot(res["spaces"], fig_dir / "why_spaces.png")
    scaling.plot(res["scaling"], fig_dir / "why_scaling.png")
    fam = res["spaces"]["families"]
    k = res["spaces"]["sizes"][-1]
    space_reading = " ".join(
        f"{name}: weight average {100 * c['weight_average'][-1]:.1f}% vs output (probs) average "
        f"{100 * c['probs'][-1]:.1f}% at {k} models." for name, c in fam.items())
    scaling_reading = _scaling_reading(res["scaling"])
    return {"id": "why", "title": "7. Why weight averaging works (Rethink-Merge analyses)",
            "intro": "What the weights encode (first-layer templates as 8x8 images), when averaging in weight space "
                     "matches averaging features or outputs, and how stable predictions are when weights are scaled.",
            "figures": [{"file": "why_weights.png", "caption": "First-layer weights seen as 8x8 digit templates, per "
                         "class direction and per unit, for two fine-tunes and their average, with per-layer norms and "
                         "effective ranks below."},
                        {"file": "why_spaces.png", "caption": space_reading},
                        {"file": "why_scaling.png", "caption": scaling_reading}]}


def _scaling_reading(res: dict) -> str:
    """Say what the numbers show: is the average's norm smaller, and its response to scaling flatter?"""
    norms = res["norms"]
    kl_at_max = {name: res["global"][name]["kl"][-1] for name in res["names"]}
    members = [n for n in res["names"] if n != "average"]
    text = "Weight norms: " + ", ".join(f"{k} {v:.2f}" for k, v in norms.items()) + ". "
    if "average" not in norms:
        return text
    smaller = norms["average"] < min(norms[m] for m in members) - 1e-6
    flatter = kl_at_max["average"] < min(kl_at_max[m] for m in members)
    text += ("The average has a smaller norm than its members" if smaller else
             "The average's norm is no smaller than its members' (they are too close for averaging to shrink it)")
    text += (f"; its predictions move less under scaling (KL at x{res['factors'][-1]}: "
             + ", ".join(f"{k} {v:.3g}" for k, v in kl_at_max.items()) + ")"
             + (": averaging acts as a regularizer." if flatter else ": no flatter response here."))
    return text


SECTION_BUILDERS = {
    "convexity": convexity_section,
    "connectivity": connectivity_section,
    "determinism": determinism_section,
    "directedness": directedness_section,
    "merging": merging_section,
    "why": why_section,
}


TITLES = {"convexity": "1. Mode convexity", "connectivity": "2. Connectivity", "determinism": "3. Determinism",
          "directedness": "4. Directedness", "merging": "6. Merging outcome", "why": "7. Why weight averaging works"}


def skipped_section(stage: str, res: dict) -> dict:
    """A stage that could not run on these inputs says why, instead of silently vanishing."""
    return {"id": stage, "title": f"{TITLES[stage]}: not measured", "intro": res["skipped"]}


def summary_lines(results: dict) -> list[str]:
    """Plain-language answers drawn from the numbers: which merge to use for which models, and why."""
    lines = []
    conv = results.get("convexity", {})
    if conv.get("same_basin") and conv.get("independent"):
        same = conv["paths"][conv["same_basin"]]["barrier_loss"]
        indep = conv["paths"][conv["independent"]]["barrier_loss"]
        lines.append(f"Models fine-tuned from one parent share a basin (loss barrier {same:.3f} vs {indep:.3f} for "
                     f"independent seeds): for them, weight averaging (linear, task arithmetic, TIES) is the cheap "
                     f"and accurate choice.")
    conn = results.get("connectivity", {})
    if "matrices" in conn:
        means = {k: _mean_off_diagonal(m["barrier_loss"]) for k, m in conn["matrices"].items()}
        best = min(means, key=means.get)
        lines.append(f"Independently trained models are separated by barriers (mean {means['naive']:.3f}) that "
                     f"{best} cuts to {means[best]:.3f}: align neurons before averaging them, or ensemble.")
    det = results.get("determinism", {})
    if "ks" in det:
        stable = [k for k, b in zip(det["ks"], det["barrier_loss"]) if b < 0.05]
        if stable and stable[0] == 0:
            lines.append("Runs from the same initialization already end in one basin whatever the data order "
                         "(barrier < 0.05 when spawned at epoch 0): a shared start is enough to make them mergeable.")
        elif stable:
            lines.append(f"Runs sharing at least {stable[0]} epoch(s) of training end in one basin (barrier < 0.05): "
                         f"shared early training is what makes later runs mergeable.")
        else:
            lines.append(f"Runs spawned as late as epoch {det['ks'][-1]} still diverge into different basins.")
    dirn = results.get("directedness", {})
    if "chosen_test" in dirn:
        lines.append(f"Task vectors of label-subset fine-tunes add up (task arithmetic at lambda "
                     f"{dirn['chosen_scale']:g}: " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in dirn["chosen_test"].items())
                     + "): merging fine-tunes for different tasks works by adding their directions.")
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
