"""Sweeps: schema, local vs real Ray cluster (identical tables), small states through the object
store, a killed worker retried, resume after a real Ctrl-C, fail-fast on a bad --ray address.

References are independent: task arithmetic and evaluation re-done here with plain torch, the
barrier matrix from the sequential ``landscape.barrier_matrix``, and hand-made rows for the search.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def put_then_delete(ray, monkeypatch) -> list[str]:
    """Spy on ``ray.put``: record each shared checkpoint's path and delete its file right after the
    put, so a task that still read it by path would fail."""
    puts, real_put = [], ray.put

    def spy(value, **kwargs):
        ref = real_put(value, **kwargs)
        puts.append(value.path)
        os.remove(value.path)
        return ref

    monkeypatch.setattr(ray, "put", spy)
    return puts


def test_20_task_sweep_identical_locally_on_ray_by_path_and_through_the_object_store(zoo, tmp_path, ray_cluster,
                                                                                      monkeypatch):
    ray, _ = ray_cluster
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for i in range(5):
        shutil.copy(zoo / f"m{i}.safetensors", folder)
    spec_file = write(folder, "grid.yaml", GRID_20)
    local = sweep.run(spec_file, tmp_path / "local.jsonl", sweep.LocalExecutor(workers=2))
    on_ray = sweep.run(spec_file, tmp_path / "ray.jsonl", sweep.RayExecutor(workers=2, share_below=0))
    assert local.total == on_ray.total == local.ran == on_ray.ran == 20
    assert (tmp_path / "local.jsonl").read_bytes() == (tmp_path / "ray.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert ids == sorted(set(ids)) and len(ids) == 20

    # default threshold (64 MB): every checkpoint is small, so each is put once for all 20 tasks
    puts = put_then_delete(ray, monkeypatch)
    executor = sweep.RayExecutor(workers=2)
    shared = sweep.run(spec_file, tmp_path / "shared.jsonl", executor)
    want = sorted(str((folder / f"m{i}.safetensors").resolve()) for i in range(5))  # 4 in the model sets + the base
    assert sorted(puts) == sorted(executor.shared) == want
    assert not list(folder.glob("*.safetensors")), "the tasks could only have used the object store"
    assert shared.ran == 20 and (tmp_path / "shared.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()

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


def test_only_states_up_to_the_threshold_go_through_the_object_store(zoo, tmp_path, ray_cluster, monkeypatch):
    ray, _ = ray_cluster
    small = tmp_path / "small.safetensors"
    shutil.copy(zoo / "m0.safetensors", small)
    wide = build("mlp", seed=7, width=4 * WIDTH)
    save(wide.state_dict(), tmp_path / "wide.safetensors", metadata=model_metadata("mlp", {"width": 4 * WIDTH}))
    small_bytes = sum(t.numel() * t.element_size() for t in load(zoo / "m0.safetensors").values())
    names = ["small.safetensors", "./small.safetensors", "wide.safetensors"]  # small spelled twice: 2 tasks, 1 put
    spec_file = write(tmp_path, "mixed.yaml", {"kind": "evaluate", "checkpoints": names})

    puts = put_then_delete(ray, monkeypatch)
    executor = sweep.RayExecutor(workers=2, share_below=small_bytes)  # inclusive: small is exactly at it
    rows = {r["checkpoint"]: r for r in sweep.run(spec_file, tmp_path / "mixed.jsonl", executor).rows}
    assert puts == [str(small.resolve())] and executor.shared == {str(small.resolve()): small_bytes}
    assert not small.exists() and (tmp_path / "wide.safetensors").exists()  # the wide one went by path

    narrow = build("mlp", width=WIDTH)
    narrow.load_state_dict(dict(load(zoo / "m0.safetensors")))
    task = digits()
    for name, net in (("small.safetensors", narrow), ("./small.safetensors", narrow), ("wide.safetensors", wide)):
        for split in ("val", "test"):
            ref = task.evaluate(net, split)
            assert rows[name][f"{split}_accuracy"] == ref["accuracy"]
            assert rows[name][f"{split}_loss"] == pytest.approx(ref["loss"], rel=1e-6)


@pytest.mark.parametrize("share_below", ["64MB", "0"])  # read on the driver / in the task
def test_a_sweep_failing_before_its_first_row_names_the_file_and_leaves_no_table(zoo, tmp_path, ray_cluster,
                                                                              share_below):
    spec_file = write(tmp_path, "missing.yaml", {"kind": "evaluate", "checkpoints": ["gone.safetensors"]})
    out = tmp_path / "t.jsonl"
    with pytest.raises(MergescopeError, match="gone.safetensors: no such file"):
        sweep.run(spec_file, out, sweep.RayExecutor(workers=1, share_below=share_below))
    assert not out.exists()  # a rerun after fixing the sweep needs no --force


def test_share_threshold_parsing():
    assert sweep.RayExecutor(share_below="0").share_below == 0
    assert sweep.RayExecutor(share_below="64MB").share_below == 64 * 10**6
    assert sweep.RayExecutor(share_below="1GiB").share_below == 2**30
    with pytest.raises(MergescopeError, match="--share-below 'lots'"):
        sweep.RayExecutor(share_below="lots")


def _pool_running_a_long_task(ignore_sigterm: bool = False):
    """A one-worker spawn pool whose worker runs a ten-minute task (after ignoring SIGTERM, if asked); its processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    if ignore_sigterm:
        pool.submit(signal.signal, signal.SIGTERM, signal.SIG_IGN).result(timeout=120)
    running = pool.submit(time.sleep, 600)
    deadline = time.monotonic() + 120
    while not running.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pool, list(pool._processes.values())


