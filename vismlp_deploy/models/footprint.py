"""Memory guard: what a model of a config will cost, measured on the meta device before anything is allocated.

``check_footprint(fmt, config)`` builds the model on the meta device (tensors without storage:
free), adds up its weights and runs one forward at ``batch`` on meta tensors while a dispatch
mode tracks every new intermediate tensor and when it dies, which gives the peak of live
activation bytes. Above the limit (``max_bytes``, default: half of the memory available, since
every command holds the train and the deploy form at once) it raises ``UserError`` with the
estimate. Sizes cost nothing on meta; a build or forward that creates more tensors than any real
network (a billion blocks) is cut short, so that every refusal takes little memory and time.
"""
from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import UserError, first_line

if TYPE_CHECKING:
    from .registry import CheckpointFormat

DEFAULT_FRACTION = 0.5  # of the available memory: the train and the deploy form coexist in every command
MAX_TENSORS = 20_000  # tensors created while building: the largest named config creates about 900
MAX_FORWARD_TENSORS = 200_000  # tensors created by one forward
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes of a model: ``weights`` (parameters and buffers) and the ``activations`` peak of one
    eval-mode, no-grad forward of an input (batch, C, H, W)."""

    weights: int
    activations: int
    batch: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def describe(self) -> str:
        return (f"about {format_bytes(self.total)} ({format_bytes(self.weights)} weights + "
                f"{format_bytes(self.activations)} activations at batch {self.batch})")


class _TooManyTensors(Exception):
    """Raised inside the tracking mode: the build or forward creates more tensors than any real network."""


class _AllocationTracker(TorchDispatchMode):
    """Follows every tensor an operator creates (views and in-place results reuse a storage and are not
    counted) until it is freed: ``peak`` is the most bytes alive at once. Meta tensors cost nothing, so
    sizes never need a cut-off; only the number of tensors (Python objects) does."""

    def __init__(self, max_tensors: int) -> None:
        super().__init__()
        self.max_tensors = max_tensors
        self.count = self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        pairs = [(returns[0], out)] if len(returns) == 1 else zip(returns, out)
        for ret, value in pairs:
            if ret.alias_info is not None:  # a view or an in-place write: no new storage
                continue
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    self._add(t, t.untyped_storage().nbytes())
        return out

    def _add(self, t: torch.Tensor, nbytes: int) -> None:
        self.count += 1
        if self.count > self.max_tensors:
            raise _TooManyTensors(f"creates more than {self.max_tensors} tensors (real networks: a few thousand)")
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def build_on_meta(fmt: CheckpointFormat, config: Mapping[str, Any]) -> nn.Module:
    """``fmt.build(config)`` on the meta device, eval mode; UserError if the family rejects the config (negative
    integers: none of them takes one) or it creates more tensors than any real network."""
    negative = [f"{k}={v!r}" for k, v in config.items() if any(isinstance(x, int) and x < 0 for x in tree_leaves(v))]
    if negative:
        raise UserError(f"{fmt.name} config has negative sizes or counts: {', '.join(negative)}")
    try:
        with torch.device("meta"), _AllocationTracker(MAX_TENSORS), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # init functions remark on meta/empty tensors
            model = fmt.build(dict(config))
    except _TooManyTensors as e:
        raise UserError(f"building {fmt.name} with this config stopped: it {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure of a constructor means a config it does not accept
        raise UserError(f"cannot build {fmt.name} with config {dict(config)}: "
                        f"{type(e).__name__}: {first_line(e)}") from None
    return model.eval()


def estimate(model: nn.Module, input_size: tuple[int, int, int], batch: int = 1, name: str = "the model") -> Footprint:
    """Weights and activation peak of ``model`` (on the meta device) for one (batch, *input_size) forward.

    A forward that fails on meta tensors fails on real ones too: UserError with the reason (``name`` says
    which model).
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tracker = _AllocationTracker(MAX_FORWARD_TENSORS)
    shape = (batch, *input_size)
    try:
        with torch.no_grad(), tracker:
            model(torch.empty(shape, device="meta"))
    except Exception as e:  # noqa: BLE001 - shapes the network cannot take (too small, not divisible, …)
        raise UserError(f"{name} cannot run on an input of shape {'x'.join(map(str, shape))}: "
                        f"{type(e).__name__}: {first_line(e)}") from None
    return Footprint(weights, tracker.peak, batch)


