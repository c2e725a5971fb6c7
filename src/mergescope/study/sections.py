"""Turn saved stage results into report sections: figures (drawn from the JSON) and plain readings.

Every stage result holds ``replicates`` (one dict per replicate). Numbers are shown as the mean
with a 95% interval over replicates, and every sentence that compares two conditions comes from a
paired ``stats.compare``: "A beats B" only when the interval of the difference excludes 0, else
"tie within noise". Selections (best merge, best member) are made on the validation split; test
is only reported.
"""

from __future__ import annotations

from pathlib import Path

from ..report import figures as F
from .stats import compare, interval

DESIGN = "Replicates are independent training runs with disjoint seeds; intervals are 95% Student-t intervals."


def _reps(res: dict) -> list[dict]:
    return res["replicates"]


def _iv(values, digits: int = 3, scale: float = 1.0) -> str:
    return interval(values).text(digits, scale)


def _mean_off_diagonal(m) -> float:
    k = len(m)
    return sum(m[i][j] for i in range(k) for j in range(k) if i != j) / (k * (k - 1))


def _pts(values) -> list[float]:
    return [100 * v for v in values]


def _section(stage: str, title: str, intro: str, figures: list[dict], rows: list[dict] | None = None,
             columns: list[str] | None = None) -> dict:
    """A report section: id, title, intro (with the replicate design), figures and an optional table."""
    section = {"id": stage, "title": title, "intro": f"{intro} {DESIGN}", "figures": figures}
    if rows:
        section["tables"] = [{"columns": columns or list(rows[0]), "rows": rows}]
    return section


# ----------------------------------------------------------------------------- 1. mode convexity

def convexity_section(res: dict, fig_dir: Path) -> dict:
    reps = _reps(res)
    labels = list(reps[0]["paths"])
    paths = {label: [r["paths"][label] for r in reps] for label in labels}
    F.band_paths_figure(paths, fig_dir / "convexity.png", "Mode convexity: linear interpolation between two models")
    barrier = {label: [p["barrier_loss"] for p in ps] for label, ps in paths.items()}
    acc = {label: [p["barrier_acc"] for p in ps] for label, ps in paths.items()}
    reading = "Test loss barrier (mean ± 95% interval over replicates): " + "; ".join(
        f"{label} {_iv(barrier[label])} ({_iv(acc[label], 1, 100)} accuracy points)" for label in labels) + "."
    if res.get("same_basin") in barrier and res.get("independent") in barrier:
        c = compare("fine-tunes of one parent", barrier[res["same_basin"]], "independent seeds",
                    barrier[res["independent"]], higher_is_better=False)
        reading += " " + _cap(c.sentence("the loss barrier (lower is better)")) + "."
    rows = [{"pair": label, "replicates": len(paths[label]), "test loss barrier": _iv(barrier[label]),
             "test accuracy barrier (pts)": _iv(acc[label], 2, 100),
             "train loss barrier": _iv([p["train_barrier_loss"] for p in paths[label]]),
             "loss barrier, BN statistics interpolated": _iv([p["naive_barrier_loss"] for p in paths[label]])
             if paths[label][0]["naive_barrier_loss"] is not None else "-"} for label in labels]
    return _section("convexity", "Mode convexity: is there a low-loss straight line?",
                    "Loss and accuracy on the test split along theta(t) = (1-t) A + t B. The barrier is the largest "
                    "rise above the straight line between the endpoint values; BatchNorm statistics are recomputed "
                    "at every point (the barrier with interpolated statistics is listed too).",
                    [{"file": "convexity.png", "caption": reading}], rows)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ----------------------------------------------------------------------------- 2. connectivity

PATH_KINDS = (("line", "straight line"), ("weight matching", "line after weight matching"),
              ("activation matching", "line after activation matching"), ("curve", "Bezier curve"),
              ("aligned curve", "Bezier curve after activation matching"))


