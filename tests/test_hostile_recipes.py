"""Hostile recipes, sweep files and study configs (issue 14): FIFOs, non-UTF-8 text, YAML alias
bombs, huge integers, layer ranges past the model, weights that overflow, tensors some models lack,
unbounded sweep sizes, non-finite grid values and metrics, and a --ray address where something that
is not Ray accepts the connection.

Representatives of the classes that could hang or eat memory run the CLI in a subprocess through
``hostile.attack`` (wall-clock limit, peak RSS); the other variants run the CLI in-process under a
SIGALRM guard. ``hostile.assert_refused`` checks every promise: exit 2, one line naming the file and
the problem, no traceback, nothing changed or written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hostile import Hung, assert_refused, attack, run_inprocess  # noqa: E402

from mergescope import recipe as R  # noqa: E402
from mergescope import sweep  # noqa: E402
from mergescope.errors import MergescopeError  # noqa: E402
from mergescope.io import load, save  # noqa: E402
from mergescope.merge import methods as M  # noqa: E402
from mergescope.sweep.results import ResultsWriter  # noqa: E402

HUGE_INT = "9" * 5000  # over Python's 4,300-digit int conversion limit
LAYERS = 2


def toy(path: Path, seed: int, drop: tuple[str, ...] = (), extra: tuple[str, ...] = (), layers: int = LAYERS) -> None:
    """A tiny Llama-named checkpoint: ``layers`` layers of 3-vectors, a norm; tensors dropped or added."""
    g = torch.Generator().manual_seed(seed)
    state = {f"model.layers.{i}.w": torch.randn(3, generator=g) for i in range(layers)}
    state["model.norm.weight"] = torch.randn(3, generator=g)
    state.update({name: torch.randn(3, generator=g) for name in extra})
    save({k: v for k, v in state.items() if k not in drop}, path)


@pytest.fixture
def models(tmp_path):
    for seed, name in enumerate(("a", "b", "base")):
        toy(tmp_path / f"{name}.safetensors", seed)
    toy(tmp_path / "lacks_norm.safetensors", 3, drop=("model.norm.weight",))
    toy(tmp_path / "with_head.safetensors", 4, extra=("lm_head.weight",))
    return tmp_path


def bomb(levels: int = 9, width: int = 9) -> str:
    """A billion-laughs YAML fragment: ``width ** levels`` nodes once expanded."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nboom: *l{levels - 1}\n"


LINEAR = "merge_method: linear\nmodels:\n  - {model: a.safetensors, parameters: {weight: 1.0}}\n"


# ---- 1. every YAML through io.untrusted: FIFO, UTF-8, alias bombs, huge integers -------------------

def test_fifo_recipe_is_refused_at_once(models):
    os.mkfifo(models / "recipe.yml")
    out = attack(["merge", "recipe.yml", "out"], models, timeout=60)
    assert_refused(out, "recipe.yml", "FIFO", max_seconds=30)


def test_recipe_alias_bomb_is_refused_in_bounded_memory(models):
    (models / "recipe.yml").write_text(LINEAR + bomb())
    out = attack(["merge", "recipe.yml", "out"], models, timeout=60)
    assert_refused(out, "recipe.yml", "alias bomb", max_rss_mb=600, max_seconds=30)


@pytest.mark.parametrize("name, content, problem", [
    ("latin1", (LINEAR + "# café\n").encode("latin-1"), "not UTF-8"),
    ("hugeint", (LINEAR + f"parameters: {{lambda: {HUGE_INT}}}\n").encode(), "4300 digits"),
    ("smallbomb", (LINEAR + bomb(6, 10)).encode(), "alias bomb"),
    ("folder", None, "a folder"),
])
def test_bad_recipe_files_are_one_line(models, capsys, name, content, problem):
    path = models / f"{name}.yml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    out = run_inprocess(["merge", path.name, "out"], models, capsys)
    assert_refused(out, path.name, problem)


