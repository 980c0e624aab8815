"""HiFT's paper schedule (`schedule_unit: cycle`), the warning for groups a short run never trains, and groups sized
by parameter count (issue 17, items 4 and 5)."""

from __future__ import annotations

import itertools
import random
import signal

import pytest
from transformers import AutoModelForCausalLM

from sparseft.methods.hift import balanced_groups, build_units
from sparseft.recipe import load_recipe
from sparseft.train.optim import lr_factor
from tests.helpers import cli, records, write_recipe
from tests.methods.hift.hift_testlib import prepared


def _best_max(sizes, k):
    """Brute force: the smallest largest-group sum over every split of `sizes` into k consecutive groups."""
    n = len(sizes)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def _within(seconds: float, fn, *args):
    """fn(*args), failing (not hanging) when it runs longer than `seconds`: a bisection that never ends is a bug."""
    def expire(*_):
        raise TimeoutError(f"{fn.__name__}{args} ran past {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_balanced_groups_are_optimal_and_consecutive():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        # Sizes far apart (an embedding table against blocks) and close together (ties decide where a group ends).
        sizes = [rng.choice([1, 5, 40, 100, 1000]) if rng.random() < 0.5 else rng.randint(1, 12) for _ in range(n)]
        k = rng.randint(1, n)
        groups = _within(2, balanced_groups, sizes, k)
        assert len(groups) == k and all(groups)
        assert [u for g in groups for u in g] == list(range(n)), "every unit once, bottom up"
        assert max(sum(sizes[u] for u in g) for g in groups) == _best_max(sizes, k), (sizes, k, groups)
    # By hand: a group may fill up to the cap exactly (16: 8 + 8 in the middle, not 9 + 8 at the bottom).
    assert balanced_groups([9, 8, 8, 9], 3) == [[0], [1, 2], [3]]
    # Units of ~10^8 parameters, as in a 7B model: the bisection stays on integers and ends (a float midpoint
    # loops forever on these).
    assert _within(2, balanced_groups, [87, 94954329, 77465444], 2) == [[0, 1], [2]]


def test_group_by_parameters_isolates_a_large_embedding(tiny_model_dir):
    # Untied 2048 x 64 embeddings and head (131k each) vs 41k a block: by units (2 a group) the embeddings and the
    # head each share a group with a block; by parameters they train alone and the 4 blocks together.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", num_hidden_layers=4, model_vocab_size=2048,
                                                                tie_word_embeddings=False))
    params = dict(model.named_parameters())
    sizes = [sum(params[n].numel() for n in u["params"]) for u in build_units(model)]
    by_units, _, _ = prepared(model, {"name": "hift", "group_size": 2})
    by_params, _, _ = prepared(model, {"name": "hift", "group_size": 2, "group_by": "parameters"})
    assert by_units.num_groups == by_params.num_groups == 3
    largest = lambda m: max(sum(p.numel() for _, p in g) for g in m._groups)  # noqa: E731
    assert largest(by_params) == _best_max(sizes, 3) == sum(sizes[1:5]) < largest(by_units) == sizes[4] + sizes[5]
    assert [by_params.group_names(g)[0].split(".")[1] for g in range(3)] == ["embed_tokens", "layers", "norm"]
    # 6 units, 4 a group: as many groups as by units, rounded up (2), balanced.
    four, _, _ = prepared(model, {"name": "hift", "group_size": 4, "group_by": "parameters"})
    assert four.num_groups == 2 and largest(four) == _best_max(sizes, 2)


def test_a_run_shorter_than_a_cycle_warns_naming_the_starved_groups(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")  # 2 blocks, untied: units embed, layers.0, layers.1, head
    recipe = write_recipe(tmp_path, base, {"name": "hift"}, train={"max_steps": 2})
    out = " ".join(cli("train", recipe).output.split())
    assert "2 group(s) never train: layers.1, head" in out and "at least 4" in out, out
    recipe = write_recipe(tmp_path, base, {"name": "hift"}, name="r2.yaml",
                          train={"max_steps": 4, "output_dir": str(tmp_path / "run2")})
    assert "never train" not in cli("train", recipe).output


@pytest.mark.slow
def test_cycle_schedule_holds_the_rate_for_a_cycle(tiny_model_dir, tmp_path):
    train = {"max_steps": 12, "lr": 1e-2, "schedule": "linear", "warmup_steps": 2, "min_lr_ratio": 0.1}
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), {"name": "hift", "schedule_unit": "cycle"}, train=train)
    cli("train", recipe)
    t = load_recipe(recipe).train
    lrs = [r["lr"] for r in records(tmp_path / "run") if "loss" in r]
    assert len(lrs) == 12
    for k, lr in enumerate(lrs):  # 4 groups: cycles start at steps 0, 4 and 8
        assert lr == pytest.approx(t.lr * lr_factor(k - k % 4, t), rel=1e-9), (k, lrs)
    assert len(set(lrs)) == 3 and lrs[0] != lrs[4] != lrs[8], "one rate a cycle, and it follows the schedule"