def connectivity_section(res: dict, fig_dir: Path) -> dict:
    reps = _reps(res)
    archs = list(reps[0]["pairs"])
    values = {split: {arch: {label: [r["pairs"][arch][key][field] for r in reps]
                             for key, label in PATH_KINDS if key in reps[0]["pairs"][arch]}
                      for arch in archs}
              for split, field in (("test", "barrier_loss"), ("train", "train_barrier_loss"))}
    F.barrier_bars_figure({}, fig_dir / "connectivity_curves.png",
                          "Connectivity: barriers of lines and fitted curves, before and after alignment",
                          "loss barrier", panels={f"{split} split": data for split, data in values.items()})
    readings = [_alignment_reading(arch, values["test"][arch]) for arch in archs]
    curve_readings = [_curve_reading(arch, values["test"][arch], values["train"][arch]) for arch in archs
                      if "Bezier curve" in values["test"][arch]]
    matrices = reps[0]["matrices"]
    F.heatmaps_figure(matrices, fig_dir / "connectivity_matrix.png", "barrier_loss",
                      "Pairwise loss barriers between independent MLP seeds (replicate 1): naive vs aligned")
    means = {name: [_mean_off_diagonal(r["matrices"][name]["barrier_loss"]) for r in reps] for name in matrices}
    matrix_reading = ("Mean pairwise loss barrier among the independent MLPs: " + ", ".join(
        f"{name} {_iv(v)}" for name, v in means.items()) + ". " + _cap(compare(
            "weight matching", means["weight matching"], "no alignment", means["naive"],
            higher_is_better=False).sentence("the mean barrier")) + ".")
    rows = [{"architecture": arch, "path": label, "replicates": len(v),
             "test loss barrier": _iv(v), "train loss barrier": _iv(values["train"][arch][label])}
            for arch in archs for label, v in values["test"][arch].items()]
    return _section("connectivity", "Connectivity: are minima joined by low-loss paths?",
                    "For pairs of independently trained models: the straight line, the line after aligning B's "
                    "hidden units to A (weight or activation matching; BatchNorm statistics recomputed, which is "
                    "REPAIR's correction for BN models), and a quadratic Bezier curve fitted between them without "
                    "and with activation matching (Garipov et al. 2018; Tatro et al. 2020), each on test and train.",
                    [{"file": "connectivity_curves.png", "caption": " ".join(readings + curve_readings)},
                     {"file": "connectivity_matrix.png", "caption": matrix_reading}], rows)


def _best_alignment(test: dict) -> str:
    aligned = [k for k in test if k.startswith("line after")]
    return min(aligned, key=lambda k: interval(test[k]).mean)


def _alignment_reading(arch: str, test: dict) -> str:
    best = _best_alignment(test)
    c = compare(best, test[best], "the straight line", test["straight line"], higher_is_better=False)
    return (f"{arch}: straight line {_iv(test['straight line'])}, {best} {_iv(test[best])}; "
            + c.sentence("the test loss barrier") + ".")


def _curve_reading(arch: str, test: dict, train: dict) -> str:
    """Tatro et al.'s claim, checked: is the curve fitted after alignment lower than the one without?"""
    parts = []
    for split, data in (("test", test), ("train", train)):
        c = compare("the aligned curve", data["Bezier curve after activation matching"], "the unaligned curve",
                    data["Bezier curve"], higher_is_better=False)
        parts.append(c.sentence(f"the {split} barrier"))
    line = compare("the aligned curve", test["Bezier curve after activation matching"], "the aligned line",
                   test["line after activation matching"], higher_is_better=False)
    return f"{arch} curves: " + "; ".join(parts) + "; " + line.sentence("the test barrier") + "."


# ----------------------------------------------------------------------------- 3. determinism

def _settings(reps: list[dict]) -> dict[str, list[dict]]:
    """{setting: its runs}: a setting may have fewer replicates than another (the cheap, flat ones)."""
    labels = dict.fromkeys(label for r in reps for label in r["settings"])
    return {label: [r["settings"][label] for r in reps if label in r["settings"]] for label in labels}


