"""SquareHead sparse fine-tuning: prune, fine-tune every weight under fixed masks, distil from the dense teacher.

- select: keep the dense teacher (a frozen copy of the starting model, or method.teacher), then prune the block linears
  one-shot (SparseGPT or magnitude, unstructured or N:M; to gradual.initial_sparsity when pruning gradually). The
  selection records the pruned linears and their sparsity; the masks themselves travel in the method state of every
  checkpoint (bit-packed), so a resumed run keeps exactly the same ones.
- prepare: masks on the pruned weights (gradient hooks); every parameter trains, as in full fine-tuning.
- steps: gradual pruning at its steps (on_step_start), masks re-applied after every optimizer step (on_step_end).
- loss: ce * CE + squarehead * SquareHead + kd * KD (distill.py), each term logged.
- export: merged only, a plain transformers model whose pruned weights are exact zeros, with sparsity.json and
  sparsity.md (per layer, read from the exported weights) beside it.

On resume or export (prepare without select) the default teacher is reloaded from model.path when first needed: that
is the starting model before pruning, and an export never needs it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from sparseft.errors import UserError
from sparseft.methods.base import Method, MethodContext, register
from sparseft.methods.squarehead.config import SquareHeadConfig, parse_pattern
from sparseft.methods.squarehead.distill import Distiller
from sparseft.methods.squarehead.masks import MaskSet
from sparseft.methods.squarehead.oneshot import prune_magnitude, prune_sparsegpt, target_linears
from sparseft.methods.squarehead.prune import cubic_sparsity, is_prune_step, magnitude_keep
from sparseft.methods.squarehead.report import report_files
from sparseft.models.arch import arch_of


def frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


def _dtype_name(model: nn.Module) -> str:
    return "bfloat16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"


@register
class SquareHead(Method):
    config_cls = SquareHeadConfig
    cfg: SquareHeadConfig
    # Masks are re-applied to whole weights after every step and gradual pruning ranks whole weights; ZeRO-3 keeps only a
    # partition of each weight outside the forward pass, so that would gather the whole model every step. Stages 0-2
    # keep every weight whole on every rank.
    zero_stages = (0, 1, 2)

    def __init__(self, cfg: SquareHeadConfig):
        super().__init__(cfg)
        self._teacher: nn.Module | None = None
        self._teacher_path: tuple[str, str, str] | None = None  # (path, dtype, recipe key) to load on first use
        self._student_geometry: tuple | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # keep masks from select, for prepare
        self._masks: MaskSet | None = None
        self._distiller: Distiller | None = None
        self._event: float | None = None

    # --- before training -------------------------------------------------------------------------------------------
    def select(self, model: nn.Module, ctx: MethodContext) -> dict:
        cfg = self.cfg
        targets = target_linears(model, cfg)
        g = cfg.gradual
        if g is not None and ctx.recipe is not None and g.end_step >= ctx.recipe.train.max_steps:
            ctx.log(f"squarehead: gradual.end_step={g.end_step} is not before train.max_steps="
                    f"{ctx.recipe.train.max_steps}; the run ends below the final sparsity {cfg.sparsity}")
        # The teacher is the model as it is now, before any pruning (or the recipe's own dense model).
        if cfg.teacher is None:
            self._teacher = frozen_copy(model)
        else:
            self._teacher_path = (cfg.teacher, _dtype_name(model), "method.teacher")
            self._student_geometry = self._geometry(model)
            self._teacher_on(next(model.parameters()).device)  # a bad path fails now, not after pruning
        sparsity = g.initial_sparsity if g is not None else cfg.target_sparsity
        nm = parse_pattern(cfg.pattern)
        n_batches = 0
        if sparsity == 0:
            keep = {f"{t.path}.weight": torch.ones_like(model.get_submodule(t.path).weight, dtype=torch.bool)
                    for t in targets}
        elif cfg.pruner == "magnitude":
            keep = prune_magnitude(model, targets, sparsity, nm)
        else:
            if ctx.calibration_batches is None:
                raise UserError("method.pruner=sparsegpt: needs calibration batches from the training data "
                                "(or use pruner: magnitude)")
            batches = list(ctx.calibration_batches(cfg.calibration_batches))
            if not batches:
                raise UserError("method.pruner=sparsegpt: the training data gave no calibration batch")
            n_batches = len(batches)
            keep = prune_sparsegpt(model, targets, cfg, sparsity, batches)
        self._pending = keep
        linears = {name: round(1 - k.float().mean().item(), 6) for name, k in keep.items()}
        ctx.log(self._summary(targets, linears, n_batches))
        return {"pruner": cfg.pruner, "pattern": cfg.pattern, "sparsity": sparsity,
                "final_sparsity": cfg.target_sparsity, "calibration_batches": n_batches,
                "teacher": cfg.teacher or "the starting model before pruning", "linears": linears}

    def _summary(self, targets, linears: dict[str, float], n_batches: int) -> str:
        cfg = self.cfg
        how = f"{cfg.pruner}" + (f" on {n_batches} calibration batches" if n_batches else "")
        lines = [f"squarehead: {how}, {cfg.pattern}, {len(linears)} linears; teacher: "
                 f"{cfg.teacher or 'the dense starting model'}"]
        by_layer: dict[int, list[str]] = {}
        for t in targets:
            by_layer.setdefault(t.layer, []).append(f"{t.role} {linears[t.path + '.weight']:.1%}")
        lines += [f"block {layer}: " + ", ".join(parts) for layer, parts in by_layer.items()]
        return "\n".join(lines)

    def prepare(self, model: nn.Module, selection: dict, ctx: MethodContext) -> nn.Module:
        params = dict(model.named_parameters())
        names = list(selection.get("linears", {}))
        missing = [n for n in names if n not in params]
        if missing or not names:
            raise UserError(f"squarehead selection does not fit this model (weights {missing[:3]} not found)")
        self._masks = MaskSet({n: params[n] for n in names})
        if self._pending is not None:
            self._masks.set(self._pending)
            self._pending = None
        # else: resume or export; the masks arrive with the checkpoint's method state (load_state_dict).
        self._masks.hook_gradients()
        self._student_geometry = self._geometry(model)
        if self._teacher is None and self._teacher_path is None:
            if self.cfg.teacher is not None:
                self._teacher_path = (self.cfg.teacher, _dtype_name(model), "method.teacher")
            elif ctx.recipe is not None:  # the model was loaded from model.path: that is the starting model
                self._teacher_path = (ctx.recipe.model.path, ctx.recipe.model.dtype, "model.path")
            else:
                self._teacher = frozen_copy(model)
        self._distiller = Distiller(self.cfg.loss, self._teacher_on)
        return model

    @staticmethod
    def _geometry(model: nn.Module) -> tuple:
        spec = arch_of(model)
        return spec.num_layers, spec.hidden_size, model.config.vocab_size

    def _teacher_on(self, device: torch.device) -> nn.Module:
        """The frozen teacher on `device`, loaded on first use when it lives on disk."""
        if self._teacher is None:
            from sparseft.models import load_model

            path, dtype, key = self._teacher_path
            teacher = load_model(path, dtype, key=key).requires_grad_(False).eval()
            have, want = self._geometry(teacher), self._student_geometry
            if have[:2] != want[:2] or (self.cfg.loss.kd > 0 and have[2] != want[2]):
                raise UserError(f"{key}={path}: (blocks, hidden size, vocab) {have} do not match the student's "
                                f"{want}; SquareHead matches block outputs one to one")
            self._teacher = teacher
        if next(self._teacher.parameters()).device != device:
            self._teacher.to(device)
        return self._teacher

    # --- during training -------------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self._distiller(model, batch)

    def on_step_start(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self._masks.ready:
            raise RuntimeError("squarehead: no masks; prepare() ran without select() and no checkpoint state loaded")
        self._event = None
        g = self.cfg.gradual
        if g is not None and is_prune_step(step, g):
            target = cubic_sparsity(step, g, self.cfg.sparsity)
            with torch.no_grad():
                keep = {n: magnitude_keep(p, target, None, keep=~self._masks.pruned[n])
                        for n, p in self._masks.params.items()}
            self._masks.set(keep)
            self._masks.zero_optimizer_state(optimizer)
            self._event = self._masks.sparsity()

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        self._masks.apply()
        return {} if self._event is None else {"sparsity": self._event}

    def state_dict(self) -> dict:
        return {"masks": self._masks.state_dict()} if self._masks is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "masks" in state:
            self._masks.load_state_dict(state["masks"])

    # --- after training --------------------------------------------------------------------------------------------
    def merged(self, model: nn.Module) -> nn.Module:
        """The model itself, pruned weights exact zeros, hooks removed and the teacher released."""
        if self._masks is not None:
            if self._masks.ready:
                self._masks.apply()
            self._masks.remove_hooks()
        self._teacher = None
        return model

    def export_files(self, model: nn.Module) -> dict[str, str]:
        """sparsity.json and sparsity.md: zeros per linear of the merged weights, and the N:M check."""
        return report_files(model, self.cfg)
