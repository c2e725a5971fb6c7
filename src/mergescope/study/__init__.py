"""The main job: the four-characteristics study on the embedded default (digits + zoo).

``run_study(out, config)`` trains (or reuses) the model family, runs each stage, saves
``results.json``, draws ``figures/*.png`` from those results and writes ``report.html``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from .._version import __version__
from ..results import write_json
from .config import STAGES, StudyConfig
from .family import Family
from .sections import SECTION_BUILDERS, number_sections, skipped_section, summary_lines
from .stages import STAGE_FUNCTIONS, STAGE_RECIPES, Context

__all__ = ["STAGES", "StudyConfig", "run_custom_study", "run_study", "write_report"]


def run_study(out: str | os.PathLike = "study", config: StudyConfig | None = None,
              on_stage: Callable[[str, int, int], None] | None = None,
              tick: Callable[[str], None] = lambda message: None) -> dict:
    """Run every configured stage on every replicate; returns the results dict also saved as results.json.

    Replicates are independent (disjoint seeds), so they run in parallel processes, each with one
    torch thread; every (stage, replicate) result is cached under ``out/cache`` and reused only for
    the same config, stage, replicate and mergescope version. ``results[stage]["replicates"]`` keeps
    every replicate's values, in replicate order, whatever process computed them.
    """
    config = config or StudyConfig()
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    stages = [s for s in config.stages if s in STAGE_FUNCTIONS]
    start = time.perf_counter()
    units = [(r, name) for name in stages for r in range(config.stage_replicates(name))]
    done, training = _run_units(config, out, units, on_stage, tick)
    reps = {name: range(config.stage_replicates(name)) for name in stages}
    results: dict = {"config": config.to_dict(), "mergescope_version": __version__, "replicates": config.replicates,
                     "timings": {"training": training["seconds"],
                                 **{name: sum(done[r]["timings"][name] for r in reps[name]) for name in stages}}}
    for name in stages:
        results[name] = {"replicates": [done[r][name] for r in reps[name]]}
    results["models"] = {"trained": training["trained"], "reused": training["reused"],
                         "stages_reused": [s for s in stages if all(s in done[r]["stages_reused"] for r in reps[s])]}
    results["wall_seconds"] = time.perf_counter() - start
    write_json(out / "results.json", results)
    write_report(out)
    return results


# Rough relative cost of each stage, so the longest units start first and both cores finish together.
STAGE_COST = {"connectivity": 5, "convexity": 4, "determinism": 4, "merging": 3, "why": 1, "directedness": 1}


def _run_units(config: StudyConfig, out: Path, units: list[tuple[int, str]], on_stage, tick):
    """Every (stage, replicate) result, computed in units that keep every core busy.

    First every model the uncached units need is trained (parents, then the rest: one unit per
    model), then every uncached (stage, replicate) runs as its own unit, longest first. Units
    run in worker processes (one torch thread each); cached results load inline, so a warm
    rerun starts no process. Returns ({replicate: {stage: result, "timings", "stages_reused"}},
    {"seconds", "trained", "reused"}).
    """
    done, todo = _load_cached(config, out, units)
    phases = _phases(config, out, todo)
    training = {"seconds": 0.0, "trained": 0, "reused": 0}
    total, finished = len(todo), [0]

    def report(message: str) -> None:
        if message.startswith("stage ") and on_stage is not None:
            on_stage(message.removeprefix("stage "), finished[0], total)
            finished[0] += 1
        tick(message)

    def collect(kind: str, key, value) -> None:
        if kind == "train":
            for k in training:
                training[k] += value[k]
        else:
            r, name = key
            done[r][name], done[r]["timings"][name] = value["result"], value["seconds"]

    workers = min(config.workers or min(2, os.cpu_count() or 1), max(len(phases[1]), len(todo), 1))
    if workers <= 1 or len(todo) <= 1:
        for phase in phases:
            for kind, key, args in phase:
                collect(kind, key, UNIT_FUNCTIONS[kind](*args, report=report))
    else:
        _run_in_pool(phases, workers, report, collect)
    return done, training


def _load_cached(config: StudyConfig, out: Path, units: list[tuple[int, str]]):
    """(done, todo): the cached (stage, replicate) results loaded, and the units still to compute."""
    done = {r: {"timings": {}, "stages_reused": []} for r, _ in units}
    todo = []
    for r, name in units:
        cached = _read_json(_cache_path(out, config, name, r))
        if cached is None:
            todo.append((r, name))
        else:
            done[r][name], done[r]["timings"][name] = cached, 0.0
            done[r]["stages_reused"].append(name)
    todo.sort(key=lambda unit: -STAGE_COST.get(unit[1], 1))
    return done, todo


def _phases(config: StudyConfig, out: Path, todo: list[tuple[int, str]]) -> list[list[tuple]]:
    """Three phases of (kind, key, args) units: train parents, train the other models, run the stages."""
    recipes = _needed_recipes(config, todo)
    parents = list({p.key: p for p in (r.parent for r in recipes.values() if r.parent is not None)}.values())
    others = [r for key, r in recipes.items() if key not in {p.key for p in parents}]
    return [[("train", p.key, (config, out, p)) for p in parents],
            [("train", r.key, (config, out, r)) for r in others],
            [("stage", unit, (config, out, *unit)) for unit in todo]]


def _run_in_pool(phases: list[list[tuple]], workers: int, report, collect) -> None:
    """Run each phase's units on a spawn-context process pool, relaying progress messages."""
    import multiprocessing
    import queue as queue_module
    from concurrent.futures import ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # forking a process that has run torch can deadlock
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        messages = manager.Queue()
        for phase in phases:
            futures = {pool.submit(UNIT_FUNCTIONS[kind], *args, report=messages.put): (kind, key)
                       for kind, key, args in phase}
            pending = set(futures)
            while pending:
                finished_now, pending = wait(pending, timeout=0.2)
                while True:
                    try:
                        report(messages.get_nowait())
                    except queue_module.Empty:
                        break
                for f in finished_now:
                    collect(*futures[f], f.result())


