"""S2FT: select kv groups (or q heads) and FFN channels, co-permute them to the front of each block, train them as
dense slices (q heads' o columns are trained in place, indexed).

Export undoes the permutation: the merged model is in the base layout, and the adapter stores each trained slice's
delta with its row / column indices in the base model's own coordinates.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from sparseft.export.adapter_files import write_adapter
from sparseft.methods.base import Method, MethodContext, register
from sparseft.methods.s2ft.config import S2FTConfig
from sparseft.methods.s2ft.layers import SliceLinear
from sparseft.methods.s2ft.permute import Orders, expand, layer_orders, permute_model, unpermuted
from sparseft.methods.s2ft.select import budgets, check_selection, select_units, summary, unit_shape
from sparseft.models.arch import ATTN_ROLES, COL_ROLES, ArchSpec, arch_of, set_module

# Attribute on a prepared model: what merged() and save_adapter() need to undo prepare(), whichever Method instance
# (the training run's or an exporter's) calls them.
_STATE = "_s2ft_state"


@dataclass
class _Prepared:
    spec: ArchSpec
    selection: dict
    orders: Orders
    wrapped: list[tuple[int, str]]  # (layer, role) of every SliceLinear


def _units(selection: dict, layer: int, role: str) -> list[int]:
    return sorted(selection["heads" if role in ATTN_ROLES else "channels"].get(str(layer), []))


@register
class S2FT(Method):
    config_cls = S2FTConfig
    has_adapter = True
    cfg: S2FTConfig

    def check(self, model: nn.Module) -> None:
        """The heads and channels budgets fit the model's kv groups and FFN channels."""
        budgets(arch_of(model), self.cfg)

    def select(self, model: nn.Module, ctx: MethodContext) -> dict:
        seed = self.cfg.seed
        if seed is None:
            seed = ctx.recipe.train.seed if ctx.recipe is not None else 0
        selection = select_units(model, self.cfg, seed, ctx.calibration_batches)
        head = f"s2ft: {self.cfg.strategy} selection ({self.cfg.scope}, {self.cfg.order} first)"
        ctx.log(head + "\n" + summary(selection))
        return selection

    def prepare(self, model: nn.Module, selection: dict, ctx: MethodContext) -> nn.Module:
        """Freeze everything, co-permute every block, wrap the listed projections of blocks with selected units."""
        if getattr(model, _STATE, None) is not None:
            raise ValueError("s2ft: this model is already prepared")
        spec = arch_of(model)
        check_selection(selection, spec)
        model.requires_grad_(False)
        orders = layer_orders(selection, spec)
        permute_model(model, spec, orders)
        wrapped = []
        for layer in range(spec.num_layers):
            for role in selection["projections"]:
                units, size = _units(selection, layer, role), unit_shape(spec, role, selection["unit"])[1]
                if not units:
                    continue
                kind = "cols" if role in COL_ROLES else "rows"
                # Permuted units are the leading slice; q_head units stay in place and are indexed.
                index = expand(units, size) if role in ATTN_ROLES and selection["unit"] == "q_head" else None
                layer_module = SliceLinear(spec.proj(model, layer, role), kind, len(units) * size, index)
                set_module(model, spec.proj_path(layer, role), layer_module)
                wrapped.append((layer, role))
        setattr(model, _STATE, _Prepared(spec, selection, orders, wrapped))
        return model

    def _state(self, model: nn.Module) -> _Prepared:
        state = getattr(model, _STATE, None)
        if state is None:
            raise ValueError("s2ft: the model was not prepared by S2FT (or was already merged)")
        return state

    def merged(self, model: nn.Module) -> nn.Module:
        """Fuse every slice, undo the permutation and drop the wrappers, in place: a plain transformers model in the
        base layout. The prepared model is consumed, so save an adapter before merging."""
        state = self._state(model)
        for layer, role in state.wrapped:
            path = state.spec.proj_path(layer, role)
            set_module(model, path, model.get_submodule(path).unwrap())
        permute_model(model, state.spec, state.orders, inverse=True)
        delattr(model, _STATE)
        return model

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`<path>.delta` and `<path>.rows` / `<path>.cols` (base coordinates, in the delta's order) per slice."""
        state = self._state(model)
        tensors: dict[str, torch.Tensor] = {}
        for layer, role in state.wrapped:
            path = state.spec.proj_path(layer, role)
            sl: SliceLinear = model.get_submodule(path)
            # The slice holds the selected units in ascending base order (unit_order), so expanding that list gives
            # the base index of each of the slice's rows / columns.
            idx = expand(_units(state.selection, layer, role), unit_shape(state.spec, role, state.selection["unit"])[1])
            assert len(idx) == sl.k
            tensors[f"{path}.delta"] = sl.delta()
            tensors[f"{path}.{sl.kind}"] = idx
        return tensors

    def save_adapter(self, model: nn.Module, out_dir: Path, base_model: str) -> dict:
        state = self._state(model)
        tensors = self.adapter_tensors(model)
        sel = state.selection
        heads_key = "q_heads" if sel["unit"] == "q_head" else "kv_groups"
        layers = {str(layer): {heads_key: _units(sel, layer, "o"), "num_channels": len(_units(sel, layer, "down"))}
                  for layer in range(state.spec.num_layers)}
        fields = {
            "method": "s2ft",
            "base_model": base_model,
            "projections": list(sel["projections"]),
            "unit": sel["unit"],
            "head_dim": state.spec.head_dim,
            "q_heads_per_kv_group": state.spec.group_size,
            "layers": layers,
            "num_parameters": sum(t.numel() for n, t in tensors.items() if n.endswith(".delta")),
        }
        write_adapter(out_dir, tensors, fields)
        return fields

    def base_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each wrapped linear's weight as the base had it: its start slice back in place, the permutation undone."""
        state = self._state(model)
        out = {}
        for layer, role in state.wrapped:
            path = state.spec.proj_path(layer, role)
            sl: SliceLinear = model.get_submodule(path)
            out[path] = unpermuted(sl.base_weight(), state.spec, state.orders, layer, role)
        return out

    @classmethod
    @contextmanager
    def apply_adapter(cls, model: nn.Module, path: Path):
        """Fuse the deltas into the base weights; the touched rows and columns are restored bit for bit on exit."""
        from sparseft.export.sparse_adapters import fuse, load_sparse_adapter, unfuse

        adapter = fuse(model, load_sparse_adapter(path))  # (the caller checked the base fingerprint)
        try:
            yield model
        finally:
            unfuse(model, adapter)

    @classmethod
    def load_mixable(cls, path: Path, model: nn.Module):
        """S2FT adapters mix row by row in one batch (sparseft/export/sparse_adapters.py: mixed_adapters)."""
        from sparseft.export.sparse_adapters import load_sparse_adapter

        adapter = load_sparse_adapter(path)  # (the caller checked the base fingerprint)
        adapter.check(model)
        return adapter
