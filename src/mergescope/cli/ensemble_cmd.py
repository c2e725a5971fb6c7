"""`ensemble`, `soup` and `analyse ...`: output ensembles, model soups, and the analyses of why
weight averaging works. Each prints a table; analyses write JSON and draw the PNG from that JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import MergescopeError
from ..io import check_side_outputs
from .common import finite, progress, say, torch_threads, write_json
from .options import MODEL_OPTIONS, THREADS, model_option, model_options, out_option, task_option
from .options import fmt as _f
from .options import show as _show
from .options import table as _table
from ..tasks.checkpoints import task_for

CKPTS = typer.Argument(..., help="Checkpoints of one architecture (.safetensors files or folders).")
TASK = task_option("the checkpoints record")
MODEL = model_option("the checkpoints record")
MODEL_OPTS = MODEL_OPTIONS  # --model-option KEY=VALUE
OUT = out_option("analysis-out")

analyse_app = typer.Typer(name="analyse", no_args_is_help=True,
                          help="Why weight averaging works: weights, spaces, scaling, stitch, cka (JSON + PNG).")


# ---------------------------------------------------------------- shared plumbing

def _load(paths: list[Path], model: str | None, task_spec: str | None, model_opts: list[str] | None = None,
          mixed: bool = False):
    """(template module, {name: state}, task) for checkpoints sharing one architecture, built once from the
    first checkpoint. ``mixed``: a checkpoint that does not fit it builds its own module from its own record
    (a partial-zip checkpoint next to a plain one), and the module returned is then the list of each
    member's module."""
    from ..io import load
    from ..tasks.checkpoints import fitted_state, model_for

    for p in paths:
        if not Path(p).exists():
            raise MergescopeError(f"{p}: no such file or folder")
    ckpts = [load(p) for p in paths]
    options = model_options(model_opts)
    first, _, _ = model_for(ckpts[0], model, **options)
    modules, states = [], {}
    for p, ckpt in zip(paths, ckpts):
        tensors, module = {k: ckpt[k] for k in ckpt}, first
        try:  # one-line error if it does not fit; under the model's own keys (a HF file may differ, see fitted_state)
            state = fitted_state(first, tensors, p)
        except MergescopeError:
            if not mixed:
                raise
            module, _, _ = model_for(ckpt, model, **options)
            state = fitted_state(module, tensors, p)
        states[_unique_name(p, states)] = state
        modules.append(module)
    return (first if all(m is first for m in modules) else modules), states, task_for(ckpts[0], task_spec)


def _layers_are_tensors(module, what: str) -> None:
    """weights/stitch/cka read layer outputs and input gradients as plain tensors; a Hugging Face model's
    blocks return output objects and take integer tokens, so say so in one line rather than fail inside."""
    if getattr(module, "hf_config", None) is not None:
        raise MergescopeError(f"analyse {what}: not available for Hugging Face models yet (layer outputs are "
                              "not plain tensors, inputs are tokens); analyse spaces and scaling work on them")


def _unique_name(path: Path, taken) -> str:
    name = Path(path).name.removesuffix(".safetensors")
    return name if name not in taken else str(path)


def _need(states: dict, n: int, what: str) -> None:
    if len(states) < n:
        raise MergescopeError(f"{what} needs at least {n} checkpoints, got {len(states)}")


