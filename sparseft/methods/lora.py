"""LoRA through PEFT: the low-rank baseline. Adapters are written in PEFT's own format, so PEFT loads them."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from sparseft.errors import UserError
from sparseft.export.adapter_files import METADATA_NAME
from sparseft.methods.base import Method, MethodConfig, register

_PEFT_PREFIX = "base_model.model."  # where PeftModel puts the wrapped model's module paths


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names (suffixes) to adapt, e.g. [q_proj, v_proj], or [all-linear].",
    )


@register
class Lora(Method):
    config_cls = LoraConfig
    has_adapter = True
    # adapter_config.json is exactly PEFT's (PEFT warns about keys it does not know); sparseft's fields go here.
    metadata_file = METADATA_NAME

    def check(self, model: nn.Module) -> None:
        """Every target module names linear layers of the model."""
        targets = list(self.cfg.target_modules)
        if targets != ["all-linear"]:
            names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            missing = [t for t in targets if t not in names]
            if missing:
                raise UserError(f"method.target_modules: {missing} match no linear layer of the model "
                                f"(linear layers: {sorted(names)})")

    def prepare(self, model: nn.Module, selection: dict, ctx) -> nn.Module:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        self.check(model)
        targets = list(self.cfg.target_modules)
        peft_cfg = PeftLoraConfig(
            r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_cfg)

    def merged(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()

    def save_adapter(self, model: nn.Module, out_dir: Path, base_model: str) -> dict:
        model.peft_config["default"].base_model_name_or_path = base_model
        model.save_pretrained(str(out_dir))
        return {}  # rank, alpha and targets are in PEFT's own keys

    def base_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from peft.tuners.lora import LoraLayer

        return {n.removeprefix(_PEFT_PREFIX): m.get_base_layer().weight for n, m in model.named_modules()
                if isinstance(m, LoraLayer)}

    @classmethod
    @contextmanager
    def apply_adapter(cls, model: nn.Module, path: Path):
        """PEFT wraps the model; unloading it on exit gives the base back."""
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(model, str(path))
        except Exception as e:
            raise UserError(f"adapter {path}: PEFT cannot load it onto this model ({str(e).splitlines()[0]})") from None
        peft_model.eval()
        try:
            yield peft_model
        finally:
            peft_model.unload()
