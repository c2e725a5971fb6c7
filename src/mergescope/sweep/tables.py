"""Turning result rows into answers: the barrier matrix, and coefficient search (val picks, test reports)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import MergescopeError
from ..landscape import BarrierMatrix, PathResult


def _num(x) -> float:
    """A metric as stored in a row: ``null`` (written for NaN/Inf, see ``results``) reads as NaN."""
    return math.nan if x is None else float(x)


def _path_from_dict(d: dict) -> PathResult:
    def tup(v):
        return None if v is None else tuple(_num(x) for x in v)

    return PathResult(t=tup(d["t"]), split=d["split"], loss=tup(d["loss"]), accuracy=tup(d["accuracy"]),
                      train_loss=tup(d["train_loss"]), train_accuracy=tup(d["train_accuracy"]),
                      bn_reset=d["bn_reset"], naive_loss=tup(d["naive_loss"]), naive_accuracy=tup(d["naive_accuracy"]))


def barrier_matrix_from_rows(rows: Iterable[dict], names: Sequence[str] | None = None) -> BarrierMatrix:
    """Assemble a ``BarrierMatrix`` (same ``to_dict()`` shape the study report's heatmap reads) from
    the rows of a barrier_matrix sweep; ``names`` defaults to the checkpoints as written in the sweep.
    Paths are in pair order (0,1), (0,2), ..., as ``landscape.barrier_matrix`` orders them."""
    rows = [r for r in rows if r.get("kind") == "barrier"]
    if not rows:
        raise MergescopeError("barrier matrix: no barrier rows in the results")
    size = 1 + max(max(r["i"], r["j"]) for r in rows)
    labels = [None] * size
    for r in rows:
        labels[r["i"]], labels[r["j"]] = r["a"], r["b"]
    by_pair = {(r["i"], r["j"]): r for r in rows}
    missing = [(i, j) for i in range(size) for j in range(i + 1, size) if (i, j) not in by_pair]
    if missing:
        raise MergescopeError(f"barrier matrix: {len(missing)} pair(s) not computed yet, e.g. {missing[0]}; resume the sweep")
    loss = [[0.0] * size for _ in range(size)]
    acc = [[0.0] * size for _ in range(size)]
    paths = []
    for (i, j) in sorted(by_pair):
        r = by_pair[(i, j)]
        loss[i][j] = loss[j][i] = _num(r["barrier_loss"])
        acc[i][j] = acc[j][i] = _num(r["barrier_acc"])
        paths.append(_path_from_dict(r["path"]))
    first = paths[0]
    return BarrierMatrix(tuple(names) if names is not None else tuple(labels), tuple(map(tuple, loss)),
                         tuple(map(tuple, acc)), first.split, len(first.t), first.bn_reset, tuple(paths))


@dataclass(frozen=True)
class Choice:
    """The grid point a coefficient search picked for one (method, model set, alignment)."""

    method: str
    models: tuple[str, ...]
    align: str
    params: dict
    candidates: int
    val_accuracy: float
    val_loss: float
    test_accuracy: float
    test_loss: float
    id: str

    def to_dict(self) -> dict:
        return {"method": self.method, "models": list(self.models), "align": self.align, "params": self.params,
                "candidates": self.candidates, "val_accuracy": self.val_accuracy, "val_loss": self.val_loss,
                "test_accuracy": self.test_accuracy, "test_loss": self.test_loss, "id": self.id}


def _rank(r: dict) -> tuple:
    """Best validation accuracy first, then lower validation loss, then id; a metric that is null (not a
    finite number: the merge diverged) ranks last."""
    acc, loss = _num(r["val_accuracy"]), _num(r["val_loss"])
    return (-acc if math.isfinite(acc) else math.inf, loss if math.isfinite(loss) else math.inf, r["id"])


def coefficient_search(rows: Iterable[dict]) -> list[Choice]:
    """Per (method, models, align): the grid point with the best validation accuracy (ties: lower
    validation loss, then id), reported with its *test* numbers, so test data never picks a coefficient."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("kind") == "merge":
            key = json.dumps([r["method"], r["models"], r["align"]])
            groups.setdefault(key, []).append(r)
    out = []
    for key in sorted(groups):
        cands = groups[key]
        best = min(cands, key=_rank)
        out.append(Choice(best["method"], tuple(best["models"]), best["align"], best["params"], len(cands),
                          best["val_accuracy"], best["val_loss"], best["test_accuracy"], best["test_loss"], best["id"]))
    return out