def test_inline_recipe_text_goes_through_the_bounded_parser():
    with pytest.raises(MergescopeError, match="alias bomb") as e:
        R.read(LINEAR + bomb())
    assert str(e.value).startswith("recipe: ")
    with pytest.raises(MergescopeError, match="4300 digits"):
        R.read(LINEAR + f"parameters: {{lambda: {HUGE_INT}}}\n")


# ---- 2. layer ranges checked against the layers the models have -----------------------------------

def slices(*sources: tuple[str, object]) -> str:
    body = "".join(f"  - sources: [{{model: {m}, layer_range: {r}}}]\n" for m, r in sources)
    return f"merge_method: passthrough\nslices:\n{body}"


def test_layer_range_far_past_the_model_is_refused_at_once(models):
    (models / "recipe.yml").write_text(slices(("a.safetensors", "[0, 1000000000]")))
    out = attack(["merge", "recipe.yml", "out"], models, timeout=60)
    assert_refused(out, "recipe.yml", "'a.safetensors'", "[0, 1000000000]", f"has {LAYERS} layers", max_seconds=30)


@pytest.mark.parametrize("ranges, names", [
    ([("a.safetensors", "[0, 1]"), ("b.safetensors", "[1, 3]")], ["'b.safetensors'", "[1, 3]", f"has {LAYERS} layers"]),
    ([("a.safetensors", f"[0, {'9' * 4000}]")], ["'a.safetensors'", "(4000 digits)"]),
    ([("a.safetensors", "[-1, 1]")], ["'a.safetensors'", "[-1, 1]", "0 <= start < end"]),
    ([("a.safetensors", "[2, 1]")], ["'a.safetensors'", "[2, 1]", "0 <= start < end"]),
    ([("flat.safetensors", "[0, 1]")], ["'flat.safetensors'", "no numbered layers"]),
])
def test_bad_layer_ranges_name_the_model_and_the_range(models, capsys, ranges, names):
    save({"w": torch.ones(3)}, models / "flat.safetensors")
    (models / "recipe.yml").write_text(slices(*ranges))
    out = run_inprocess(["merge", "recipe.yml", "out"], models, capsys)
    assert_refused(out, "recipe.yml", *names)


def test_too_many_stacked_layers_are_refused_before_planning(models, capsys):
    text = slices(*[("a.safetensors", f"[0, {LAYERS}]")] * 5001)  # 10,002 output layers
    (models / "recipe.yml").write_text(text)
    out = run_inprocess(["merge", "recipe.yml", "out"], models, capsys)
    assert_refused(out, "recipe.yml", "10002 layers", "10000", max_seconds=10)


# ---- 3. weights whose use would overflow ---------------------------------------------------------

@pytest.mark.parametrize("recipe, names", [
    ("merge_method: linear\nmodels:\n  - {model: a.safetensors, parameters: {weight: 1.0e+308}}\n"
     "  - {model: b.safetensors, parameters: {weight: 1.0}}\n", ["'a.safetensors'", "'weight'", "float32"]),
    ("merge_method: linear\nmodels:\n  - {model: a.safetensors, parameters: {weight: 3.0e+38}}\n"
     "  - {model: b.safetensors, parameters: {weight: 3.0e+38}}\n", ["recipe.yml", "'weight'", "add up to 6e+38"]),
    ("merge_method: ties\nbase_model: base.safetensors\nmodels:\n  - {model: a.safetensors, parameters: {weight: 2.0e+38}}\n"
     "  - {model: b.safetensors, parameters: {weight: -2.0e+38}}\n", ["recipe.yml", "add up to 4e+38"]),
    ("merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels:\n  - {model: a.safetensors, parameters: "
     "{weight: 1.0}}\nparameters: {lambda: -1.0e+300}\n", ["'lambda'", "float32"]),
    (f"merge_method: linear\nmodels:\n  - {{model: a.safetensors, parameters: {{weight: {'9' * 400}}}}}\n",
     ["'a.safetensors'", "'weight'", "finite number"]),
])
def test_weights_that_would_overflow_are_one_line(models, capsys, recipe, names):
    (models / "recipe.yml").write_text(recipe)
    out = run_inprocess(["merge", "recipe.yml", "out.safetensors"], models, capsys)
    assert_refused(out, *names)


