"""HiFT's units, groups and orders, and its recipe section."""

from __future__ import annotations

import json

import pytest
import torch

from sparseft.errors import UserError
from sparseft.methods import MethodContext, build_method
from sparseft.methods.hift import build_units, group_units
from sparseft.recipe import load_recipe
from tests.methods.hift.hift_testlib import prepared, recipe


def test_units_cover_every_parameter_once(load):
    model = load("qwen3")
    units = build_units(model)
    assert [u["name"] for u in units] == ["embed", "layers.0", "layers.1", "head"]
    listed = [n for u in units for n in u["params"]]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert units[0]["params"] == ["model.embed_tokens.weight"]
    assert units[-1]["params"] == ["model.norm.weight", "lm_head.weight"]
    assert all(n.startswith("model.layers.1.") for n in units[2]["params"])
    json.dumps(units)  # the selection is saved as JSON


def test_tied_embeddings_and_head_are_one_unit(load):
    model = load("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    units = build_units(model)
    assert [u["name"] for u in units] == ["embed+head", "layers.0", "layers.1"]
    assert units[0]["params"] == ["model.embed_tokens.weight", "model.norm.weight"]
    listed = [n for u in units for n in u["params"]]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_a_parameter_the_table_does_not_name_trains_with_the_head(load, tied):
    """None of the known families has one, so one is added by hand: it joins the unit of the LM head (the bottom
    unit when the head is tied to the embeddings), and every parameter is still in exactly one unit."""
    model = load("llama", tie_word_embeddings=tied)
    model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    units = build_units(model)
    head = units[0] if tied else units[-1]
    assert head["name"] == ("embed+head" if tied else "head") and head["params"][-1] == "extra"
    listed = [n for u in units for n in u["params"]]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())


def test_groups_are_consecutive_units():
    assert group_units(4, 1) == [[0], [1], [2], [3]]
    assert group_units(6, 2) == [[0, 1], [2, 3], [4, 5]]
    assert group_units(4, 3) == [[0, 1, 2], [3]]
    assert group_units(4, 9) == [[0, 1, 2, 3]]


def _sequence(method, steps: int) -> list[int]:
    return [method.group_at(s) for s in range(steps)]


def test_order_follows_the_strategy(load):
    model = load("llama")  # 4 units: embed, layers.0, layers.1, head
    up, _, _ = prepared(model, {"name": "hift", "order": "bottom_up"})
    assert up.num_groups == 4 and _sequence(up, 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert up.group_names(0) == ["model.embed_tokens.weight"]
    down, _, _ = prepared(model, {"name": "hift", "order": "top_down", "group_size": 2})
    assert _sequence(down, 5) == [1, 0, 1, 0, 1]
    assert down.cycle_order(0) == [1, 0] and up.cycle_order(3) == [0, 1, 2, 3]  # each group once a cycle
    assert down.group_names(1) == [n for n, _ in model.named_parameters()
                                   if n.startswith(("model.layers.1.", "model.norm", "lm_head"))]

    def random_order(seed, reshuffle=True):
        m, _, _ = prepared(model, {"name": "hift", "order": "random", "reshuffle": reshuffle}, seed=seed)
        seq = _sequence(m, 40)
        return [seq[i:i + 4] for i in range(0, 40, 4)]

    cycles = random_order(0)
    assert all(sorted(c) == [0, 1, 2, 3] for c in cycles)  # every cycle trains every group once
    assert len({tuple(c) for c in cycles}) > 1  # reshuffled each cycle
    assert random_order(0) == cycles  # seeded
    assert random_order(1) != cycles
    fixed = random_order(0, reshuffle=False)
    assert len({tuple(c) for c in fixed}) == 1 and sorted(fixed[0]) == [0, 1, 2, 3]
    assert fixed[0] == cycles[0], "without reshuffling, every cycle keeps the first cycle's order"
    # method.seed overrides train.seed
    m, _, _ = prepared(model, {"name": "hift", "order": "random", "seed": 1}, seed=0)
    assert [m.group_at(s) for s in range(8)] == [g for c in random_order(1)[:2] for g in c]


def test_prepare_lists_every_weight_as_trainable_in_one_param_group_pair_per_group(load):
    model = load("llama")
    method, model, _ = prepared(model, {"name": "hift", "group_size": 2})
    # Every weight requires grad until the first step (so an engine built now holds them all) ...
    assert all(p.requires_grad for p in model.parameters())
    assert list(method.trainable_parameters(model)) == [n for n, _ in model.named_parameters()]
    # ... and each group is its own pair of param groups (decayed matrices, undecayed vectors), tagged with it.
    groups = method.optimizer_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in range(method.num_groups):
        mine = [pg for pg in groups if pg["hift_group"] == g]
        assert {names[id(p)] for pg in mine for p in pg["params"]} == set(method.group_names(g))
        assert all(pg["weight_decay"] == (0.1 if pg["params"][0].ndim >= 2 else 0.0) for pg in mine)
    assert sum(len(pg["params"]) for pg in groups) == len(names)


def test_a_fresh_run_starts_at_step_0_of_the_first_cycle(load):
    method, _, _ = prepared(load("llama"), {"name": "hift", "order": "top_down"})
    assert method.state_dict() == {"next_step": 0, "cycle": 0, "position": 0, "order": [3, 2, 1, 0],
                                   "optimizer_state": {}}


def test_an_unprepared_method_has_the_state_of_nothing_done():
    assert build_method(recipe({"name": "hift"}).method).state_dict() == {
        "next_step": 0, "cycle": 0, "position": 0, "order": [], "optimizer_state": {}}


def test_without_a_recipe_the_order_is_seeded_with_0_and_no_group_starves(load):
    """A MethodContext built by hand, without a recipe: the random order takes seed 0 and the run has no step limit,
    so no group is reported as never training."""
    logs: list[str] = []
    method = build_method(recipe({"name": "hift", "order": "random"}).method)
    model = load("llama")
    ctx = MethodContext(recipe=None, log=logs.append)
    selection = method.select(model, ctx)
    assert selection["seed"] == 0
    method.prepare(model, selection, ctx)
    assert method.starved_groups() == [] and not any("never train" in line for line in logs)
    seeded, _, _ = prepared(load("llama"), {"name": "hift", "order": "random"}, seed=0)
    assert [method.group_at(s) for s in range(12)] == [seeded.group_at(s) for s in range(12)]


def test_prepare_logs_the_groups_and_names_those_a_short_run_never_trains(load):
    logs: list[str] = []
    r = recipe({"name": "hift", "group_size": 2}, max_steps=1)
    method = build_method(r.method)
    model = load("llama")
    ctx = MethodContext(recipe=r, log=logs.append)
    method.prepare(model, method.select(model, ctx), ctx)
    text = " ".join(logs)
    assert "4 units in 2 groups (embed+layers.0, layers.1+head)" in text, text
    assert "1 group(s) never train: layers.1+head" in text, text
    assert method.starved_groups() == [1]


def test_recipe_section():
    r = load_recipe("recipes/hift.yaml")
    assert r.method.name == "hift" and r.model.path == "demo/tiny-llama"
    with pytest.raises(UserError) as e:
        recipe({"name": "hift", "group_size": 0, "order": "sideways"})
    text = str(e.value)
    assert "method.group_size" in text and "method.order" in text
