"""SparseGPT on a GPU, which a CPU-only machine cannot show. Skipped without a CUDA device (scripts/gpu_check.sh runs
it)."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods.squarehead.prune import sparsegpt

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_on_the_gpu_prunes_what_it_prunes_on_the_cpu(nm):
    """The same mask and (to fp32 rounding) the same updated weights from a weight and Hessian on the GPU as from
    the same ones on the CPU, over blocks (block_size 16 of 64 columns)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(64, 256, generator=g)
    h = 2 * x @ x.T / x.shape[1]
    w_cpu, keep_cpu = sparsegpt(w, h, 0.5, nm=nm, block_size=16)
    w_gpu, keep_gpu = sparsegpt(w.to(CUDA), h.to(CUDA), 0.5, nm=nm, block_size=16)
    assert w_gpu.device == CUDA and keep_gpu.device == CUDA
    assert torch.equal(keep_gpu.cpu(), keep_cpu) and float(keep_cpu.float().mean()) == 0.5
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-4, atol=1e-5)
