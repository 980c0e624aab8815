"""LaMDA and LaMDA++: SVD-initialised adapters y = W x + scale * B S A x with A frozen, S trained and B frozen gradually.

`select` fixes each linear's rank (uniform, or LaMDA++'s spectrum rule) and computes the SVD start once; in a run it
is saved beside selection.json (`lamda_init.safetensors`), so resume and export rebuild exactly the same A whatever
SVD another machine would compute. `prepare` wraps the linears. The freezing of B is a pure function of the step, so a
resumed run rebuilds it from the step and its checkpointed B.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from sparseft.errors import UserError
from sparseft.export.adapter_files import write_adapter
from sparseft.methods.base import Method, MethodContext, register
from sparseft.methods.lamda.config import LamdaConfig
from sparseft.methods.lamda.layers import NAMES, LamdaLinear
from sparseft.methods.lamda.spectrum import allocate_ranks, effective_rank, singular_values, svd_start, top_svd
from sparseft.models.arch import ArchSpec, arch_of, set_module

INIT_FILE = "lamda_init.safetensors"
_STATE = "_lamda_state"  # attribute on a prepared model, for whichever Method instance exports it


@dataclass
class _Prepared:
    paths: list[str]
    start_step: int  # B's directions start freezing at this optimizer step
    end_step: int  # B is wholly frozen from this step
    full_parameters: Callable[..., ContextManager]  # the engine's gather (MethodContext.full_parameters)


def frozen_count(step: int, rank: int, start_step: int, end_step: int) -> int:
    """Directions of a rank-`rank` B frozen during optimizer step `step` (0-based): none before start_step, all from
    end_step, and in between floor(rank * (step - start_step) / (end_step - start_step)), one direction at a time."""
    if step >= end_step:
        return rank
    if step < start_step:
        return 0
    return rank * (step - start_step) // (end_step - start_step)


@register
class Lamda(Method):
    config_cls = LamdaConfig
    has_adapter = True
    cfg: LamdaConfig
    # Every ZeRO stage (the default zero_stages): frozen columns of B are taken from a copy in the forward and written
    # back into B after each step, which needs no access to the optimizer's state (ZeRO keeps it in flat partitions).

    def __init__(self, cfg: LamdaConfig):
        super().__init__(cfg)
        self._start: tuple[int, dict[str, torch.Tensor]] | None = None  # (id of model, SVD start) from select

    # --- before training -------------------------------------------------------------------------------------------
    def _linears(self, model: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
        return {spec.proj_path(layer, role): spec.proj(model, layer, role)
                for layer in range(spec.num_layers) for role in self.cfg.projections}

    def _caps(self, model: nn.Module) -> dict[str, int]:
        """Each adapted linear's largest possible rank (min of its weight's shape); a UserError naming the key when the
        recipe's rank (uniform) or total rank (LaMDA++) does not fit."""
        cfg = self.cfg
        caps = {p: min(m.weight.shape) for p, m in self._linears(model, arch_of(model)).items()}
        if cfg.rank_allocation == "uniform":
            small = {p: c for p, c in caps.items() if c < cfg.r}
            if small:
                p, c = next(iter(small.items()))
                raise UserError(f"method.r={cfg.r}: larger than {p}'s largest possible rank {c} "
                                f"(min of its weight's shape); lower r or drop that projection")
        elif not len(caps) <= self._budget(len(caps)) <= sum(caps.values()):
            key, value = ("method.rank_budget", cfg.rank_budget) if cfg.rank_budget else ("method.r", cfg.r)
            raise UserError(f"{key}={value}: a total rank of {self._budget(len(caps))} over {len(caps)} linears must "
                            f"be between {len(caps)} (rank 1 each) and {sum(caps.values())} (each at full rank)")
        return caps

    def _budget(self, n_linears: int) -> int:
        return self.cfg.rank_budget or self.cfg.r * n_linears

    def check(self, model: nn.Module) -> None:
        self._caps(model)

    def select(self, model: nn.Module, ctx: MethodContext) -> dict:
        """Each adapted linear's rank, and the SVD start (kept for prepare; written to the run directory)."""
        cfg, spec = self.cfg, arch_of(model)
        linears = self._linears(model, spec)
        caps = self._caps(model)
        selection: dict = {"projections": list(cfg.projections), "rank_allocation": cfg.rank_allocation,
                           "init": cfg.init}
        factors: dict[str, tuple] = {}
        if cfg.rank_allocation == "uniform":
            ranks = {p: cfg.r for p in linears}
        else:
            budget = self._budget(len(linears))
            erank = {}
            for p, m in linears.items():
                if cfg.svd == "full":
                    # One SVD a linear: its values give the spectrum, its vectors (as many as this linear's rank can
                    # reach) are kept for the start.
                    most = min(caps[p], budget - len(linears) + 1)
                    u, sigma, vh = top_svd(m.weight, caps[p], "full")
                    factors[p] = (u[:, :most].clone(), sigma, vh[:most].clone())
                    erank[p] = effective_rank(sigma)
                else:
                    erank[p] = effective_rank(singular_values(m.weight))
            ranks = dict(zip(linears, allocate_ranks(list(erank.values()), budget, list(caps.values()))))
            selection.update(budget=budget, effective_rank={p: round(e, 3) for p, e in erank.items()})
        selection["ranks"] = ranks
        selection["svd"] = cfg.svd
        start = {}
        for p, m in linears.items():
            for name, t in svd_start(m.weight, ranks[p], cfg.init, cfg.scale, cfg.svd, factors.pop(p, None)).items():
                start[f"{p}.{name}"] = t
        self._start = (id(model), start)
        if ctx.run_dir is not None:
            _save_atomic(start, Path(ctx.run_dir) / INIT_FILE)
        ctx.log(summary(selection, spec, cfg.scale))
        return selection

    def prepare(self, model: nn.Module, selection: dict, ctx: MethodContext) -> nn.Module:
        """Freeze the model and wrap every selected linear in a LamdaLinear started from the SVD."""
        if getattr(model, _STATE, None) is not None:
            raise ValueError("lamda: this model is already prepared")
        spec = arch_of(model)
        linears = self._linears(model, spec)
        ranks = selection.get("ranks", {})
        if set(ranks) != set(linears) or selection.get("init") != self.cfg.init:
            raise UserError("lamda: the selection (selection.json) does not match the recipe's projections / init; "
                            "was the recipe changed after the run started?")
        start = self._start_for(model, linears, ranks, ctx)
        model.requires_grad_(False)
        for p, m in linears.items():
            tensors = {n: start[f"{p}.{n}"] for n in NAMES if f"{p}.{n}" in start}
            set_module(model, p, LamdaLinear(m, scale=self.cfg.scale, **tensors))
        steps = ctx.recipe.train.max_steps
        fb = self.cfg.freeze_b
        setattr(model, _STATE, _Prepared(list(linears), round(fb.start * steps), round(fb.end * steps),
                                         ctx.full_parameters))
        return model

    def _start_for(self, model, linears: dict[str, nn.Linear], ranks: dict[str, int], ctx) -> dict[str, torch.Tensor]:
        """The SVD start: from select on this model, else the run's saved file, else computed afresh."""
        if self._start is not None and self._start[0] == id(model):
            start, self._start = self._start[1], None
            return start
        path = Path(ctx.run_dir) / INIT_FILE if ctx.run_dir is not None else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            start = load_file(str(path))
            for p, m in linears.items():
                d_out, d_in = m.weight.shape
                a = start.get(f"{p}.lamda_A")
                if a is None or tuple(a.shape) != (ranks[p], d_in):
                    raise UserError(f"{path}: {p}.lamda_A is missing or not ({ranks[p]}, {d_in}); the file does not "
                                    "belong to this run's selection")
            return start
        if path is not None:
            ctx.log(f"lamda: {path} is missing; recomputing the SVD start (identical only on the same machine)")
        return {f"{p}.{n}": t for p, m in linears.items()
                for n, t in svd_start(m.weight, ranks[p], self.cfg.init, self.cfg.scale, self.cfg.svd).items()}

    def _state(self, model: nn.Module) -> _Prepared:
        state = getattr(model, _STATE, None)
        if state is None:
            raise ValueError("lamda: the model was not prepared by LaMDA (or was already merged)")
        return state

    def _layers(self, model: nn.Module) -> list[tuple[str, LamdaLinear]]:
        return [(p, model.get_submodule(p)) for p in self._state(model).paths]

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """S and B's columns of every layer, frozen columns included (checkpoints keep them, so a resumed run has
        them)."""
        return {f"{p}.{n}": q for p, layer in self._layers(model) for n, q in layer.named_parameters()
                if not n.startswith("base_layer.")}

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """S and B are left out of weight decay, whatever train.weight_decay says. Decay pulls them toward zero, not
        toward their SVD start: with init spectrum it shrinks B S from B0 S0 and so strips W's top-r directions from
        the model (measured: logits moved by 0.057 in 50 steps with a zero loss), and with either init it pulls B off
        the singular vectors it starts from."""
        return [{"params": list(self.trainable_parameters(model).values()), "weight_decay": 0.0}]

    # --- during training -------------------------------------------------------------------------------------------
    def on_step_start(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Freeze the directions of B the schedule freezes by this step (idempotent, so resume rebuilds it)."""
        state = self._state(model)
        wanted = []
        for _, layer in self._layers(model):
            n = frozen_count(step, layer.rank, state.start_step, state.end_step)
            cols = torch.zeros(layer.rank, dtype=torch.bool)
            if self.cfg.freeze_b.order == "largest":
                cols[:n] = True
            else:
                cols[layer.rank - n:] = True
            wanted.append((layer, cols))
        # Freezing may copy B's new frozen columns: under ZeRO-3, gather those (all at once) to read them.
        with state.full_parameters([c for layer, cols in wanted for c in layer.new_columns(cols)]):
            for layer, cols in wanted:
                layer.freeze_directions(cols, optimizer)

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Undo whatever the optimizer step did to frozen directions; log how many parameters trained in this step."""
        layers = [layer for _, layer in self._layers(model)]
        pinned = [layer.lamda_B_cols[j] for layer in layers for j in layer.pinned]
        with self._state(model).full_parameters(pinned, modify=True):
            for layer in layers:
                layer.restore_frozen()
        return {"trainable_params": sum(layer.trainable_count() for layer in layers)}

    # --- after training --------------------------------------------------------------------------------------------
    def merged(self, model: nn.Module) -> nn.Module:
        """Fold every adapter into its base weight (W + scale (B S - B0 S0) A) and drop the wrappers, in place."""
        for p, layer in self._layers(model):
            set_module(model, p, layer.unwrap())
        delattr(model, _STATE)
        return model

    def base_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {p: layer.base_layer.weight for p, layer in self._layers(model)}

    @classmethod
    def apply_adapter(cls, model: nn.Module, path: Path):
        from sparseft.methods.lamda.adapter import lamda_applied

        return lamda_applied(model, path)

    def save_adapter(self, model: nn.Module, out_dir: Path, base_model: str) -> dict:
        tensors, ranks = {}, {}
        for p, layer in self._layers(model):
            ranks[p] = layer.rank
            tensors.update({f"{p}.{n}": t for n, t in layer.adapter_tensors().items()})
        fields = {
            "method": "lamda",
            "base_model": base_model,
            "projections": list(self.cfg.projections),
            "rank_allocation": self.cfg.rank_allocation,
            "init": self.cfg.init,
            "scale": self.cfg.scale,
            "ranks": ranks,
            "num_parameters": sum(t.numel() for n, t in tensors.items() if n.endswith((".lamda_S", ".lamda_B"))),
        }
        write_adapter(out_dir, tensors, fields)
        return fields


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary(selection: dict, spec: ArchSpec, scale: float) -> str:
    """What select chose, for the run log: a rank per layer and projection."""
    roles, ranks = selection["projections"], selection["ranks"]
    if selection["rank_allocation"] == "uniform":
        r = next(iter(ranks.values()))
        head = f"lamda: rank {r} on {', '.join(roles)} of {spec.num_layers} layers"
    else:
        head = (f"lamda++: ranks from each weight's effective rank exp(H(sigma^2 / sum sigma^2)), total "
                f"{selection['budget']} over {len(ranks)} linears")
    head += f"; init {selection['init']}, scale {scale:g}"
    if selection["rank_allocation"] == "uniform":
        return head
    lines = [head, "  layer " + "".join(f"{r:>6}" for r in roles)]
    for layer in range(spec.num_layers):
        lines.append(f"  {layer:<5} " + "".join(f"{ranks[spec.proj_path(layer, r)]:>6}" for r in roles))
    return "\n".join(lines)
