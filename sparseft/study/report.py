"""What a study leaves: study.json, study.md (the table and the reading of each claim) and pareto.png (gain against
retention, one colour per method)."""

from __future__ import annotations

import json
from pathlib import Path

# Differences in exact match below this are read as "matches" (about two standard errors of a proportion near 0.5
# scored on 100 prompts; the study scores a few hundred at most).
TOLERANCE = 0.05


def _ok(results: list[dict]) -> list[dict]:
    return [r for r in results if "error" not in r]


def best(results: list[dict], method: str, budget: str | None = None) -> dict | None:
    """The point of a method (and budget) with the highest gain; ties go to the better retention, then perplexity."""
    rows = [r for r in _ok(results) if r["method"] == method and (budget is None or r["budget"] == budget)]
    return max(rows, key=lambda r: (r["gain"], r["retention"], -r["perplexity"]), default=None)


def budgets(results: list[dict], method: str) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["method"] == method and r["budget"] not in seen:
            seen.append(r["budget"])
    return seen


def _compare(a: float, b: float) -> str:
    return "better" if a - b > TOLERANCE else "worse" if b - a > TOLERANCE else "the same"


def _fmt_point(r: dict) -> str:
    return (f"{r['method']} {r['budget']} lr {r['lr']:g}: gain {r['gain']:.3f}, retention {r['retention']:.3f}, "
            f"perplexity {r['perplexity']:.2f}, {r['trainable']:,} trainable")


def read_claims(base: dict, results: list[dict]) -> list[dict]:
    """Each seed claim against the best point of each method and budget (best = highest gain over the learning
    rates). Verdicts: holds, partly, does not hold, or not measured."""
    claims = []

    def add(claim: str, verdict: str, evidence: list[str]):
        claims.append({"claim": claim, "verdict": verdict, "evidence": evidence})

    # 1. S2FT forgets less and generalises better than LoRA at the same budget (budgets paired in grid order):
    # two sub-claims a pair, each better (by more than the tolerance), the same, or worse.
    ev, calls = [], []
    for sb, lb in zip(budgets(results, "s2ft"), budgets(results, "lora")):
        s, l_ = best(results, "s2ft", sb), best(results, "lora", lb)
        if s and l_:
            for what, key in (("generalises (gain)", "gain"), ("forgets (capitals retention)", "retention")):
                calls.append(_compare(s[key], l_[key]))
                ev.append(f"{sb} vs {lb}: {what} {s[key]:.3f} vs {l_[key]:.3f}: {calls[-1]}")
            ev += [_fmt_point(s), _fmt_point(l_)]
    verdict = "not measured" if not calls else "holds" if all(c == "better" for c in calls) else \
        "does not hold" if "better" not in calls else "partly"
    add("S2FT forgets less and generalises better than LoRA at the same budget", verdict, ev)

    # 2. HiFT matches full FT.
    h, f = best(results, "hift"), best(results, "full")
    if h and f:
        d = h["gain"] - f["gain"]
        add("HiFT matches full FT", "holds" if d >= -TOLERANCE else "does not hold",
            [_fmt_point(h), _fmt_point(f), f"gain difference {d:+.3f} (tolerance {TOLERANCE})"])
    else:
        add("HiFT matches full FT", "not measured", [])

    # 3. LaMDA matches LoRA with far fewer trainable weights (paired budgets).
    ev, oks = [], []
    for mb, lb in zip(budgets(results, "lamda"), budgets(results, "lora")):
        m, l_ = best(results, "lamda", mb), best(results, "lora", lb)
        if m and l_:
            ratio = m["trainable"] / max(l_["trainable"], 1)
            ev += [_fmt_point(m), _fmt_point(l_), f"trainable ratio lamda/lora {ratio:.3f}"]
            oks.append(m["gain"] >= l_["gain"] - TOLERANCE and ratio <= 0.5)
    add("LaMDA matches LoRA with far fewer trainable weights",
        "not measured" if not oks else "holds" if all(oks) else "partly" if any(oks) else "does not hold", ev)

    # 4. SquareHead recovers accuracy at 50% sparsity and at 2:4: its gain against dense full FT's.
    ev, oks = [], []
    f = best(results, "full")
    for b in budgets(results, "squarehead"):
        s = best(results, "squarehead", b)
        if s and f:
            ev += [_fmt_point(s), f"gain vs dense full FT {s['gain'] - f['gain']:+.3f}, retention vs base "
                                  f"{s['retention'] - base['retention']:+.3f}"]
            oks.append(s["gain"] >= f["gain"] - TOLERANCE)
    if f and oks:
        ev.append(_fmt_point(f))
    add("SquareHead recovers accuracy at 50% sparsity and at 2:4",
        "not measured" if not oks else "holds" if all(oks) else "partly" if any(oks) else "does not hold", ev)
    return claims


