"""Neuron alignment: permutation specs from any torch model, matching methods, REPAIR.

Independently trained networks compute the same function under many orderings of their hidden
units; alignment finds the ordering of one model that best matches another before merging.
"""

from __future__ import annotations

from .permute import Permutation, apply, random_permutation
from .spec import PermutationSpec, as_spec
from .matching import activation_matching, weight_matching
from .trace import permutation_spec

__all__ = ["Permutation", "PermutationSpec", "activation_matching", "apply", "as_spec", "permutation_spec",
           "random_permutation", "weight_matching"]