def _shuts_down_within_a_minute(pool) -> bool:
    import threading

    closing = threading.Thread(target=pool.shutdown, kwargs={"wait": True}, daemon=True)
    closing.start()
    closing.join(timeout=60)
    return not closing.is_alive()


def test_stopping_the_local_pool_does_not_wait_for_the_running_task():
    """Ctrl-C (or an early stop) terminates the pool's workers: shutting the pool down then returns at once,
    where it used to wait for the running task (here one of ten minutes)."""
    from mergescope.sweep import executors

    pool, processes = _pool_running_a_long_task()
    try:
        executors._stop_workers(pool)
        assert _shuts_down_within_a_minute(pool), "shutdown still waits for the running task"
        assert processes and not any(p.is_alive() for p in processes)
    finally:  # a failure must not leave the ten-minute task behind
        for p in processes:
            p.kill()


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period():
    """A task's library may handle SIGTERM; its worker must not hold the CLI's exit (or its pipes) after Ctrl-C."""
    from mergescope.sweep import executors

    pool, processes = _pool_running_a_long_task(ignore_sigterm=True)
    try:
        start = time.monotonic()
        executors._stop_workers(pool, grace_s=1.0)
        assert processes and not any(p.is_alive() for p in processes)
        assert time.monotonic() - start < 60
        assert [p.exitcode for p in processes] == [-signal.SIGKILL]  # SIGTERM was ignored: it took the kill
        assert _shuts_down_within_a_minute(pool)
    finally:
        for p in processes:
            p.kill()


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


