"""Fixed sparsity masks on trainable weights: pruned weights stay exactly zero through every optimizer step.

Two guards, either of which alone would keep them at zero under AdamW or SGD with momentum and weight decay:
- a gradient hook zeroes the gradient of pruned weights, so no optimizer moment ever builds up there (AdamW's update
  of a zero weight with zero moments is zero, and decoupled decay of zero is zero);
- `apply()` re-zeroes the weights after every optimizer step, for anything that bypasses gradients (a DeepSpeed master
  copy, a newly pruned weight whose moments were not yet cleared).
When masks grow (gradual pruning), `zero_optimizer_state` clears the moments of the newly pruned weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def pack(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask as bits (uint8, 1/8 of a bool tensor) for checkpoints."""
    return torch.from_numpy(np.packbits(keep.detach().cpu().numpy().ravel()))


def unpack(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool)).reshape(shape)


class MaskSet:
    """Pruned positions (True = held at zero) of named weight parameters."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.pruned: dict[str, torch.Tensor] = {}
        self._handles: list = []

    @property
    def ready(self) -> bool:
        return bool(self.pruned) or not self.params

    def set(self, keep: dict[str, torch.Tensor]) -> None:
        """Replace the masks (keep masks: True where a weight may be non-zero) and zero the pruned weights."""
        for name, k in keep.items():
            p = self.params[name]
            if tuple(k.shape) != tuple(p.shape):
                raise ValueError(f"mask of {name} has shape {tuple(k.shape)}, the weight {tuple(p.shape)}")
            self.pruned[name] = (~k.bool()).to(p.device)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for name, pr in self.pruned.items():
            self.params[name].masked_fill_(pr, 0.0)

    def hook_gradients(self) -> None:
        """Zero the gradient of pruned weights as autograd produces it (every micro-batch, before accumulation)."""
        for name, p in self.params.items():
            self._handles.append(p.register_hook(lambda g, name=name: self._mask_grad(name, g)))

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        pr = self.pruned.get(name)
        return grad if pr is None else grad.masked_fill(pr, 0.0)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Clear per-weight optimizer state (AdamW moments, SGD momentum) at pruned positions."""
        state = getattr(optimizer, "state", None)
        if not state:
            return
        for name, p in self.params.items():
            for value in state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.masked_fill_(self.pruned[name].to(value.device), 0.0)

    def sparsity(self) -> float:
        """Fraction of the masked weights held at zero."""
        total = sum(p.numel() for p in self.params.values())
        return sum(int(pr.sum()) for pr in self.pruned.values()) / max(total, 1)

    def state_dict(self) -> dict:
        return {name: {"shape": list(pr.shape), "keep_bits": pack(~pr)} for name, pr in self.pruned.items()}

    def load_state_dict(self, state: dict) -> None:
        unknown = [n for n in state if n not in self.params]
        if unknown:
            raise ValueError(f"squarehead: checkpoint masks for {unknown[:3]} do not match the prepared model")
        self.set({n: unpack(s["keep_bits"], tuple(s["shape"])) for n, s in state.items()})
