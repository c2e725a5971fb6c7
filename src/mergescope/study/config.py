"""What the default study trains and measures; ``quick`` shrinks everything for tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

STAGES = ("convexity", "connectivity", "determinism", "directedness", "merging", "why")
REPLICATE_SEED_STRIDE = 1000  # replicate r uses seeds seed + 1000 r + offset: no two replicates share a model


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and counts of the default study (digits + MNIST-1D; defaults: the full run).

    Every stage runs ``replicates`` times with disjoint seeds (new initializations, data orders,
    parents); the report shows means with 95% intervals over them and compares conditions with
    paired differences. Replicates run in ``workers`` processes (default: one per core, at most 2).
    """

    quick: bool = False
    seed: int = 0
    replicates: int = 3
    determinism_replicates: int = 5  # the spawn effect on MNIST-1D is small next to seed noise: more runs
    workers: int | None = None
    mlp_width: int = 256
    cnn_width: int = 16
    transformer_dim: int = 32
    transformer_epochs: int = 40
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
    # MNIST-1D (harder than digits: where averaging independent runs fails and spawning shows).
    # The spawn setting comes from bench/mnist1d_determinism.py: at lr 3e-2 children spawned at k=0
    # end in different basins (barrier 0.053 [0.036, 0.070] over 5 replicates), at lower rates not.
    mnist1d_model: str = "cnn1d"
    mnist1d_width: int = 32
    mnist1d_epochs: int = 10
    mnist1d_spawn_model: str = "cnn1d"
    mnist1d_spawn_width: int = 16
    mnist1d_spawn_lr: float = 3e-2
    mnist1d_spawn_epochs: int = 10
    mnist1d_spawn_ks: tuple[int, ...] = (0, 1, 2, 4)  # the barrier is 0 from k=4 on (bench/mnist1d_determinism)
    stages: tuple[str, ...] = field(default=STAGES)
    # Optional column (off by default): the merging stage also fine-tunes one poisoned member
    # (analysis.backdoor) and reports attack success rates. Left out of to_dict() when off, so the
    # default study's results, cache keys and report are those of a config without the field.
    backdoor: bool = False

    @classmethod
    def quick_config(cls, **overrides) -> StudyConfig:
        """Small widths and few epochs, two replicates: the whole study in well under 90 s (the end-to-end test)."""
        small = dict(quick=True, replicates=2, determinism_replicates=2, mlp_width=64, cnn_width=8, transformer_dim=16, transformer_epochs=12,
                     parent_epochs=2, finetune_epochs=4, full_epochs=6, independent=3, finetunes=3, path_points=9,
                     curve_epochs=4, spawn_epochs=(0, 2), spawn_total_epochs=4, mnist1d_width=16, mnist1d_epochs=5,
                     mnist1d_spawn_width=8, mnist1d_spawn_epochs=4, mnist1d_spawn_ks=(0, 2))
        return cls(**{**small, **overrides})

    def stage_replicates(self, stage: str) -> int:
        """Replicates of one stage: ``determinism_replicates`` for spawning (it trains no shared models,
        so extra runs are cheap), ``replicates`` for the rest; never fewer than ``replicates``."""
        return max(self.replicates, self.determinism_replicates) if stage == "determinism" else self.replicates

    def replicate_seed(self, replicate: int) -> int:
        return self.seed + REPLICATE_SEED_STRIDE * replicate

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.backdoor:
            out.pop("backdoor")
        return out
