"""samopt: sharpness-aware training for PyTorch.

One engine, :class:`samopt.SAM`, over any torch optimizer: SAM and ASAM with exact
restore, BatchNorm-safe second pass, fp16/bf16 mixed precision, gradient
accumulation, clipping and bit-exact resume. The math lives in
:mod:`samopt.functional`, the BatchNorm bookkeeping in :mod:`samopt.bn`.
"""

from samopt import functional
from samopt.bn import BufferGuard
from samopt.sam import SAM

__version__ = "0.1.0"

__all__ = ["SAM", "BufferGuard", "__version__", "functional"]