def test_every_method_survives_the_largest_accepted_parameters():
    """No method raises (traceback) on float parameters at the accepted limit, even on fp16 tensors:
    the result may be Inf/NaN, which the engine's finiteness check reports in one line."""
    big = R.FLOAT_LIMIT
    for dtype in (torch.float16, torch.float32):
        t = [torch.ones(4, dtype=dtype) * (i + 1) for i in range(3)]
        for name, method in M.REGISTRY.items():
            n = 1 if method.max_inputs == 1 or name in ("slerp", "nearswap") else 2 if name == "nuslerp" else 3
            params = {p.name: big if p.scope == "shared" else [big] * n for p in method.params
                      if p.kind is float and p.name not in ("density", "epsilon", "gamma")}
            try:
                method(t[:n], None if method.base == "ignored" else torch.zeros(4, dtype=dtype), **params)
            except MergescopeError:  # a one-line refusal is fine too (multislerp: eps swallows the mean)
                pass


# ---- 4. a tensor present in some models but not all ----------------------------------------------

@pytest.mark.parametrize("recipe, names", [
    # the first model lacks a tensor the others have (it used to be dropped silently)
    ("merge_method: linear\nmodels:\n  - {model: lacks_norm.safetensors, parameters: {weight: 1}}\n"
     "  - {model: a.safetensors, parameters: {weight: 1}}\n", ["'model.norm.weight'", "'lacks_norm.safetensors'"]),
    # a later model lacks it
    ("merge_method: linear\nmodels:\n  - {model: a.safetensors, parameters: {weight: 1}}\n"
     "  - {model: lacks_norm.safetensors, parameters: {weight: 1}}\n", ["'model.norm.weight'", "'lacks_norm.safetensors'"]),
    # a later model has an extra tensor the base lacks: TIES needs the base's tensor
    ("merge_method: ties\nbase_model: base.safetensors\nmodels:\n  - {model: a.safetensors, parameters: {weight: 1}}\n"
     "  - {model: with_head.safetensors, parameters: {weight: 1}}\n",
     ["'lm_head.weight'", "base model 'base.safetensors'", "'with_head.safetensors'"]),
    # a model of a task-vector merge lacks a tensor no architecture lets it lack
    ("merge_method: ties\nbase_model: base.safetensors\nmodels:\n  - {model: a.safetensors, parameters: {weight: 1}}\n"
     "  - {model: lacks_norm.safetensors, parameters: {weight: 1}}\n",
     ["'model.norm.weight'", "'lacks_norm.safetensors'"]),
    # only the base has it, and slerp cannot merge it from the base alone
    ("merge_method: slerp\nbase_model: a.safetensors\nmodels: [{model: lacks_norm.safetensors}]\nparameters: {t: 0.5}\n",
     ["'model.norm.weight'", "'lacks_norm.safetensors'"]),
    # only the base lacks it, and TIES needs the base to form task vectors
    ("merge_method: ties\nbase_model: lacks_norm.safetensors\nmodels:\n  - {model: a.safetensors, parameters: {weight: 1}}\n"
     "  - {model: b.safetensors, parameters: {weight: 1}}\n", ["'model.norm.weight'", "base model 'lacks_norm.safetensors'"]),
])
def test_a_tensor_some_models_lack_is_one_line(models, capsys, recipe, names):
    (models / "recipe.yml").write_text(recipe)
    out = run_inprocess(["merge", "recipe.yml", "out.safetensors"], models, capsys)
    assert_refused(out, *names)


def test_a_tensor_only_the_base_has_is_copied_by_task_vector_methods(models, capsys):
    (models / "recipe.yml").write_text(
        "merge_method: task_arithmetic\nbase_model: with_head.safetensors\nmodels:\n"
        "  - {model: a.safetensors, parameters: {weight: 0.5}}\n  - {model: b.safetensors, parameters: {weight: 0.5}}\n")
    assert run_inprocess(["-q", "merge", "recipe.yml", "out.safetensors"], models, capsys).code == 0
    out, base = load(models / "out.safetensors"), load(models / "with_head.safetensors")
    assert sorted(out) == sorted(base)
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])


