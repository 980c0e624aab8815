"""Evaluation: tasks (YAML files: perplexity, exact match, multiple choice), scoring any model form alone or with each
adapter in turn, CI gates, a results table and JSON, an lm-evaluation-harness bridge, and scoring during training.

    tasks.py        the task schema and loading          runner.py       models x adapters x tasks, gates, JSON
    perplexity.py   whole documents, rolling windows     exact_match.py  generate, extract the answer, compare
    choice.py       choices by log-likelihood (lm-eval)  report.py       the results table (value ± stderr)
    harness.py      lm-evaluation-harness bridge         in_training.py  the recipe's `eval` section
    stats.py        standard errors (binomial, bootstrap)
"""