def check_footprint(fmt: CheckpointFormat, config: Mapping[str, Any], input_size: tuple[int, int, int] | None = None,
                    batch: int = 1, max_bytes: int | None = None, model: nn.Module | None = None) -> Footprint:
    """Refuse (UserError, estimate in the message) a ``fmt`` model of ``config`` whose weights plus activations
    at ``batch`` exceed ``max_bytes`` (bytes; None: :func:`default_limit`). Returns the estimate.

    model: the same network already built on the meta device (saves a build); input_size: (C, H, W),
    default ``fmt.input_size(config)``.
    """
    limit, how = resolve_limit(max_bytes)
    if model is None:
        model = build_on_meta(fmt, config)
    if input_size is None:
        input_size = input_size_of(fmt, config)
    fp = estimate(model, input_size, batch, name=f"{fmt.name} with config {dict(config)}")
    if limit is not None and fp.total > limit:
        size = "x".join(map(str, input_size))
        raise UserError(f"{fmt.name} at input {size} needs {fp.describe()}, more than the memory limit of "
                        f"{format_bytes(limit)} ({how}); pass max_memory (--max-memory) to raise the limit")
    return fp


def input_size_of(fmt: CheckpointFormat, config: Mapping[str, Any]) -> tuple[int, int, int]:
    """``fmt.input_size(config)`` as a tuple; UserError if the family cannot size this config."""
    try:
        return tuple(fmt.input_size(dict(config)))
    except Exception as e:  # noqa: BLE001 - a config the family cannot size
        raise UserError(f"cannot tell the input size of {fmt.name} with config {dict(config)}: "
                        f"{first_line(e)}") from None


# --------------------------------------------------------------------------- the limit

def resolve_limit(max_bytes: int | None) -> tuple[int | None, str]:
    """(limit in bytes or None for none, where it comes from)."""
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise UserError(f"max_memory must be a positive number of bytes, got {max_bytes!r}")
        return max_bytes, "given with max_memory"
    return default_limit()


def default_limit() -> tuple[int | None, str]:
    """Half the memory available now (None if this system does not say)."""
    avail = available_memory()
    if avail is None:
        return None, "available memory unknown"
    return int(avail * DEFAULT_FRACTION), f"half of the {format_bytes(avail)} available"


def available_memory() -> int | None:
    """Bytes that can be allocated now: the least of MemAvailable (/proc/meminfo), the cgroup's headroom, and
    (where /proc is absent) the free physical pages; None when none of them can be read."""
    found = [n for n in (_meminfo_available(), _cgroup_headroom()) if n is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """What this container's cgroup still allows: limit - usage + reclaimable page cache (v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``, as seen at /sys/fs/cgroup inside a container); None without a limit."""
    root = CGROUP_ROOT
    for folder, limit_file, usage_file, cache_key in (("", "memory.max", "memory.current", "inactive_file"),
                                                      ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                                       "total_inactive_file")):
        try:
            limit = (root / folder / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes a huge number for "no limit"
                continue
            usage = int((root / folder / usage_file).read_text())
            stat = (root / folder / "memory.stat").read_text().splitlines()
            cache = next((int(line.split()[1]) for line in stat if line.split()[:1] == [cache_key]), 0)
            return max(0, int(limit) - usage + cache)
        except (OSError, ValueError, IndexError):
            continue
    return None


# --------------------------------------------------------------------------- text

def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``320.0 MiB``; binary units."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"
