"""Python API: ``bench(model_or_spec, ...)`` and ``bench_zoo(...)`` -> :class:`BenchResult`."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn

from ..runtime.source import Source, as_source, from_named_config
from . import machine
from .exports import export_ahead, onnx_paths
from .sweep import BenchResult, SweepConfig, run_sweep


def bench(model: nn.Module | str | Path, *, on_step: Callable[[str, int], None] | None = None,
          **settings) -> BenchResult:
    """Benchmark a train-form model (with ``input_size``), a checkpoint/artifact path or a named config.

    ``settings`` are :class:`SweepConfig` fields, e.g. ``backends=("torch", "onnxruntime")``,
    ``batch_sizes=(1, 8)``, ``precisions=("fp32",)``, ``device="cpu"``, ``repeats=10``.
    """
    return run_sweep([as_source(model)], SweepConfig(**settings), 1, on_step)


def zoo_names(families: list[str] | None = None) -> list[str]:
    """Every named config (of the given families), sorted by family then name."""
    from ..models.registry import configs, formats

    family = {c.name: formats()[c.format].family for c in configs().values()}
    return sorted((n for n, f in family.items() if not families or f in families), key=lambda n: (family[n], n))


def bench_zoo(names: list[str], *, seed: int = 0, on_step: Callable[[str, int], None] | None = None,
              export_workers: int | None = None, on_export: Callable[[str, int], None] | None = None,
              **settings) -> BenchResult:
    """Sweep the named configs one after the other (each built, measured and freed in turn).

    When an ONNX backend is asked for, every config is exported first by ``export_workers``
    processes (see :mod:`.exports`; ``on_export(name, total)`` reports progress), so the
    sequential part is the timing alone.
    """
    cfg = SweepConfig(seed=seed, **settings)

    def sources() -> Iterator[Source]:
        for name in names:
            yield from_named_config(name, seed)

    if not {"onnxruntime", "tensorrt"} & set(cfg.backends):
        return run_sweep(sources(), cfg, len(names), on_step)
    load_before = machine.load_average()  # the exports load the CPUs themselves: read it now
    with tempfile.TemporaryDirectory(prefix="vismlp-zoo-onnx-") as tmp:
        out_dir = Path(tmp)
        t0 = time.perf_counter()
        workers = export_ahead(names, seed, out_dir, export_workers, on_export)
        export_s = time.perf_counter() - t0
        result = run_sweep(sources(), cfg, len(names), on_step, lambda name: onnx_paths(out_dir, name))
    result.wall_s = {"export": export_s, **result.wall_s}
    result.machine["load_average"] = load_before
    result.settings["export_workers"] = workers
    return result