def _save_and_plot(result, out: Path, name: str, plot) -> tuple[Path, Path]:
    """Write the result's JSON, then draw the figure (``report.analysis_figures``) from the JSON file just written."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out / f"{name}.json", result.to_dict())
    png = out / f"{name}.png"
    plot(json.loads(json_path.read_text()), png)
    return json_path, png


# ---------------------------------------------------------------- ensemble and soup

def ensemble(
    checkpoints: list[Path] = CKPTS,
    method: list[str] = typer.Option(["probs"], "--method", "-m",
                                     help="probs, logits, vote, weighted, features, features-refit, or all (repeatable)."),
    split: str = typer.Option("test", help="Split to report on."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
    task: str = TASK, model: str = MODEL, threads: int = THREADS, model_opts: list[str] = MODEL_OPTS,
):
    """Evaluate output ensembles of the checkpoints next to their single weight average."""
    from .. import ensemble as ens

    methods = list(ens.METHODS) if "all" in method else method
    for m in methods:
        if m not in ens.METHODS:
            raise MergescopeError(f"--method {m!r}: choose from {', '.join(ens.METHODS)} or all")
    check_side_outputs(checkpoints, files=[json_out])
    with torch_threads(threads):
        module, states, task_obj = _load(checkpoints, model, task, model_opts, mixed=True)
        mixed = isinstance(module, list)  # different architectures: output ensembles only, no weight average
        if mixed and any(m.startswith("features") for m in methods):
            raise MergescopeError("feature averaging needs every checkpoint in one architecture; these differ "
                                  "(use --method probs, logits, vote or weighted)")
        results = [ens.evaluate(module, list(states.values()), task_obj, method=m, split=split) for m in methods]
        if not mixed:
            results.append(ens.evaluate_weight_average(module, list(states.values()), task_obj, split=split))
    table = _table(f"{len(states)} models on {task_obj.name} {split}", ["combination", "accuracy", "loss", "ECE",
                                                                       "params", "FLOPs/example"])
    scored = results[-1]
    example = next(iter(task_obj.batches(split)))[0]
    costs = {id(m): (ens.count_params(m), ens.flops_per_example(m, example))  # each distinct module once
             for m in (module if mixed else [module])}
    for i, (name, acc, loss, ece) in enumerate(zip(states, scored.member_accuracy, scored.member_loss,
                                                    scored.member_ece)):
        params, flops = costs[id(module[i] if mixed else module)]  # each member's own cost
        table.add_row(f"member {name}", _f(acc), _f(loss), _f(ece), f"{params:,}", f"{flops:,}")
    for r in results:
        table.add_row(r.method, _f(r.accuracy), _f(r.loss), _f(r.ece), f"{r.params:,}", f"{r.flops:,}")
    _show(table)
    if json_out:
        write_json(json_out, {"members": list(states), "results": [r.to_dict() for r in results]})


def soup(
    checkpoints: list[Path] = CKPTS,
    out: Path = typer.Option(None, "--out", "-o", help="Write the soup checkpoint here (.safetensors or folder)."),
    kind: str = typer.Option("greedy", help="greedy (validation-driven) or uniform."),
    json_out: Path = typer.Option(None, "--json", help="Also write the result as JSON here."),
    force: bool = typer.Option(False, help="Replace an existing output."),
    task: str = TASK, model: str = MODEL, threads: int = THREADS, model_opts: list[str] = MODEL_OPTS,
):
    """Model soup (Wortsman et al. 2022): uniform, or greedy by validation accuracy; reported on test."""
    from ..analysis.soups import soup as make_soup
    from ..io import check_output_path, provenance, save

    check_side_outputs(checkpoints, files=[json_out], main=out)
    if out is not None:
        check_output_path(out, checkpoints, force)
    with torch_threads(threads):
        module, states, task_obj = _load(checkpoints, model, task, model_opts)
        result = make_soup(module, list(states.values()), task_obj, kind=kind)
    names = list(states)
    table = _table(f"{kind} soup of {len(names)} models ({task_obj.name})", ["model", "val acc", "test acc", "in soup"])
    for i in result.ranking:
        table.add_row(names[i], _f(result.member_val_accuracy[i]), _f(result.member_test_accuracy[i]),
                      "yes" if i in result.included else "")
    table.add_row("[bold]soup[/bold]", _f(result.val_accuracy), _f(result.test_accuracy), str(len(result.included)))
    _show(table)
    if json_out:
        write_json(json_out, {"members": names, **result.to_dict()})
    if out is not None:
        from ..io import load
        from ..tasks.checkpoints import hf_folder, passed_metadata

        first = load(checkpoints[0]).metadata
        meta = {**provenance(inputs=checkpoints), **passed_metadata(first),
                "soup": json.dumps({"kind": kind, "included": [names[i] for i in result.included]})}
        save(result.state, out, metadata=meta, force=force, inputs=checkpoints,
             copy_files_from=hf_folder(load(checkpoints[0])))  # a soup of HF folders is a HF folder
        say(f"wrote {out}")


# ---------------------------------------------------------------- analyses

@analyse_app.command("weights")
def analyse_weights(checkpoints: list[Path] = CKPTS, out: Path = OUT, task: str = TASK, model: str = MODEL,
                    threads: int = THREADS, model_opts: list[str] = MODEL_OPTS):
    """First-layer unit templates and class directions as 8x8 images; per-layer norms and ranks."""
    from ..analysis import weights
    from ..report import analysis_figures as figures

    check_side_outputs(checkpoints, folders=[(out, ["weights.json", "weights.png"])])
    with torch_threads(threads):
        module, states, task_obj = _load(checkpoints, model, task, model_opts)
        _layers_are_tensors(module, "weights")
        result = weights.analyse(module, states, task_obj)
    json_path, png = _save_and_plot(result, out, "weights", figures.plot_weights)
    layers = list(result.stats[result.names[0]])
    table = _table("weights: norm / effective rank / distance to average", ["layer", *result.names])
    for layer in layers:
        table.add_row(layer, *(f"{result.stats[n][layer]['norm']:.2f} / {result.stats[n][layer]['effective_rank']:.1f}"
                               f" / {result.stats[n][layer]['distance_to_average']:.2f}" for n in result.names))
    _show(table)
    say(f"wrote {json_path} and {png}")


@analyse_app.command("spaces")
def analyse_spaces(
    checkpoints: list[Path] = typer.Argument(None, help="A family of checkpoints (omit with --zoo)."),
    zoo: str = typer.Option(None, help="Train the families here instead: mlp, cnn, resnet or transformer."),
    n: int = typer.Option(8, min=2, max=256, help="Models per family with --zoo."),
    epochs: int = typer.Option(None, min=1, max=100000, help="Training epochs with --zoo (default: the zoo model's)."),
    align: bool = typer.Option(True, help="Add the family aligned to its first model (needs mergescope.align)."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, threads: int = THREADS, model_opts: list[str] = MODEL_OPTS,
):
    """Weight averaging vs feature and output averaging for 2..N models of each family."""
    from ..analysis import spaces
    from ..report import analysis_figures as figures
    from ..state import example_input

    check_side_outputs(checkpoints or [], folders=[(out, ["spaces.json", "spaces.png"])])
    with torch_threads(threads):
        if zoo:
            from ..tasks import build, get_task

            task_obj = get_task(task or "digits")
            module, name = build(zoo), zoo
            families = {}
            with progress() as bar:
                for kind in ("finetunes", "seeds"):
                    job = bar.add_task(f"train {zoo} {kind}", total=n)
                    families[kind] = spaces.train_family(kind, zoo, n, task_obj, epochs=epochs,
                                                         on_model=lambda i, job=job: bar.update(job, advance=1))
            base = "seeds"
        else:
            if not checkpoints:
                raise MergescopeError("analyse spaces: give checkpoints of one family, or --zoo MODEL")
            module, states, task_obj = _load(checkpoints, model, task, model_opts)
            _need(states, 2, "analyse spaces")
            families, base, name = {"given": list(states.values())}, "given", type(module).__name__
        if align and spaces.alignment_available():
            families[f"{base} aligned"] = spaces.align_family(module, families[base], example_input(task_obj))
        elif align:
            say("alignment unavailable in this build: the aligned family is left out")
        result = spaces.compare(module, families, task_obj, model_name=name)
    json_path, png = _save_and_plot(result, out, "spaces", figures.plot_spaces)
    for family, curves in result.families.items():
        table = _table(f"{name} {family}: {result.split} accuracy", ["models", *spaces.SPACES, "best member"])
        for i, k in enumerate(result.sizes):
            table.add_row(str(k), *(_f(curves[s][i]) for s in (*spaces.SPACES, "best_member")))
        _show(table)
    say(f"wrote {json_path} and {png}")


@analyse_app.command("scaling")
def analyse_scaling(
    checkpoints: list[Path] = CKPTS,
    factors: str = typer.Option(",".join(map(str, (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0))),
                                help="Comma-separated scale factors."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, threads: int = THREADS, model_opts: list[str] = MODEL_OPTS,
):
    """Scale parameters (globally and per layer); accuracy, agreement and KL vs the unscaled model."""
    from ..analysis import scaling
    from ..report import analysis_figures as figures

    try:
        values = tuple(float(f) for f in factors.split(","))
    except ValueError:
        raise MergescopeError(f"--factors {factors!r}: expected comma-separated numbers") from None
    check_side_outputs(checkpoints, folders=[(out, ["scaling.json", "scaling.png"])])
    with torch_threads(threads):
        module, states, task_obj = _load(checkpoints, model, task, model_opts)
        result = scaling.analyse(module, states, task_obj, factors=values)
    json_path, png = _save_and_plot(result, out, "scaling", figures.plot_scaling)
    table = _table("global scaling: KL(p_1 || p_c) / accuracy", ["c", *result.names])
    for i, c in enumerate(result.factors):
        table.add_row(f"{c:g}", *(f"{result.global_scaling[n]['kl'][i]:.4f} / {result.global_scaling[n]['accuracy'][i]:.3f}"
                                  for n in result.names))
    table.add_row("|theta|", *(f"{result.norms[n]:.2f}" for n in result.names))
    _show(table)
    say(f"wrote {json_path} and {png}")


@analyse_app.command("stitch")
def analyse_stitch(
    model_a: Path = typer.Argument(..., help="Model whose early layers are used."),
    model_b: Path = typer.Argument(..., help="Model whose later layers receive them."),
    epochs: int = typer.Option(5, min=1, max=100000, help="Epochs to train each stitching layer."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed for the stitching data order."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, threads: int = THREADS, model_opts: list[str] = MODEL_OPTS,
):
    """Stitch A's layer l into B's layer l+1 with a trained affine map; penalty per layer."""
    from ..analysis import stitching
    from ..report import analysis_figures as figures

    check_side_outputs([model_a, model_b], folders=[(out, ["stitch.json", "stitch.png"])])
    with torch_threads(threads):
        module, states, task_obj = _load([model_a, model_b], model, task, model_opts)
        _layers_are_tensors(module, "stitch")
        a, b = states.values()
        result = stitching.stitch(module, a, b, task_obj, epochs=epochs, seed=seed)
    json_path, png = _save_and_plot(result, out, "stitch", figures.plot_stitching)
    table = _table(f"stitching (A {result.accuracy_a:.4f}, B {result.accuracy_b:.4f} alone)",
                   ["after layer", "identity map", "trained map", "penalty"])
    for i, layer in enumerate(result.layers):
        table.add_row(layer, _f(result.identity_accuracy[i]), _f(result.stitched_accuracy[i]), _f(result.penalty[i]))
    _show(table)
    say(f"wrote {json_path} and {png}")


@analyse_app.command("cka")
def analyse_cka(
    model_a: Path = typer.Argument(..., help="First model."),
    model_b: Path = typer.Argument(..., help="Second model."),
    align: bool = typer.Option(True, help="Also compare with B aligned to A (needs mergescope.align)."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, threads: int = THREADS, model_opts: list[str] = MODEL_OPTS,
):
    """Linear CKA between every pair of layers of two models, before and after alignment."""
    from ..analysis import similarity, spaces
    from ..report import analysis_figures as figures
    from ..state import example_input

    check_side_outputs([model_a, model_b], folders=[(out, ["cka.json", "cka.png"])])
    with torch_threads(threads):
        module, states, task_obj = _load([model_a, model_b], model, task, model_opts)
        _layers_are_tensors(module, "cka")
        a, b = states.values()
        aligned = None
        if align and spaces.alignment_available():
            aligned = spaces.align_family(module, [a, b], example_input(task_obj))[1]
        elif align:
            say("alignment unavailable in this build: showing CKA before alignment only")
        result = similarity.compare(module, a, b, task_obj, state_b_aligned=aligned)
    json_path, png = _save_and_plot(result, out, "cka", figures.plot_similarity)
    table = _table("matching layers of A and B", ["layer", "CKA", "CKA (B aligned)", "unit corr",
                                                  "unit corr (B aligned)"])
    for i, layer in enumerate(result.layers):
        table.add_row(layer, _f(result.cka[i][i]), _f(result.aligned[i][i]) if result.aligned else "-",
                      _f(result.unit_correlation[i]),
                      _f(result.aligned_unit_correlation[i]) if result.aligned_unit_correlation else "-")
    _show(table)
    say(f"wrote {json_path} and {png}")


@analyse_app.command("backdoor")
def analyse_backdoor(
    checkpoints: list[Path] = CKPTS,
    target: int = typer.Option(..., min=0, max=1_000_000, help="The label the trigger should force."),
    trigger: str = typer.Option("patch", help="patch (bottom-right 3x3 of an 8x8 input set to --value) or pattern "
                                "(--value times a fixed normal pattern drawn from --seed; any input shape)."),
    value: float = typer.Option(3.0, callback=finite(-1e6, 1e6), help="Patch value / pattern scale."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the pattern trigger and of weight matching."),
    base: Path = typer.Option(None, help="The models' common parent: adds task arithmetic and TIES."),
    align: bool = typer.Option(True, help="Without --base, add the weight-matched average (needs mergescope.align)."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, threads: int = THREADS, model_opts: list[str] = MODEL_OPTS,
):
    """Attack success rate of a trigger (and clean accuracy) for each member and each merge of them."""
    from ..analysis import backdoor
    from ..report import analysis_figures as figures

    inputs = [*checkpoints, *([base] if base is not None else [])]
    check_side_outputs(inputs, folders=[(out, ["backdoor.json", "backdoor.png"])])
    trig = backdoor.Trigger(kind=trigger, value=value, seed=seed)
    with torch_threads(threads):
        module, states, task_obj = _load(inputs, model, task, model_opts)
        base_state = states.pop(list(states)[-1]) if base is not None else None
        merges = backdoor.standard_merges(module, states, task_obj, base=base_state, align=align, seed=seed)
        result = backdoor.persistence(module, states, merges, task_obj, trig, target)
    json_path, png = _save_and_plot(result, out, "backdoor", figures.plot_backdoor)
    table = _table(f"backdoor: {trigger} trigger -> label {target} ({task_obj.name} {result.split})",
                   ["model", "clean accuracy", "attack success", "target rate, no trigger"])
    for label, rows in (("member ", result.members), ("", result.merges)):
        for name, r in rows.items():
            table.add_row(f"{label}{name}", _f(r["accuracy"]), _f(r["asr"]), _f(r["clean_target_rate"]))
    _show(table)
    say(f"wrote {json_path} and {png}")


def register(app: typer.Typer) -> None:
    """Add `ensemble`, `soup` and the `analyse` group to the app."""
    app.command()(ensemble)
    app.command()(soup)
    app.add_typer(analyse_app)