def determinism_section(res: dict, fig_dir: Path) -> dict:
    reps = _reps(res)
    settings = _settings(reps)
    F.stability_figure(settings, fig_dir / "determinism.png")
    readings, rows = [], []
    for label, runs in settings.items():
        ks = runs[0]["ks"]
        per_k = [[run["barrier_loss"][i] for run in runs] for i in range(len(ks))]
        first, last = interval(per_k[0]), interval(per_k[-1])
        shows = "clearly above 0" if first.excludes_zero() and first.mean > 0 else "not distinguishable from 0"
        fall = compare(f"the barrier at k={ks[0]}", per_k[0], f"the barrier at k={ks[-1]}", per_k[-1])
        falls = ("and it falls as shared training grows: " + fall.sentence("", verb="exceeds")
                 if fall.winner == fall.a else "; " + fall.sentence("", verb="exceeds"))
        example = 100 / runs[0]["test_examples"] if runs[0].get("test_examples") else None
        readings.append(f"{label}: children spawned at k={ks[0]} are separated by a test loss barrier of "
                        f"{first.text()} ({shows}), at k={ks[-1]} by {last.text()} {falls}."
                        + (f" One test example is {example:.2f} accuracy points." if example else ""))
        for i, k in enumerate(ks):
            rows.append({"setting": label, "spawn epoch k": k, "replicates": len(runs),
                         "test loss barrier": _iv(per_k[i]),
                         "test accuracy barrier (pts)": _iv([run["barrier_acc"][i] for run in runs], 2, 100),
                         "child accuracy (%)": _iv([a for run in runs for a in run["child_accuracy"][i]], 1, 100)})
    return _section("determinism", "Determinism: when does a run commit to its basin?",
                    "Instability analysis (Frankle et al. 2020): train a parent for k epochs, copy it, train both "
                    "copies to the end with different data orders, and measure the barrier between them. An "
                    "accuracy barrier smaller than one test example (100/N points) is noise.",
                    [{"file": "determinism.png", "caption": " ".join(readings)}], rows)


# ----------------------------------------------------------------------------- 4. directedness

def directedness_section(res: dict, fig_dir: Path) -> dict:
    reps = _reps(res)
    F.task_vector_figure(reps, fig_dir / "directedness.png")
    names = reps[0]["names"]
    pairs = [(i, j) for i in range(len(names)) for j in range(len(names)) if i < j]
    cos = [r["cosine"][i][j] for r in reps for i, j in pairs]
    lambdas = ", ".join(f"{r['chosen_scale']:g}" for r in reps)
    reading = (f"Cosine between the task vectors (fine-tune minus parent): {_iv(cos, 2)} over {len(reps)} "
               f"replicate(s). Adding them (lambda chosen on validation: {lambdas}): ")
    per_task = []
    for n in names:
        arith, ft, base = ([r[k][n] for r in reps] for k in ("chosen_test", "individual_test", "base_test"))
        vs_ft = compare("task arithmetic", arith, f"the fine-tune for {n}", ft)
        vs_base = compare("task arithmetic", arith, "the parent", base)
        per_task.append(f"on {n}, {_iv(arith, 1, 100)}% vs fine-tune {_iv(ft, 1, 100)}% and parent "
                        f"{_iv(base, 1, 100)}% ({vs_ft.sentence('test accuracy', 1, 100, ' pts')}; "
                        f"{vs_base.sentence('test accuracy', 1, 100, ' pts')})")
    reading += "; ".join(per_task) + "."
    if reps[0]["negation"]:
        reading += " Subtracting a task vector: " + "; ".join(
            f"{n}: {_iv([r['negation'][n]['chosen_target_test'] for r in reps], 1, 100)}% on it, "
            f"{_iv([r['negation'][n]['chosen_control_test'] for r in reps], 1, 100)}% on the rest"
            for n in reps[0]["negation"]) + "."
    rows = [{"task": n, "replicates": len(reps), "parent (%)": _iv([r["base_test"][n] for r in reps], 1, 100),
             "fine-tune (%)": _iv([r["individual_test"][n] for r in reps], 1, 100),
             "task arithmetic (%)": _iv([r["chosen_test"][n] for r in reps], 1, 100),
             "norm of tau": _iv([r["norms"][i] for r in reps], 2)} for i, n in enumerate(names)]
    return _section("directedness", "Directedness: do task-specific directions exist?",
                    "Fine-tune the parent on disjoint label subsets; the task vectors tau = theta_ft - theta_parent "
                    "are added (task arithmetic) or subtracted (negation) with a scale chosen on the validation "
                    "split, and reported on test.", [{"file": "directedness.png", "caption": reading}], rows)


