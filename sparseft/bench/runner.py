"""Run benchmark entries one process each, then report: a table, JSON and a plot, with ratios to full FT and the floor.

Each entry runs in a fresh process so one method's allocations cannot inflate another's peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparseft.errors import UserError
from sparseft.models.arch import ROLES, arch_of
from sparseft.recipe import Recipe



def run_entry(recipe_path: Path, entry: str, steps: int, warmup: int, sets: list[str] = (), console=None,
              device: str = "auto") -> dict:
    cmd = [sys.executable, "-m", "sparseft.bench.worker", str(recipe_path), entry, "--steps", str(steps),
           "--warmup", str(warmup), "--device", device] + [f"--set={s}" for s in sets]
    if console:
        console.print(f"[dim]bench: {entry} …[/]", highlight=False)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"bench entry {entry!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("BENCH "):])


def spec_family_module(recipe: Recipe, role: str) -> str:
    from transformers import AutoConfig

    return arch_of(AutoConfig.from_pretrained(recipe.model.path)).family.proj[role].rsplit(".", 1)[-1]


def lora_rank_matching(recipe: Recipe, trainable: int, roles: list[str]) -> int:
    """The LoRA rank whose trainable parameters on `roles` come closest to `trainable`."""
    from transformers import AutoConfig

    spec = arch_of(AutoConfig.from_pretrained(recipe.model.path))
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    dims = {"q": (spec.hidden_size, q_out), "k": (spec.hidden_size, kv_out), "v": (spec.hidden_size, kv_out),
            "o": (q_out, spec.hidden_size), "up": (spec.hidden_size, spec.intermediate_size),
            "gate": (spec.hidden_size, spec.intermediate_size), "down": (spec.intermediate_size, spec.hidden_size)}
    per_rank = spec.num_layers * sum(sum(dims[r]) for r in roles)
    return max(1, round(trainable / per_rank))


def run_bench(recipe: Recipe, recipe_path: Path, entries: list[str], steps: int, warmup: int, out_dir: Path,
              console: Console, device: str = "auto") -> dict:
    if recipe.method.name != "s2ft" and ("s2ft" in entries or "serve" in entries):
        raise UserError(f"method.name={recipe.method.name!r}: bench needs an s2ft recipe for the s2ft and serve "
                        "entries (it compares the other methods against it)")
    order = sorted(entries, key=lambda e: (e != "s2ft", e == "serve"))  # s2ft first: LoRA's rank is matched to it
    results: dict[str, dict] = {}
    for entry in order:
        sets = []
        if entry == "lora":
            # LoRA as users run it: every linear projection of the blocks, at the rank that matches S2FT's count.
            roles = list(ROLES)
            target = results.get("s2ft", {}).get("trainable_params")
            rank = lora_rank_matching(recipe, target, roles) if target else 16
            modules = [spec_family_module(recipe, r) for r in roles]  # LoRA (PEFT) targets modules by name
            sets = [f"r={rank}", f"alpha={2 * rank}", "target_modules=" + json.dumps(modules)]
        results[entry] = run_entry(recipe_path, entry, steps, warmup, sets, console, device)
    report = _ratios(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps({"recipe": str(recipe_path), "steps": steps, "warmup": warmup,
                                                    "results": results, "ratios": report}, indent=2) + "\n")
    _plot(results, out_dir / "bench.png", Path(recipe.model.path).name)
    _print(results, report, console)
    console.print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}", highlight=False)
    return {"results": results, "ratios": report}


def _ratios(results: dict[str, dict]) -> dict[str, float]:
    """The comparisons the S2FT paper makes: time and memory of S2FT against full FT, LoRA and the floor."""
    out = {}
    s = results.get("s2ft")
    if not s:
        return out
    for other in ("full", "lora", "floor", "hift"):
        if other in results:
            o = results[other]
            out[f"s2ft_time_over_{other}"] = s["median_step_s"] / o["median_step_s"]
            out[f"s2ft_memory_over_{other}"] = s["peak_mem_mb"] / o["peak_mem_mb"]
    return out


def _print(results: dict[str, dict], ratios: dict[str, float], console: Console) -> None:
    full = results.get("full")
    trained = [r for n, r in results.items() if n != "serve"]
    kind = trained[0]["memory"] if trained else "RSS"
    table = Table("method", "trainable", "median step (s)", "tokens/s", f"peak {kind} (GB)", "time / full",
                  "memory / full")
    for name, r in results.items():
        if name == "serve":
            continue
        rel_t = f"{r['median_step_s'] / full['median_step_s']:.2f}x" if full else "-"
        rel_m = f"{r['peak_mem_mb'] / full['peak_mem_mb']:.2f}x" if full else "-"
        table.add_row(name, f"{r['trainable_params']:,}", f"{r['median_step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['peak_mem_mb'] / 1024:.2f}", rel_t, rel_m)
    console.print(table)
    if ratios:
        console.print("  ".join(f"{k} {v:.2f}" for k, v in ratios.items()), highlight=False)
    if "serve" in results:
        s = results["serve"]
        console.print(f"serving: adapter switch (fuse + unfuse) {1000 * s['switch_s']:.1f} ms; forward of a batch mixing "
                      f"{s['n_adapters']} adapters {1000 * s['mixed_forward_s']:.1f} ms vs one fused adapter "
                      f"{1000 * s['single_adapter_forward_s']:.1f} ms ({s['mixed_over_single']:.2f}x)", highlight=False)


def _plot(results: dict[str, dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n != "serve"]
    if not names:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=120)
    kind = results[names[0]]["memory"]
    for ax, key, label, scale in ((axes[0], "median_step_s", "median step time (s)", 1),
                                  (axes[1], "peak_mem_mb", f"peak memory (GB {kind})", 1 / 1024)):
        values = [results[n][key] * scale for n in names]
        bars = ax.bar(names, values, color=["#d62728" if n == "s2ft" else "#7f7f7f" for n in names])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"sparseft bench · {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
