"""Neuron alignment: permutation specs from any torch model, matching methods, REPAIR.

Independently trained networks compute the same function under many orderings of their hidden
units; alignment finds the ordering of one model that best matches another before merging.
"""

from __future__ import annotations

from .api import AlignResult, align_models, interpolate_states
from .cca import CCAResult, cca_merge, cca_merge_many
from .many import ManyResult, align_to_reference, merge_many
from .matching import activation_matching, weight_matching
from .ot import FusionResult, ot_alignment, ot_fusion
from .partial import zipped_model
from .permute import Permutation, apply, random_permutation
from .registry import Aligner, get, names
from .repair import repair, reset_bn_stats
from .spec import PermutationSpec, as_spec
from .ste import ste_matching
from .trace import permutation_spec
from .zipit import ZipResult, zipit

__all__ = ["AlignResult", "Aligner", "CCAResult", "FusionResult", "ManyResult", "Permutation", "PermutationSpec",
           "ZipResult", "activation_matching", "align_models", "align_to_reference", "apply", "as_spec", "cca_merge",
           "cca_merge_many", "get", "interpolate_states", "merge_many", "names", "ot_alignment", "ot_fusion",
           "permutation_spec", "random_permutation", "repair", "reset_bn_stats", "ste_matching", "weight_matching",
           "zipit", "zipped_model"]
