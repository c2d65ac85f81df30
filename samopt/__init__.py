"""samopt: sharpness-aware training for PyTorch.

One engine, :class:`samopt.SAM`, over any torch optimizer: SAM and ASAM with exact
restore, BatchNorm-safe second pass, fp16/bf16 mixed precision, gradient
accumulation, clipping and bit-exact resume. The math lives in
:mod:`samopt.functional`, the BatchNorm bookkeeping in :mod:`samopt.bn`.
Sparse SAM's perturbation masks are in :mod:`samopt.masks` (``SAM(..., mask=)``),
with :func:`SSAMF` and :func:`SSAMD` as ready-made configurations. δ-SAM
(:class:`DeltaSAM`) reweights the examples of the batch in the ascent direction;
:class:`PerInstanceSAM` is the per-instance / m-sharpness reference it approximates.
:mod:`samopt.schedules` decides which steps ascend (periodic, random, adaptive, late
phase); :func:`LookSAM` reuses SAM's extra direction between them; :attr:`SAM.work`
counts the passes the updates cost. :class:`MSAM` perturbs along the momentum at the cost of
the base optimizer. Published variants on the seams: :func:`GSAM`, :func:`FriendlySAM`,
:func:`VaSSO` and :func:`WSAM`. :mod:`samopt.diagnostics` measures the curvature a run reached.
"""

from samopt import (
    diagnostics,
    fsam,
    functional,
    gsam,
    looksam,
    masks,
    profiling,
    schedules,
    seams,
    sub_batch,
    vasso,
    wsam,
)
from samopt.bn import BufferGuard
from samopt.delta import DeltaSAM
from samopt.fsam import FriendlySAM
from samopt.gsam import GSAM
from samopt.looksam import LookSAM
from samopt.msam import MSAM
from samopt.per_instance import PerInstanceSAM
from samopt.sam import SAM, NonFiniteGradientError, Work
from samopt.ssam import SSAMD, SSAMF
from samopt.vasso import VaSSO
from samopt.wsam import WSAM

__version__ = "0.1.0"

__all__ = [
    "GSAM",
    "MSAM",
    "SAM",
    "SSAMD",
    "SSAMF",
    "WSAM",
    "BufferGuard",
    "DeltaSAM",
    "FriendlySAM",
    "LookSAM",
    "NonFiniteGradientError",
    "PerInstanceSAM",
    "VaSSO",
    "Work",
    "__version__",
    "diagnostics",
    "fsam",
    "functional",
    "gsam",
    "looksam",
    "masks",
    "profiling",
    "schedules",
    "seams",
    "sub_batch",
    "vasso",
    "wsam",
]
