"""Sweeps: schema, local vs real Ray cluster (identical tables), a killed worker retried, resume.

References are independent: task arithmetic and evaluation re-done here with plain torch, the
barrier matrix from the sequential ``landscape.barrier_matrix``, and hand-made rows for the search.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from mergescope import sweep
from mergescope.errors import MergescopeError
from mergescope.io import load, save
from mergescope.tasks import build, digits, train
from mergescope.tasks.checkpoints import model_metadata

WIDTH = 16


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Five small MLP checkpoints (trained one epoch from different seeds) that record their model."""
    root = tmp_path_factory.mktemp("zoo")
    task = digits()
    for seed in range(5):
        model = build("mlp", seed=seed, width=WIDTH)
        train(model, task, epochs=1, lr=3e-3, weight_decay=0.0, seed=seed)
        save(model.state_dict(), root / f"m{seed}.safetensors", metadata=model_metadata("mlp", {"width": WIDTH}))
    return root


def write(root, name, data) -> os.PathLike:
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


GRID_20 = {"kind": "merge_grid", "checkpoints": [f"m{i}.safetensors" for i in range(4)], "base": "m4.safetensors",
           "methods": [{"method": "task_arithmetic", "grid": {"lambda": [0.2, 0.4, 0.6, 0.8, 1.0]}}],
           "model_sets": [["m0.safetensors", "m1.safetensors"], ["m2.safetensors", "m3.safetensors"]],
           "align": ["none", "weight"]}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster on loopback with 2 CPUs; workers see the fault-injection marker path
    (created here, so it is disarmed until a test deletes it)."""
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("fault") / "fired"
    marker.touch()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {sweep.FAULT_ENV: str(marker)}})
    yield ray, marker
    ray.shutdown()


# --- schema -----------------------------------------------------------------------------------
def test_unknown_keys_and_bad_values_are_one_line_errors():
    with pytest.raises(MergescopeError, match="colour"):
        sweep.parse({**GRID_20, "colour": "red"})
    with pytest.raises(MergescopeError, match="unknown merge methods"):
        sweep.parse({**GRID_20, "methods": [{"method": "nope"}]})
    with pytest.raises(MergescopeError, match="kind"):
        sweep.parse({"kind": "everything", "checkpoints": ["a"]})
    with pytest.raises(MergescopeError, match="at least 2"):
        sweep.parse({"kind": "barrier_matrix", "checkpoints": ["a"]})


def test_ids_are_stable_unique_and_independent_of_where_the_sweep_lives():
    a = sweep.expand(sweep.parse(GRID_20), root="/x")
    b = sweep.expand(sweep.parse(GRID_20), root="/elsewhere")
    assert len(a) == 20 and len({s.id for s in a}) == 20
    assert [s.id for s in a] == [s.id for s in b]
    first = a[0]
    assert first.id == sweep.task_id(first.kind, json.loads(json.dumps(first.params)))
    pairs = sweep.expand(sweep.parse({"kind": "barrier_matrix", "checkpoints": list("abcd")}))
    assert sorted((s.params["i"], s.params["j"]) for s in pairs) == [(i, j) for i in range(4) for j in range(i + 1, 4)]


# --- local vs Ray -----------------------------------------------------------------------------
def reference_task_arithmetic(zoo, models, lam):
    """theta = base + lam * sum_i (theta_i - base), evaluated on val and test with plain torch."""
    base = dict(load(zoo / "m4.safetensors"))
    states = [dict(load(zoo / m)) for m in models]
    merged = {k: base[k] + lam * sum(s[k] - base[k] for s in states) for k in base}
    net = build("mlp", width=WIDTH)
    net.load_state_dict(merged)
    task = digits()
    return {split: task.evaluate(net, split) for split in ("val", "test")}


def test_20_task_sweep_identical_locally_and_on_ray(zoo, tmp_path, ray_cluster):
    spec_file = write(zoo, "grid.yaml", GRID_20)
    local = sweep.run(spec_file, tmp_path / "local.jsonl", sweep.LocalExecutor(workers=2))
    on_ray = sweep.run(spec_file, tmp_path / "ray.jsonl", sweep.RayExecutor(workers=2))
    assert local.total == on_ray.total == local.ran == on_ray.ran == 20
    assert (tmp_path / "local.jsonl").read_bytes() == (tmp_path / "ray.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert ids == sorted(set(ids)) and len(ids) == 20

    for row in (r for r in local.rows if r["align"] == "none"):
        ref = reference_task_arithmetic(zoo, row["models"], row["params"]["lambda"])
        assert row["val_accuracy"] == pytest.approx(ref["val"]["accuracy"], abs=1e-12)
        assert row["test_loss"] == pytest.approx(ref["test"]["loss"], rel=1e-5)
    # alignment changes the merge (undone permutations), so aligned rows differ from unaligned ones
    by = {(tuple(r["models"]), r["params"]["lambda"], r["align"]): r["val_loss"] for r in local.rows}
    assert any(by[k[:2] + ("weight",)] != v for k, v in by.items() if k[2] == "none")


def test_killed_worker_is_retried_by_ray_without_lost_or_duplicated_rows(zoo, tmp_path, ray_cluster):
    from mergescope.landscape import barrier_matrix
    from mergescope.report.figures import heatmaps_figure

    _, marker = ray_cluster
    marker.unlink()  # arm: the first task to start kills its worker process once
    names = [f"m{i}.safetensors" for i in range(4)]
    spec_file = write(zoo, "barrier.yaml", {"kind": "barrier_matrix", "checkpoints": names, "points": 5})
    result = sweep.run(spec_file, tmp_path / "b.jsonl", sweep.RayExecutor(workers=2, max_retries=2))
    assert marker.exists(), "the fault was not injected"
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    assert len(lines) == result.total == 6 and len({json.loads(x)["id"] for x in lines}) == 6

    got = sweep.barrier_matrix_from_rows(result.rows).to_dict()
    states = [dict(load(zoo / n)) for n in names]
    want = barrier_matrix(build("mlp", width=WIDTH), states, digits(), names=names, n=5).to_dict()
    assert got.keys() == want.keys() and got["names"] == want["names"]
    for key in ("barrier_loss", "barrier_acc"):
        assert sum(got[key], []) == pytest.approx(sum(want[key], []), abs=1e-6)
    for p, q in zip(got["paths"], want["paths"], strict=True):
        assert p["loss"] == pytest.approx(q["loss"], abs=1e-6) and p["accuracy"] == q["accuracy"]
    assert heatmaps_figure({"sweep": got}, tmp_path / "heat.png").stat().st_size > 0


def test_curve_barriers_equal_fit_curve_run_directly(zoo, tmp_path, ray_cluster):
    from mergescope.landscape import fit_curve

    spec_file = write(zoo, "curve.yaml", {"kind": "barrier_matrix", "checkpoints": ["m0.safetensors", "m1.safetensors"],
                                          "points": 5, "path": "bezier", "curve_epochs": 1, "seed": 3})
    (row,) = sweep.run(spec_file, tmp_path / "c.jsonl", sweep.RayExecutor(workers=1)).rows
    a, b = (dict(load(zoo / f"m{i}.safetensors")) for i in (0, 1))
    want = fit_curve(build("mlp", width=WIDTH), a, b, digits(), kind="bezier", epochs=1, seed=3, n=5)
    assert row["path"]["loss"] == pytest.approx(list(want.curve.loss), rel=1e-5)
    assert row["barrier_loss"] == pytest.approx(want.barrier_loss, rel=1e-4, abs=1e-6)


def test_local_pool_also_survives_a_killed_worker(zoo, tmp_path, monkeypatch):
    marker = tmp_path / "fired"
    monkeypatch.setenv(sweep.FAULT_ENV, str(marker))
    spec_file = write(zoo, "eval.yaml", {"kind": "evaluate", "checkpoints": ["m0.safetensors", "m1.safetensors"],
                                         "splits": ["test"]})
    result = sweep.run(spec_file, tmp_path / "e.jsonl", sweep.LocalExecutor(workers=1))
    assert marker.exists() and result.ran == 2
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 2


# --- resume -----------------------------------------------------------------------------------
def test_resume_after_an_interrupted_run_runs_only_the_missing_tasks(zoo, tmp_path, ray_cluster):
    """The table logic is the same for both executors; Ray's warm workers keep this test fast."""
    names = [f"m{i}.safetensors" for i in range(5)]
    spec_file = write(zoo, "eval5.yaml", {"kind": "evaluate", "checkpoints": names})
    out = tmp_path / "r.jsonl"
    full = sweep.run(spec_file, out, sweep.RayExecutor(workers=2))
    complete = out.read_bytes()
    lines = complete.decode().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # interrupted mid-write

    with pytest.raises(MergescopeError, match="--resume"):
        sweep.run(spec_file, out, sweep.RayExecutor(workers=2))
    resumed = sweep.run(spec_file, out, sweep.RayExecutor(workers=2), resume=True)
    assert (resumed.skipped, resumed.ran) == (2, 3)
    assert out.read_bytes() == complete and resumed.rows == full.rows

    task = digits()
    for row in full.rows:
        net = build("mlp", width=WIDTH)
        net.load_state_dict(dict(load(zoo / row["checkpoint"])))
        for split in ("val", "test"):
            assert row[f"{split}_accuracy"] == task.evaluate(net, split)["accuracy"]