def test_a_tensor_only_the_base_lacks_is_merged_from_the_others_by_optional_base_methods(models, capsys):
    (models / "recipe.yml").write_text(
        "merge_method: nuslerp\nbase_model: lacks_norm.safetensors\nmodels:\n"
        "  - {model: a.safetensors, parameters: {weight: 1}}\n  - {model: b.safetensors, parameters: {weight: 1}}\n")
    assert run_inprocess(["-q", "merge", "recipe.yml", "out.safetensors"], models, capsys).code == 0
    out, a, b = (load(models / f"{n}.safetensors") for n in ("out", "a", "b"))
    want = M.get("nuslerp")([a["model.norm.weight"], b["model.norm.weight"]], None, weight=[1.0, 1.0])
    assert torch.allclose(out["model.norm.weight"], want)


def test_methods_that_copy_from_the_base_return_it_unchanged():
    base = torch.randn(5)
    from mergescope.merge.plan import COPIES_FROM_BASE

    for name in COPIES_FROM_BASE:
        assert torch.equal(M.get(name)([], base, **({"weight": [], "density": []} if name != "sce" else {})), base)


# ---- 5/6. sweep files: untrusted reading, grid values, sizes ---------------------------------------

def write_sweep(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


GRID = ("kind: merge_grid\ncheckpoints: [a.safetensors, b.safetensors]\nbase: base.safetensors\n"
        "methods:\n  - method: {method}\n    grid: {grid}\n")


def test_fifo_sweep_file_is_refused_at_once(models):
    os.mkfifo(models / "sweep.yaml")
    out = attack(["sweep", "sweep.yaml", "-o", "out.jsonl"], models, timeout=60)
    assert_refused(out, "sweep.yaml", "FIFO", max_seconds=30)


def test_sweep_of_10_to_the_8_tasks_is_refused_before_expanding(models):
    values = "[" + ", ".join(f"{0.01 * (i + 1):.2f}" for i in range(100)) + "]"
    grid = "{" + ", ".join(f"{k}: {values}" for k in ("lambda", "weight", "density", "epsilon")) + "}"
    write_sweep(models, "sweep.yaml", GRID.format(method="della", grid=grid))
    out = attack(["sweep", "sweep.yaml", "-o", "out.jsonl"], models, timeout=60)
    assert_refused(out, "sweep.yaml", "100,000,000 tasks", "10,000", max_rss_mb=600, max_seconds=30)


@pytest.mark.parametrize("text, names", [
    (GRID.format(method="linear", grid="{weight: [.nan, .inf]}"), ["grid.weight", "finite number", "nan"]),
    (GRID.format(method="ties", grid="{density: [0.5, 1.5]}"), ["grid.density", "(0, 1]", "1.5"]),
    (GRID.format(method="ties", grid="{density: [-1]}"), ["grid.density", "(0, 1]", "-1"]),
    (GRID.format(method="ties", grid="{densty: [0.5]}"), ["'densty'", "not used by ties"]),
    (GRID.format(method="task_arithmetic", grid="{lambda: [1.0e+300]}"), ["grid.lambda", "float32"]),
    (GRID.format(method="ties", grid="{weight: [[1, 2, 3]]}"), ["grid.weight", "3 values for 2 models"]),
    (GRID.format(method="ties", grid="{normalize: [maybe]}"), ["grid.normalize", "must be bool"]),
    (GRID.format(method="ties", grid="{density: [0.5]}").replace("base: base.safetensors\n", ""), ["needs 'base'"]),
    ("kind: barrier_matrix\ncheckpoints: [" + ", ".join(f"c{i}" for i in range(200)) + "]\n",
     ["19,900 tasks", "10,000"]),
    ("kind: barrier_matrix\ncheckpoints: [a, b]\npath: bezier\ncurve_epochs: 1000000000\n", ["curve_epochs", "10000"]),
    ("kind: barrier_matrix\ncheckpoints: [a, b]\npoints: 1000000000\n", ["points", "1001"]),
    ("kind: barrier_matrix\ncheckpoints: [a, b]\nseed: 100000000000000000000000000000\n", ["seed"]),
    ("kind: barrier_matrix\ncheckpoints: [a, b]\npoints: " + HUGE_INT + "\n", ["4300 digits"]),
    ("kind: barrier_matrix\ncheckpoints: [a, b]\n" + bomb(6, 10), ["alias bomb"]),
])
def test_bad_sweep_files_are_one_line(models, capsys, text, names):
    write_sweep(models, "sweep.yaml", text)
    out = run_inprocess(["sweep", "sweep.yaml", "-o", "out.jsonl"], models, capsys)
    assert_refused(out, "sweep.yaml", *names, max_seconds=10)


def test_non_utf8_sweep_file_is_one_line(models, capsys):
    (models / "sweep.yaml").write_bytes("kind: evaluate\ncheckpoints: [a.safetensors]\n# café\n".encode("latin-1"))
    out = run_inprocess(["sweep", "sweep.yaml", "-o", "out.jsonl"], models, capsys)
    assert_refused(out, "sweep.yaml", "not UTF-8")


def test_task_count_is_arithmetic_and_the_cap_is_inclusive():
    cks = [f"c{i}" for i in range(142)]  # 142 * 141 / 2 = 10,011 pairs
    with pytest.raises(MergescopeError, match="10,011 tasks"):
        sweep.parse({"kind": "barrier_matrix", "checkpoints": cks})
    ok = sweep.parse({"kind": "barrier_matrix", "checkpoints": cks[:141]})  # 9,870 pairs
    assert sweep.spec.count_tasks(ok) == 9_870 == len(sweep.expand(ok))
    grid = sweep.parse({"kind": "merge_grid", "checkpoints": ["a", "b"], "base": "c",
                        "methods": [{"method": "ties", "grid": {"lambda": [0.1 * i for i in range(1, 101)],
                                                                "density": [0.01 * i for i in range(1, 51)]}}],
                        "align": ["none", "weight"]})
    assert sweep.spec.count_tasks(grid) == 10_000 == len(sweep.expand(grid))


def test_grid_values_are_converted_like_a_recipe_for_the_worker():
    from mergescope.sweep.work import method_params

    got = method_params("ties", {"density": 1, "normalize": "false", "weight": [1, 2]}, 2, seed=0)
    assert got == {"density": [1.0, 1.0], "normalize": False, "weight": [1.0, 2.0]}
    assert method_params("dare_ties", {"seed": 7}, 2, seed=0)["seed"] == 7


class _Rows:
    """An executor that yields given rows (as a worker would return them)."""

    workers = 1

    def __init__(self, rows):
        self.rows = rows

    def run(self, specs):
        yield from self.rows


def test_result_rows_are_strict_json_with_null_for_non_finite_metrics(tmp_path):
    spec = sweep.parse({"kind": "evaluate", "checkpoints": ["a", "b"]})
    specs = sweep.expand(spec, tmp_path)
    rows = [{"id": specs[0].id, "kind": "evaluate", "checkpoint": "a", "val_loss": float("nan"), "val_accuracy": 0.5,
             "test_loss": float("inf"), "test_accuracy": 0.25, "curve": [1.0, float("-inf")]},
            {"id": specs[1].id, "kind": "evaluate", "checkpoint": "b", "val_loss": 1.0, "val_accuracy": 0.5,
             "test_loss": 2.0, "test_accuracy": 0.25}]
    out = tmp_path / "t.jsonl"
    result = sweep.run_specs(specs, out, _Rows(rows))

    def strict(token):
        raise AssertionError(f"non-JSON token {token}")

    lines = [json.loads(x, parse_constant=strict) for x in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in lines}
    assert by_id[specs[0].id]["val_loss"] is None and by_id[specs[0].id]["test_loss"] is None
    assert by_id[specs[0].id]["curve"] == [1.0, None] and by_id[specs[1].id]["val_loss"] == 1.0
    assert list(result.rows) == [by_id[k] for k in sorted(by_id)]  # what is returned is what is on disk
    # an old table holding bare NaN tokens is rewritten as strict JSON on --resume
    out.write_text(json.dumps(rows[0]) + "\n")
    assert "NaN" in out.read_text()
    ResultsWriter(out, resume=True).close()
    assert "NaN" not in out.read_text() and json.loads(out.read_text(), parse_constant=strict)["val_loss"] is None


def test_tables_read_null_metrics_as_nan_and_rank_them_last():
    def row(i, val_acc, val_loss):
        return {"id": f"{i:02d}", "kind": "merge", "method": "task_arithmetic", "params": {"lambda": i},
                "models": ["a", "b"], "align": "none", "val_accuracy": val_acc, "val_loss": val_loss,
                "test_accuracy": 0.5, "test_loss": None}

    (choice,) = sweep.coefficient_search([row(0, None, None), row(1, 0.3, None), row(2, 0.3, 2.0)])
    assert choice.id == "02"


def test_results_table_that_is_a_fifo_is_refused_on_resume(tmp_path):
    os.mkfifo(tmp_path / "t.jsonl")
    with pytest.raises(MergescopeError, match="FIFO"):
        sweep.read_rows(tmp_path / "t.jsonl")


# ---- study config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    (None, "FIFO"),
    ("model: mlp\ncheckpoints: [a, b]\n# café\n".encode("latin-1"), "not UTF-8"),
    (("model: mlp\ncheckpoints: [a, b]\n" + bomb(6, 10)).encode(), "alias bomb"),
    (f"model: mlp\ncheckpoints: [a, b]\nseed: {HUGE_INT}\n".encode(), "4300 digits"),
    (b"model: mlp\ncheckpoints: [a, b]\npath_points: 1000000000\n", "path_points"),
    (b"model: mlp\ncheckpoints: [a, b]\ncurve_epochs: 1000000000\n", "curve_epochs"),
    (("model: mlp\ncheckpoints: [" + ", ".join(f"c{i}" for i in range(142)) + "]\n").encode(), "142 models"),
])
def test_bad_study_configs_are_one_line(tmp_path, content, problem):
    from mergescope.study.custom import read_config

    path = tmp_path / "study.yaml"
    if content is None:
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    def on_alarm(*_):
        raise Hung("read_config blocked")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(10)
    try:
        with pytest.raises(MergescopeError, match=problem) as e:
            read_config(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


# ---- 7. --ray at a port where something that is not Ray accepts -----------------------------------

class Server:
    """A loopback TCP server that accepts and then stays silent, or answers like an HTTP/1 server."""

    def __init__(self, answer: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.answer, self.conns = answer, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.answer is not None:
                try:
                    conn.recv(4096)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("answer, problem", [
    (None, "no HTTP/2 (gRPC) answer within 5 s"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "'HTTP/1.1 400 Bad Request', not HTTP/2"),
])
def test_ray_address_where_a_non_ray_service_accepts_fails_in_seconds(models, answer, problem):
    server = Server(answer)
    try:
        address = f"127.0.0.1:{server.port}"
        (models / "sweep.yaml").write_text("kind: evaluate\ncheckpoints: [a.safetensors]\n")
        env = {"RAY_ADDRESS": "", "RAY_USE_TLS": "0"}
        out = attack(["sweep", "sweep.yaml", "-o", "out.jsonl", "--ray", address], models, timeout=60, env=env)
    finally:
        server.close()
    assert_refused(out, address, "not a Ray head", problem, max_seconds=25)


def test_probe_accepts_an_http2_server_and_the_real_check_is_bounded():
    """A server that answers the preface with a SETTINGS frame (as every gRPC server does) passes."""
    from mergescope.sweep.address import check_reachable

    server = Server(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    try:
        start = time.monotonic()
        check_reachable(f"127.0.0.1:{server.port}")
        assert time.monotonic() - start < 5
    finally:
        server.close()
