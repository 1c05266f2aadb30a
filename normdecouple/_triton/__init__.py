"""Fused Triton kernels of L1 and L∞ batch normalization (imported lazily: Triton is an optional dependency).

``kernels`` holds the ``@triton.jit`` kernels with their math, ``launch`` the typed host launchers (layouts,
tiles, grids), ``function`` the custom ops and :class:`TritonLpBatchNormFunction`, which
``normdecouple.functional`` selects for ``backend="triton"`` and for CUDA tensors with ``backend="auto"``.
On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported), which is how the tests check them without a GPU.

References: arXiv:1803.01814
"""

from .function import TritonLpBatchNormFunction

__all__ = ["TritonLpBatchNormFunction"]