def _needed_recipes(config: StudyConfig, todo: list[tuple[int, str]]) -> dict:
    """{key: recipe} of every model the (replicate, stage) units will read, deduplicated."""
    needed = {}
    for r, name in todo:
        for recipe in STAGE_RECIPES[name](Context(config, None, r)):
            needed[recipe.key] = recipe
    return needed


def _one_thread(fn):
    """Run ``fn`` with one torch thread (small models: fastest, and bit-identical across machines)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def train_unit(config: StudyConfig, out: Path, recipe, report: Callable[[str], None] = lambda m: None) -> dict:
    """Train (or find cached) one model of the family."""
    family = Family(out / "checkpoints")
    start = time.perf_counter()
    _one_thread(lambda: family.state(recipe))
    report(f"model {recipe.model} seed {recipe.seed}")
    return {"seconds": time.perf_counter() - start, "trained": family.trained, "reused": family.reused}


def stage_unit(config: StudyConfig, out: Path, replicate: int, name: str,
               report: Callable[[str], None] = lambda m: None) -> dict:
    """One stage on one replicate (its models are already trained), cached under ``out/cache``."""
    report(f"stage {name} (replicate {replicate + 1}/{config.stage_replicates(name)})")
    ctx = Context(config, Family(out / "checkpoints"), replicate, report)
    start = time.perf_counter()
    result = _one_thread(lambda: STAGE_FUNCTIONS[name](ctx))
    write_json(_cache_path(out, config, name, replicate), result)
    return {"result": result, "seconds": time.perf_counter() - start}


UNIT_FUNCTIONS = {"train": train_unit, "stage": stage_unit}


def _run_stages(stage_fns: dict[str, Callable[[], dict]], on_stage) -> dict:
    """Run stages in order with progress and timings: {stage: result, ..., "timings": {stage: s}}."""
    out: dict = {"timings": {}}
    for i, (name, fn) in enumerate(stage_fns.items()):
        if on_stage is not None:
            on_stage(name, i, len(stage_fns))
        start = time.perf_counter()
        out[name] = fn()
        out["timings"][name] = time.perf_counter() - start
    return out


def _cache_path(out: Path, config: StudyConfig, stage: str, replicate: int) -> Path:
    return out / "cache" / f"{stage}-r{replicate}-{_stage_key(config, stage, replicate)}.json"


def _stage_key(config: StudyConfig, stage: str, replicate: int = 0) -> str:
    """A stage's results are reused only for the same config, stage, replicate and mergescope version."""
    import hashlib

    settings = {k: v for k, v in config.to_dict().items()
                if k not in ("workers", "stages", "replicates", "determinism_replicates")}
    text = json.dumps({"config": settings, "stage": stage, "replicate": replicate, "version": __version__},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_custom_study(config_path: str | os.PathLike, out: str | os.PathLike = "study",
                     on_stage: Callable[[str, int, int], None] | None = None,
                     tick: Callable[[str], None] = lambda message: None, seed: int | None = None,
                     stages: tuple[str, ...] | None = None) -> dict:
    """The same measurements on a user's checkpoints (see ``study.custom`` for the YAML).

    ``seed`` (default: the YAML's) drives alignment and curve fitting; ``stages`` picks a subset.
    The user's checkpoints are one replicate: the report shows each figure without an interval and
    says so. Stages that cannot apply (spawning needs training; task vectors need a base) say why.
    """
    from ..io import load
    from ..tasks import get_task, make_model
    from ..tasks.checkpoints import load_state_into
    from . import measure
    from .custom import read_config

    cfg = read_config(config_path)
    seed = cfg.seed if seed is None else seed
    task = get_task(cfg.task, **cfg.task_options)
    module = make_model(cfg.model, **cfg.model_options)

    def read(path: str) -> dict:
        ckpt = load(path)
        load_state_into(module, ckpt, path)  # checks keys and shapes, one-line errors
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    named = {name: read(path) for name, path in cfg.checkpoints.items()}
    base = read(cfg.base) if cfg.base else None
    names = list(named)
    pair = {names[0]: named[names[0]], names[1]: named[names[1]]}
    group = f"your {len(named)} models"
    stage_fns = {
        "convexity": lambda: measure.paths(measure.all_pairs(module, named, task), cfg.path_points, tick),
        "connectivity": lambda: {
            "pairs": {f"{names[0]} - {names[1]}": measure.pair_connectivity(
                module, *pair.values(), task, cfg.path_points, cfg.curve_epochs, seed, tick=tick)},
            "matrices": measure.matrices(module, named, task, cfg.path_points, seed, tick)},
        "determinism": lambda: {"skipped": "spawning needs a training function; it runs on the built-in study"},
        "merging": lambda: {"rows": measure.merge_rows(module, named, task, group, base, seed, tick)
                            + measure.pair_rows(module, *pair.values(), task, f"{names[0]} + {names[1]}", seed, tick)},
        "why": lambda: measure.why(module, {f"{names[0]} + {names[1]}": pair}, {
            "your models": list(named.values()),
            "your models, aligned": measure.align_to_first(module, list(named.values()), task, "weight", seed)},
            task, tick),
        "directedness": ((lambda: _directedness(module, base, named, task)) if base is not None else
                         (lambda: {"skipped": "task vectors need a base model (give 'base:' in the config)"})),
    }
    chosen = [name for name in STAGES if stages is None or name in stages]
    ran = _run_stages({name: stage_fns[name] for name in chosen}, on_stage)
    results: dict = {"config": {**cfg.model_dump(), "seed": seed}, "mergescope_version": __version__, "replicates": 1,
                     "custom": True, "timings": ran.pop("timings"),
                     **{name: value if "skipped" in value else {"replicates": [value]} for name, value in ran.items()},
                     "models": {"trained": 0, "reused": len(named) + (base is not None), "stages_reused": []}}
    out = Path(out)
    write_json(out / "results.json", results)
    write_report(out)
    return results


def _directedness(module, base, named, task) -> dict:
    from ..landscape import task_vectors

    return task_vectors(module, base, dict(named), {name: task for name in named}).to_dict()


def write_report(out: str | os.PathLike) -> Path:
    """Draw figures and the HTML report from ``out/results.json`` alone (no recomputation)."""
    from ..report import render_report

    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    fig_dir = out / "figures"
    sections = number_sections([skipped_section(name, results[name]) if "skipped" in results[name] else
                                SECTION_BUILDERS[name](results[name], fig_dir)
                                for name in STAGES if name in results and name in SECTION_BUILDERS])
    for section in sections:
        if section.get("tables"):
            write_json(fig_dir / f"{section['id']}.json", results[section["id"]])
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in results["timings"].items())
    custom = results.get("custom", False)
    data = (f"your models ({results['config']['model']}) on {results['config']['task']}" if custom else
            "digits (scikit-learn) and MNIST-1D (generated offline), fixed seeds")
    footer = (f"mergescope {results['mergescope_version']}; {data}; {results['replicates']} replicate(s); config "
              f"{json.dumps(results['config'])}; compute per stage (all replicates): {timings}; models trained "
              f"{results['models']['trained']}, reused from cache {results['models']['reused']}.")
    title = (f"mergescope study: your {results['config']['model']} models" if custom else
             "mergescope study: digits and MNIST-1D model zoo")
    return render_report(title, summary_lines(results), sections, footer, out / "report.html", fig_dir)


def _read_json(path: Path):
    """A cached stage result, or None when absent or damaged (then it is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
