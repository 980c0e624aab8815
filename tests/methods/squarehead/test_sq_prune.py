"""Pruning: exact unstructured counts, the N:M pattern, SparseGPT against magnitude on calibration data, the cubic
schedule, bit-packed masks."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods.squarehead.config import Gradual, SquareHeadConfig
from sparseft.methods.squarehead.masks import pack, unpack
from sparseft.methods.squarehead.oneshot import prune_magnitude, prune_sparsegpt, target_linears
from sparseft.methods.squarehead.prune import (_inverse_cholesky, cubic_sparsity, is_prune_step, magnitude_keep,
                                               prune_count, smallest, sparsegpt)
from tests.methods.squarehead.sq_testlib import clone, copy_batch, tiny_llama


def _hessian(x: torch.Tensor) -> torch.Tensor:  # x: (n, in)
    return 2 * x.T @ x / x.shape[0]


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.linspace(0.05, 1.0, d)  # uneven scales, correlated features
    return torch.randn(n, d, generator=g) @ mix


def _groups_ok(w: torch.Tensor, n: int, m: int) -> bool:
    return bool(((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all())


def test_magnitude_unstructured_zeroes_exactly_the_smallest():
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    keep = magnitude_keep(w, 0.3, None)
    assert int((~keep).sum()) == prune_count(w.numel(), 0.3) == round(0.3 * 37 * 64)
    assert w.abs()[~keep].max() <= w.abs()[keep].min()


def test_magnitude_grows_an_existing_mask():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    first = magnitude_keep(w, 0.25, None)
    w2 = w.masked_fill(~first, 5.0)  # pruned weights now the largest (say a master copy moved them): still pruned
    second = magnitude_keep(w2, 0.5, None, keep=first)
    assert not (second & ~first).any(), "a pruned weight came back"
    assert int((~second).sum()) == prune_count(w.numel(), 0.5)


def test_prune_count_rounds_halves_up():
    """round(sparsity * numel) with halves rounded up, also where the product falls just below a half in floats
    (0.35 * 10 = 3.4999999999999996); Python's round() alone would round 2.5 down to 2."""
    assert [prune_count(10, s) for s in (0.25, 0.3, 0.35, 0.5)] == [3, 3, 4, 5]
    assert prune_count(6, 0.5) == 3 and prune_count(7, 0.5) == 4 and prune_count(8, 0.0) == 0


def test_smallest_breaks_ties_by_position_on_the_scores_device():
    """Equal scores are dropped first come, first served (an unstable sort picks others for 100 zeros), an
    already-dropped weight counts first, and the mask is made where the scores are (meta stands in for a GPU)."""
    assert torch.equal(smallest(torch.zeros(100), 10), torch.arange(100) >= 10)
    keep = torch.arange(100) != 50
    assert torch.equal(smallest(torch.zeros(100), 10, keep), (torch.arange(100) >= 9) & keep)
    assert smallest(torch.zeros(2, 4, device="meta"), 3).device.type == "meta"


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_magnitude_nm_keeps_n_of_every_m(n, m):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    keep = magnitude_keep(w, 1 - n / m, (n, m))
    groups = keep.reshape(24, 64 // m, m)
    assert bool((groups.sum(-1) == n).all())


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_count_pattern_and_exact_zeros(nm):
    x = _correlated_inputs(256, 48)
    w = torch.randn(20, 48, generator=torch.Generator().manual_seed(3))
    new, keep = sparsegpt(w, _hessian(x), 0.5, nm, block_size=16)  # 3 lazy blocks
    assert torch.equal(new == 0, ~keep)
    if nm is None:
        assert int((~keep).sum()) == prune_count(w.numel(), 0.5)
    else:
        assert _groups_ok(new, *nm)


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_one_linear(nm):
    x = _correlated_inputs(512, 64)  # (n, in)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    sgpt, _ = sparsegpt(w, _hessian(x), 0.5, nm)
    mag = w.masked_fill(~magnitude_keep(w, 0.5, nm), 0.0)
    err_s, err_m = ((w - sgpt) @ x.T).norm(), ((w - mag) @ x.T).norm()
    assert err_s < (0.8 if nm is None else 0.95) * err_m, (float(err_s), float(err_m))


def _linear_inputs(model, paths: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Each linear's inputs on the non-padding tokens of `batches`: (n, in)."""
    seen: dict[str, list] = {p: [] for p in paths}
    mask = [None]
    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda _m, args, p=p: seen[p].append(args[0][mask[0]])) for p in paths]
    with torch.no_grad():
        for b in batches:
            mask[0] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    return {p: torch.cat(v) for p, v in seen.items()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_on_the_calibration_data(pattern):
    """Per linear of the first block (whose inputs both pruners see alike): ||W X - W_hat X|| over the calibration
    tokens is lower for SparseGPT at 50% than for magnitude pruning, and so is the model's output error."""
    dense = tiny_llama(seed=5).eval()
    batches = [copy_batch(16, 40 + i, pad_last=4) for i in range(2)]
    cfg = SquareHeadConfig(pattern=pattern)
    targets = target_linears(dense, cfg)
    first = [t.path for t in targets if t.layer == 0]
    xs = _linear_inputs(dense, first, batches)
    sgpt, mag = clone(dense), clone(dense)
    prune_sparsegpt(sgpt, targets, cfg, 0.5, batches)
    prune_magnitude(mag, targets, 0.5, None if pattern == "unstructured" else (2, 4))
    for path in first:
        w = dense.get_submodule(path).weight.detach()
        err = {name: float(((w - m.get_submodule(path).weight.detach()) @ xs[path].T).norm())
               for name, m in (("sparsegpt", sgpt), ("magnitude", mag))}
        assert err["sparsegpt"] < err["magnitude"], (path, err)
    with torch.no_grad():
        ref = [dense(**b).logits for b in batches]
        out_err = {name: sum(float((m(**b).logits - r).norm()) for b, r in zip(batches, ref))
                   for name, m in (("sparsegpt", sgpt), ("magnitude", mag))}
    assert out_err["sparsegpt"] < out_err["magnitude"], out_err


def test_sparsegpt_model_masks_match_weights_and_leave_head_dense():
    model = tiny_llama(seed=6)
    head, embed = model.lm_head.weight.clone(), model.model.embed_tokens.weight.clone()
    cfg = SquareHeadConfig(roles=["q", "down"], layers=[1])
    masks = prune_sparsegpt(model, target_linears(model, cfg), cfg, 0.5, [copy_batch(8, 0)])
    assert sorted(masks) == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert torch.equal(params[name] == 0, ~keep)
        assert int((~keep).sum()) == prune_count(keep.numel(), 0.5)
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, embed)
    assert int((model.model.layers[0].self_attn.q_proj.weight == 0).sum()) == 0


