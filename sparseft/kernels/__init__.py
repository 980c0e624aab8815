"""Partial-backprop autograd functions (torch; a Triton path may follow for GPUs)."""

from sparseft.kernels.partial_linear import KINDS, leading_slice, slice_linear

__all__ = ["KINDS", "leading_slice", "slice_linear"]
