"""Training on several ranks with DeepSpeed: who this process is, the DeepSpeed config a recipe resolves to, each
rank's share of the data, and `DeepSpeedEngine`, which offers the single-process `Engine`'s calls.

A run is the same computation on one process and on N ranks at the same global batch:
- the data stream is the single process's: global micro-batch i holds the stream's next micro_batch_size x N examples
  and rank r takes every N-th of them, starting at r;
- each rank's loss is weighted by its share of the global micro-batch's loss tokens, so the gradient DeepSpeed averages
  over ranks is the token mean over the whole global micro-batch, as one process computes it;
- the optimizer is our torch optimizer over the trainable parameters only, the schedule our `lr_factor`, clipping the
  recipe's; DeepSpeed (ZeRO) partitions optimizer state, gradients and, at stage 3, parameters;
- checkpoints hold full tensors in the single-process format (gathered from the partitions), so a run resumes on any
  number of ranks or on one process.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from sparseft.data import IGNORE, Example, collate, sample_index
from sparseft.errors import UserError
from sparseft.files import read_json_object
from sparseft.recipe import Recipe
from sparseft.train.optim import build_optimizer, lr_factor
from sparseft.train.precision import precision_name

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"  # the bundled DeepSpeed configs

# --- who this process is ---------------------------------------------------------------------------------------------


def launched() -> bool:
    """True in a rank started by a launcher (ours, `deepspeed`, torchrun): they all set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", 0))


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job. One process is rank 0 of 1 and every collective is a no-op."""

    rank: int = 0
    world: int = 1
    launched: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory (logs, metrics, checkpoints, final state); the others only compute."""
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a small picklable object: a path, a selection)."""
        if not self.launched:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks, in float64."""
        if not self.launched:
            return [float(v) for v in values]
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Means over ranks of per-rank values (the same keys on every rank)."""
        if not self.launched or not values:
            return values
        keys = sorted(values)
        return dict(zip(keys, (v / self.world for v in self.all_sum([values[k] for k in keys]))))


def start_ranks() -> Ranks:
    """Ranks of this process; in a launched rank, also join the job (DeepSpeed's communication backend: NCCL on
    GPUs, gloo on CPUs without oneCCL)."""
    if not launched():
        return Ranks()
    init_process_group()
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), True)


def init_process_group() -> None:
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError:
        raise UserError("training on several ranks needs DeepSpeed: pip install -e '.[deepspeed]'") from None
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # DeepSpeed logs its whole config and every bucket at INFO
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ op, ~75 s on two cores, cached in
    # ~/.cache/torch_extensions afterwards) when it starts. Only its tensor-parallel *inference* all-reduce uses it;
    # training collectives go through torch.distributed. Marking the op unavailable skips the build and the load.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.accelerator import get_accelerator

    # One device a local rank, chosen before the first collective (NCCL puts its buffers on the current device).
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False)


# --- data ------------------------------------------------------------------------------------------------------------


def rank_batches(examples: Sequence[Example], micro_batch_size: int, seed: int, start_k: int, pad_id: int,
                 ranks: Ranks) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches. Global micro-batch i holds stream examples start_k + i*B*N ... + (i+1)*B*N - 1
    (B = micro_batch_size, N = ranks); rank r takes every N-th of them starting at r. With N = 1 this is exactly
    `sparseft.data.micro_batches`, and the union over ranks is one process's stream at micro batch B*N."""
    n, k = len(examples), start_k
    while True:
        idx = [sample_index(n, seed, k + ranks.rank + ranks.world * j) for j in range(micro_batch_size)]
        yield collate([examples[i] for i in idx], pad_id)
        k += micro_batch_size * ranks.world


# --- the DeepSpeed config --------------------------------------------------------------------------------------------

# Keys sparseft fills from the recipe (so they cannot disagree with it), and the recipe key each one comes from.
_FROM_RECIPE = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.max_grad_norm",
    "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x ranks",
}
# Sections DeepSpeed would build its own optimizer or schedule from: ours come from the recipe.
_OURS = {"optimizer": "train.optimizer, train.lr, train.betas, train.weight_decay",
         "scheduler": "train.schedule, train.warmup_steps, train.min_lr_ratio"}


def bundled_configs() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.glob("*.json"))


