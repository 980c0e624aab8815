"""HiFT, hierarchical full-parameter fine-tuning: every weight trains, one group of units a step.

Units, bottom to top: the embeddings, each transformer block, the final norm with the LM head (with tied embeddings the
shared weight makes the embeddings and the head one unit, placed at the bottom). Consecutive units form groups of
`group_size`; the groups take turns in a bottom-up, top-down or seeded random order, cycling until train.max_steps.

One step trains one group:
- Only its parameters require grad, so autograd computes no weight gradient for the others and keeps no activations
  for them below the lowest active unit: nothing under it is in the graph, and the backward pass ends there.
- Each group is its own optimizer param group (two: with and without weight decay), marked `active` for the step it
  trains. torch optimizers skip parameters whose `.grad` is None, and the trainer's optimizer skips inactive groups
  (sparseft/train/optim.py), so an inactive parameter gets no update, no weight decay and no momentum step, also
  under DeepSpeed ZeRO, which hands the optimizer a gradient for every group.
- In one process a parameter's optimizer state (AdamW keeps a `step` per parameter, so bias correction counts the
  updates that parameter has had) exists only once it has trained, and between its turns it is held here, in CPU
  memory when `offload` is on, not by the optimizer on the compute device. On a CPU-only run moving it is free: no
  copy is made.
- The learning-rate schedule is the trainer's, over optimizer steps: step k runs at lr * lr_factor(k) whichever group
  is active, and warmup and decay end at train.max_steps. (HiFT's public code advanced its scheduler once a cycle but
  sized it for every step, so its LR barely decayed.) With `schedule_unit: cycle` (the paper's delayed schedule) every
  step of cycle c runs at lr * lr_factor(c * number of groups), so all groups of a cycle train at one rate, and the
  schedule still ends at train.max_steps.
- The group is set in on_step_start, before the step's micro-batches, so gradient accumulation sums every micro-batch
  into the same group.

On DeepSpeed (data parallelism, ZeRO-1, -2 and -3) every weight requires grad when the engine is built, so ZeRO
holds all of them, each HiFT group in flat partitions of its own. Its optimizer state is partitioned across ranks rather
than parked here (it lives in those partitions, which the method does not move), and the groups that wait are left out
of the step by their `active` flag.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from sparseft.errors import UserError
from sparseft.methods.base import Method, MethodConfig, MethodContext, register
from sparseft.models.arch import arch_of


class HiFTConfig(MethodConfig):
    name: Literal["hift"] = "hift"
    group_size: int = Field(
        1, gt=0,
        description="Units a group (m in the HiFT paper). Units: the embeddings, each transformer block, and the final "
                    "norm with the LM head (one unit with the embeddings when they are tied).",
    )
    order: Literal["bottom_up", "top_down", "random"] = Field(
        "bottom_up",
        description="Order the groups train in, one a step, cycling: bottom_up (embeddings first), top_down (LM head "
                    "first) or random (seeded).",
    )
    reshuffle: bool = Field(True, description="random order: a new permutation every cycle (true) or one for the run.")
    seed: int | None = Field(None, description="Seed of the random order; null uses train.seed.")
    offload: bool = Field(True, description="Hold the optimizer state of inactive groups in CPU memory "
                                            "(a no-op when training on CPU).")
    group_by: Literal["units", "parameters"] = Field(
        "units",
        description="units: group_size consecutive units a group; parameters: as many groups (units / group_size, "
                    "rounded up), consecutive units split so the largest group holds as few parameters as possible "
                    "(an embedding table as large as several blocks then trains alone).",
    )
    schedule_unit: Literal["step", "cycle"] = Field(
        "step",
        description="step: the learning rate follows the trainer's schedule step by step; cycle (the HiFT paper): it "
                    "is held for a whole cycle, every group of a cycle training at the rate of the cycle's first step.",
    )


_MASTER = "_master"  # key of a parked fp32 master beside the parked optimizer state of a weight


def build_units(model: nn.Module) -> list[dict]:
    """[{name, params}] from bottom to top; every parameter (tied ones once) in exactly one unit."""
    spec = arch_of(model)
    fam = spec.family
    names = [n for n, _ in model.named_parameters()]  # a tied weight is listed once, under the embeddings

    def under(prefix: str) -> list[str]:
        return [n for n in names if n == prefix or n.startswith(prefix + ".")]

    units = [{"name": "embed", "params": under(fam.embed)}]
    units += [{"name": f"layers.{i}", "params": under(f"{fam.blocks}.{i}")} for i in range(spec.num_layers)]
    head = under(fam.final_norm) + under(fam.lm_head)
    if model.get_submodule(fam.lm_head).weight is model.get_submodule(fam.embed).weight:
        units[0] = {"name": "embed+head", "params": units[0]["params"] + head}
    else:
        units.append({"name": "head", "params": head})
    placed = {n for u in units for n in u["params"]}
    # Anything the table does not name (none in the known families) trains with the head.
    top = units[0] if units[0]["name"] == "embed+head" else units[-1]
    top["params"] += [n for n in names if n not in placed]
    return units


def group_units(n_units: int, group_size: int) -> list[list[int]]:
    """Consecutive units, bottom up, `group_size` a group (the top group may be smaller)."""
    return [list(range(i, min(i + group_size, n_units))) for i in range(0, n_units, group_size)]


def balanced_groups(sizes: list[int], n_groups: int) -> list[list[int]]:
    """Consecutive units split into `n_groups` non-empty groups, bottom up, whose largest parameter count (the sum
    of `sizes` over a group) is the smallest possible. The smallest feasible cap is found by bisection, filling
    groups greedily from the bottom; groups are then split from the top until there are exactly n_groups (splitting
    never raises the largest)."""
    n_groups = min(n_groups, len(sizes))

    def fill(cap: int) -> list[list[int]]:
        groups, total = [[]], 0
        for i, size in enumerate(sizes):
            if groups[-1] and total + size > cap:
                groups.append([])
                total = 0
            groups[-1].append(i)
            total += size
        return groups

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(fill(mid)) <= n_groups:
            hi = mid
        else:
            lo = mid + 1
    groups = fill(lo)
    while len(groups) < n_groups:
        i = max(j for j, g in enumerate(groups) if len(g) > 1)
        groups[i:i + 1] = [groups[i][:-1], groups[i][-1:]]
    return groups


@register
class HiFT(Method):
    config_cls = HiFTConfig
    cfg: HiFTConfig

    def __init__(self, cfg: HiFTConfig):
        super().__init__(cfg)
        self._groups: list[list[tuple[str, nn.Parameter]]] = []
        self._name_of: dict[int, str] = {}  # id(param) -> name
        self._seed = 0
        self._max_steps: int | None = None
        self._orders: dict[int, list[int]] = {}  # cycle -> order of group indices
        self._parked: dict[str, dict] = {}  # name -> optimizer state of a parameter whose group is inactive
        self._active: int | None = None
        self._next_step = 0
        # Mixed precision: only the active group holds fp32 masters (see _swap_state).
        self._master_dtype: torch.dtype | None = None
        self._storage_dtype: torch.dtype | None = None
        self._device = torch.device("cpu")
        self._ready: dict[str, dict] = {}  # name -> parked state already on its way to the device (prefetched)
        self._copy_stream = None
        self._lr_factor = None  # the trainer's schedule (MethodContext.lr_factor), for schedule_unit: cycle

    # --- before training -------------------------------------------------------------------------------------------
    def select(self, model: nn.Module, ctx: MethodContext) -> dict:
        recipe = ctx.recipe
        seed = self.cfg.seed if self.cfg.seed is not None else (recipe.train.seed if recipe is not None else 0)
        units = build_units(model)
        n_groups = -(-len(units) // self.cfg.group_size)
        if self.cfg.group_by == "parameters":
            params = dict(model.named_parameters())
            sizes = [sum(params[n].numel() for n in u["params"]) for u in units]
            groups = balanced_groups(sizes, n_groups)
        else:
            groups = group_units(len(units), self.cfg.group_size)
        return {"units": units, "groups": groups, "seed": seed}

    def prepare(self, model: nn.Module, selection: dict, ctx: MethodContext) -> nn.Module:
        """Learn the groups. Every weight requires grad until the first step, so an engine built now (DeepSpeed's ZeRO
        flattens only weights that require grad) holds them all; on_step_start freezes all groups but the step's."""
        model.requires_grad_(True)
        params = dict(model.named_parameters())
        units = selection["units"]
        listed = [n for u in units for n in u["params"]]
        if sorted(listed) != sorted(params):
            raise UserError("hift: the run's selection.json does not list the model's parameters once each "
                            "(was model.path changed?)")
        self._groups = [[(n, params[n]) for u in group for n in units[u]["params"]] for group in selection["groups"]]
        self._name_of = {id(p): n for n, p in params.items()}
        self._seed = int(selection["seed"])
        self._max_steps = ctx.recipe.train.max_steps if ctx.recipe is not None else None
        self._master_dtype, self._device = ctx.master_dtype, torch.device(ctx.device)
        self._storage_dtype = next(iter(params.values())).dtype
        sizes = [sum(p.numel() for _, p in g) for g in self._groups]
        layout = ", ".join("+".join(units[u]["name"] for u in g) for g in selection["groups"])
        ctx.log(f"hift: {len(units)} units in {len(self._groups)} groups ({layout}); order {self.cfg.order}; "
                f"{min(sizes):,} to {max(sizes):,} parameters train a step")
        starved = self.starved_groups()
        if starved:
            names = ", ".join("+".join(units[u]["name"] for u in selection["groups"][g]) for g in starved)
            ctx.log(f"hift: warning: train.max_steps={self._max_steps} is shorter than one cycle of {self.num_groups} "
                    f"groups; {len(starved)} group(s) never train: {names}. Raise train.max_steps to at least "
                    f"{self.num_groups}, or raise group_size")
        self._lr_factor = ctx.lr_factor if self.cfg.schedule_unit == "cycle" else None
        return model

    def steps_to_steady_state(self) -> int:
        """One whole cycle: until then some groups have no optimizer state yet."""
        return self.num_groups

    def starved_groups(self) -> list[int]:
        """Groups that no step of the run trains (all of them train once the run has a whole cycle)."""
        if self._max_steps is None or self._max_steps >= self.num_groups:
            return []
        trained = {self.group_at(s) for s in range(self._max_steps)}
        return [g for g in range(self.num_groups) if g not in trained]

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Every weight trains (one group a step), so all of them are the optimizer's and every checkpoint's."""
        return dict(model.named_parameters())

    def master_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """None for the whole run: under mixed precision only the active group holds fp32 masters (`_swap_state`),
        so the model stays in its storage dtype but for one group."""
        return {}

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Each group's weights as their own param groups (decayed matrices, undecayed biases and norms), tagged with
        the group (`hift_group`), so the step can leave out every group but the active one."""
        out = []
        for g, group in enumerate(self._groups):
            decay = [p for _, p in group if p.ndim >= 2]
            no_decay = [p for _, p in group if p.ndim < 2]
            out += [{"params": ps, "weight_decay": wd, "hift_group": g, "active": True}
                    for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
        return out

    # --- the order -------------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self._groups)

    def cycle_order(self, cycle: int) -> list[int]:
        """Group indices in the order cycle `cycle` trains them (groups are numbered bottom up)."""
        if cycle not in self._orders:
            k = self.num_groups
            if self.cfg.order == "bottom_up":
                order = list(range(k))
            elif self.cfg.order == "top_down":
                order = list(range(k - 1, -1, -1))
            else:
                # Its own generator, seeded by (seed, cycle): the global RNG (data order, dropout) is not disturbed,
                # and any cycle's order can be recomputed on resume.
                order = list(range(k))
                random.Random(f"hift:{self._seed}:{cycle if self.cfg.reshuffle else 0}").shuffle(order)
            self._orders[cycle] = order
        return self._orders[cycle]

    def group_at(self, step: int) -> int:
        cycle, position = divmod(step, self.num_groups)
        return self.cycle_order(cycle)[position]

    def group_names(self, g: int) -> list[str]:
        """Names of the parameters of group `g`."""
        return [n for n, _ in self._groups[g]]

    # --- during training -------------------------------------------------------------------------------------------
    def on_step_start(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        g = self.group_at(step)
        for i, group in enumerate(self._groups):
            for _, p in group:
                p.requires_grad_(i == g)
                if i != g:
                    p.grad = None  # a kept gradient would make the optimizer update (decay, momentum) a frozen weight
        for pg in optimizer.param_groups:
            if "hift_group" in pg:
                pg["active"] = pg["hift_group"] == g
            if self._lr_factor is not None and "initial_lr" in pg:
                # The cycle's rate: the schedule read at the cycle's first step (the trainer's scheduler sets
                # initial_lr * factor(step) after every step; this overrides it before the optimizer steps).
                pg["lr"] = pg["initial_lr"] * self._lr_factor(step - step % self.num_groups)
        self._swap_state(optimizer, g)
        self._active = g
        if self.num_groups > 1:
            self._prefetch(self.group_at(step + 1))

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        self._next_step = step + 1
        return {"group": self._active}

    def _swap_state(self, optimizer: torch.optim.Optimizer, g: int) -> None:
        """Park the optimizer state (and under mixed precision the fp32 master) of every inactive parameter, then hand
        the active group's back (parking first, so the compute device never holds both). Only state the optimizer
        keeps per model weight is parked: under ZeRO it lives in flat partitions, partitioned across ranks already.

        Mixed precision keeps fp32 masters for the active group alone: a group's weights become fp32 when its turn
        comes (its parked master, or its stored weights upcast the first time) and go back to the storage dtype,
        rounded once, when its turn ends, while the master waits with the optimizer state. So the model costs its
        storage dtype plus one group's masters, and no update is lost to rounding between turns."""
        active = {id(p) for _, p in self._groups[g]}
        if self._parked and not any(id(p) in self._name_of for pg in optimizer.param_groups for p in pg["params"]):
            raise UserError("hift: this checkpoint was written by a single process (or at ZeRO stage 0), which keeps "
                            "the waiting groups' optimizer state with HiFT, weight by weight; ZeRO cannot take it in. "
                            "Resume it in one process (without --nproc / --hostfile)")
        for p in [p for p in optimizer.state if id(p) not in active and id(p) in self._name_of]:
            state = optimizer.state.pop(p)
            if state:
                self._parked.setdefault(self._name_of[id(p)], {}).update(
                    {k: self._move(k, v, self._park_tensor) for k, v in state.items()})
        if self._master_dtype is not None:
            for i, group in enumerate(self._groups):
                for name, p in group if i != g else ():
                    if p.dtype != self._storage_dtype:  # a master from its group's last turn
                        self._parked.setdefault(name, {})[_MASTER] = self._park_tensor(p.data)
                        p.data = p.data.to(self._storage_dtype)
        for name, p in self._groups[g]:
            state = self._take_parked(name)
            master = state.pop(_MASTER, None)
            if master is not None:
                p.data = master
            elif self._master_dtype is not None and p.dtype != self._master_dtype:
                p.data = p.data.to(self._master_dtype)
            if state:
                optimizer.state[p] = state

    @staticmethod
    def _move(key: str, value, fn):
        # `step` stays where the optimizer keeps it (a CPU scalar, unless the optimizer is fused or capturable).
        return fn(value) if isinstance(value, torch.Tensor) and key != "step" else value

    @property
    def _offloading(self) -> bool:
        return self.cfg.offload and self._device.type == "cuda"

    def _park_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Where an inactive group's state waits with `offload`: CPU memory, pinned and copied without blocking from a
        GPU (on a CPU-only run the move is free: `.to("cpu")` copies nothing). Without `offload` it stays put."""
        if not self.cfg.offload:
            return t
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)  # ordered on the compute stream, before anything reuses t's memory
            return host
        return t.to("cpu")

    def _take_parked(self, name: str) -> dict:
        """The parked state of `name` on the compute device (prefetched when it could be), out of the parking."""
        state = self._parked.pop(name, None) or {}
        ready = self._ready.pop(name, None)
        if ready is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_stream(self._copy_stream)
            for v in ready.values():
                if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                    v.record_stream(current)  # allocated on the copy stream, used on the compute stream
            return ready
        return {k: self._move(k, v, self._fetch_tensor) for k, v in state.items()}

    def _fetch_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._device)

    def _prefetch(self, g: int) -> None:
        """Start copying group g's parked state to the GPU on a side stream, so it arrives while this step computes."""
        if not self._offloading:
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self._device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self._device))  # the parking copies come first
        with torch.cuda.stream(self._copy_stream):
            for name, _ in self._groups[g]:
                if name in self._parked and name not in self._ready:
                    self._ready[name] = {k: self._move(k, v, lambda t: t.to(self._device, non_blocking=True))
                                         for k, v in self._parked[name].items()}

    def state_dict(self) -> dict:
        """The cycle position and its order, and the parked optimizer state of the inactive groups (the active
        group's is in the optimizer's own state). Once the last step is done the parked state is left out: nothing
        resumes from the final state, and it would copy the whole optimizer state into it."""
        if self._offloading:
            torch.cuda.synchronize(self._device)  # the parking copies to pinned memory have landed
        cycle, position = divmod(self._next_step, max(1, self.num_groups))
        state = {"next_step": self._next_step, "cycle": cycle, "position": position,
                 "order": list(self.cycle_order(cycle)) if self._groups else []}
        if self._max_steps is None or self._next_step < self._max_steps:
            state["optimizer_state"] = self._parked
            # The active group's fp32 masters: the checkpoint's weights file holds them too, but it loads into the
            # model as stored (one rounding), before this group's turn makes it fp32 again.
            if self._master_dtype is not None and self._active is not None:
                state["masters"] = {n: p.detach().to("cpu", copy=True) for n, p in self._groups[self._active]
                                    if p.dtype != self._storage_dtype}
        return state

    def load_state_dict(self, state: dict) -> None:
        self._next_step = int(state["next_step"])
        if state["order"]:
            self._orders[int(state["cycle"])] = [int(i) for i in state["order"]]
        self._parked = dict(state.get("optimizer_state", {}))
        params = {n: p for group in self._groups for n, p in group}
        for name, master in state.get("masters", {}).items():
            params[name].data = master.to(params[name].device)
