"""Loading causal LMs and tokenizers; the architecture table of the families structured methods understand."""

from sparseft.models.arch import ArchSpec, arch_of
from sparseft.models.loader import load_model, load_tokenizer

__all__ = ["ArchSpec", "arch_of", "load_model", "load_tokenizer"]
