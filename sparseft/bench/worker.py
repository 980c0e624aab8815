"""One benchmark entry in its own process: load the recipe's model, prepare one method, time training steps on a fixed
random batch and read the process's peak resident memory over those steps. Prints one JSON line.

    python -m sparseft.bench.worker RECIPE ENTRY --steps 5 --warmup 2 [--set key=value ...]

ENTRY is a registered method name, or `floor`: the model fully frozen except one tiny weight in its first block, so a
step is the forward plus input-gradient backprop through every block and nothing else — no method can beat it.
`serve` measures S2FT adapter switching and mixed-adapter batches instead of training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparseft.train.precision import rss_mb


def _reset_peak(device: torch.device) -> None:
    """Start the peak-memory high-water mark afresh (device memory on a GPU, else RSS on Linux), so loading the model
    does not count as a step's memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: a step ends when the GPU is done


def _batch(recipe, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (recipe.train.micro_batch_size, recipe.data.max_length), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _method_for(recipe, entry: str, overrides: dict):
    from sparseft.methods import build_method
    from sparseft.recipe import validate_recipe_data

    data = recipe.model_dump(mode="json")
    if entry not in ("floor", data["method"]["name"]):
        data["method"] = {"name": entry}
    data["method"].update(overrides)
    if entry == "floor":
        data["method"] = {"name": "full"}
    recipe = validate_recipe_data(data, source=f"bench entry {entry}")
    return recipe, build_method(recipe.method)


def train_steps(recipe_path: str, entry: str, steps: int, warmup: int, method_overrides: dict,
                device: str = "auto") -> dict:
    from sparseft.methods import MethodContext
    from sparseft.models import arch_of, load_model
    from sparseft.recipe import load_recipe
    from sparseft.train.optim import Engine
    from sparseft.train.precision import keep_masters, peak_memory_mb, resolve_device, resolve_precision

    recipe, method = _method_for(load_recipe(recipe_path), entry, method_overrides)
    where = resolve_device(device, key="--device")
    precision = resolve_precision(recipe.train.precision, recipe.model.dtype)
    torch.manual_seed(recipe.train.seed)
    model = load_model(recipe.model.path, recipe.model.dtype, attn_implementation=recipe.model.attn_implementation,
                       device=where)
    batch = _batch(recipe, model.config.vocab_size, where)
    ctx = MethodContext(recipe=recipe, calibration_batches=lambda n: iter([batch] * n), log=lambda s: None,
                        device=where, master_dtype=precision.master_dtype)
    model = method.prepare(model, method.select(model, ctx), ctx)
    if entry == "floor":
        model.requires_grad_(False)
        tiny = arch_of(model).blocks(model)[0].input_layernorm.weight
        tiny.requires_grad_(True)
    keep_masters(method.master_parameters(model) if entry != "floor" else {}, precision)
    model.train()
    groups = method.optimizer_param_groups(model, recipe.train.weight_decay)
    engine = Engine(model, groups, recipe.train, precision)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    # Warm up until the method is in its steady state (HiFT: a whole cycle, so every group has optimizer state),
    # and time as many steps (HiFT's groups differ in cost: a cycle's median); memory is the peak over timed steps.
    cycle = method.steps_to_steady_state()
    warmup, steps = max(warmup, cycle), max(steps, cycle)
    rss_before = rss_mb("VmRSS")
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            _reset_peak(where)
        _sync(where)
        tick = time.perf_counter()
        method.on_step_start(i, model, engine.optimizer)
        loss, _ = engine.loss(method.compute_loss, batch)
        engine.backward(loss, batch)
        engine.step()
        method.on_step_end(i, model, engine.optimizer)
        _sync(where)
        if i >= warmup:
            times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    return {
        "entry": entry, "method": method.name if entry != "floor" else "floor", "trainable_params": trainable,
        "step_s": times, "median_step_s": median, "loss": float(loss.detach()),
        "tokens_per_s": int(batch["attention_mask"].sum()) / median, "device": str(where),
        "precision": precision.name, "peak_mem_mb": peak_memory_mb(where),
        "memory": "GPU allocated" if where.type == "cuda" else "RSS",
        "peak_rss_mb": rss_mb("VmHWM"), "rss_before_steps_mb": rss_before, "threads": torch.get_num_threads(),
        "warmup_steps": warmup, "timed_steps": steps,
    }


def serve(recipe_path: str, n_adapters: int, repeats: int, device: str = "auto") -> dict:
    """Adapter switch time (fuse + unfuse) and one forward of a batch mixing n adapters vs one fused adapter."""
    from sparseft.export.sparse_adapters import SparseAdapter, SparseDelta, fuse, mixed_adapters, unfuse
    from sparseft.methods.s2ft.permute import expand
    from sparseft.methods.s2ft.select import select_units
    from sparseft.models import arch_of, load_model
    from sparseft.models.arch import ATTN_ROLES, COL_ROLES
    from sparseft.recipe import load_recipe

    from sparseft.train.precision import resolve_device

    recipe = load_recipe(recipe_path)
    cfg = recipe.method
    where = resolve_device(device, key="--device")
    model = load_model(recipe.model.path, recipe.model.dtype, device=where).eval()
    spec = arch_of(model)
    adapters = []
    for i in range(n_adapters):  # n adapters with different random selections and random deltas
        sel = select_units(model, cfg.model_copy(update={"strategy": "random"}), seed=i)
        modules = {}
        for layer in range(spec.num_layers):
            for role in sel["projections"]:
                units = sel["heads" if role in ATTN_ROLES else "channels"][str(layer)]
                if not units:
                    continue
                idx = expand(sorted(units), spec.unit_size(role))
                w = spec.proj(model, layer, role).weight
                shape = (w.shape[0], len(idx)) if role in COL_ROLES else (len(idx), w.shape[1])
                modules[spec.proj_path(layer, role)] = SparseDelta(
                    "cols" if role in COL_ROLES else "rows", idx, 1e-3 * torch.randn(shape, dtype=w.dtype))
        adapters.append(SparseAdapter(f"random-{i}", {"method": "s2ft"}, modules))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (n_adapters, recipe.data.max_length), generator=g).to(where)

    def timed(fn) -> float:
        fn()  # warm-up
        out = []
        for _ in range(repeats):
            _sync(where)
            tick = time.perf_counter()
            fn()
            _sync(where)
            out.append(time.perf_counter() - tick)
        return statistics.median(out)

    def switch():
        fuse(model, adapters[0])
        unfuse(model, adapters[0])

    def forward() -> float:
        tick = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - tick

    def setup():
        with mixed_adapters(model, adapters, list(range(n_adapters))):
            pass

    with torch.no_grad():
        switch_s = timed(switch)
        # Serving enters the mixing context once a batch (sparseft generate: once for all its decoding steps) and runs
        # forwards inside it: the forward is what a decoding step costs; the set-up is reported apart. The two
        # forwards alternate, so a busy machine slows both alike.
        setup_s = timed(setup)
        single, mixed = [], []
        for i in range(repeats + 1):  # the first pair warms up
            fuse(model, adapters[0])
            t = forward()
            unfuse(model, adapters[0])
            with mixed_adapters(model, adapters, list(range(n_adapters))):
                m = forward()
            if i:
                single.append(t)
                mixed.append(m)
        single_s, mixed_s = statistics.median(single), statistics.median(mixed)
    return {"entry": "serve", "n_adapters": n_adapters, "adapter_params": adapters[0].num_parameters,
            "switch_s": switch_s, "single_adapter_forward_s": single_s, "mixed_forward_s": mixed_s,
            "mixed_setup_s": setup_s, "mixed_over_single": mixed_s / single_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("entry")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="method key=value (numbers parsed as JSON)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    from sparseft.models.loader import quiet_libraries

    quiet_libraries()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if args.entry == "serve":
        result = serve(args.recipe, args.adapters, repeats=max(args.steps, 3), device=args.device)
    else:
        result = train_steps(args.recipe, args.entry, args.steps, args.warmup, overrides, args.device)
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
