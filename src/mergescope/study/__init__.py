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
from .sections import SECTION_BUILDERS, skipped_section, summary_lines
from .stages import STAGE_FUNCTIONS, Context

__all__ = ["STAGES", "StudyConfig", "run_custom_study", "run_study", "write_report"]


def run_study(out: str | os.PathLike = "study", config: StudyConfig | None = None,
              on_stage: Callable[[str, int, int], None] | None = None,
              tick: Callable[[str], None] = lambda message: None) -> dict:
    """Run every configured stage; returns the results dict that is also saved as results.json."""
    config = config or StudyConfig()
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    family = Family(out / "checkpoints")
    ctx = Context(config, family, tick)
    stages = [s for s in config.stages if s in STAGE_FUNCTIONS]
    results: dict = {"config": config.to_dict(), "mergescope_version": __version__}
    reused_stages = []

    def cached_stage(name: str) -> Callable[[], dict]:
        def run() -> dict:
            cache = out / "cache" / f"{name}-{_stage_key(config, name)}.json"
            cached = _read_json(cache)
            if cached is not None:
                reused_stages.append(name)
                return cached
            result = STAGE_FUNCTIONS[name](ctx)
            write_json(cache, result)
            return result

        return run

    results.update(_run_stages({name: cached_stage(name) for name in stages}, on_stage))
    results["models"] = {"trained": family.trained, "reused": family.reused, "stages_reused": reused_stages}
    write_json(out / "results.json", results)
    write_report(out)
    return results


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


def _stage_key(config: StudyConfig, stage: str) -> str:
    """A stage's results are reused only for the same config, stage and mergescope version."""
    import hashlib

    text = json.dumps({"config": config.to_dict(), "stage": stage, "version": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_custom_study(config_path: str | os.PathLike, out: str | os.PathLike = "study",
                     on_stage: Callable[[str, int, int], None] | None = None,
                     tick: Callable[[str], None] = lambda message: None) -> dict:
    """The same measurements on a user's checkpoints (see ``study.custom`` for the YAML)."""
    from ..io import load
    from ..tasks import get_task, make_model
    from ..tasks.checkpoints import load_state_into
    from . import measure
    from .custom import read_config

    cfg = read_config(config_path)
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
        "convexity": lambda: measure.paths(measure.all_pairs(module, named), task, cfg.path_points, tick),
        "connectivity": lambda: measure.connectivity(module, named, task, cfg.path_points, cfg.curve_epochs, cfg.seed,
                                                     tick),
        "determinism": lambda: {"skipped": "spawning needs a training function; it runs on the built-in study"},
        "merging": lambda: {"rows": measure.merge_rows(module, named, task, group, base, cfg.seed, tick)
                            + measure.pair_rows(module, *pair.values(), task, f"{names[0]} + {names[1]}", cfg.seed, tick)},
        "why": lambda: measure.why(module, pair, {
            "your models": list(named.values()),
            "your models, aligned": measure.align_to_first(module, list(named.values()), task, "weight", cfg.seed)},
            task, tick),
    }
    if base is not None:
        stage_fns["directedness"] = lambda: _directedness(module, base, named, task)
    else:
        stage_fns["directedness"] = lambda: {"skipped": "task vectors need a base model (give 'base:' in the config)"}
    results: dict = {"config": cfg.model_dump(), "mergescope_version": __version__,
                     **_run_stages({name: stage_fns[name] for name in STAGES}, on_stage),
                     "models": {"trained": 0, "reused": len(named) + (base is not None)}}
    out = Path(out)
    write_json(out / "results.json", results)
    write_report(out)
    return results


def _directedness(module, base, named, task):
    from ..landscape import task_vectors

    return task_vectors(module, base, dict(named), {name: task for name in named}).to_dict()


def write_report(out: str | os.PathLike) -> Path:
    """Draw figures and the HTML report from ``out/results.json`` alone (no recomputation)."""
    from ..report import render_report

    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    fig_dir = out / "figures"
    sections = [skipped_section(name, results[name]) if "skipped" in results[name] else
                SECTION_BUILDERS[name](results[name], fig_dir)
                for name in STAGES if name in results and name in SECTION_BUILDERS]
    for section in sections:
        for table in section.get("tables", []):
            write_json(fig_dir / f"{section['id']}.json", results[section["id"]])
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in results["timings"].items())
    footer = (f"mergescope {results['mergescope_version']}; digits (scikit-learn), fixed seeds; config "
              f"{json.dumps(results['config'])}; stage times: {timings}; models trained {results['models']['trained']}, "
              f"reused from cache {results['models']['reused']}.")
    return render_report("mergescope study: digits model zoo", summary_lines(results), sections, footer,
                         out / "report.html", fig_dir)


def _read_json(path: Path):
    """A cached stage result, or None when absent or damaged (then it is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