# ----------------------------------------------------------------------------- 5. merging outcome

def aggregate_rows(reps: list[dict]) -> list[dict]:
    """One row per (models, method) with every replicate's values, in first-seen order."""
    merged: dict = {}
    for rep in reps:
        for r in rep["rows"]:
            key = (r["models"], r["method"])
            row = merged.setdefault(key, {"models": r["models"], "family": r["family"], "method": r["method"],
                                          "accuracy": [], "loss": [], "val_accuracy": [], "seconds": []})
            for k in ("accuracy", "loss", "val_accuracy", "seconds"):
                row[k].append(r.get(k))
    return list(merged.values())


def group_verdicts(reps: list[dict], group: str) -> dict:
    """For one set of models: the best merge and ensemble chosen on validation, the best member chosen on
    validation per replicate, and the paired comparisons between them on test."""
    rows = [r for r in aggregate_rows(reps) if r["models"] == group]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    merges = [r for r in rows if r["family"] in ("weight aggregation", "neuron alignment")]
    ensembles = [r for r in rows if r["family"] == "ensembling"]
    best_merge = max(merges, key=lambda r: mean(r["val_accuracy"]))
    best_ensemble = max(ensembles, key=lambda r: mean(r["val_accuracy"]))
    singles = [[r for r in rep["rows"] if r["models"] == group and r["family"] == "single model"] for rep in reps]
    best_member = [max(s, key=lambda r: r["val_accuracy"])["accuracy"] for s in singles]
    naive = next(r for r in merges if r["method"].startswith("linear"))
    return {"rows": rows, "best_merge": best_merge, "best_ensemble": best_ensemble, "best_member": best_member,
            "members": len(singles[0]), "naive": naive,
            "merge_vs_member": compare(best_merge["method"], best_merge["accuracy"], "the best member",
                                       best_member),
            "merge_vs_ensemble": compare(best_merge["method"], best_merge["accuracy"], best_ensemble["method"],
                                         best_ensemble["accuracy"]),
            "naive_vs_member": compare("the naive average", naive["accuracy"], "the best member", best_member),
            "ensemble_vs_member": compare(best_ensemble["method"], best_ensemble["accuracy"], "the best member",
                                          best_member)}


def merging_section(res: dict, fig_dir: Path) -> dict:
    reps = _reps(res)
    rows = aggregate_rows(reps)
    F.merge_table_figure(rows, fig_dir / "merging.png")
    readings, table_rows = [], []
    for group in dict.fromkeys(r["models"] for r in rows):
        v = group_verdicts(reps, group)
        readings.append(_merge_reading(group, v))
        for r in v["rows"]:
            vote = r["method"] == "ensemble (vote)"
            table_rows.append({
                "models": group, "family": r["family"], "method": r["method"], "replicates": len(r["accuracy"]),
                "val accuracy (%)": _iv(r["val_accuracy"], 2, 100), "test accuracy (%)": _iv(r["accuracy"], 2, 100),
                "test loss": "n/a (votes)" if vote else _iv(r["loss"]),
                "seconds": "-" if r["seconds"][0] is None else f"{sum(r['seconds']) / len(r['seconds']):.3f}",
                "_best": r is v["best_merge"] or r is v["best_ensemble"]})
    columns = ["models", "family", "method", "replicates", "val accuracy (%)", "test accuracy (%)", "test loss",
               "seconds"]
    if all("backdoor" in rep for rep in reps):  # the optional column (config.backdoor): absent by default
        rows, reading = backdoor_rows([rep["backdoor"] for rep in reps])
        table_rows += rows
        readings.append(reading)
        columns.append(BACKDOOR_COLUMN)
    return _section("merging", "Merging outcome: every method on the same models",
                    "Test accuracy of each merge (one model) and each output ensemble (N models' inference cost), "
                    "next to the members. The best merge and the best ensemble of each set are chosen on the "
                    "validation split (highlighted) and compared on test with the best single member, itself "
                    "chosen on validation. A vote ensemble has no meaningful loss (its likelihood is clipped), so "
                    "none is shown.", [{"file": "merging.png", "caption": " ".join(readings)}], table_rows, columns)


