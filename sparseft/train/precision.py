"""Where a run computes and in which precision: `train.device` and `train.precision` resolved once, for the trainer,
the exporter and the bench alike.

The storage dtype (`model.dtype`) is what the frozen weights are kept in. The precision says what the trainable weights
live in and how the forward and backward passes compute:

| precision  | trainable weights and optimizer state | forward / backward          | gradient scaler |
|------------|---------------------------------------|-----------------------------|-----------------|
| fp32       | fp32                                  | fp32                        | no              |
| bf16-mixed | fp32 (masters over the frozen weights) | bf16 under torch.autocast  | no              |
| bf16-true  | bf16, as stored                       | bf16                        | no              |
| fp16-mixed | fp32                                  | fp16 under torch.autocast   | yes             |

Which tensors are masters is the method's word (`Method.master_parameters`): by default every trainable weight; HiFT
keeps fp32 copies of its active group only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from sparseft.errors import UserError

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
# Storage dtypes each precision accepts (model.dtype); auto picks from the storage dtype.
_STORAGE = {"fp32": ("float32",), "bf16-mixed": ("float32", "bfloat16"), "bf16-true": ("bfloat16",),
            "fp16-mixed": ("float32", "float16")}
_AUTO = {"float32": "fp32", "bfloat16": "bf16-mixed", "float16": "fp16-mixed"}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16-mixed | bf16-true | fp16-mixed
    autocast_dtype: torch.dtype | None  # None: no autocast
    master_dtype: torch.dtype | None  # dtype of the trainable weights; None: left as the model stores them

    @property
    def mixed(self) -> bool:
        return self.autocast_dtype is not None

    @property
    def scaled(self) -> bool:
        return self.autocast_dtype == torch.float16

    def autocast(self, device: torch.device):
        """The context the forward (and so the backward) runs in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast_dtype)


def precision_name(precision: str, model_dtype: str) -> str:
    return _AUTO[model_dtype] if precision == "auto" else precision


def check_precision(precision: str, model_dtype: str) -> str | None:
    """A problem (key: message) when train.precision does not fit model.dtype, else None."""
    name = precision_name(precision, model_dtype)
    if model_dtype not in _STORAGE[name]:
        fits = [p for p, dtypes in _STORAGE.items() if model_dtype in dtypes]
        return (f"train.precision={name}: does not fit model.dtype={model_dtype} (it needs model.dtype "
                f"{' or '.join(_STORAGE[name])}; with {model_dtype} use {' or '.join(fits)})")
    return None


def resolve_precision(precision: str, model_dtype: str) -> Precision:
    problem = check_precision(precision, model_dtype)
    if problem:
        raise UserError(problem)
    name = precision_name(precision, model_dtype)
    return Precision(name, _AUTOCAST.get(name), None if name == "bf16-true" else torch.float32)


def resolve_device(device: str = "auto", key: str = "train.device") -> torch.device:
    """auto: the local rank's GPU when CUDA is there, else the CPU. cuda / cuda:N must exist."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()) or device.endswith(":"):
        raise UserError(f"{key}={device}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"{key}={device}: CUDA is not available on this machine (torch {torch.__version__}, "
                        f"CUDA build: {torch.version.cuda or 'none'}); use auto or cpu")
    n = int(index) if index else local_rank
    if n >= torch.cuda.device_count():
        raise UserError(f"{key}={device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(f"cuda:{n}")


@torch.no_grad()
def keep_masters(params: dict[str, nn.Parameter], precision: Precision) -> int:
    """Move the given trainable weights to the precision's master dtype in place (the Parameter objects stay, so
    optimizers and hooks keep them). Returns how many elements changed dtype."""
    if precision.master_dtype is None:
        return 0
    moved = 0
    for p in params.values():
        if p.is_floating_point() and p.dtype != precision.master_dtype:
            p.data = p.data.to(precision.master_dtype)
            moved += p.numel()
    return moved


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory from /proc/self/status (VmRSS now, VmHWM its peak), in MB; NaN off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since start (or the last reset): allocated device memory on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb("VmHWM")


def describe(device: torch.device, model_dtype: str, precision: Precision, launched: bool = False) -> str:
    """One line for the run log: where and how a run computes."""
    kept = {"fp32": "everything fp32", "bf16-mixed": "trainable weights and optimizer state fp32, compute bf16",
            "bf16-true": "everything bf16 (no fp32 copies)",
            "fp16-mixed": "trainable weights and optimizer state fp32, compute fp16, loss scaled"}[precision.name]
    if launched:
        kept = "DeepSpeed's " + ("bf16 path (fp32 master partitions)" if precision.autocast_dtype == torch.bfloat16
                                 or precision.name == "bf16-true" else "fp32 path")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"device {device} ({name}); weights stored in {model_dtype}; precision {precision.name}: {kept}"
