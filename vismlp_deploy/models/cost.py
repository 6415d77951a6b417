"""Parameters and FLOPs of a config without building it for real (meta tensors: no memory, no init)."""
from __future__ import annotations

import torch

from ..reparam.report import count_flops
from .registry import get_format


def config_cost(format_name: str, config: dict) -> tuple[int, int]:
    """(parameters incl. floating buffers, FLOPs of one image) of ``format_name`` built from ``config``."""
    fmt = get_format(format_name)
    with torch.device("meta"):
        model = fmt.build(dict(config)).eval()
    params = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    return params, count_flops(model, torch.empty(1, *fmt.input_size(config), device="meta"))
