"""Distillation: SquareHead is 0 for a student equal to its teacher and grows with a perturbation, ignores padding,
the teacher can come from a directory, and with a hard-pruned student, CE + SquareHead recovers more of the
teacher's held-out loss than CE alone over the same steps."""

from __future__ import annotations

import pytest
import torch

from sparseft.errors import UserError
from sparseft.methods.squarehead.distill import kd_term, squarehead_term
from tests.methods.squarehead.sq_testlib import (HALF, clone, copy_batch, heldout_loss, prepared, tiny_llama,
                                                 train_dense, train_steps)

# Gradual pruning from 0% starts with the student equal to its teacher: nothing is pruned before step 0.
UNPRUNED = {"pruner": "magnitude", "gradual": {"initial_sparsity": 0.0, "end_step": 10}}


def test_squarehead_term_normalises_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 8, generator=g)
    s = t + 0.1 * torch.randn(2, 5, 8, generator=g)
    tokens = torch.ones(2, 5, dtype=torch.bool)
    tokens[1, 3:] = False
    value = squarehead_term(s, t, tokens)
    keep = tokens.unsqueeze(-1)
    expected = ((s - t) ** 2 * keep).sum() / (t ** 2 * keep).sum()
    torch.testing.assert_close(value, expected)
    s2 = s.clone()
    s2[1, 3:] += 100.0  # padding positions do not count
    torch.testing.assert_close(squarehead_term(s2, t, tokens), value)
    torch.testing.assert_close(squarehead_term(10 * s, 10 * t, tokens), value)  # scale-free
    assert float(squarehead_term(t, t, tokens)) == 0.0


def test_squarehead_is_zero_for_the_teacher_itself_and_grows_with_noise():
    batch = copy_batch(8, 0, pad_last=3)
    method, model, _ = prepared(tiny_llama(seed=4), {**UNPRUNED, "loss": {"kd": 1.0}}, [batch])
    _, logs = method.compute_loss(model, batch)
    assert logs["squarehead"] == 0.0 and logs["kd"] == pytest.approx(0.0, abs=1e-6)
    values = []
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    noise = {n: torch.randn(p.shape, generator=g) for n, p in base.items()}
    for scale in (1e-3, 1e-2, 1e-1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + scale * noise[n] * base[n].abs().mean())
        loss, logs = method.compute_loss(model, batch)
        values.append(logs["squarehead"])
        assert float(loss.detach()) == pytest.approx(logs["ce"] + logs["squarehead"] + logs["kd"], rel=1e-5)
    assert 0 < values[0] < values[1] < values[2], values


def test_teacher_hooks_and_states_do_not_outlive_the_loss():
    batch = copy_batch(4, 0)
    method, model, _ = prepared(tiny_llama(seed=5), {"pruner": "magnitude"}, [batch])
    loss, logs = method.compute_loss(model, batch)
    teacher = method._teacher
    for m in (model, teacher):
        assert all(not block._forward_hooks for block in m.model.layers), "block hooks left behind"
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert logs["squarehead"] > 0 and loss.requires_grad


def test_teacher_from_a_directory_matches_the_in_memory_copy(tmp_path):
    batch = copy_batch(8, 1)
    dense = tiny_llama(seed=6)
    dense.save_pretrained(tmp_path / "teacher")
    a, ma, _ = prepared(clone(dense), {"pruner": "magnitude"}, [batch])
    b, mb, _ = prepared(clone(dense), {"pruner": "magnitude", "teacher": str(tmp_path / "teacher")}, [batch])
    (_, la), (_, lb) = a.compute_loss(ma, batch), b.compute_loss(mb, batch)
    assert la["squarehead"] == pytest.approx(lb["squarehead"], rel=1e-6) and la["squarehead"] > 0


def test_a_missing_teacher_directory_is_a_recipe_error(tmp_path):
    with pytest.raises(UserError, match="method.teacher="):
        prepared(tiny_llama(seed=7), {"pruner": "magnitude", "teacher": str(tmp_path / "nope")}, [copy_batch(4, 0)])


def test_kd_term_matches_kl_div():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    tokens = torch.ones(2, 3, dtype=torch.bool)
    ref = torch.nn.functional.kl_div((s / 2).log_softmax(-1).reshape(6, 11), (t / 2).log_softmax(-1).reshape(6, 11),
                                     log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(kd_term(s, t, tokens, 2.0), ref)


def _answer_only(batch: dict) -> dict:
    """Labels on the last token only: a short answer, as in instruction data. Distillation still sees every token."""
    labels = torch.full_like(batch["labels"], -100)
    labels[:, -1] = batch["labels"][:, -1]
    return {**batch, "labels": labels}


def test_distillation_recovers_more_than_ce_alone():
    """A teacher learns the copy task, SparseGPT prunes it to 90%, then the student trains 20 steps on 32 sequences
    labelled on their last token only, with CE alone or with the paper's CE + SquareHead. Recovery: the share of the
    gap between the pruned student's and the teacher's held-out loss (the whole copied half) that training closes."""
    teacher = tiny_llama(seed=0)
    train_dense(teacher, 80, lr=1e-2, seed=0)
    held = [copy_batch(64, 10_000 + i) for i in range(2)]
    l_teacher = heldout_loss(teacher, held)
    assert l_teacher < 0.1, "the teacher did not learn the copy task"
    data = [_answer_only(copy_batch(16, 500 + i)) for i in range(2)]
    recovered, losses = {}, {}
    for name, weights in (("ce", {"squarehead": 0.0}), ("ce+squarehead", {"squarehead": 1.0})):
        method, student, engine = prepared(clone(teacher), {"sparsity": 0.9, "loss": weights}, data, steps=20, lr=3e-3)
        pruned = heldout_loss(student, held)
        train_steps(method, student, engine, data, steps=20)
        after = heldout_loss(student, held)
        losses[name] = (pruned, after)
        recovered[name] = (pruned - after) / (pruned - l_teacher)
    print(f"\nteacher {l_teacher:.3f}; " + "; ".join(
        f"{n}: pruned {p:.3f} -> {a:.3f}, recovered {recovered[n]:.2f}" for n, (p, a) in losses.items()))
    assert losses["ce"][0] == losses["ce+squarehead"][0]  # the same pruned start
    assert recovered["ce+squarehead"] > recovered["ce"] + 0.1, recovered
