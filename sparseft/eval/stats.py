"""Standard errors: binomial for fractions right (accuracy, exact match), bootstrap over documents for ratios.

The binomial error is the sample standard deviation of the 0/1 scores over sqrt(n), sqrt(p (1 - p) / (n - 1)), as
lm-evaluation-harness reports it, so the two agree on the same rows. Fewer than two rows give NaN (written as null).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def binomial_stderr(correct: int, n: int) -> float:
    """Standard error of the fraction `correct / n` of 0/1 scores."""
    if n < 2:
        return math.nan
    p = correct / n
    return math.sqrt(p * (1 - p) / (n - 1))


def bootstrap_stderr(columns: np.ndarray, figures: Callable[[np.ndarray], dict], iters: int, seed: int,
                     chunk: int = 100) -> dict[str, float]:
    """Bootstrap standard error of each figure computed from column sums.

    `columns` is (k, n): k summed quantities for each of n documents. Each of `iters` resamples draws n documents with
    replacement (a seeded numpy generator) and computes `figures(sums)`, sums of shape (k, chunk); the error of a
    figure is the standard deviation (ddof=1) of its resampled values.
    """
    n = columns.shape[1]
    if n < 2 or iters < 2:
        return {name: math.nan for name in figures(columns.sum(axis=1))}
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {}
    for start in range(0, iters, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, iters - start))  # (c, n) times drawn
        for name, values in figures(columns @ counts.T).items():  # (k, c) resampled sums
            draws.setdefault(name, []).append(values)
    return {name: float(np.std(np.concatenate(v), ddof=1)) for name, v in draws.items()}
