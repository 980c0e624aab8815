"""The evidence study: a grid of methods x learning rates x budgets on one model, scored on gain and retention."""
