"""samopt: sharpness-aware training for PyTorch.

One engine, :class:`samopt.SAM`, over any torch optimizer: SAM and ASAM with exact
restore, BatchNorm-safe second pass, fp16/bf16 mixed precision, gradient
accumulation, clipping and bit-exact resume. The math lives in
:mod:`samopt.functional`, the BatchNorm bookkeeping in :mod:`samopt.bn`.
Sparse SAM's perturbation masks are in :mod:`samopt.masks` (``SAM(..., mask=)``),
with :class:`SSAMF` and :class:`SSAMD` as ready-made configurations. δ-SAM
(:class:`DeltaSAM`) reweights the examples of the batch in the ascent direction;
:class:`PerInstanceSAM` is the per-instance / m-sharpness reference it approximates.
:mod:`samopt.schedules` decides which steps ascend (periodic, random, adaptive, late
phase); :class:`LookSAM` reuses SAM's extra direction between them; :attr:`SAM.work`
counts the passes the updates cost. :class:`MSAM` perturbs along the momentum at the cost of
the base optimizer. :mod:`samopt.diagnostics` measures the curvature a run reached.
"""

from samopt import diagnostics, functional, looksam, masks, profiling, schedules, seams, sub_batch
from samopt.bn import BufferGuard
from samopt.delta import DeltaSAM
from samopt.looksam import LookSAM
from samopt.msam import MSAM
from samopt.per_instance import PerInstanceSAM
from samopt.sam import SAM, NonFiniteGradientError, Work
from samopt.ssam import SSAMD, SSAMF

__version__ = "0.1.0"

__all__ = [
    "MSAM",
    "SAM",
    "SSAMD",
    "SSAMF",
    "BufferGuard",
    "DeltaSAM",
    "LookSAM",
    "NonFiniteGradientError",
    "PerInstanceSAM",
    "Work",
    "__version__",
    "diagnostics",
    "functional",
    "looksam",
    "masks",
    "profiling",
    "schedules",
    "seams",
    "sub_batch",
]
