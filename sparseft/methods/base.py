"""The method protocol. A method chooses what trains, prepares the model, may hook into steps, and says how it exports.

The trainer calls only what is here; it knows no method by name. Every hook has a default that does nothing, so a
method writes only what it changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Iterator, Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from sparseft.errors import UserError

if TYPE_CHECKING:
    from sparseft.recipe import Recipe


class MethodConfig(BaseModel):
    """Base of every method's recipe section. Subclasses set `name: Literal["..."] = "..."` and their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@contextlib.contextmanager
def whole_parameters(params: Sequence[nn.Parameter], modify: bool = False):
    """Parameters that are whole already (one process, ZeRO-0/1/2): nothing to gather."""
    yield


@dataclass
class MethodContext:
    """What a method may use while selecting and preparing, besides the model. Methods take what they need from the
    trainer through here and never import sparseft.train."""

    recipe: "Recipe"
    tokenizer: Any = None
    # Yields training batches (dicts of tensors) for calibration: activation / gradient scores, SparseGPT, ...
    calibration_batches: Callable[[int], Iterator[dict[str, torch.Tensor]]] | None = None
    run_dir: Path | None = None
    log: Callable[[str], None] = field(default=print)
    # Where the run computes (the model is there already; whatever a method creates goes there too), and the dtype
    # the trainable weights live in under mixed precision (None: as the model stores them; see
    # sparseft/train/precision.py).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    master_dtype: torch.dtype | None = None
    # `with full_parameters(params, modify=False):` each of params holds its full value inside, also where the engine
    # keeps only a partition of it (DeepSpeed ZeRO-3); with modify=True what rank 0 writes is kept on every rank.
    # A collective: every rank enters alike. The trainer passes its engine's; the default gathers nothing.
    full_parameters: Callable[..., ContextManager] = whole_parameters
    # The trainer's learning-rate multiplier of optimizer step k (warmup and decay over train.max_steps); None
    # outside training.
    lr_factor: Callable[[int], float] | None = None


class Method:
    """Default behaviour: nothing is selected, the model is unchanged, every parameter that requires grad trains."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    has_adapter: ClassVar[bool] = False
    # ZeRO stages the method trains correctly under (sparseft/train/distributed.py checks it before launching);
    # empty: single process only.
    zero_stages: ClassVar[tuple[int, ...]] = (0, 1, 2, 3)

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    # --- before training -------------------------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Check the method's settings against the model's module names and shapes; a UserError naming the recipe key
        when they do not fit. `model` may be on the meta device (shapes, no values): `sparseft validate` builds it from
        the model's config.json alone. Methods call it before their own work too, so both see the same checks."""

    def select(self, model: nn.Module, ctx: MethodContext) -> dict:
        """Choose what trains. Returns a JSON-serialisable selection, saved in the run directory and reused on resume
        and export (so expensive or data-dependent choices are made once)."""
        return {}

    def prepare(self, model: nn.Module, selection: dict, ctx: MethodContext) -> nn.Module:
        """Turn the loaded base model into the trainable model (wrap layers, permute, freeze ...). Returns the model."""
        return model

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def master_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable weights kept in fp32 for the whole run under mixed precision (the trainer casts them once,
        before the optimizer sees them). Default: every trainable weight. A method that keeps masters only for part of
        the model at a time (HiFT) returns none and manages its own from `MethodContext.master_dtype`."""
        return self.trainable_parameters(model)

    def optimizer_param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Parameter groups for the optimizer: weight decay on matrices, none on biases and norms."""
        decay, no_decay = [], []
        for p in self.trainable_parameters(model).values():
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # --- during training -------------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to backpropagate and any extra terms to log. Default: the mean next-token cross-entropy, computed
        without materialising the full logits (sparseft/train/loss.py)."""
        from sparseft.train.loss import causal_lm_loss

        return causal_lm_loss(model, batch), {}

    def steps_to_steady_state(self) -> int:
        """Optimizer steps after which every trainable parameter has stepped once (its optimizer state exists), so
        a step's time and memory are typical from then on; a benchmark warms up at least this long. Call after
        prepare."""
        return 1

    def on_step_start(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called before the micro-batches of optimizer step `step` (0-based)."""

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Called after the optimizer step; may return values to log."""
        return {}

    def state_dict(self) -> dict:
        """Method state a checkpoint must keep besides parameters and optimizer (a cycle position, masks ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # --- after training --------------------------------------------------------------------------------------------
    def merged(self, model: nn.Module) -> nn.Module:
        """A plain transformers model in the base model's original layout, with the training folded in."""
        return model

    def export_files(self, model: nn.Module) -> dict[str, str]:
        """Extra text files written beside a merged model (file name -> content), e.g. a report. Default: none."""
        return {}

    def save_adapter(self, model: nn.Module, out_dir: Path, base_model: str) -> dict:
        """Write the adapter tensors (and any method files) to `out_dir`; return the method's adapter_config fields."""
        raise UserError(f"method {self.name!r} has no adapter form; export it with --merged")

    def base_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The untouched base weights, in the base model's layout, of the modules the adapter changes (module path ->
        weight), read from the prepared `model`; an adapter records their fingerprint (sparseft/export/fingerprint.py)
        so it is never applied to another base."""
        return {}

    # --- applying an adapter to a base model (no run directory, no recipe) -----------------------------------------
    # The method named in an adapter's config is looked up in the registry, so applying and serving never branch on
    # a method's name: a new method is one folder.
    # File with sparseft's own adapter fields (method, base_model, fingerprint ...); a method whose adapter_config.json
    # belongs to another library (PEFT) writes them beside it instead.
    metadata_file: ClassVar[str] = "adapter_config.json"

    @classmethod
    def apply_adapter(cls, model: nn.Module, path: Path) -> ContextManager[nn.Module]:
        """A context manager: inside, the model with the adapter at `path` in effect (the module to call, which may
        wrap `model`); on exit `model` is exactly the base again."""
        raise UserError(f"adapter {path}: method {cls.name!r} cannot be applied to a base model here "
                        "(export it with --merged instead)")

    @classmethod
    def load_mixable(cls, path: Path, model: nn.Module) -> Any:
        """The adapter at `path`, loaded and checked against `model`, in the form that
        sparseft.export.sparse_adapters.mixed_adapters runs row by row in one batch; None when this method's adapters
        cannot be mixed (they are then applied one after another)."""
        return None


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method known to recipes, the trainer and the exporter by its config's `name`."""
    name = cls.config_cls.model_fields["name"].default
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_config_classes() -> list[type[MethodConfig]]:
    return [_REGISTRY[n].config_cls for n in method_names()]


def check_against_config(method: Method, recipe: "Recipe") -> bool:
    """`method.check` on the recipe's model built from its config.json alone (meta device, no weights read), before
    anything loads or launches. False when model.path is not a local directory (nothing checked)."""
    from sparseft.models.loader import model_skeleton

    skeleton = model_skeleton(recipe.model.path, recipe.model.trust_remote_code)
    if skeleton is not None:
        method.check(skeleton)
    return skeleton is not None


def method_class(name: str, where: str = "method.name") -> type[Method]:
    """The registered method called `name`; a UserError naming `where` (a key or a file) when none is."""
    if name not in _REGISTRY:
        raise UserError(f"{where}={name!r}: unknown method (known: {', '.join(method_names())})")
    return _REGISTRY[name]


def build_method(cfg: MethodConfig) -> Method:
    return method_class(getattr(cfg, "name", None))(cfg)
