"""S2FT, structured sparse fine-tuning: config, selection, co-permutation, the slice layer and the method."""

from sparseft.methods.s2ft.config import Budget, S2FTConfig
from sparseft.methods.s2ft.method import S2FT

__all__ = ["Budget", "S2FT", "S2FTConfig"]