def read_ds_config(recipe: Recipe) -> tuple[dict, str]:
    """The recipe's DeepSpeed config as given (a JSON file or an inline mapping), and the prefix that names one of
    its keys in messages. No `distributed` section: ZeRO stage 1."""
    section = recipe.distributed
    given = section.config if section is not None else None
    if given is None:
        return {"zero_optimization": {"stage": 1}}, "default DeepSpeed config: "
    if isinstance(given, dict):
        return dict(given), "distributed.config."
    path = Path(given)
    if not path.is_file() and (CONFIGS_DIR / path.name).is_file() and path.parent in (Path("."), Path("configs")):
        path = CONFIGS_DIR / path.name  # configs/zero2.json works from any directory
    if not path.is_file():
        raise UserError(f"distributed.config={given}: no such file (bundled configs: "
                        f"{', '.join('configs/' + n for n in bundled_configs())})")
    config = read_json_object(path, f"distributed.config={given}")
    return config, f"distributed.config={given}: "


def resolve_ds_config(recipe: Recipe, world_size: int | None = None) -> dict:
    """The config handed to deepspeed.initialize: the recipe's, with batch size, accumulation, clipping and
    precision filled from the recipe. A key that sets one of them differently is a UserError naming the key.
    `world_size` None checks everything that does not depend on it (before launching)."""
    t = recipe.train
    config, key_prefix = read_ds_config(recipe)
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm is not None else 0.0,
    }
    if world_size is not None:
        wanted["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * world_size
    problems = []
    for key, value in wanted.items():
        if key in config and config[key] not in ("auto", value):
            problems.append(f"{key}={config[key]!r}: differs from {_FROM_RECIPE[key]}={value}; remove it "
                            "(sparseft fills it from the recipe)")
    for key, recipe_keys in _OURS.items():
        if key in config:
            problems.append(f"{key}: sparseft builds it from the recipe ({recipe_keys}); remove it")
    for key in ("fp16", "bf16", "zero_optimization"):
        if key in config and not isinstance(config[key], dict):
            problems.append(f"{key}={config[key]!r}: must be a mapping")
    precision = precision_name(recipe.train.precision, recipe.model.dtype)
    if _enabled(config, "fp16"):
        problems.append("fp16.enabled=true: not supported; train in bf16 (train.precision: bf16-mixed)")
    if precision == "fp16-mixed":
        problems.append("train.precision=fp16-mixed: not supported on several ranks; use bf16-mixed")
    # DeepSpeed's bf16 path keeps fp32 master partitions of the trained weights: bf16-mixed and bf16-true map onto it.
    bf16 = precision in ("bf16-mixed", "bf16-true")
    if isinstance(config.get("bf16"), dict) and config["bf16"].get("enabled", bf16) not in ("auto", bf16):
        problems.append(f"bf16.enabled={config['bf16']['enabled']!r}: differs from train.precision={precision} "
                        "(bf16 follows train.precision)")
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage={stage!r}: must be 0, 1, 2 or 3")
    elif stage == 0 and bf16:
        # DeepSpeed's bf16 data parallelism wraps the optimizer in flat fp32 masters with no per-parameter mapping,
        # so neither checkpoints nor methods could reach a parameter's state.
        problems.append(f"zero_optimization.stage=0: not supported with train.precision={precision}; use stage 1 "
                        "(the same communication) or fp32")
    if problems:
        problems = [key_prefix + p for p in problems]
        raise UserError(problems[0] if len(problems) == 1 else f"{len(problems)} problems in the DeepSpeed config",
                        problems if len(problems) > 1 else None)
    resolved = {k: v for k, v in config.items() if k != "train_batch_size"}
    resolved.update(wanted)
    resolved["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    # Our own torch optimizer, not one of DeepSpeed's fused ops (which would be JIT-compiled); with ZeRO-Offload
    # DeepSpeed would insist on its CPU Adam unless told otherwise.
    resolved["zero_allow_untested_optimizer"] = True
    resolved.setdefault("zero_force_ds_cpu_optimizer", False)
    resolved.setdefault("steps_per_print", 2**62)  # the trainer logs; DeepSpeed's own step lines would duplicate it
    return resolved


def _enabled(config: dict, key: str):
    section = config.get(key)
    return bool(section.get("enabled", False)) if isinstance(section, dict) else False


def zero_stage(config: dict):
    section = config.get("zero_optimization")
    return section.get("stage", 0) if isinstance(section, dict) else 0


def check_method_stage(method, stage: int) -> None:
    """The method's `zero_stages` (sparseft/methods/base.py) must include `stage`; empty means a single process only."""
    supported = tuple(method.zero_stages)
    if stage in supported:
        return
    if not supported:
        raise UserError(f"method.name={method.name}: runs in a single process only; train it without --nproc / "
                        "--hostfile")
    raise UserError(f"zero_optimization.stage={stage}: method {method.name} supports ZeRO stage(s) "
                    f"{', '.join(map(str, supported))}; choose one in distributed.config")


# --- the engine ------------------------------------------------------------------------------------------------------


class DeepSpeedEngine:
    """`Engine`'s calls on DeepSpeed. Every rank calls each method in the same order (most are collective).

    - `model`: the module to call for a forward pass (DeepSpeed's engine, around `_Forward`); `loss(compute_loss,
      batch)` runs a method's loss through it.
    - `backward(loss, batch)`: the caller has divided the loss by grad_accum_steps, as for `Engine`.
    - `step()`: the optimizer stepped inside the last `backward` (DeepSpeed counts micro-steps); this advances our
      schedule and reports loss and tokens over all ranks, lr and the gradient norm before clipping.
    - `gather(params)` / `state_dict()` / `load_state_dict()`: full tensors in the single-process format (kept on rank 0,
      which writes them; every rank takes part in gathering).
    """

    def __init__(self, model: nn.Module, param_groups: list[dict], recipe: Recipe, ranks: Ranks, method=None):
        import deepspeed

        self.t, self.ranks, self.is_main = recipe.train, ranks, ranks.is_main
        self.params = [p for g in param_groups for p in g["params"]]
        if not self.params:
            raise RuntimeError("the method left no parameter to train")
        self._group_sizes = [len(g["params"]) for g in param_groups]  # DeepSpeed replaces the groups' params
        self._group_of = [gi for gi, n in enumerate(self._group_sizes) for _ in range(n)]  # param index -> its group
        self.config = resolve_ds_config(recipe, ranks.world)
        self.stage = zero_stage(self.config)
        if method is not None:
            check_method_stage(method, self.stage)
        # Our optimizer and schedule: DeepSpeed steps the optimizer (on its partitions, which keep our param groups),
        # we step the schedule, so lr_factor(k) applies to optimizer step k exactly as in one process.
        self.optimizer = build_optimizer(param_groups, self.t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.t))
        self.model, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=_Forward(model), model_parameters=self.params, optimizer=self.optimizer, config=self.config)
        self.device = self.model.device
        self._micro, self._loss, self._tokens, self._norm = 0, 0.0, 0, None

    # --- training ----------------------------------------------------------------------------------------------------
    def loss(self, compute_loss, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """`compute_loss(model, batch)` run as the forward of DeepSpeed's module, so its hooks wrap all of it."""
        loss = self.model(batch, loss_fn=compute_loss)
        return loss, self.model.module.logs

    def backward(self, loss: torch.Tensor, batch: dict[str, torch.Tensor] | None = None) -> None:
        weight = 1.0
        if batch is not None and self.ranks.world > 1:
            # HF losses are token means over this rank's micro-batch, and DeepSpeed averages gradients over ranks:
            # weighting by n_r * N / sum(n) makes the average the token mean over the global micro-batch.
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            (total,) = self.ranks.all_sum([n])
            weight = n * self.ranks.world / max(total, 1.0)
        self.model.backward(loss * weight, scale_wrt_gas=False)  # the caller divided by grad_accum_steps already
        self._micro += 1
        if self._micro == self.t.grad_accum_steps and self.model.get_global_grad_norm() is None:
            # Plain data parallelism in fp32 (stage 0) leaves the norm uncomputed; the gradients are reduced by now.
            self._norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        self.model.step()  # steps the optimizer at every grad_accum_steps-th call, a no-op otherwise
        self._loss += float(loss.detach()) * weight / self.ranks.world
        self._tokens += int(batch["attention_mask"].sum()) if batch is not None else 0

    def step(self) -> dict[str, float]:
        if self._micro != self.t.grad_accum_steps:
            raise RuntimeError(f"DeepSpeedEngine.step after {self._micro} backward calls; expected "
                               f"train.grad_accum_steps={self.t.grad_accum_steps}")
        lr = self.optimizer.param_groups[0]["lr"]
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else self._norm
        self.scheduler.step()
        loss, tokens = self.ranks.all_sum([self._loss, self._tokens])
        self._micro, self._loss, self._tokens, self._norm = 0, 0.0, 0, None
        return {"loss": loss, "tokens": int(tokens), "lr": lr, "grad_norm": norm if norm is not None else math.nan}

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return self.ranks.mean(values)

    def global_grad_norm(self) -> float | None:
        """While DeepSpeed steps the optimizer: the gradient norm ZeRO reduced over every rank before the step (the
        same on all ranks); None without ZeRO, where each rank holds the whole reduced gradient itself."""
        return getattr(self.ds_optimizer, "_global_grad_norm", None) if self.stage > 0 else None

    # --- state -------------------------------------------------------------------------------------------------------
    def gather(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Full copies of `params` on CPU, on rank 0 (which writes them); ZeRO-3 holds only partitions, so every rank
        takes part in gathering each one, and the others keep nothing (no rank but 0 holds a whole copy in memory)."""
        out = {}
        for name, p in params.items():
            with full_parameters([p]):
                if self.is_main:
                    out[name] = p.detach().to("cpu", copy=True).contiguous()
        return out

    def state_dict(self) -> dict:
        """Optimizer and schedule state as `Engine.state_dict` has it: a torch optimizer state_dict over the
        trainable parameters in param-group order, each state tensor full-size, and no entry for a parameter whose
        state does not exist (it never stepped, or a method freed it). Under bf16 DeepSpeed also keeps fp32 master
        weights; they are saved too (`master`), so resuming continues from them exactly."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base = self.optimizer
        self._link_state_fragments()
        state, masters = {}, {}
        with _requiring_grad(self.params):
            for i, p in enumerate(self.params):
                entry = {}
                for key, value in self._state_of(i, p).items():
                    if torch.is_tensor(value) and value.dim() > 0:  # moments: full-size, gathered from the partitions
                        full = safe_get_full_optimizer_state(p, key) if _partitioned(p) else value
                        if self.is_main:  # the others took part in gathering; rank 0 alone keeps and writes it
                            entry[key] = full.detach().to("cpu", copy=True).reshape(_shape(p))
                    else:  # AdamW's step: one for the whole flat partition, so for each of its parameters
                        entry[key] = value.clone() if torch.is_tensor(value) else value
                if entry:
                    state[i] = entry
                if self.config["bf16"]["enabled"]:
                    master = safe_get_full_fp32_param(p)
                    if self.is_main:
                        masters[i] = master.detach().to("cpu", copy=True).reshape(_shape(p))
        groups, start = [], 0
        for g, n in zip(base.param_groups, self._group_sizes):
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        out = {"optimizer": {"state": state, "param_groups": groups}, "scheduler": self.scheduler.state_dict()}
        if self.config["bf16"]["enabled"]:
            out["master"] = masters
        return out

    def load_state_dict(self, state: dict) -> None:
        """Load `state_dict()` output of either engine, saved on any number of ranks. The weights themselves are
        loaded into the model before the engine is built (DeepSpeed starts its partitions from them)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        opt = state["optimizer"]
        if len(opt["param_groups"]) != len(self.optimizer.param_groups):
            raise UserError("the checkpoint's optimizer has a different number of parameter groups")
        for group, saved in zip(self.optimizer.param_groups, opt["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        saved_state = opt["state"]
        self._materialize_optimizer_state(saved_state)
        with _requiring_grad(self.params):
            for i, entry in saved_state.items():
                p = self.params[i]
                for key, value in entry.items():
                    if not (torch.is_tensor(value) and value.dim() > 0):
                        continue
                    if _partitioned(p):
                        safe_set_full_optimizer_state(p, value.to(self.device), key)
                    else:
                        self.optimizer.state[p][key].copy_(value)
            for i, p in enumerate(self.params):
                if "master" in state and _partitioned(p):
                    safe_set_full_fp32_param(p, state["master"][i].to(self.device))
        self.scheduler.load_state_dict(state["scheduler"])

    def _holders(self, i: int) -> list[torch.Tensor]:
        """What the optimizer steps for parameter `i`: the parameter itself (stage 0 in fp32), its group's flat
        partition on this rank (ZeRO-1/2, DeepSpeed's bf16 optimizer), or its sub-group's flat partition (ZeRO-3
        keeps those itself; the optimizer's groups are empty between steps)."""
        p, held = self.params[i], self.optimizer.param_groups[self._group_of[i]]["params"]
        if any(q is p for q in held):
            return [p]
        if hasattr(p, "ds_id"):
            z3 = self.ds_optimizer
            return [z3.fp32_partitioned_groups_flat[z3.grad_position[z3.get_param_id(p)][0]]]
        return held

    def _state_of(self, i: int, p: nn.Parameter) -> dict:
        """The optimizer state holding parameter `i`'s entries ({} when there is none). Its tensors are this rank's
        partition; safe_get_full_optimizer_state gives a parameter's full slice of them."""
        return next((s for s in map(self.optimizer.state.get, self._holders(i)) if s), {})

    def _materialize_optimizer_state(self, saved_state: dict) -> None:
        """torch optimizers create their state at the first step, and ZeRO links each parameter's view of it only
        then; before loading into it, create it (zeros, and the saved scalars such as AdamW's step) for what steps
        each saved parameter, and link it."""
        holders = {id(flat): (flat, entry) for i, entry in saved_state.items() for flat in self._holders(i)}
        for flat, entry in holders.values():
            self.optimizer.state[flat] = {k: torch.zeros_like(flat) if torch.is_tensor(v) and v.dim() > 0
                                          else (v.clone() if torch.is_tensor(v) else v) for k, v in entry.items()}
        self._link_state_fragments()

    def _link_state_fragments(self) -> None:
        """Point each parameter's ZeRO-1/2 (or bf16 optimizer) mapping at its slice of the optimizer state.
        DeepSpeed links them once, after the first group's first step, so with several param groups the later
        groups' parameters are left unlinked (DeepSpeed 0.19); linking again is cheap and idempotent."""
        for p in self.params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                flat = self.optimizer.param_groups[mapping.param_group_index]["params"][0]
                mapping.set_optim_state_fragment(flat, self.optimizer.state.get(flat, {}))


class _Forward(nn.Module):
    """The module handed to DeepSpeed: calls go to the model, or run a loss function on it (`loss_fn=`).

    DeepSpeed does its forward work in hooks on the module it was given (ZeRO-3 gathers parameters, also those a
    module reads from another, and traces the order; the backward prologue is hooked onto the output). A method's loss
    may call submodules directly (the default loss runs the decoder and the LM head in chunks), which would bypass
    hooks on the model itself; running the whole loss as this module's forward keeps them around all of it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.logs: dict[str, float] = {}

    def forward(self, *args, loss_fn=None, **kwargs):
        if loss_fn is None:
            return self.model(*args, **kwargs)
        loss, self.logs = loss_fn(self.model, *args)
        return loss


@contextlib.contextmanager
def full_parameters(params: Sequence[nn.Parameter], modify: bool = False):
    """Inside, each of `params` holds its full value, also where DeepSpeed ZeRO-3 keeps only a partition of it
    outside the forward pass (a collective there: every rank enters alike). With modify=True, what rank 0 writes is
    kept on every rank; the optimizer's fp32 master copy is not changed. Elsewhere this does nothing."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


@contextlib.contextmanager
def _requiring_grad(params: list[nn.Parameter]):
    """Every parameter requires grad inside: DeepSpeed 0.19's ZeRO-3 reads and writes no optimizer state for one that
    does not (a method may have frozen it for a step: HiFT's waiting groups, LaMDA's B)."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _partitioned(p: torch.Tensor) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 copy and optimizer state in flat partitions."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # _hp_mapping is None on ranks holding none of it


def _shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


class SilentReporter:
    """What ranks other than 0 report: nothing (rank 0 writes metrics.jsonl and shows progress)."""

    def info(self, text: str) -> None:
        pass

    def log(self, record: dict, show: bool = True) -> None:
        pass

    def close(self) -> None:
        pass
