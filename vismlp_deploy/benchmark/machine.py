"""What the numbers were measured on: CPU model, threads, GPU, library versions."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (Linux), else platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, threads: int) -> dict:
    import os

    from .. import __version__

    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "device": device,
            "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "vismlp_deploy": __version__, "load_average": load_average()}
    for mod in ("onnxruntime", "onnx"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


def load_average() -> float | None:
    """1-minute load average now (read when a run starts: > threads means other work shared the CPUs)."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
