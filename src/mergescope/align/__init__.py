"""Neuron alignment: permutation specs from any torch model, matching methods, REPAIR.

Independently trained networks compute the same function under many orderings of their hidden
units; alignment finds the ordering of one model that best matches another before merging.
"""

from __future__ import annotations

from .api import AlignResult, align_models, interpolate_states
from .matching import activation_matching, weight_matching
from .permute import Permutation, apply, random_permutation
from .repair import repair, reset_bn_stats
from .spec import PermutationSpec, as_spec
from .trace import permutation_spec

__all__ = ["AlignResult", "Permutation", "PermutationSpec", "activation_matching", "align_models", "apply", "as_spec",
           "interpolate_states", "permutation_spec", "random_permutation", "repair", "reset_bn_stats",
           "weight_matching"]
