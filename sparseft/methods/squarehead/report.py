"""Sparsity report of a model's block linears, read from the weights themselves (what was exported, not what was
planned): zeros per layer, the N:M check, totals. Written beside a merged model as sparsity.json and sparsity.md."""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from sparseft.methods.squarehead.config import SquareHeadConfig, parse_pattern
from sparseft.models.arch import ROLES, arch_of


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of m consecutive weights in a row with more than n non-zeros (-1 when the row length is not a multiple
    of m, so the pattern cannot hold)."""
    rows, cols = weight.shape
    if cols % m:
        return -1
    nonzero = (weight.detach() != 0).reshape(rows, cols // m, m).sum(-1)
    return int((nonzero > n).sum())


def sparsity_report(model: nn.Module, cfg: SquareHeadConfig) -> dict:
    spec = arch_of(model)
    nm = parse_pattern(cfg.pattern)
    pruned_layers = set(range(spec.num_layers) if cfg.layers is None else cfg.layers)
    rows = []
    zeros = total = 0
    for layer in range(spec.num_layers):
        for role in ROLES:
            w = spec.proj(model, layer, role).weight
            z = int((w.detach() == 0).sum())
            pruned = layer in pruned_layers and role in cfg.roles
            row = {"name": spec.proj_path(layer, role), "layer": layer, "role": role, "pruned": pruned,
                   "shape": list(w.shape), "zeros": z, "numel": w.numel(), "sparsity": z / w.numel()}
            if nm is not None and pruned:
                row["nm_violations"] = nm_violations(w, *nm)
            rows.append(row)
            if pruned:
                zeros, total = zeros + z, total + w.numel()
    all_zeros = sum(int((p.detach() == 0).sum()) for p in model.parameters())
    all_params = sum(p.numel() for p in model.parameters())
    return {
        "target": {"pattern": cfg.pattern, "sparsity": cfg.target_sparsity, "pruner": cfg.pruner,
                   "roles": list(cfg.roles), "layers": cfg.layers},
        "pruned_linears": {"zeros": zeros, "numel": total, "sparsity": zeros / max(total, 1)},
        "model": {"zeros": all_zeros, "numel": all_params, "sparsity": all_zeros / max(all_params, 1)},
        "layers": rows,
    }


def report_table(report: dict) -> str:
    """The report as a Markdown table, one row a linear."""
    nm = any("nm_violations" in r for r in report["layers"])
    t = report["target"]
    head = f"# Sparsity\n\nTarget: {t['pattern']} at {t['sparsity']:.2%} ({t['pruner']}).\n\n"
    cols = "| linear | shape | zeros | sparsity |" + (" N:M violations |" if nm else "")
    sep = "|---|---|---:|---:|" + ("---:|" if nm else "")
    lines = [cols, sep]
    for r in report["layers"]:
        shape = "x".join(map(str, r["shape"]))
        mark = "" if r["pruned"] else " (dense)"
        line = f"| {r['name']}{mark} | {shape} | {r['zeros']:,} | {r['sparsity']:.2%} |"
        if nm:
            line += f" {r.get('nm_violations', '-')} |"
        lines.append(line)
    p, m = report["pruned_linears"], report["model"]
    foot = (f"\nPruned linears: {p['zeros']:,} of {p['numel']:,} weights zero ({p['sparsity']:.2%}); "
            f"whole model: {m['sparsity']:.2%}.\n")
    return head + "\n".join(lines) + "\n" + foot


def report_files(model: nn.Module, cfg: SquareHeadConfig) -> dict[str, str]:
    report = sparsity_report(model, cfg)
    return {"sparsity.json": json.dumps(report, indent=2) + "\n", "sparsity.md": report_table(report)}
