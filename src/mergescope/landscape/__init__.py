"""Loss-landscape geometry: the four characteristics that explain merging.

Mode convexity (linear paths, barriers), connectivity (fitted curves, planes), flatness
(Hessian curvature), determinism (spawning stability) and directedness (task vectors).
"""

from .paths import BarrierMatrix, PathResult, accuracy_barrier, barrier_matrix, interpolate, loss_barrier

__all__ = ["BarrierMatrix", "PathResult", "accuracy_barrier", "barrier_matrix", "interpolate", "loss_barrier"]
