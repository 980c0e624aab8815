"""Fixtures for the LaMDA tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM


@pytest.fixture
def load(tiny_model_dir):
    """load(arch) -> a freshly loaded fp32 tiny model of that family."""
    def make(arch: str = "llama"):
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32)
    return make
