"""`sparseft bench`: step time and peak memory of several methods on one model and batch, each in its own process."""
