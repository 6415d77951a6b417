"""Parameters and FLOPs of a config without building it for real (meta tensors: no memory, no init)."""
from __future__ import annotations

import torch

from ..reparam.report import count_flops, count_params
from .footprint import build_on_meta
from .registry import get_format


def config_cost(format_name: str, config: dict) -> tuple[int, int]:
    """(parameters incl. floating buffers, FLOPs of one image) of ``format_name`` built from ``config``."""
    fmt = get_format(format_name)
    model = build_on_meta(fmt, config)
    return count_params(model), count_flops(model, torch.empty(1, *fmt.input_size(config), device="meta"))
