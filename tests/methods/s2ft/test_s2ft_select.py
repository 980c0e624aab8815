"""S2FT config and unit selection: strategies, scopes, budgets and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import random_batches
from tests.methods.s2ft import s2ft_reference as reference
from tests.methods.s2ft.s2ft_testlib import context, recipe, s2ft

import sparseft.methods.s2ft.select as select_module
from sparseft.errors import UserError
from sparseft.models.arch import arch_of

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def select(model, logs=None, **method):
    return s2ft(**method).select(model, context(model, logs, **method))


def test_config_defaults_and_validation():
    cfg = recipe().method
    assert cfg.projections == ["o", "down"] and cfg.scope == "per_layer" and cfg.seed is None
    assert recipe(projections=["down", "q"]).method.projections == ["q", "down"]  # canonical order
    bad = [
        ({"projections": ["q", "x"]}, "method.projections"),
        ({"projections": []}, "method.projections"),
        ({"heads": {"ratio": 1.3}}, "method.heads.ratio"),
        ({"heads": {"ratio": 0.5, "count": 2}}, "method.heads"),
        ({"channels": {}}, "method.channels"),
        ({"channels": {"count": -1}}, "method.channels.count"),
        ({"heads": {"fraction": 0.5}}, "method.heads.fraction"),
        ({"strategy": "magic"}, "method.strategy"),
        ({"calibration_batches": 0}, "method.calibration_batches"),
    ]
    for method, key in bad:
        with pytest.raises(UserError) as e:
            recipe(**method)
        assert any(p.startswith(key) for p in e.value.problems), (method, e.value.problems)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_is_seeded_and_fits_budget(load, arch):
    model = load(arch)
    spec = arch_of(model)
    method = dict(projections=["q", "o", "up", "down"], heads={"count": 1}, channels={"ratio": 0.1}, seed=3)
    logs = []
    a = select(model, logs, **method)
    assert a == select(model, **method)
    assert a != select(model, **{**method, "seed": 4})
    assert select(model, **{**method, "seed": None}) == select(model, **{**method, "seed": 0})  # train.seed is 0
    json.dumps(a)  # serialisable as-is
    assert a["unit"] == "kv_group" and a["projections"] == ["q", "o", "up", "down"]
    for layer in range(spec.num_layers):
        heads, chans = a["heads"][str(layer)], a["channels"][str(layer)]
        assert len(heads) == 1 and heads[0] < spec.num_kv_heads
        assert len(chans) == 12 and chans == sorted(chans)  # floor(0.1 * 128)
    assert f"layer 0: heads {a['heads']['0']} of {spec.num_kv_heads}, channels 12 of 128" in logs[0]


def _scale_unit(model, layer: int, group: int | None, channel: int | None, by: float = 10.0):
    spec = arch_of(model)
    with torch.no_grad():
        if group is not None:
            size = spec.unit_size("o")
            spec.proj(model, layer, "o").weight[:, group * size:(group + 1) * size] *= by
        if channel is not None:
            spec.proj(model, layer, "down").weight[:, channel] *= by


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_picks_largest_norm_units(load, arch):
    model = load(arch)
    spec = arch_of(model)
    last = spec.num_kv_heads - 1
    _scale_unit(model, 0, last, 7)
    _scale_unit(model, 1, 0, 100)
    sel = select(model, strategy="weight", heads={"count": 1}, channels={"count": 1})
    assert sel["heads"] == {"0": [last], "1": [0]} and sel["channels"] == {"0": [7], "1": [100]}
    small = select(model, strategy="weight", order="smallest", heads={"count": 1}, channels={"count": 1})
    assert small["heads"]["0"] != [last] and small["channels"]["0"] != [7]


def test_global_scope_ranks_across_layers(load):
    model = load("llama")
    for g in (1, 2):
        _scale_unit(model, 0, g, None)
    for c in (5, 9, 11):
        _scale_unit(model, 1, None, c)
    glob = select(model, strategy="weight", scope="global", normalize="none", heads={"count": 2},
                  channels={"count": 3})
    assert glob["heads"] == {"0": [1, 2], "1": []}
    assert glob["channels"] == {"0": [], "1": [5, 9, 11]}
    per = select(model, strategy="weight", heads={"count": 2}, channels={"count": 3})
    assert per["heads"]["0"] == [1, 2] and len(per["heads"]["1"]) == 2
    ratio = select(model, strategy="weight", scope="global", heads={"ratio": 0.25}, channels={"ratio": 0.5})
    assert sum(map(len, ratio["heads"].values())) == 2  # 0.25 of 4 groups x 2 layers
    assert sum(map(len, ratio["channels"].values())) == 128


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
@pytest.mark.parametrize("strategy", ["activation", "gradient"])
def test_calibrated_strategies_pick_the_reference_units(load, arch, strategy):
    """Which units, against scores computed the plain way (tests/methods/s2ft/s2ft_reference.py) on batches with
    padding: the activation strategy counts real tokens only, the gradient strategy scores the loss gradient."""
    model = load(arch)
    batches = reference.padded_batches(model.config.vocab_size, 2)
    roles = ["v", "o", "gate", "down"]
    ref_heads, ref_chans = reference.strategy_scores(model, strategy, roles, batches)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    method = dict(strategy=strategy, projections=roles, heads={"count": 1}, channels={"count": 16},
                  calibration_batches=2)
    ctx = context(model, **method)
    ctx.calibration_batches = lambda n: iter(batches[:n])
    sel = s2ft(**method).select(model, ctx)
    assert sel["heads"] == reference.top(ref_heads, 1) and sel["channels"] == reference.top(ref_chans, 16)
    spec = arch_of(model)
    heads, chans = (select_module.activation_scores(model, spec, batches) if strategy == "activation"
                    else select_module.gradient_scores(model, spec, roles, batches))
    torch.testing.assert_close(heads, ref_heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chans, ref_chans, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_activation_picks_loud_units(load):
    model = load("mistral")
    spec = arch_of(model)
    with torch.no_grad():  # louder v rows of kv group 1 and up row of channel 7 -> louder inputs to o and down
        spec.proj(model, 0, "v").weight[spec.head_dim:] *= 20
        spec.proj(model, 0, "up").weight[7] *= 50
    sel = select(model, strategy="activation", heads={"count": 1}, channels={"count": 1})
    assert sel["heads"]["0"] == [1] and sel["channels"]["0"] == [7]


def test_activation_needs_calibration_data(load):
    model = load("llama")
    ctx = context(model, strategy="activation")
    ctx.calibration_batches = None
    with pytest.raises(UserError, match="method.strategy=activation"):
        s2ft(strategy="activation").select(model, ctx)


@pytest.mark.parametrize("method, message", [
    (dict(projections=["o"], heads={"count": 9}), "method.heads.count=9: the model has 2 kv groups per layer"),
    (dict(projections=["q"], heads={"ratio": 0.2}), "method.heads.ratio=0.2"),
    (dict(projections=["q"], scope="global", heads={"ratio": 0.2}), "method.heads.ratio=0.2"),
    (dict(projections=["q"], scope="global", heads={"count": 5}), "method.heads.count=5: the model has 4 kv groups"),
    (dict(projections=["down"], channels={"count": 129}), "method.channels.count=129"),
    (dict(projections=["o", "down"], heads={"count": 0}, channels={"count": 0}), "select nothing"),
    (dict(projections=["down"], heads={"count": 2}, channels={"count": 0}), "select nothing"),  # heads unlisted
    (dict(projections=["o"], heads={"count": 5, "unit": "q_head"}), "method.heads.count=5: the model has 4 q heads"),
    (dict(projections=["o"], scope="global", heads={"ratio": 0.1, "unit": "q_head"}),
     "method.heads.ratio=0.1: selects no unit of the 8 q heads in all"),
])
def test_impossible_budgets(load, method, message):
    model = load("mistral")  # 2 kv groups per layer, 2 layers, 128 channels
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        select(model, **method)


def test_budget_of_unlisted_kind_is_ignored(load):
    model = load("mistral")
    sel = select(model, projections=["down"], heads={"count": 99}, channels={"count": 2})
    assert sel["heads"] == {"0": [], "1": []} and all(len(v) == 2 for v in sel["channels"].values())


def test_activation_without_a_mask_counts_every_token(load):
    model = load("llama")
    batches = random_batches(model.config.vocab_size, 2)  # every token real
    heads, chans = reference.activation_scores(model, batches)
    unmasked = [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches]
    got_heads, got_chans = select_module.activation_scores(model, arch_of(model), unmasked)
    torch.testing.assert_close(got_heads, heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_chans, chans, rtol=1e-4, atol=1e-6)


def test_gradient_without_labels_predicts_the_input(load):
    model = load("llama")
    batches = random_batches(model.config.vocab_size, 2)  # labels = input_ids
    heads, chans = reference.gradient_scores(model, ["o", "down"], batches)
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    got_heads, got_chans = select_module.gradient_scores(model, arch_of(model), ["o", "down"], unlabelled)
    torch.testing.assert_close(got_heads, heads, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got_chans, chans, rtol=1e-4, atol=1e-8)


def test_global_scope_normalises_scores_per_layer(load):
    """Issue 17, item 8: a layer whose weights are all larger takes the whole raw budget; normalised per layer, the
    units that stand out of their own layer win, and rank shares the budget evenly."""
    from sparseft.methods.s2ft.select import normalized

    model = load("mistral")  # 2 layers, 2 kv groups, 128 channels
    spec = arch_of(model)
    with torch.no_grad():
        for role in ("o", "down"):
            spec.proj(model, 0, role).weight.mul_(10.0)  # layer 0: every score 10x
    _scale_unit(model, 1, None, 7, by=5.0)  # one channel of layer 1 stands far out of its layer
    method = dict(strategy="weight", scope="global", heads={"count": 2}, channels={"count": 8})
    raw = select(model, normalize="none", **method)
    assert raw["channels"]["1"] == [] and len(raw["channels"]["0"]) == 8, "raw scores: layer 0 takes everything"
    assert raw["heads"] == {"0": [0, 1], "1": []}
    z = select(model, normalize="zscore", **method)
    assert 7 in z["channels"]["1"] and z["channels"]["0"], z["channels"]
    assert z["normalize"] == "zscore"
    ranked = select(model, normalize="rank", **method)
    assert len(ranked["channels"]["0"]) == len(ranked["channels"]["1"]) == 4
    assert len(ranked["heads"]["0"]) == len(ranked["heads"]["1"]) == 1
    scores = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]], dtype=torch.float64)
    assert torch.allclose(normalized(scores, "rank"), torch.tensor([[0, 0.5, 1], [0, 0.5, 1]], dtype=torch.float64))
    z = normalized(scores, "zscore")
    assert torch.allclose(z.mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.std(1, correction=0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(UserError):
        recipe(normalize="softmax")


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
def test_gradient_scores_match_dense_autograd(load, unit):
    """Issue 17, item 9: scores accumulated in hooks (no weight gradient kept) equal per-unit norms of each batch's
    dense weight gradient, squared and summed over batches."""
    from sparseft.methods.s2ft.select import _unit_sq, gradient_scores
    from tests.helpers import random_batches

    model = load("qwen3")
    spec = arch_of(model)
    roles = ["o", "down"] if unit == "q_head" else ["q", "k", "o", "up", "down"]
    batches = random_batches(model.config.vocab_size, 2, batch=2, seed=4)
    heads, chans = gradient_scores(model, spec, roles, batches, unit)
    assert all(p.grad is None for p in model.parameters())

    ref_h, ref_c = torch.zeros_like(heads), torch.zeros_like(chans)
    weights = {(layer, role): spec.proj(model, layer, role).weight for layer in range(spec.num_layers) for role in roles}
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    model.eval()
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for (layer, role), w in weights.items():
            (ref_h if role in ("q", "k", "v", "o") else ref_c)[layer] += _unit_sq(w.grad, spec, role, unit).double()
    torch.testing.assert_close(heads, ref_h.sqrt(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(chans, ref_c.sqrt(), rtol=1e-4, atol=1e-9)
    assert heads.shape[1] == (spec.num_heads if unit == "q_head" else spec.num_kv_heads)


def test_activation_scores_per_q_head(load):
    """With unit q_head each of o's q heads is scored on its own (o's columns h*head_dim .. (h+1)*head_dim - 1), not
    per kv group: a GQA model, so the two differ in count."""
    model = load("mistral")  # 4 q heads over 2 kv groups
    batches = reference.padded_batches(model.config.vocab_size, 2)
    ref_heads, ref_chans = reference.activation_scores(model, batches, unit="q_head")
    model.train()
    heads, chans = select_module.activation_scores(model, arch_of(model), batches, "q_head")
    assert model.training and all(m.training for m in model.modules())  # scored in eval mode, then restored
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed
    assert heads.shape == (2, 4)
    torch.testing.assert_close(heads, ref_heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chans, ref_chans, rtol=1e-4, atol=1e-6)


def test_gradient_scores_compute_no_weight_gradient(load):
    """The point of the hooks: every weight is frozen during the calibration passes, so autograd never builds a weight
    gradient (the peak stays one transient g^T x); the flags are restored afterwards."""
    model = load("llama")
    model.get_input_embeddings().weight.requires_grad_(False)  # a mix of flags to restore
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda *_: seen.append(sorted(n for n, p in model.named_parameters() if p.requires_grad)))
    modes = model.get_output_embeddings().register_forward_hook(lambda m, *_: seen.append(m.training))
    model.train()
    select_module.gradient_scores(model, arch_of(model), ["o", "down"], random_batches(model.config.vocab_size, 2))
    hook.remove()
    modes.remove()
    assert seen == [[], False, [], False]  # frozen, in eval mode
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_calibration_batch_moves_to_the_model_device():
    """Calibration batches go to the device of the model's weights (the meta device stands in for a GPU here); keys
    the forward pass does not take are dropped, labels are kept."""
    model = torch.nn.Linear(2, 2, device="meta")
    ids = torch.ones(2, 3, dtype=torch.long)
    b = select_module._device_batch(model, {"input_ids": ids, "attention_mask": ids, "labels": ids, "other": ids})
    assert set(b) == {"input_ids", "attention_mask", "labels", "use_cache"}
    assert all(b[k].device.type == "meta" for k in ("input_ids", "attention_mask", "labels"))


def test_normalized_by_hand():
    """rank: each unit's place in its layer, scaled to [0, 1], ties in index order (a stable sort: from 17 units on,
    torch's unstable CPU sort breaks ties otherwise); zscore: a layer whose units all score the same is 0 throughout,
    although its float64 mean is not exactly that score."""
    from sparseft.methods.s2ft.select import normalized, pick

    n = 20
    scores = torch.tensor([[float(i % 3) for i in range(n)], [float(7 * i % 5) for i in range(n)]], dtype=torch.float64)

    def rank(row):  # units scoring less, plus equal ones with a lower index
        return [sum(b < a or (b == a and j < i) for j, b in enumerate(row)) / (n - 1) for i, a in enumerate(row)]

    assert normalized(scores, "rank").tolist() == [rank(row) for row in scores.tolist()]
    assert normalized(torch.tensor([[5.0, 2.0]], dtype=torch.float64), "rank").tolist() == [[1.0, 0.0]]
    assert normalized(torch.tensor([[5.0]], dtype=torch.float64), "rank").tolist() == [[0.0]]

    flat = torch.tensor([[0.7, 0.7, 0.7], [0.0, 1.0, 2.0]], dtype=torch.float64)
    assert flat[0].mean().item() != 0.7  # rounding: a naive (x - mean) / std is noise over noise
    z = normalized(flat, "zscore")
    assert z[0].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(z[1], torch.tensor([-1.5 ** 0.5, 0.0, 1.5 ** 0.5], dtype=torch.float64))
    assert normalized(flat[:1], "zscore").tolist() == [[0.0, 0.0, 0.0]]
    assert pick(flat, 2, "global", "largest", "zscore") == {"0": [0], "1": [2]}


def test_check_selection_names_each_problem():
    """A selection read back from a run directory: each thing wrong with it is one problem, worded for the user;
    selections at the edges (last layer, last unit, q heads beyond the kv-group count under q_head) pass."""
    from transformers import MistralConfig

    spec = arch_of(MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128))  # 2 kv groups of 2 q heads
    good = {"unit": "kv_group", "projections": ["o", "down"], "heads": {"0": [0, 1], "1": []},
            "channels": {"0": [0, 127], "1": [5]}}
    select_module.check_selection(good, spec)
    select_module.check_selection({**good, "unit": "q_head", "heads": {"0": [3], "1": [0, 2]}}, spec)
    select_module.check_selection({**good, "projections": ["q", "k", "v", "o", "gate", "up", "down"]}, spec)

    units, roles = ["kv_group", "q_head"], ["q", "k", "v", "o", "up", "gate", "down"]
    cases = [
        ({"unit": "head"}, [f"unit is 'head', expected one of {units}"]),
        ({"unit": None}, [f"unit is None, expected one of {units}"]),
        ({"projections": "o"}, [f"projections: 'o' is not a list of {roles}"]),
        ({"projections": []}, [f"projections: [] is not a list of {roles}"]),
        ({"projections": ["o", "x"]}, [f"projections: ['o', 'x'] is not a list of {roles}"]),
        *[({"unit": "q_head", "projections": [r, "o"], "heads": {"0": [3]}},
           ["unit q_head trains o only; projections list q, k or v"]) for r in ("q", "k", "v")],
        ({"heads": None}, ["heads: missing"]),
        ({"channels": [1]}, ["channels: missing"]),
        ({"heads": {"2": [0]}}, ["heads: layer '2' is not one of the model's 2 layers"]),
        ({"heads": {0: [0]}}, ["heads: layer 0 is not one of the model's 2 layers"]),
        ({"channels": {"-1": [0]}}, ["channels: layer '-1' is not one of the model's 2 layers"]),
        ({"heads": {"1": [2]}}, ["heads.1: indices must be distinct integers in [0, 2)"]),
        ({"unit": "q_head", "heads": {"1": [4]}}, ["heads.1: indices must be distinct integers in [0, 4)"]),
        ({"heads": {"0": [-1]}}, ["heads.0: indices must be distinct integers in [0, 2)"]),
        ({"heads": {"0": (0,)}}, ["heads.0: indices must be distinct integers in [0, 2)"]),
        ({"channels": {"0": [1.0]}}, ["channels.0: indices must be distinct integers in [0, 128)"]),
        ({"channels": {"0": [3, 3]}}, ["channels.0: indices must be distinct integers in [0, 128)"]),
        ({"channels": {"1": [128]}}, ["channels.1: indices must be distinct integers in [0, 128)"]),
        ({"heads": None, "channels": {"0": [0], "5": [1], "1": [200]}},  # every problem, not the first only
         ["heads: missing", "channels: layer '5' is not one of the model's 2 layers",
          "channels.1: indices must be distinct integers in [0, 128)"]),
    ]
    for change, problems in cases:
        with pytest.raises(UserError, match="s2ft selection does not fit this model") as e:
            select_module.check_selection({**good, **change}, spec)
        assert e.value.problems == problems, change


def test_summary_by_hand():
    """The log's line a layer, for each unit and for selections of one kind only."""
    base = {"num_kv_groups": 2, "num_channels": 128, "heads": {"0": [1], "1": []},
            "channels": {"0": [3, 9], "1": [0]}}
    assert select_module.summary({**base, "unit": "kv_group", "projections": ["o", "down"]}) == (
        "layer 0: heads [1] of 2, channels 2 of 128\nlayer 1: heads [] of 2, channels 1 of 128")
    assert select_module.summary({**base, "unit": "q_head", "num_q_heads": 4, "projections": ["o"]}) == (
        "layer 0: q heads [1] of 4\nlayer 1: q heads [] of 4")
    assert select_module.summary({**base, "projections": ["up"]}) == (
        "layer 0: channels 2 of 128\nlayer 1: channels 1 of 128")
    many = {**base, "projections": ["q"], "heads": {str(i): [0] for i in (10, 2, 1)},
            "channels": {str(i): [] for i in (10, 2, 1)}}
    assert select_module.summary(many).splitlines()[0].startswith("layer 1:")  # layers in numeric order
    assert select_module.summary(many).splitlines()[2].startswith("layer 10:")


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
def test_weight_scores_match_reference(load, unit):
    """Each unit's L2 norm over the listed projections (rows of q, k, v, gate, up; columns of o, down), against
    explicit row / column ranges (s2ft_reference.unit_ranges)."""
    model = load("qwen3")  # GQA with an explicit head_dim
    spec = arch_of(model)
    roles = ["o"] if unit == "q_head" else ["q", "k", "v", "o", "gate", "up", "down"]
    heads, chans = select_module.weight_scores(model, spec, roles, unit)
    ref_h, ref_c = torch.zeros_like(heads), torch.zeros_like(chans)
    for layer in range(spec.num_layers):
        for role in roles:
            w = spec.proj(model, layer, role).weight
            (ref_h if role in ("q", "k", "v", "o") else ref_c)[layer] += reference._unit_sq(
                w.detach(), reference.unit_ranges(model.config, role, unit))
    assert heads.shape == (2, 4 if unit == "q_head" else 2)
    torch.testing.assert_close(heads, ref_h.sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(chans, ref_c.sqrt(), rtol=1e-6, atol=0)


def test_pick_by_hand():
    """The k best of each layer, or of the whole table, sorted per layer; equal scores go in index order (stable
    sorts: 20 units, where torch's unstable CPU sort breaks ties otherwise)."""
    from sparseft.methods.s2ft.select import pick

    row = [float(i % 3) for i in range(20)]  # 2 at 2, 5, 8, ...; 0 at 0, 3, 6, ...
    scores = torch.tensor([row, row[1:] + row[:1]], dtype=torch.float64)  # layer 1: 2 at 1, 4, ...; 0 at 2, 5, ...
    assert pick(scores, 5, "per_layer", "largest") == {"0": [2, 5, 8, 11, 14], "1": [1, 4, 7, 10, 13]}
    assert pick(scores, 5, "per_layer", "smallest") == {"0": [0, 3, 6, 9, 12], "1": [2, 5, 8, 11, 14]}
    assert pick(scores, 8, "global", "largest") == {"0": [2, 5, 8, 11, 14, 17], "1": [1, 4]}
    assert pick(scores, 8, "global", "smallest") == {"0": [0, 3, 6, 9, 12, 15, 18], "1": [2]}
    assert pick(scores, 0, "per_layer", "largest") == {"0": [], "1": []}
    table = torch.tensor([[0.1, 0.9, 0.5], [10.0, 20.0, 30.0]], dtype=torch.float64)
    assert pick(table, 3, "global", "largest") == {"0": [], "1": [0, 1, 2]}  # raw scores unless told otherwise
    assert pick(table, 3, "global", "largest", "zscore") == {"0": [1, 2], "1": [2]}
    assert pick(table, 2, "global", "smallest", "rank") == {"0": [0], "1": [0]}


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
def test_random_selection_in_full(load, unit):
    """The whole selection dict of the random strategy: one float64 draw of (layers, head units) first, then one of
    (layers, channels), from a generator seeded with the method's seed; so a seed picks the same units every time,
    whichever projections are listed."""
    model = load("mistral")  # 2 layers, 2 kv groups of 2 q heads, 128 channels
    g = torch.Generator().manual_seed(5)
    head_draw = torch.rand(2, 4 if unit == "q_head" else 2, generator=g, dtype=torch.float64)
    chan_draw = torch.rand(2, 128, generator=g, dtype=torch.float64)
    method = dict(strategy="random", seed=5, heads={"count": 1, "unit": unit}, channels={"count": 3})
    sel = select(model, projections=["o", "down"], **method)
    expected = {"unit": unit, "projections": ["o", "down"], "strategy": "random", "scope": "per_layer",
                "order": "largest", "num_kv_groups": 2, "num_channels": 128,
                "heads": reference.top(head_draw, 1), "channels": reference.top(chan_draw, 3)}
    if unit == "q_head":
        expected["num_q_heads"] = 4
    assert sel == expected
    assert select(model, projections=["down"], **method)["channels"] == expected["channels"]
    assert select(model, projections=["o"], **method)["heads"] == expected["heads"]
    two = {**method, "heads": {"count": 2, "unit": unit}}
    glob = select(model, projections=["o"], scope="global", normalize="rank", **two)
    assert glob["normalize"] == "rank" and glob["scope"] == "global"
    assert glob["heads"] == expected["heads"]  # each layer's best ranks 1, the rest below: one a layer
    assert glob["channels"] == {"0": [], "1": []}


@pytest.mark.parametrize("strategy", ["weight", "activation", "gradient"])
def test_every_strategy_scores_q_heads(load, strategy):
    """With heads.unit q_head, select ranks each q head on its own scores (the scoring functions are checked
    against references above): 3 of 4 q heads a layer, which 2 kv groups could not give."""
    model = load("mistral")  # 4 q heads over 2 kv groups
    spec = arch_of(model)
    batches = reference.padded_batches(model.config.vocab_size, 2)
    method = dict(strategy=strategy, projections=["o"], heads={"count": 3, "unit": "q_head"}, calibration_batches=2)
    ctx = context(model, **method)
    ctx.calibration_batches = lambda n: iter(batches[:n])
    sel = s2ft(**method).select(model, ctx)
    scores = {"weight": lambda: select_module.weight_scores(model, spec, ["o"], "q_head"),
              "activation": lambda: select_module.activation_scores(model, spec, batches, "q_head"),
              "gradient": lambda: select_module.gradient_scores(model, spec, ["o"], batches, "q_head")}[strategy]()[0]
    assert scores.shape == (2, 4)
    assert sel["heads"] == reference.top(scores, 3) and sel["num_q_heads"] == 4
