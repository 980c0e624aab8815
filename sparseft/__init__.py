"""sparseft: structured-sparse and memory-lean fine-tuning of LLMs, driven by YAML recipes."""

__version__ = "0.1.0"
