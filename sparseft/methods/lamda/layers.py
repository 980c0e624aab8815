"""The LaMDA layer: a frozen linear plus the path scale * (B S - B0 S0) A, with B's directions freezable one by one."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NAMES = ("lamda_A", "lamda_S", "lamda_B", "lamda_start")  # tensor names in the layer, checkpoints and adapters


class LamdaLinear(nn.Module):
    """Wraps an `nn.Linear`: y = W x + scale * (B S - B0 S0) A x.

    `lamda_A` (r, d_in, PMA) is a buffer: it never trains. `lamda_S` (r, r) and `lamda_B` (d_out, r, PMB) are the
    parameters. `lamda_start` (d_out, r) = B0 S0 is the frozen start subtracted for init "spectrum" (None for "zero",
    where S0 = 0). Column j of B is direction j (singular value j, descending). `freeze_directions` freezes columns for
    good: their values are copied aside (`b_frozen`) and the forward takes them from there, as constants, so they get
    an exactly zero gradient and nothing an optimizer does to B's storage (momentum, weight decay) reaches the model's
    output; `restore_frozen`, after each optimizer step, writes the frozen values back into B, so B as saved and
    exported holds them. Once every column is frozen, B stops requiring grad and a torch optimizer's state for it is
    deleted. This needs nothing from the optimizer, so it holds where the optimizer keeps B's master copy and moments
    in flat partitions of its own (DeepSpeed ZeRO-1/2/3; under ZeRO-3, which keeps only a partition of B outside the
    forward pass, LaMDA gathers B around both calls).
    """

    def __init__(self, base_layer: nn.Linear, lamda_A: torch.Tensor, lamda_S: torch.Tensor, lamda_B: torch.Tensor,
                 scale: float, lamda_start: torch.Tensor | None = None):
        super().__init__()
        rank = lamda_A.shape[0]
        d_out, d_in = base_layer.weight.shape
        if lamda_A.shape != (rank, d_in) or lamda_S.shape != (rank, rank) or lamda_B.shape != (d_out, rank) or (
                lamda_start is not None and lamda_start.shape != (d_out, rank)):
            raise ValueError(f"LaMDA tensors A {tuple(lamda_A.shape)}, S {tuple(lamda_S.shape)}, B "
                             f"{tuple(lamda_B.shape)} do not fit rank {rank} on {base_layer}")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.scale, self.rank, self.d_out = float(scale), rank, d_out
        w = base_layer.weight
        self.register_buffer("lamda_A", lamda_A.detach().to(w.device, w.dtype).clone())
        self.lamda_S = nn.Parameter(lamda_S.detach().to(w.device, w.dtype).clone())
        self.lamda_B = nn.Parameter(lamda_B.detach().to(w.device, w.dtype).clone())
        start = None if lamda_start is None else lamda_start.detach().to(w.device, w.dtype).clone()
        self.register_buffer("lamda_start", start)
        # Freezing state, rebuilt from the step on resume (see LaMDA.on_step_start), so not saved.
        self.register_buffer("frozen", torch.zeros(rank, dtype=torch.bool, device=w.device), persistent=False)
        self.register_buffer("b_frozen", torch.zeros_like(self.lamda_B.detach()), persistent=False)
        self.n_frozen = 0  # int(frozen.sum()), kept on the host so the forward needs no device sync

    # Read-only views of the base layer, for code that inspects a linear's attributes.
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)
    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)

    def up(self) -> torch.Tensor:
        """B S - B0 S0 (d_out, r); frozen columns of B enter as constants (their frozen values), so they get no
        gradient."""
        b = self.lamda_B
        if self.n_frozen == self.rank:
            b = self.b_frozen
        elif self.n_frozen:
            b = torch.where(self.frozen, self.b_frozen, b)
        m = b @ self.lamda_S
        return m if self.lamda_start is None else m - self.lamda_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lamda_A)  # (..., r): A is frozen, so only this small projection is kept for backward
        return self.base_layer(x) + self.scale * F.linear(h, self.up())

    def trainable_count(self) -> int:
        """Parameters that receive updates now: S always, B's unfrozen columns while B trains."""
        return self.rank * self.rank + self.d_out * (self.rank - self.n_frozen)  # (ZeRO-3 empties the parameters)

    def freezes_new(self, cols: torch.Tensor) -> bool:
        """Whether `freeze_directions(cols)` would freeze a column not frozen yet."""
        return bool((cols.to(self.frozen.device) & ~self.frozen).any())

    @torch.no_grad()
    def freeze_directions(self, cols: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        """Freeze B's columns where `cols` (bool, (r,)) is True, on top of those frozen already. Reads B (under
        ZeRO-3 the caller gathers it)."""
        b = self.lamda_B
        if self.b_frozen.dtype != b.dtype:  # B became an fp32 master after this layer was built (mixed precision)
            self.b_frozen = self.b_frozen.to(b.dtype)
        new = cols.to(self.frozen.device) & ~self.frozen
        if bool(new.any()):
            self.b_frozen[:, new] = b[:, new]
            self.frozen |= new
            self.n_frozen = int(self.frozen.sum())
        if self.n_frozen == self.rank and b.requires_grad:
            b.requires_grad_(False)
            b.grad = None
            if optimizer is not None:
                optimizer.state.pop(b, None)  # a no-op where the optimizer holds a flat copy instead of B

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """After an optimizer step: write the frozen columns' values back into B, whatever the step did to them
        (under ZeRO-3 the caller gathers B for writing)."""
        if self.n_frozen:
            self.lamda_B[:, self.frozen] = self.b_frozen[:, self.frozen]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {"lamda_A": self.lamda_A, "lamda_S": self.lamda_S, "lamda_B": self.lamda_B}
        if self.lamda_start is not None:
            out["lamda_start"] = self.lamda_start
        return {k: v.detach() for k, v in out.items()}

    @torch.no_grad()
    def unwrap(self) -> nn.Linear:
        """The base layer with the adapter merged into its weight (in place); it stays frozen."""
        w = self.base_layer.weight
        w.copy_(merged_weight(w, self.scale, **self.adapter_tensors()))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, B frozen {self.n_frozen}/{self.rank}"


@torch.no_grad()
def lamda_delta(scale: float, lamda_A: torch.Tensor, lamda_S: torch.Tensor, lamda_B: torch.Tensor,
                lamda_start: torch.Tensor | None = None) -> torch.Tensor:
    """scale * (B S - B0 S0) A as a float32 (d_out, d_in) matrix: what the adapter adds to the base weight."""
    m = lamda_B.float() @ lamda_S.float()
    if lamda_start is not None:
        m = m - lamda_start.float()
    return scale * (m @ lamda_A.float())


@torch.no_grad()
def merged_weight(weight: torch.Tensor, scale: float, **tensors: torch.Tensor) -> torch.Tensor:
    """A new weight, base + adapter, in the base weight's dtype. Exporting and applying an adapter both use this, so
    a merged model and an adapter applied to the untouched base agree bit for bit."""
    return (weight.detach().float() + lamda_delta(scale, **tensors).to(weight.device)).to(weight.dtype)
