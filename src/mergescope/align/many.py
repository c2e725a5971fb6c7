"""Aligning more than two models: to one reference, or MergeMany (Ainsworth et al. 2023, Alg. 3).

MergeMany repeatedly picks a model (in a seeded random order) and weight-matches it to the mean
of all the others, until no permutation changes; the merged model is the mean of the aligned
states. Aligning everything to a single reference is the cheap one-pass alternative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MergescopeError
from ..state import average
from .matching import weight_matching
from .permute import apply, identity
from .spec import as_spec


@dataclass(frozen=True)
class ManyResult:
    """Aligned states (same order as given), their mean, and the permutation of each."""

    states: list[dict[str, torch.Tensor]]
    mean: dict[str, torch.Tensor]
    perms: list[dict[str, torch.Tensor]]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"info": dict(self.info), "perms": [{k: v.tolist() for k, v in p.items()} for p in self.perms]}


def mean_state(states: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating tensors; integer buffers from the first state (``mergescope.state.average``)."""
    return average(states)


def align_to_reference(spec, states: Sequence[Mapping], reference: int = 0, seed: int = 0) -> ManyResult:
    """Weight-match every state to ``states[reference]``."""
    spec = as_spec(spec).with_sizes(states[0])
    perms = [identity(spec) if i == reference else weight_matching(spec, states[reference], s, seed=seed).perms
             for i, s in enumerate(states)]
    aligned = [dict(s) if i == reference else apply(spec, p, s) for i, (s, p) in enumerate(zip(states, perms))]
    return ManyResult(aligned, mean_state(aligned), perms, {"method": "reference", "reference": reference})


def merge_many(spec, states: Sequence[Mapping], seed: int = 0, max_rounds: int = 50) -> ManyResult:
    """MergeMany: align each model to the mean of the others in turn until nothing moves."""
    if len(states) < 2:
        raise MergescopeError(f"merge_many: need at least 2 states, got {len(states)}")
    spec = as_spec(spec).with_sizes(states[0])
    originals = [dict(s) for s in states]
    perms = [identity(spec) for _ in states]
    aligned = [dict(s) for s in originals]
    rng = np.random.default_rng(seed)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for i in rng.permutation(len(states)):
            others = mean_state([aligned[j] for j in range(len(states)) if j != i])
            new = weight_matching(spec, others, originals[i], seed=int(rng.integers(1 << 31)), init=perms[i]).perms
            if any(not torch.equal(new[p], perms[i][p]) for p in new):
                changed = True
                perms[i] = new
                aligned[i] = apply(spec, new, originals[i])
        if not changed:
            break
    return ManyResult(aligned, mean_state(aligned), perms, {"method": "merge_many", "rounds": rounds, "seed": seed})
