"""`mergescope landscape ...`: loss-landscape measurements; each prints a table, writes JSON + PNG."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import MergescopeError
from ..io import check_output_path, check_side_outputs
from .common import finite, progress, say, torch_threads, write_json
from .options import MODEL_OPTIONS, THREADS, WIDTH, fmt as _f, model_option, model_options, out_option
from .options import show as _show, task_option
from ..tasks.checkpoints import task_for

landscape = typer.Typer(name="landscape", help="Loss-landscape geometry: paths, barriers, curves, planes, curvature, "
                        "stability, task vectors.", no_args_is_help=True)

OUT = out_option("landscape-out")
TASK = task_option()
MODEL = model_option()
SPLIT = typer.Option("test", help="Split the path is reported on (train is always measured too).")


def _load_models(paths: list[Path], model: str | None, pairs: list[str] | None = None):
    """(template module, states) for checkpoints that share one architecture (``pairs``: --model-option)."""
    from ..io import load
    from ..tasks.checkpoints import model_for

    options = model_options(pairs)
    ckpts = [load(p) for p in paths]
    module, _, _ = model_for(ckpts[0], model, **options)
    return module, ckpts


def _path_table(title: str, path, every: int = 1) -> Table:
    table = Table(title=title)
    for col in ("t", f"{path.split} loss", f"{path.split} acc", "train loss", "train acc"):
        table.add_column(col, justify="right")
    naive = path.naive_loss is not None
    if naive:
        table.add_column(f"{path.split} loss (BN not reset)", justify="right")
    for i in range(0, len(path.t), every):
        row = [_f(path.t[i], 3), _f(path.loss[i]), _f(path.accuracy[i]), _f(path.train_loss[i]), _f(path.train_accuracy[i])]
        table.add_row(*row, *([_f(path.naive_loss[i])] if naive else []))
    return table


def _barrier_table(rows: dict) -> Table:
    table = Table(title="barriers")
    for col in ("path", "loss barrier", "accuracy barrier"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for name, (loss, acc) in rows.items():
        table.add_row(name, _f(loss), _f(acc))
    return table


def line(
    a: Path = typer.Argument(..., help="First checkpoint."),
    b: Path = typer.Argument(..., help="Second checkpoint."),
    n: int = typer.Option(25, min=2, max=10001, help="Points along the path (endpoints included)."),
    split: str = SPLIT,
    bn_reset: bool = typer.Option(True, "--bn-reset/--no-bn-reset", help="Recompute BatchNorm statistics at each point."),
    robust_eps: float = typer.Option(0.0, callback=finite(0, 1e6), help="Also measure the robust path: PGD L-inf radius in input units (0: off)."),
    robust_steps: int = typer.Option(5, min=1, max=1000, help="PGD steps for the robust path."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, model_opts: list[str] = MODEL_OPTIONS,
    threads: int = THREADS,
):
    """Loss and accuracy along the straight line between two models; loss and accuracy barriers."""
    from ..landscape import interpolate, robust_interpolate
    from ..report.landscape_figures import plot_path

    check_side_outputs([a, b], folders=[(out, ["line.json", "line.png"])])
    module, (ca, cb) = _load_models([a, b], model, model_opts)
    the_task = task_for(ca, task)
    with torch_threads(threads), progress() as bar:
        job = bar.add_task("line", total=n)
        path = interpolate(module, ca, cb, the_task, n=n, split=split, bn_reset=bn_reset,
                           on_chunk=lambda done, total: bar.update(job, completed=done))
        robust = None
        if robust_eps > 0:
            robust = robust_interpolate(module, ca, cb, the_task, n=n, split=split, eps=robust_eps,
                                        steps=robust_steps, bn_reset=bn_reset)
    write_json(out / "line.json", {"a": str(a), "b": str(b), **path.to_dict(),
                                   "robust": None if robust is None else {"eps": robust_eps, "steps": robust_steps,
                                                                          **robust.to_dict()}})
    plot_path(path, out / "line.png", title=f"{a.name} -> {b.name}",
              extra=None if robust is None else {f"PGD eps={robust_eps:g}": robust})
    rows = {f"{split}": (path.barrier_loss, path.barrier_acc), "train": (path.train_barrier_loss, path.train_barrier_acc)}
    if path.naive_loss is not None:
        rows[f"{split}, BN not reset"] = (path.naive_barrier_loss, path.naive_barrier_acc)
    if robust is not None:
        rows[f"{split}, PGD eps={robust_eps:g}"] = (robust.barrier_loss, robust.barrier_acc)
    _show(_path_table(f"{a.name} -> {b.name}", path, every=max(1, (n - 1) // 8)), _barrier_table(rows))
    say(f"wrote {out / 'line.json'} and {out / 'line.png'}")


def matrix(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more checkpoints of one architecture."),
    n: int = typer.Option(11, min=2, max=10001, help="Points along each path."),
    split: str = SPLIT,
    bn_reset: bool = typer.Option(True, "--bn-reset/--no-bn-reset", help="Recompute BatchNorm statistics at each point."),
    align: str = typer.Option("none", help="Before each pair's path, permute the second model to match the first: "
                              "none, weight, activation, ste or ot (mergescope.align methods that permute)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the alignment (--align)."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, model_opts: list[str] = MODEL_OPTIONS,
    threads: int = THREADS,
):
    """Pairwise loss/accuracy barrier matrix of N models (each pair's path computed once)."""
    from ..landscape import barrier_matrix
    from ..report.landscape_figures import plot_matrix

    if len(checkpoints) < 2:
        raise MergescopeError("matrix: give at least two checkpoints")
    how = _permuting_method(align)
    check_side_outputs(checkpoints, folders=[(out, ["matrix.json", "matrix.png"])])
    module, ckpts = _load_models(checkpoints, model, model_opts)
    names = [p.stem if p.suffix else p.name for p in checkpoints]
    if len(set(names)) != len(names):
        names = [str(p) for p in checkpoints]
    the_task = task_for(ckpts[0], task)
    pairs = len(ckpts) * (len(ckpts) - 1) // 2
    with torch_threads(threads), progress() as bar:
        job = bar.add_task("pairs", total=pairs)
        result = barrier_matrix(module, ckpts, the_task, names=names, n=n, split=split, bn_reset=bn_reset,
                                on_pair=lambda done, total: bar.update(job, completed=done), align=how, seed=seed)
    write_json(out / "matrix.json", result.to_dict())
    plot_matrix(result, out / "matrix.png")
    table = Table(title=f"loss barrier / accuracy barrier ({split}{f', {how}-aligned' if how else ''})")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for i, name in enumerate(names):
        table.add_row(name, *(f"{result.loss[i][j]:.3f} / {result.accuracy[i][j]:.3f}" for j in range(len(names))))
    _show(table)
    say(f"wrote {out / 'matrix.json'} and {out / 'matrix.png'}")


def _permuting_method(name: str) -> str | None:
    """--align of `matrix`: None for none, else a registered method that permutes B (checked before any work)."""
    from ..align import get

    if name.lower() in ("none", ""):
        return None
    if get(name).merges:
        raise MergescopeError(f"--align {name}: this method merges the models; choose one that permutes "
                              "(weight, activation, ste, ot)")
    return name


def curve(
    a: Path = typer.Argument(..., help="First checkpoint (endpoint A)."),
    b: Path = typer.Argument(..., help="Second checkpoint (endpoint B)."),
    kind: str = typer.Option("bezier", help="bezier or polychain."),
    align: str = typer.Option("none", help="Align B's neurons to A first: none, weight, activation or pam "
                              "(weight matching re-solved each epoch, Tatro et al.)."),
    epochs: int = typer.Option(20, min=1, max=100000, help="Epochs of curve training on the train split."),
    lr: float = typer.Option(1e-3, callback=finite(0, 10, open_low=True), help="Adam learning rate of the bend."),
    pam_step: float = typer.Option(None, callback=finite(0, 1e6),
                                   help="--align pam only: relative proximal step eta of each permutation update "
                                        "(0: stays weight matching) (default 0.1)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed for t sampling and data order."),
    n: int = typer.Option(25, min=2, max=10001, help="Points along the curve for evaluation."),
    split: str = SPLIT,
    bn_reset: bool = typer.Option(True, "--bn-reset/--no-bn-reset", help="Recompute BatchNorm statistics at each point."),
    save_midpoint: Path = typer.Option(None, help="Also save the curve's midpoint phi(1/2) as a checkpoint "
                                       "(e.g. for `landscape plane A B MID`)."),
    robust_eps: float = typer.Option(0.0, callback=finite(0, 1e6), help="Also measure curve and line on PGD inputs of this L-inf radius (0: off)."),
    robust_steps: int = typer.Option(5, min=1, max=1000, help="PGD steps for the robust measurements."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, model_opts: list[str] = MODEL_OPTIONS,
    threads: int = THREADS,
):
    """Fit a Bezier/polychain curve between two models (optionally aligned) and compare it with the line."""
    from ..landscape import fit_curve
    from ..report.landscape_figures import plot_curve

    how = None if align.lower() in ("none", "") else align.lower()
    if pam_step is not None and how != "pam":
        raise MergescopeError("--pam-step applies to --align pam only")
    check_side_outputs([a, b], folders=[(out, ["curve.json", "curve.png"])], main=save_midpoint)
    if save_midpoint is not None:
        check_output_path(save_midpoint, [a, b], force=False)
    module, (ca, cb) = _load_models([a, b], model, model_opts)
    the_task = task_for(ca, task)
    with torch_threads(threads), progress() as bar:
        job = bar.add_task(f"{kind} curve", total=epochs)
        result = fit_curve(module, ca, cb, the_task, kind=kind, align=how, epochs=epochs, seed=seed, n=n, split=split,
                           bn_reset=bn_reset, lr=lr, on_epoch=lambda e, loss: bar.update(job, completed=e + 1),
                           robust_eps=robust_eps, robust_steps=robust_steps,
                           **({} if pam_step is None else {"pam_step": pam_step}))
    write_json(out / "curve.json", {"a": str(a), "b": str(b), **result.to_dict()})
    plot_curve(result, out / "curve.png")
    if save_midpoint is not None:
        _save_midpoint(result, ca, save_midpoint, [a, b])
    rows = {f"{kind} curve": (result.barrier_loss, result.barrier_acc),
            "line": (result.line.barrier_loss, result.line.barrier_acc)}
    if result.aligned_line is not None:
        rows[f"line after {how} alignment"] = (result.aligned_line.barrier_loss, result.aligned_line.barrier_acc)
    if result.robust_curve is not None:
        rows[f"{kind} curve, PGD eps={robust_eps:g}"] = (result.robust_curve.barrier_loss, result.robust_curve.barrier_acc)
        rows[f"line{' (aligned)' if how else ''}, PGD eps={robust_eps:g}"] = (result.robust_line.barrier_loss,
                                                                            result.robust_line.barrier_acc)
    _show(_path_table(f"{kind} curve {a.name} -> {b.name}" + (f" ({how}-aligned)" if how else ""), result.curve,
                      every=max(1, (n - 1) // 8)), _barrier_table(rows))
    say(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")


def _save_midpoint(result, template_ckpt, path: Path, inputs: list[Path]) -> None:
    """phi(1/2) with A's model metadata, so later commands rebuild the model from the file."""
    import json

    import torch

    from ..io import provenance, save
    from ..tasks.checkpoints import hf_folder, passed_metadata

    mid = result.state_at(0.5)
    state = {k: mid[k].to(template_ckpt[k].dtype) if k in mid else template_ckpt[k] for k in template_ckpt}
    meta = passed_metadata(template_ckpt.metadata)
    meta["curve"] = json.dumps({"kind": result.kind, "align": result.align, "epochs": result.epochs, "t": 0.5})
    save({k: torch.as_tensor(v) for k, v in state.items()}, path, metadata={**provenance(inputs=inputs), **meta},
         inputs=inputs, copy_files_from=hf_folder(template_ckpt))  # a HF folder's midpoint is a HF folder
    say(f"wrote the curve midpoint to {path}")


def plane(
    checkpoints: list[Path] = typer.Argument(..., help="One checkpoint (random filter-normalized plane around it) "
                                             "or three (the plane through them)."),
    grid: int = typer.Option(25, min=2, max=1001, help="Grid points per axis."),
    span: float = typer.Option(1.0, callback=finite(0, 1e6, open_low=True), help="Random plane: coordinates in [-span, span]."),
    margin: float = typer.Option(0.25, callback=finite(0, 100), help="Three-model plane: margin around the three points (fraction)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the random directions."),
    split: str = typer.Option("train", help="Split evaluated on the grid."),
    bn_reset: bool = typer.Option(True, "--bn-reset/--no-bn-reset", help="Recompute BatchNorm statistics at each point."),
    chunk: int = typer.Option(32, min=1, max=4096, help="Grid points evaluated together (vmap)."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, model_opts: list[str] = MODEL_OPTIONS,
    threads: int = THREADS,
):
    """Loss and accuracy on a 2-D plane: filter-normalized random directions (Li et al.) or through three models."""
    from ..landscape import plane as random_plane
    from ..landscape import plane_through
    from ..report.landscape_figures import plot_plane

    if len(checkpoints) not in (1, 3):
        raise MergescopeError(f"plane: give 1 or 3 checkpoints, got {len(checkpoints)}")
    check_side_outputs(checkpoints, folders=[(out, ["plane.json", "plane.png"])])
    module, ckpts = _load_models(checkpoints, model, model_opts)
    the_task = task_for(ckpts[0], task)
    with torch_threads(threads), progress() as bar:
        job = bar.add_task("plane", total=grid * grid)
        tick = lambda done, total: bar.update(job, completed=done)  # noqa: E731
        if len(ckpts) == 1:
            result = random_plane(module, ckpts[0], the_task, grid=grid, span=span, seed=seed, split=split,
                                  bn_reset=bn_reset, chunk_size=chunk, on_chunk=tick)
        else:
            names = [p.stem for p in checkpoints]
            result = plane_through(module, ckpts, the_task, grid=grid, margin=margin, names=names, split=split,
                                   bn_reset=bn_reset, chunk_size=chunk, on_chunk=tick)
    write_json(out / "plane.json", {"checkpoints": [str(p) for p in checkpoints], **result.to_dict()})
    plot_plane(result, out / "plane.png")
    _show(_plane_table(result))
    say(f"wrote {out / 'plane.json'} and {out / 'plane.png'}")


def _plane_table(result) -> Table:
    """A coarse (at most 7 x 7) view of the loss grid."""
    g = len(result.alphas)
    idx = sorted(set(int(round(i)) for i in [k * (g - 1) / 6 for k in range(7)]))
    table = Table(title=f"{result.split} loss on the {result.kind} plane (rows alpha, columns beta)")
    table.add_column("alpha \\ beta", justify="right")
    for j in idx:
        table.add_column(f"{result.betas[j]:.2f}", justify="right")
    for i in idx:
        table.add_row(f"{result.alphas[i]:.2f}", *(f"{result.loss[i][j]:.3f}" for j in idx))
    return table


def sharpness(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to measure."),
    k: int = typer.Option(5, min=1, max=1000, help="How many top eigenvalues."),
    method: str = typer.Option("lanczos", help="lanczos or power."),
    samples: int = typer.Option(64, min=0, max=100000, help="Hutchinson probe vectors for the trace (0: skip the trace)."),
    batches: int = typer.Option(None, min=1, max=10**6, help="Use only the first N batches of the split (default: all of it)."),
    split: str = typer.Option("train", help="Split the loss is taken over."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the start / probe vectors."),
    tol: float = typer.Option(1e-3, callback=finite(0, 1, open_low=True),
                              help="Relative accuracy: Lanczos stops when every residual is below tol*|eigenvalue| "
                                   "(a guaranteed bound); power iteration when values change by less than tol."),
    iters: int = typer.Option(None, min=1, max=100000, help="Most iterations (default: lanczos max(10k+50, 100), power 200)."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, model_opts: list[str] = MODEL_OPTIONS,
    threads: int = THREADS,
):
    """Top Hessian eigenvalues (Lanczos or power iteration on HVPs) and Hessian trace (Hutchinson)."""
    from ..landscape import hessian_eigenvalues, hessian_trace
    from ..report.landscape_figures import plot_sharpness

    check_side_outputs([checkpoint], folders=[(out, ["sharpness.json", "sharpness.png"])])
    module, (ckpt,) = _load_models([checkpoint], model, model_opts)
    the_task = task_for(ckpt, task)
    with torch_threads(threads):
        eig = hessian_eigenvalues(module, ckpt, the_task, k=k, split=split, batches=batches, method=method, seed=seed,
                                  tol=tol, iters=iters)
        trace = hessian_trace(module, ckpt, the_task, samples=samples, split=split, batches=batches, seed=seed) \
            if samples else None
    write_json(out / "sharpness.json", {"checkpoint": str(checkpoint), "eigenvalues": eig.to_dict(),
                                        "trace": None if trace is None else trace.to_dict()})
    plot_sharpness(eig, trace, out / "sharpness.png")
    table = Table(title=f"Hessian of the mean {split} loss ({eig.examples} examples, {eig.parameters:,} parameters)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("residual |Hv - lv|", justify="right")
    for i, (value, residual) in enumerate(zip(eig.eigenvalues, eig.residuals)):
        table.add_row(f"eigenvalue {i + 1} ({method})", f"{value:.5g}", f"{residual:.2g}")
    table.add_row("Hessian-vector products", str(eig.hvps), "")
    if trace is not None:
        table.add_row(f"trace (Hutchinson, {trace.samples} probes)", f"{trace.trace:.5g} +- {trace.stderr:.2g}", "")
    _show(table)
    if not eig.converged:
        say(f"warning: not converged to tol {tol:g} in {eig.iterations} iterations; raise --iters (residuals above)")
    say(f"wrote {out / 'sharpness.json'} and {out / 'sharpness.png'}")


def stability(
    model: str = typer.Option("mlp", help="Zoo model (or package.module:factory) trained from scratch."),
    width: int = WIDTH,
    model_opts: list[str] = MODEL_OPTIONS,
    ks: str = typer.Option("0,1,2,5", help="Spawn epochs k, comma-separated."),
    epochs: int = typer.Option(None, min=1, max=100000, help="Epochs of the full run (default: the zoo model's)."),
    lr: float = typer.Option(None, callback=finite(0, 10, open_low=True), help="Peak learning rate (default: the zoo model's)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the initialization and of the parent's data order."),
    n: int = typer.Option(11, min=2, max=10001, help="Points along each children path."),
    split: str = SPLIT,
    out: Path = OUT, task: str = typer.Option("digits", help="Task: 'digits' or package.module:factory."),
    threads: int = THREADS,
):
    """Instability analysis: spawn two children at each k, train to the end, report their barrier vs k."""
    from ..landscape import spawn_stability
    from ..report.landscape_figures import plot_stability
    from ..landscape.stability import spawn_epochs
    from ..tasks import get_task, seeded_model, train_defaults

    try:
        spawn = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        raise MergescopeError(f"--ks {ks!r}: expected comma-separated integers like 0,1,2,5") from None
    check_side_outputs([], folders=[(out, ["stability.json", "stability.png"])])
    defaults = train_defaults(model)
    epochs = epochs or defaults["epochs"]
    options = model_options(model_opts, width=width)
    module, _ = seeded_model(model, seed, options)
    the_task = get_task(task)
    with torch_threads(threads), progress() as bar:
        job = bar.add_task("spawning", total=spawn_epochs(spawn, epochs))
        result = spawn_stability(module, the_task, ks=spawn, epochs=epochs, lr=lr or defaults["lr"],
                                 weight_decay=defaults["weight_decay"], batch_size=defaults["batch_size"], seed=seed,
                                 n=n, split=split,
                                 on_epoch=lambda label: bar.update(job, advance=1))
    write_json(out / "stability.json", {"model": model, "options": options, **result.to_dict()})
    plot_stability(result, out / "stability.png")
    table = Table(title=f"instability of {model} over {epochs} epochs ({split})")
    for col in ("spawn epoch k", "loss barrier", "accuracy barrier", "child accuracies"):
        table.add_column(col, justify="right")
    for k, lb, ab, (c1, c2) in zip(result.ks, result.barrier_loss, result.barrier_acc, result.child_accuracy):
        table.add_row(str(k), _f(lb), _f(ab), f"{c1:.4f} / {c2:.4f}")
    _show(table)
    say(f"wrote {out / 'stability.json'} and {out / 'stability.png'}")


def taskvec(
    base: Path = typer.Argument(..., help="The shared parent checkpoint."),
    finetuned: list[Path] = typer.Argument(..., help="Fine-tunes of the base, each recording its task "
                                           "(e.g. `mergescope train --from base --classes 0,1,2,3,4`)."),
    scales: str = typer.Option("0,0.25,0.5,0.75,1,1.25,1.5,1.75,2", help="Scaling coefficients lambda."),
    out: Path = OUT, model: str = MODEL, model_opts: list[str] = MODEL_OPTIONS,
    threads: int = THREADS,
):
    """Task vectors: cosine matrix, task arithmetic (lambda chosen on val, reported on test), negation."""
    from ..landscape import task_vectors
    from ..report.landscape_figures import plot_task_vectors

    try:
        lambdas = [float(s) for s in scales.split(",") if s.strip()]
    except ValueError:
        raise MergescopeError(f"--scales {scales!r}: expected comma-separated numbers") from None
    check_side_outputs([base, *finetuned], folders=[(out, ["taskvec.json", "taskvec.png"])])
    module, ckpts = _load_models([base, *finetuned], model, model_opts)
    names = [p.stem for p in finetuned]
    if len(set(names)) != len(names):
        names = [str(p) for p in finetuned]
    tasks = {name: task_for(c, None) for name, c in zip(names, ckpts[1:])}
    with torch_threads(threads):
        result = task_vectors(module, ckpts[0], dict(zip(names, ckpts[1:])), tasks, scales=lambdas)
    write_json(out / "taskvec.json", {"base": str(base), "tasks": {n: t.name for n, t in tasks.items()},
                                      **result.to_dict()})
    plot_task_vectors(result, out / "taskvec.png")
    cos = Table(title="task-vector cosine similarity (all parameters)")
    cos.add_column("")
    for name in names:
        cos.add_column(name, justify="right")
    for i, name in enumerate(names):
        cos.add_row(name, *(f"{c:.3f}" for c in result.cosine[i]))
    acc = Table(title=f"test accuracy per task (arithmetic lambda = {result.chosen_scale:g}, chosen on val)")
    for col in ("task", "base", "fine-tuned", "base + lambda * sum(tau)", "negation lambda", "after negation",
                "others after negation"):
        acc.add_column(col, justify="right")
    for name in names:
        neg = result.negation.get(name)
        acc.add_row(name, _f(result.base_test[name]), _f(result.individual_test[name]), _f(result.chosen_test[name]),
                    "-" if neg is None else f"{neg['chosen_scale']:g}", _f(neg and neg["chosen_target_test"]),
                    _f(neg and neg["chosen_control_test"]))
    _show(cos, acc)
    say(f"wrote {out / 'taskvec.json'} and {out / 'taskvec.png'}")


def register(app: typer.Typer) -> None:
    """Add the `landscape` command group."""
    for command in (line, matrix, curve, plane, sharpness, stability, taskvec):
        landscape.command()(command)
    app.add_typer(landscape, name="landscape")
