"""LoRA / PEFT adapters: read them, apply them to a base, merge them by their updates, extract them."""

from .adapter import (
    AdaptedCheckpoint,
    Adapter,
    Target,
    is_adapter_folder,
    open_reference,
    reference_paths,
    split_reference,
)
from .combine import DELTA_METHODS, adapter_recipe, merge_adapters, merged_updates
from .factor import (
    ExtractResult,
    Factors,
    adapter_config,
    extract_lora,
    factorize,
    write_adapter,
)

__all__ = ["DELTA_METHODS", "AdaptedCheckpoint", "Adapter", "ExtractResult", "Factors", "Target", "adapter_config",
           "adapter_recipe", "extract_lora", "factorize", "is_adapter_folder", "merge_adapters", "merged_updates",
           "open_reference", "reference_paths", "split_reference", "write_adapter"]