BACKDOOR_COLUMN = "attack success (%)"


def backdoor_rows(reps: list[dict]) -> tuple[list[dict], str]:
    """Table rows (members, then merges) of the backdoor column and one reading, from each replicate's
    ``analysis.backdoor.PersistenceResult.to_dict()``: clean test accuracy and ASR with intervals."""
    first, n = reps[0], len(reps)
    rows = []
    for family, kind in (("single model", "members"), ("weight aggregation", "merges")):
        for name in [n for n in first[kind] if all(n in rep[kind] for rep in reps)]:
            values = [rep[kind][name] for rep in reps]
            rows.append({"models": first["models"], "family": family, "method": name, "replicates": n,
                         "val accuracy (%)": "-", "test accuracy (%)": _iv([v["accuracy"] for v in values], 2, 100),
                         "test loss": "-", "seconds": "-", BACKDOOR_COLUMN: _iv([v["asr"] for v in values], 1, 100)})
    asr = {r["method"]: r[BACKDOOR_COLUMN] for r in rows}
    merged = ", ".join(f"{r['method']} {r[BACKDOOR_COLUMN]}%" for r in rows if r["family"] != "single model")
    reading = (f"Backdoor (trigger {first['trigger']['kind']}, target label {first['target']}): the poisoned "
               f"fine-tune's attack success rate is {asr['poisoned fine-tune']}% on test digits of other labels; "
               f"after merging with the clean fine-tunes: {merged}.")
    return rows, reading


def merge_advice(group: str, v: dict) -> str:
    """One recommendation per set of models, from the paired verdicts only."""
    m, e, n = v["best_merge"], v["best_ensemble"], v["members"]
    merge_wins = v["merge_vs_member"].winner == m["method"]
    member_wins = v["merge_vs_member"].winner == "the best member"
    ensemble_wins = v["ensemble_vs_member"].winner == e["method"]
    if merge_wins:
        advice = f"merge with {m['method']}: it beats the best single member"
    elif member_wins:
        advice = f"do not merge: the best merge ({m['method']}) loses to simply keeping the best member"
    else:
        advice = (f"{m['method']} (best merge on validation) and the best member tie within noise: no measurable "
                  "gain or loss from merging")
    if ensemble_wins:
        advice += f"; the {n}-model {e['method']} beats the best member, at {n}x the inference cost"
    else:
        advice += f"; the {n}-model {e['method']} shows no measurable gain over the best member either"
    return (f"{group}: {advice} (test accuracy: merge {_iv(m['accuracy'], 1, 100)}%, best member "
            f"{_iv(v['best_member'], 1, 100)}%, ensemble {_iv(e['accuracy'], 1, 100)}%; n={len(v['best_member'])}).")


def _merge_reading(group: str, v: dict) -> str:
    m, e = v["best_merge"], v["best_ensemble"]
    return (f"{group}: the best merge on validation is {m['method']} ({_iv(m['accuracy'], 1, 100)}% test), the best "
            f"member {_iv(v['best_member'], 1, 100)}%, {e['method']} {_iv(e['accuracy'], 1, 100)}% at {v['members']}x "
            f"the inference cost; {v['merge_vs_member'].sentence('test accuracy', 1, 100, ' pts')}; "
            f"{v['merge_vs_ensemble'].sentence('test accuracy', 1, 100, ' pts')}.")


# ----------------------------------------------------------------------------- 6. why

