"""The LaMDA layer: a frozen linear plus the path scale * (B S - B0 S0) A, with B's directions freezable one by one."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NAMES = ("lamda_A", "lamda_S", "lamda_B", "lamda_start")  # tensor names in the layer, checkpoints and adapters


class LamdaLinear(nn.Module):
    """Wraps an `nn.Linear`: y = W x + scale * (B S - B0 S0) A x.

    `lamda_A` (r, d_in, PMA) is a buffer: it never trains. `lamda_S` (r, r) is a parameter, and B (d_out, r, PMB) is
    r parameters, one a column (`lamda_B_cols`, column j = direction j, singular value j, descending), read whole as
    `lamda_B`. `lamda_start` (d_out, r) = B0 S0 is the frozen start subtracted for init "spectrum" (None for "zero",
    where S0 = 0).

    `freeze_directions` freezes columns for good: a frozen column stops requiring grad, so it gets no gradient and its
    optimizer state is deleted at once (a torch optimizer then skips it: no update, no moments, no memory). Where the
    optimizer does not hold the column itself but a flat copy of its own (DeepSpeed ZeRO-1/2/3 keep master weights
    and moments in flat partitions, which cannot shrink), the column's value is pinned instead and `restore_frozen`
    writes it back after each optimizer step, whatever the step did to it (under ZeRO-3, which keeps only a partition
    of each column outside the forward pass, LaMDA gathers the columns around both calls).
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
        b = lamda_B.detach().to(w.device, w.dtype)
        self.lamda_B_cols = nn.ParameterList([nn.Parameter(b[:, j].clone()) for j in range(rank)])  # r x (d_out,)
        start = None if lamda_start is None else lamda_start.detach().to(w.device, w.dtype).clone()
        self.register_buffer("lamda_start", start)
        # Freezing state, rebuilt from the step on resume (see LaMDA.on_step_start), so not saved.
        self.frozen = [False] * rank
        self.pinned: dict[int, torch.Tensor] = {}  # column -> its frozen value, where the optimizer may still move it

    # Read-only views of the base layer, for code that inspects a linear's attributes.
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)
    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)

    @property
    def lamda_B(self) -> torch.Tensor:
        """B (d_out, r), stacked from its columns (frozen ones enter as constants: they require no grad)."""
        return torch.stack(list(self.lamda_B_cols), dim=1)

    @property
    def n_frozen(self) -> int:
        return sum(self.frozen)

    def up(self) -> torch.Tensor:
        """B S - B0 S0 (d_out, r)."""
        m = self.lamda_B @ self.lamda_S
        return m if self.lamda_start is None else m - self.lamda_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lamda_A)  # (..., r): A is frozen, so only this small projection is kept for backward
        return self.base_layer(x) + self.scale * F.linear(h, self.up())

    def trainable_count(self) -> int:
        """Parameters that receive updates now: S always, B's unfrozen columns."""
        return self.rank * self.rank + self.d_out * (self.rank - self.n_frozen)  # (ZeRO-3 empties the parameters)

    def new_columns(self, cols: torch.Tensor) -> list[nn.Parameter]:
        """The columns `freeze_directions(cols)` would freeze that are not frozen yet."""
        return [self.lamda_B_cols[j] for j, c in enumerate(cols.tolist()) if c and not self.frozen[j]]

    @torch.no_grad()
    def freeze_directions(self, cols: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        """Freeze B's columns where `cols` (bool, (r,)) is True, on top of those frozen already. Reads the new
        columns where the optimizer cannot drop them (under ZeRO-3 the caller gathers them)."""
        new = [j for j, c in enumerate(cols.tolist()) if c and not self.frozen[j]]
        if not new:
            return
        held = set() if optimizer is None else {id(q) for g in optimizer.param_groups for q in g["params"]}
        for j in new:
            col = self.lamda_B_cols[j]
            self.frozen[j] = True
            col.requires_grad_(False)
            col.grad = None
            if id(col) in held:
                optimizer.state.pop(col, None)  # its moments are freed now, and the optimizer skips it from here on
            else:
                self.pinned[j] = col.detach().clone()

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """After an optimizer step: write pinned columns back (under ZeRO-3 the caller gathers them for writing)."""
        for j, value in self.pinned.items():
            self.lamda_B_cols[j].copy_(value)

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
