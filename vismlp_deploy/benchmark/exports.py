"""Export every named config's train and deploy forms to ONNX ahead of a zoo sweep, in parallel.

The dynamo exporter runs mostly single-threaded Python and takes most of a zoo run's wall time
on a small machine, while the timing itself must run alone. So the exports happen first, in
worker processes (one model each at a time), and the sweep then only opens the files. A model
whose export fails here is simply not written: the sweep exports it again in-process and
reports the failure as a skip, exactly as it does without this step.
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

FORMS = ("train", "deploy")


def onnx_paths(out_dir: Path, name: str) -> dict[str, Path]:
    """Where the export of each form of ``name`` is put (and looked for)."""
    return {form: out_dir / name / f"{form}.onnx" for form in FORMS}


def _export_one(name: str, seed: int, out_dir: str) -> str:
    """Worker: build ``name`` (seeded weights), write both forms' ONNX files. Returns ``name``."""
    import torch

    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    from ..export.onnx import export_onnx
    from ..runtime.source import from_named_config

    paths = onnx_paths(Path(out_dir), name)
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    try:
        source = from_named_config(name, seed)
        for form, model in source.forms.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(model, paths[form])
    except Exception:  # the sweep retries in-process and reports the reason as a skip
        pass
    return name


def export_ahead(names: list[str], seed: int, out_dir: Path, workers: int | None = None,
                 on_done: Callable[[str, int], None] | None = None) -> int:
    """Export ``names`` into ``out_dir/<name>/{train,deploy}.onnx`` with ``workers`` processes.

    ``workers`` defaults to the number of CPUs (at most 4: each worker holds one model).
    ``on_done(name, total)`` is called as each model finishes (progress bar). Returns ``workers``.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    # spawn, not fork: forking a process whose torch/OpenMP threads are running can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_export_one, name, seed, str(out_dir)) for name in names]
        for future in as_completed(futures):
            try:
                name = future.result()
            except BrokenProcessPool:  # a worker died (memory): the sweep exports what is missing itself
                break
            if on_done:
                on_done(name, len(names))
    return workers