def why_section(res: dict, fig_dir: Path) -> dict:
    from ..analysis import scaling, spaces

    reps = _reps(res)
    figures = []
    if reps[0].get("weights"):
        F.templates_figure(reps[0]["weights"], fig_dir / "why_weights.png",
                           "What the weights encode: class directions of each model and of the average (replicate 1)")
        figures.append({"file": "why_weights.png", "caption": _weights_reading(reps[0]["weights"])})
    spaces.plot(reps[0]["spaces"], fig_dir / "why_spaces.png")
    figures.append({"file": "why_spaces.png", "caption": _spaces_reading(reps)})
    labels = list(reps[0]["scaling"])
    scaling.plot(reps[0]["scaling"][labels[0]], fig_dir / "why_scaling.png")
    figures.append({"file": "why_scaling.png", "caption": f"Drawn: {labels[0]} (replicate 1). " + " ".join(
        f"{label}: " + _scaling_reading([r["scaling"][label] for r in reps]) for label in labels)})
    return _section("why", "Why weight averaging works (Rethink-Merge analyses)",
                    "What the weights encode (class directions drawn as images of the input), when averaging in "
                    "weight space matches averaging features or outputs, and how stable predictions are when "
                    "weights are scaled.", figures)


def _weights_reading(pairs: dict) -> str:
    """How far each average's first layer lies from its members (relative distance), per pair."""
    parts = []
    for label, result in pairs.items():
        members = [n for n in result["names"] if n != "average"]
        first = list(result["stats"][members[0]])[0]
        dist = ", ".join(f"{result['stats'][n][first]['distance_to_average']:.2f}" for n in members)
        parts.append(f"{label}: {dist}")
    return ("Rows: each model of a pair, then their weight average, on one colour scale. Relative distance of "
            "each member's first layer to the average: " + "; ".join(parts) + ". A large distance means the "
            "average's directions are a blur of its members'.")


def _spaces_reading(reps: list[dict]) -> str:
    fams = reps[0]["spaces"]["families"]
    k = reps[0]["spaces"]["sizes"][-1]
    parts = []
    for name in fams:
        w = [r["spaces"]["families"][name]["weight_average"][-1] for r in reps]
        p = [r["spaces"]["families"][name]["probs"][-1] for r in reps]
        parts.append(f"{name}: weight average {_iv(w, 1, 100)}% vs output average {_iv(p, 1, 100)}% "
                     f"({compare('the weight average', w, 'the output average', p).sentence('accuracy', 1, 100, ' pts')})")
    return f"At {k} models (drawn: replicate 1): " + "; ".join(parts) + "."


def _scaling_reading(reps: list[dict]) -> str:
    """Say only what the replicates support: is the average's norm smaller, its response to scaling flatter?"""
    members = [n for n in reps[0]["names"] if n != "average"]
    if "average" not in reps[0]["norms"]:
        return ""
    norm_avg = [r["norms"]["average"] for r in reps]
    norm_members = [min(r["norms"][m] for m in members) for r in reps]
    kl_avg = [r["global"]["average"]["kl"][-1] for r in reps]
    kl_members = [min(r["global"][m]["kl"][-1] for m in members) for r in reps]
    factor = reps[0]["factors"][-1]
    return (f"Norm of the average {_iv(norm_avg, 2)} vs the smaller member's {_iv(norm_members, 2)}: "
            + compare("the average", norm_avg, "the smaller member", norm_members, higher_is_better=False
                      ).sentence("the weight norm (smaller first)", 2)
            + f". KL of predictions after scaling by x{factor:g}: average {_iv(kl_avg, 3)}, most stable member "
            f"{_iv(kl_members, 3)}: "
            + compare("the average", kl_avg, "the most stable member", kl_members, higher_is_better=False
                      ).sentence("the change in predictions (smaller first)", 3) + ".")


SECTION_BUILDERS = {
    "convexity": convexity_section,
    "connectivity": connectivity_section,
    "determinism": determinism_section,
    "directedness": directedness_section,
    "merging": merging_section,
    "why": why_section,
}


TITLES = {"convexity": "Mode convexity", "connectivity": "Connectivity", "determinism": "Determinism",
          "directedness": "Directedness", "merging": "Merging outcome", "why": "Why weight averaging works"}


