"""LaMDA / LaMDA++: SVD-initialised low-dimensional adapters with a frozen A, a trained S and a gradually frozen B."""

from sparseft.methods.lamda.config import FreezeB, LamdaConfig
from sparseft.methods.lamda.method import Lamda

__all__ = ["FreezeB", "Lamda", "LamdaConfig"]
