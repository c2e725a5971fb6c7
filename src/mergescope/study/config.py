"""What the default study trains and measures; ``quick`` shrinks everything for tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

STAGES = ("convexity", "connectivity", "determinism", "directedness", "merging", "why")


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and counts of the default digits study (defaults: the full run, < 10 min on 2 cores)."""

    quick: bool = False
    seed: int = 0
    mlp_width: int = 256
    cnn_width: int = 16
    transformer_dim: int = 32
    parent_epochs: int = 3         # the shared, short "pre-training" of the fine-tune family
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    full_epochs: int = 20          # independent runs
    independent: int = 4           # independent MLP seeds (barrier matrix size)
    finetunes: int = 4
    path_points: int = 25
    curve_epochs: int = 20
    spawn_epochs: tuple[int, ...] = (0, 1, 2, 4, 8)
    spawn_total_epochs: int = 12
    subset_a: tuple[int, ...] = (0, 1, 2, 3, 4)
    subset_b: tuple[int, ...] = (5, 6, 7, 8, 9)
    stages: tuple[str, ...] = field(default=STAGES)

    @classmethod
    def quick_config(cls, **overrides) -> StudyConfig:
        """Small widths and few epochs: the whole study in well under 90 s (used by the end-to-end test)."""
        small = dict(quick=True, mlp_width=64, cnn_width=8, transformer_dim=16, parent_epochs=2, finetune_epochs=4,
                     full_epochs=6, independent=3, finetunes=2, path_points=9, curve_epochs=4,
                     spawn_epochs=(0, 2), spawn_total_epochs=4)
        return cls(**{**small, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)
