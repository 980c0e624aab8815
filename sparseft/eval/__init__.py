"""Evaluation: perplexity over data files (more tasks register in sparseft/eval/tasks.py)."""