def skipped_section(stage: str, res: dict) -> dict:
    """A stage that could not run on these inputs says why, instead of silently vanishing."""
    return {"id": stage, "title": f"{TITLES[stage]}: not measured", "intro": res["skipped"]}


def number_sections(sections: list[dict]) -> list[dict]:
    """Number the sections 1..N in the order shown (skipped ones included)."""
    return [{**s, "title": f"{i}. {s['title']}"} for i, s in enumerate(sections, 1)]


# ----------------------------------------------------------------------------- summary

def summary_lines(results: dict) -> list[str]:
    """Plain-language answers drawn from the verdicts: which merge to use for which models (first),
    then the evidence, one stage at a time."""
    evidence = []
    for stage, lines in (("convexity", _convexity_summary), ("connectivity", _connectivity_summary),
                         ("determinism", _determinism_summary), ("directedness", _directedness_summary)):
        if "replicates" in results.get(stage, {}):
            evidence += lines(results[stage]["replicates"])
    merge = results.get("merging", {})
    advice = []
    if "replicates" in merge:
        reps = merge["replicates"]
        advice = [merge_advice(group, group_verdicts(reps, group))
                  for group in dict.fromkeys(r["models"] for r in reps[0]["rows"])]
    return advice + evidence


def _convexity_summary(reps: list[dict]) -> list[str]:
    if not reps[0].get("same_basin"):
        return []
    same = [r["paths"][r["same_basin"]]["barrier_loss"] for r in reps]
    indep = [r["paths"][r["independent"]]["barrier_loss"] for r in reps]
    c = compare("fine-tunes of one parent", same, "independent seeds", indep, higher_is_better=False)
    return [f"Loss barrier between two MLP fine-tunes of one parent {_iv(same)} vs two independent seeds "
            f"{_iv(indep)}: " + c.sentence("the barrier") + "."]


def _connectivity_summary(reps: list[dict]) -> list[str]:
    lines = []
    for arch in reps[0]["pairs"]:
        test = {label: [r["pairs"][arch][key]["barrier_loss"] for r in reps]
                for key, label in PATH_KINDS if key in reps[0]["pairs"][arch]}
        lines.append(_alignment_reading(arch, test))
        if "Bezier curve" in test:
            c = compare("the curve fitted after alignment", test["Bezier curve after activation matching"],
                        "the curve without", test["Bezier curve"], higher_is_better=False)
            claim = "as Tatro et al. report" if c.winner == c.a else "unlike Tatro et al.'s finding that it is lower"
            lines.append(f"{arch}: {c.sentence('the test barrier')} ({claim}).")
    return lines


def _determinism_summary(reps: list[dict]) -> list[str]:
    lines = []
    for label, runs in _settings(reps).items():
        ks = runs[0]["ks"]
        first = interval([run["barrier_loss"][0] for run in runs])
        fall = compare(f"the barrier at k={ks[0]}", [run["barrier_loss"][0] for run in runs],
                       f"the barrier at k={ks[-1]}", [run["barrier_loss"][-1] for run in runs])
        shows = first.excludes_zero() and first.mean > 0
        if shows and fall.winner == fall.a:
            lines.append(f"{label}: runs from one initialization end in different basins (barrier "
                         f"{first.text()} when split at k={ks[0]}), and shared training removes it "
                         f"({fall.sentence('', verb='exceeds')}).")
        else:
            lines.append(f"{label}: the barrier at k={ks[0]} is {first.text()}; "
                         + ("it is clearly above 0 but " if shows else "")
                         + f"{fall.sentence('', verb='exceeds')}: no effect of shared training is shown here.")
    return lines


def _directedness_summary(reps: list[dict]) -> list[str]:
    lines = []
    for n in reps[0]["names"]:
        arith = [r["chosen_test"][n] for r in reps]
        base = [r["base_test"][n] for r in reps]
        c = compare("task arithmetic", arith, "the parent", base)
        lines.append(f"Task arithmetic on {n}: {_iv(arith, 1, 100)}% vs the parent's {_iv(base, 1, 100)}% "
                     f"({c.sentence('test accuracy', 1, 100, ' pts')}).")
    return lines