# --- coefficient search -----------------------------------------------------------------------
def test_coefficient_search_picks_on_val_and_reports_test():
    def row(i, lam, val_acc, test_acc, val_loss=1.0):
        return {"id": f"{i:02d}", "kind": "merge", "method": "task_arithmetic", "params": {"lambda": lam},
                "models": ["a", "b"], "align": "none", "val_accuracy": val_acc, "val_loss": val_loss,
                "test_accuracy": test_acc, "test_loss": 0.5}

    rows = [row(0, 0.2, 0.80, 0.99), row(1, 0.5, 0.90, 0.70), row(2, 1.0, 0.90, 0.60, val_loss=0.9)]
    (choice,) = sweep.coefficient_search(rows)
    assert choice.params == {"lambda": 1.0} and choice.test_accuracy == 0.60 and choice.candidates == 3


# --- CLI --------------------------------------------------------------------------------------
def test_cli_sweep_writes_table_and_heatmap_json_and_rejects_bad_files(zoo, tmp_path, ray_cluster):
    from mergescope.cli import main

    spec_file = write(zoo, "cli_barrier.yaml", {"kind": "barrier_matrix", "checkpoints": ["m0.safetensors",
                                                                                        "m1.safetensors"], "points": 3})
    out, summary = tmp_path / "t.jsonl", tmp_path / "matrix.json"
    assert main(["-q", "sweep", str(spec_file), "-o", str(out), "-w", "1", "--summary", str(summary)]) == 0
    matrix = json.loads(summary.read_text())
    assert matrix["names"] == ["m0.safetensors", "m1.safetensors"] and len(matrix["paths"]) == 1
    assert matrix["barrier_loss"][0][1] == json.loads(out.read_text())["barrier_loss"]
    assert main(["-q", "sweep", str(spec_file), "-o", str(out)]) == 2  # exists, no --resume
    on_ray = tmp_path / "ray.jsonl"  # --ray auto uses the running cluster (here: this process's connection)
    assert main(["-q", "sweep", str(spec_file), "-o", str(on_ray), "--ray", "auto"]) == 0
    assert on_ray.read_bytes() == out.read_bytes()
    bad = write(tmp_path, "bad.yaml", {"kind": "evaluate", "checkpoints": ["x"], "extra": 1})
    assert main(["-q", "sweep", str(bad), "-o", str(tmp_path / "u.jsonl")]) == 2