def test_cubic_schedule_and_events():
    g = Gradual(initial_sparsity=0.1, start_step=2, end_step=12, every=3)
    values = [cubic_sparsity(t, g, 0.6) for t in range(16)]
    assert values[0] == values[2] == pytest.approx(0.1)
    assert values[12] == values[15] == pytest.approx(0.6)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert values[7] == pytest.approx(0.6 + (0.1 - 0.6) * 0.5 ** 3)  # halfway: 1/8 of the gap left
    assert [t for t in range(16) if is_prune_step(t, g)] == [2, 5, 8, 11, 12]


def test_mask_bits_round_trip():
    keep = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.4  # 91 bits: not a whole byte
    bits = pack(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == 12
    back = unpack(bits, (7, 13))
    assert back.dtype == torch.bool and torch.equal(back, keep)  # torch.equal alone ignores the dtype


def test_hessian_damping_grows_tenfold_six_times_at_most():
    """H + damp * mean(diag H) * I with damp 0.01, 0.1, ... 1000 (six tries): H = diag(902, -900) (mean 1) first
    factors at damp 1000, into U with U^T U = (H + 1000 I)^-1; H = diag(5002, -5000) would need a seventh try."""
    upper = _inverse_cholesky(torch.diag(torch.tensor([902.0, -900.0])), 0.01)
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper.T @ upper, torch.diag(torch.tensor([1 / 1902, 1 / 100])), rtol=1e-5)
    with pytest.raises(RuntimeError, match="stays singular"):
        _inverse_cholesky(torch.diag(torch.tensor([5002.0, -5000.0])), 0.01)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_prunes_weights_of_dead_inputs_first(nm, scale):
    """Weights of an input that was always zero cost nothing on the calibration data, so SparseGPT prunes them before
    any other, whatever the scale of the activations. Unstructured, with one dead input of 8 and a budget of one
    column, that column goes and nothing else changes (there is no error to compensate); 2:4 prunes it in its group."""
    x = _correlated_inputs(256, 8) * scale
    x[:, 3] = 0
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    new, keep = sparsegpt(w, _hessian(x), 1 / 8 if nm is None else 0.5, nm)
    assert not keep[:, 3].any()
    if nm is None:
        assert torch.equal(keep, torch.arange(8).expand(4, 8) != 3)
        assert torch.equal(new, w.masked_fill(~keep, 0.0))


def _sparsegpt_plain(w: torch.Tensor, h: torch.Tensor, sparsity: float, block: int, damp: float = 0.01):
    """SparseGPT written the plain way: H^-1 by torch.linalg.inv, every pruning error spread at once over all the
    columns to its right (no lazy batch), dead inputs zeroed up front as in the paper's code; the mask of each block of
    `block` columns from its share of the layer's count, chosen when the block is reached."""
    w, h = w.clone().double(), h.clone().double()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = torch.linalg.cholesky(torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)),
                              upper=True)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        k = prune_count(rows * i2, sparsity) - prune_count(rows * i1, sparsity)
        score = (w[:, i1:i2] ** 2 / u.diagonal()[i1:i2] ** 2).flatten()
        block_keep = torch.ones(score.numel(), dtype=torch.bool)
        block_keep[torch.sort(score, stable=True).indices[:k]] = False
        keep[:, i1:i2] = block_keep.view(rows, i2 - i1)
        for i in range(i1, i2):
            e = (w[:, i] - w[:, i] * keep[:, i]) / u[i, i]
            w[:, i:] -= e[:, None] * u[i, i:][None, :]
    return w.masked_fill(~keep, 0.0).float(), keep


@pytest.mark.parametrize("block_size", [16, 48])
def test_sparsegpt_equals_the_plain_algorithm(block_size):
    """The blocked SparseGPT with its lazy batch update (3 blocks of 16 columns, or one of 48) gives the weights and
    mask of the plain algorithm, here on inputs one of which was always zero; a bf16 weight comes back in bf16."""
    x = _correlated_inputs(256, 48, seed=6)
    x[:, 10] = 0
    w = torch.randn(20, 48, generator=torch.Generator().manual_seed(7))
    new, keep = sparsegpt(w, _hessian(x), 0.4, None, block_size=block_size)
    ref_new, ref_keep = _sparsegpt_plain(w, _hessian(x), 0.4, block_size)
    assert torch.equal(keep, ref_keep) and not keep[:, 10].any()
    assert torch.allclose(new, ref_new, rtol=1e-4, atol=1e-5), float((new - ref_new).abs().max())
    assert sparsegpt(w.bfloat16(), _hessian(x), 0.4, None, block_size=block_size)[0].dtype == torch.bfloat16
