"""Loss-landscape geometry: the four characteristics that explain merging.

Mode convexity (linear paths, barriers), connectivity (fitted curves, planes), flatness
(Hessian curvature), determinism (spawning stability) and directedness (task vectors).
"""

from .curvature import EigenResult, TraceResult, hessian_eigenvalues, hessian_trace
from .plane import PlaneResult, plane, plane_through
from .curves import CurveResult, fit_curve
from .stability import StabilityResult, spawn_stability
from .taskvec import TaskVectorResult, task_vectors
from .robust import robust_interpolate
from .paths import BarrierMatrix, PathResult, accuracy_barrier, barrier_matrix, interpolate, loss_barrier

__all__ = ["BarrierMatrix", "EigenResult", "TraceResult", "hessian_eigenvalues", "hessian_trace", "PathResult", "accuracy_barrier", "barrier_matrix", "interpolate", "loss_barrier", "PlaneResult", "plane", "plane_through", "CurveResult", "fit_curve", "StabilityResult", "spawn_stability", "TaskVectorResult", "task_vectors", "robust_interpolate"]
