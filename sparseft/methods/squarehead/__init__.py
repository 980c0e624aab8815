"""SquareHead sparse fine-tuning: one-shot (SparseGPT, magnitude; unstructured, N:M) or gradual pruning, fixed masks,
and distillation from the dense teacher's block outputs."""

from sparseft.methods.squarehead.config import SquareHeadConfig
from sparseft.methods.squarehead.method import SquareHead

__all__ = ["SquareHead", "SquareHeadConfig"]
