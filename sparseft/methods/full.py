"""Full fine-tuning: every weight trains. The baseline the sparse methods are measured against."""

from __future__ import annotations

from typing import Literal

from sparseft.methods.base import Method, MethodConfig, register


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


@register
class Full(Method):
    config_cls = FullConfig