def _num(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if r.get(key) is not None else "-"


def table_markdown(base: dict, results: list[dict]) -> str:
    head = ("| method | budget | lr | trainable | % | gain (skill EM) | retention (capitals EM) | English ppl | "
            "s / step | peak MiB | wall s | CPU s |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = [f"| base | - | - | 0 | 0 | {base['gain']:.3f} | {base['retention']:.3f} | {base['perplexity']:.2f} "
            f"| - | - | - | {_num(base, 'cpu_s', '.0f')} |"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | {r['budget']} | {r['lr']:g} | failed: {r['error'][:80]} ||||||||")
            continue
        rows.append(f"| {r['method']} | {r['budget']} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_pct']:.2f} "
                    f"| {r['gain']:.3f} | {r['retention']:.3f} | {r['perplexity']:.2f} | {_num(r, 'step_s', '.2f')} "
                    f"| {r['peak_mib']:,.0f} | {r['wall_s']:.0f} | {_num(r, 'cpu_s', '.0f')} |")
    return head + "\n".join(rows) + "\n"


def pareto(results: list[dict]) -> list[dict]:
    """Points no other point beats on both gain and retention."""
    ok = _ok(results)
    return [r for r in ok if not any(o["gain"] >= r["gain"] and o["retention"] >= r["retention"] and
                                     (o["gain"] > r["gain"] or o["retention"] > r["retention"]) for o in ok)]


def plot(base: dict, results: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ok = _ok(results)
    methods = list(dict.fromkeys(r["method"] for r in ok))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = "osD^v<>"
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6), dpi=120)
    for ax, (xkey, xlabel) in zip(axes, [("retention", "retention: capitals exact match (higher is better)"),
                                         ("perplexity", "retention: English perplexity (lower is better)")]):
        for m in methods:
            bs = budgets(ok, m)
            for r in (r for r in ok if r["method"] == m):
                ax.scatter(r[xkey], r["gain"], color=colours[m], marker=markers[bs.index(r["budget"]) % 7], s=36,
                           alpha=0.85, label=f"{m} {r['budget']}" if r["budget"] != "default" else m)
        ax.scatter(base[xkey], base["gain"], color="black", marker="*", s=140, label="base model", zorder=5)
        if xkey == "retention":
            front = sorted(pareto(ok), key=lambda r: r["retention"])
            if front:
                ax.plot([r["retention"] for r in front], [r["gain"] for r in front], "k--", lw=0.8, alpha=0.6,
                        label="Pareto front")
        else:
            ax.invert_xaxis()
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("gain: skill exact match, held-out prompts")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.legend(uniq.values(), uniq.keys(), loc="center left", bbox_to_anchor=(0.87, 0.5), fontsize=7, frameon=False)
    fig.savefig(out)
    plt.close(fig)


def write_report(out: Path, base: dict, results: list[dict], planned: list[str], wall_s: float, quick: bool) -> None:
    done = [r for r in results if "error" not in r]
    claims = read_claims(base, results)
    points_wall = sum(r.get("wall_s", 0.0) for r in results)
    points_cpu = sum(r.get("cpu_s", 0.0) for r in results)
    payload = {"quick": quick, "planned": len(planned), "finished": len(done), "failed": len(results) - len(done),
               "points_wall_s": points_wall, "points_cpu_s": points_cpu, "session_wall_s": wall_s, "base": base,
               "points": results, "pareto": [r["id"] for r in pareto(results)], "claims": claims,
               "tolerance": TOLERANCE}
    (out / "study.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# Study{' (--quick)' if quick else ''}: {len(done)} of {len(planned)} points finished"
             f"{f', {len(results) - len(done)} failed' if len(results) > len(done) else ''}; "
             f"points took {points_wall / 60:.1f} min in all ({points_cpu / 60:.1f} CPU min)", "",
             f"Base model: {base['model']}", "",
             table_markdown(base, results), "## The claims, read against the best learning rate of each method "
             f"and budget (tolerance {TOLERANCE} exact match)", ""]
    for c in claims:
        lines.append(f"- **{c['claim']}: {c['verdict']}.**")
        lines += [f"  - {e}" for e in c["evidence"]]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    if done:
        plot(base, results, out / "pareto.png", f"{base['model']}: gain against retention, each point one method, "
                                                f"budget and learning rate")
