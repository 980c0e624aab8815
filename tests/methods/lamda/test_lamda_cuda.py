"""LaMDA's merge with the base weight on a GPU and the adapter's tensors in host memory (as an adapter file is read),
which a CPU-only machine cannot show. Skipped without a CUDA device (scripts/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods.lamda.layers import merged_weight

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)


def test_a_gpu_weight_merges_adapter_tensors_from_host_memory_bit_for_bit():
    """W + scale (B S - B0 S0) A, the delta formed in fp32 where the adapter is, added in fp32 and rounded once to
    the weight's dtype on the weight's device: the same bits as the whole merge on the CPU."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 32, generator=g).to(torch.bfloat16)
    tensors = {"lamda_A": torch.randn(4, 32, generator=g), "lamda_S": torch.randn(4, 4, generator=g),
               "lamda_B": torch.randn(48, 4, generator=g), "lamda_start": torch.randn(48, 4, generator=g)}
    expected = (base.float() + 0.5 * ((tensors["lamda_B"] @ tensors["lamda_S"] - tensors["lamda_start"])
                                      @ tensors["lamda_A"])).to(torch.bfloat16)
    merged = merged_weight(base.to(CUDA), 0.5, **tensors)
    assert merged.device == CUDA and merged.dtype == torch.bfloat16
    assert torch.equal(merged.cpu(), expected)