# --- resume after a real Ctrl-C ----------------------------------------------------------------
def complete_rows(path: Path) -> list[str]:
    """Lines of a results table that are whole JSON rows (a torn last line is not)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [x for x in lines if x.endswith("}") and json.loads(x)]


def test_ctrl_c_mid_sweep_then_resume_loses_and_duplicates_nothing(zoo, tmp_path, ray_cluster):
    """SIGINT to the CLI's whole process group (what Ctrl-C in a terminal does) once the first row is
    on disk; the rerun with --resume must give the uninterrupted table byte for byte. The driver holds
    after its first row (``sweep.HOLD_ENV`` names a file never created), so the signal always lands
    mid-sweep however busy the machine is: timing decides nothing."""
    from mergescope.cli import main

    names = [f"m{i}.safetensors" for i in range(5)]  # 10 pairs
    spec_file = write(zoo, "long.yaml", {"kind": "barrier_matrix", "checkpoints": names, "points": 120})
    out = tmp_path / "long.jsonl"
    # Ctrl-C in a terminal reaches a process whose SIGINT is the default; a parent started in the background by a
    # non-interactive shell (`cmd &`, as a CI runner may start the suite) hands its children SIGINT ignored, and
    # Python then leaves it ignored: the CLI slept through the signal. The CLI here starts with the default.
    terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv[0] = 'mergescope'; runpy.run_module('mergescope', run_name='__main__', alter_sys=True)")
    cli = [sys.executable, "-c", terminal, "-q", "sweep", str(spec_file), "-o", str(out), "-w", "1"]
    env = {**os.environ, sweep.HOLD_ENV: str(tmp_path / "never-created"), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cli, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 300
        while not complete_rows(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say what is still running, and where the CLI is stuck
            alive = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,wchan:24,args", "-g", str(proc.pid)],
                                   capture_output=True, text=True, check=False).stdout
            os.killpg(proc.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: each Python process prints its threads
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"the CLI did not exit 120 s after Ctrl-C (exit code {proc.poll()}); its process group:\n"
                        f"{alive}\nstderr:\n{err[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "rerun with --resume" in err and "Traceback" not in err
    kept = complete_rows(out)
    assert len(kept) == 1, f"{len(kept)} rows: the driver should hold after its first row"

    assert main(["-q", "sweep", str(spec_file), "-o", str(out), "-w", "1", "--resume"]) == 0
    final = out.read_text().splitlines()
    ids = [json.loads(x)["id"] for x in final]
    assert ids == sorted(s.id for s in sweep.expand(sweep.read(spec_file), zoo))  # each task exactly once
    assert set(kept) <= set(final)  # rows finished before Ctrl-C are kept as they were
    uninterrupted = sweep.run(spec_file, tmp_path / "whole.jsonl", sweep.RayExecutor(workers=2))
    assert uninterrupted.ran == 10 and out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_ctrl_c_between_writing_a_row_and_recording_it_keeps_the_row(zoo, tmp_path, ray_cluster, monkeypatch):
    """The window the real Ctrl-C above hits most often: the row is flushed, fsync is running."""
    spec_file = write(zoo, "eval2.yaml", {"kind": "evaluate", "checkpoints": ["m0.safetensors", "m1.safetensors"]})
    out, calls, real_fsync = tmp_path / "k.jsonl", [], os.fsync

    def fsync_then_ctrl_c(fd):
        real_fsync(fd)
        calls.append(fd)
        if len(calls) == 2:  # the first is the empty table's creation, the second the first row
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(spec_file, out, sweep.RayExecutor(workers=1))
    monkeypatch.undo()
    assert len(complete_rows(out)) == 1
    resumed = sweep.run(spec_file, out, sweep.RayExecutor(workers=1), resume=True)
    assert (resumed.skipped, resumed.ran) == (1, 1) and len(complete_rows(out)) == 2


# --- a bad --ray address fails fast -----------------------------------------------------------
def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_or_malformed_ray_addresses_are_one_line_errors(monkeypatch):
    from mergescope.sweep.address import check_reachable, host_port

    assert host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert host_port("ray://head.example:10001") == ("head.example", 10001)
    assert host_port("[::1]:6379") == ("::1", 6379)

    port = closed_loopback_port()
    cases = [(f"127.0.0.1:{port}", "connection refused"), (f"ray://127.0.0.1:{port}", "connection refused"),
             ("no-such-host.invalid:6379", "cannot resolve host 'no-such-host.invalid'"),
             ("10.0.0.5", "expected 'local', 'auto', HOST:PORT"), ("head:http", "expected")]
    for address, problem in cases:
        with pytest.raises(MergescopeError, match=re.escape(problem)) as e:
            check_reachable(address)
        assert str(e.value).startswith(f"--ray {address}: ") and "\n" not in str(e.value)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what --ray auto dials
    with pytest.raises(MergescopeError, match=re.escape(f"--ray auto (127.0.0.1:{port}): cannot reach")):
        check_reachable("auto")


def test_cli_with_a_bad_ray_address_exits_2_at_once(zoo, tmp_path):
    """A fresh process (no Ray connection yet), as a user runs it; Ray alone would retry for minutes."""
    address = f"127.0.0.1:{closed_loopback_port()}"
    spec_file = write(zoo, "eval1.yaml", {"kind": "evaluate", "checkpoints": ["m0.safetensors"]})
    out = tmp_path / "never.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-m", "mergescope", "sweep", str(spec_file), "-o", str(out),
                             "--ray", address], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()  # refused before the results table is created


# --- CLI --------------------------------------------------------------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_sweep() -> tuple[str, list[str]]:
    """The sweep file and the `mergescope sweep` command the README shows."""
    text = README.read_text()
    sweep_yaml = re.search(r"```yaml file=barrier\.yaml\n(.*?)```", text, flags=re.S).group(1)
    command = re.search(r"^\$ (mergescope sweep barrier\.yaml .*)$", text, flags=re.M).group(1)
    return sweep_yaml, shlex.split(command)[1:]


def test_readme_sweep_gives_identical_tables_locally_and_on_ray_and_feeds_the_heatmap(zoo, tmp_path, ray_cluster,
                                                                                    monkeypatch):
    from mergescope.cli import main

    sweep_yaml, args = readme_sweep()
    names = yaml.safe_load(sweep_yaml)["checkpoints"]
    for i, name in enumerate(names):
        shutil.copy(zoo / f"m{i}.safetensors", tmp_path / name)
    (tmp_path / "barrier.yaml").write_text(sweep_yaml)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", *args]) == 0  # the README's command: the local pool
    out, summary = tmp_path / args[args.index("-o") + 1], tmp_path / args[args.index("--summary") + 1]
    matrix = json.loads(summary.read_text())
    rows = {(r["i"], r["j"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert matrix["names"] == names and len(matrix["paths"]) == len(rows) == len(names) * (len(names) - 1) // 2
    loss = matrix["barrier_loss"]
    assert all(loss[i][j] == loss[j][i] == r["barrier_loss"] for (i, j), r in rows.items())

    # the same file on the Ray cluster (--ray auto: this process's connection), summary drawn as the study heatmap
    assert main(["-q", "sweep", "barrier.yaml", "-o", "ray.jsonl", "--ray", "auto", "--summary", "ray.json",
                 "--plot", "ray.png"]) == 0
    assert (tmp_path / "ray.jsonl").read_bytes() == out.read_bytes()
    assert json.loads((tmp_path / "ray.json").read_text()) == matrix
    assert (tmp_path / "ray.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["-q", *args]) == 2  # the table exists: --resume or --force
    bad = write(tmp_path, "bad.yaml", {"kind": "evaluate", "checkpoints": ["x"], "extra": 1})
    assert main(["-q", "sweep", str(bad), "-o", str(tmp_path / "u.jsonl")]) == 2


def test_summary_table_keeps_picked_parameters_whole_off_a_terminal(tmp_path):
    """Off a terminal rich squeezes tables into 80 columns and cuts cells to '...'; the CLI's consoles
    are wide there and the picked column folds instead of cutting."""
    import io

    from rich.console import Console

    from mergescope.cli import common
    from mergescope.cli.sweep_cmd import _search_table
    from mergescope.sweep.tables import Choice

    picked = {"density": 0.5, "lambda": 0.75, "majority_sign_method": "total"}
    choice = Choice("ties", ("long_model_name_0", "long_model_name_1", "long_model_name_2"), "weight", picked,
                    12, 0.9611, 0.12, 0.9555, 0.1234, "id0")
    with open(tmp_path / "log.txt", "w") as pipe:  # a file is what `mergescope sweep ... > log` writes to
        assert common._width(pipe) == 200
    wide, narrow = io.StringIO(), io.StringIO()
    Console(file=wide, width=200).print(_search_table([choice]))
    assert "density=0.5, lambda=0.75, majority_sign_method=total" in wide.getvalue()
    Console(file=narrow, width=80).print(_search_table([choice]))
    assert "\u2026" not in narrow.getvalue()  # folded over lines, never cut
