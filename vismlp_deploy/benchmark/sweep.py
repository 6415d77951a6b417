"""The sweep: sources × backend × precision × batch size, train and deploy forms interleaved.

For each (backend, precision, batch) the forms run interleaved in one :func:`measure`
call, so ``deploy_over_train`` (the median of per-round ratios) is taken under the same
machine conditions.
Achieved GFLOP/s = FLOPs of the form per image (``count_flops``, 2 per MAC; each form's
own count, the work that form really does) × images/s, read against a GEMM peak
measured at the start and end of the same run (the best) with the same threads and precision.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..reparam.report import count_flops
from ..runtime.backends import default_backends
from ..runtime.factory import RunnerFactory, Unavailable
from ..runtime.source import Source
from ..verification.inputs import random_images
from .calls import candidate
from .machine import machine_info
from .peak import GemmPeak, gemm_peak, ort_gemm_peak, ort_int8_gemm_peak
from .timing import measure, paired_ratios


@dataclass
class SweepConfig:
    backends: tuple[str, ...] | None = None  # default: the device's default backends that can run here
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    extra_batch_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # source name -> more batches
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    threads: int | None = None  # CPU threads for torch and ORT (default: torch's current count)
    warmup: int = 2
    repeats: int = 10
    min_repeats: int = 3
    max_time_s: float | None = 10.0  # per (backend, precision, batch) group, see timing.measure
    cuda_graphs: bool = False
    seed: int = 0
    peak_sizes: tuple[int, ...] | None = None  # GEMM n's (default 1024, 2048 on CPU; 4096, 8192 on CUDA)


class _Row:
    """A dataclass row of a result (one CSV/JSON record)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Record(_Row):
    model: str
    family: str | None
    backend: str
    form: str
    batch: int
    precision: str
    device: str
    input_size: list[int]  # (C, H, W)
    images_per_sec: float
    latency_ms: dict[str, float]
    spread: float  # IQR / median of the per-call times
    repeats: int
    flops_per_image: int | None
    gflops_per_sec: float | None
    fraction_of_peak: float | None


@dataclass
class Ratio(_Row):
    model: str
    backend: str
    batch: int
    precision: str
    deploy_over_train: float  # median over rounds of train time / deploy time (each round: one call of each)
    q25: float  # quartiles of those per-round ratios: the round-to-round noise of the estimate
    q75: float
    # the ratio a form doing the deploy form's FLOPs would reach at the measured GEMM peak: the
    # most any exact deploy form can gain on this backend and machine (no kernel beats the peak)
    gemm_bound: float | None = None


@dataclass
class Skip(_Row):
    model: str
    backend: str
    precision: str
    form: str
    batch: int | None
    reason: str


@dataclass
class BenchResult:
    records: list[Record] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    peaks: dict[str, GemmPeak] = field(default_factory=dict)  # precision -> GEMM peak
    machine: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)  # phase ("export", "sweep") -> seconds

    def ratio_index(self) -> dict[tuple[str, str, int, str], Ratio]:
        """(model, backend, batch, precision) -> its deploy/train :class:`Ratio`."""
        return {(r.model, r.backend, r.batch, r.precision): r for r in self.ratios}

    @property
    def gemm_peak_gflops(self) -> float | None:
        """The peak at the first measured precision (fp32 unless only others were asked for)."""
        return next(iter(self.peaks.values())).gflops if self.peaks else None

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.records], "ratios": [r.to_dict() for r in self.ratios],
                "gemm_peak_gflops": self.gemm_peak_gflops,
                "gemm_peaks": {k: p.to_dict() for k, p in self.peaks.items()},
                "skipped": [s.to_dict() for s in self.skipped], "machine": self.machine, "settings": self.settings,
                "wall_s": self.wall_s}


def run_sweep(sources: Iterable[Source], cfg: SweepConfig, n_sources: int = 1,
              on_step: Callable[[str, int], None] | None = None,
              exported: Callable[[str], dict[str, Path]] | None = None) -> BenchResult:
    """Measure every source (consumed lazily, so a zoo never holds more than one model).

    ``on_step(description, total_steps)`` is called before each measured group (progress bar).
    ``exported(name)``: ONNX files already made for that source (form -> path), if any.
    """
    previous = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        result = _run(sources, cfg, n_sources, on_step, exported or (lambda name: {}))
    finally:
        torch.set_num_threads(previous)
    result.wall_s["sweep"] = time.perf_counter() - t0
    return result


def _run(sources, cfg: SweepConfig, n_sources: int, on_step, exported) -> BenchResult:
    if cfg.backends is None:
        cfg = replace(cfg, backends=default_backends(cfg.device))
    threads = _set_threads(cfg)
    result = BenchResult(machine=machine_info(cfg.device, threads), settings={**asdict(cfg), "threads": threads})
    peak_sizes = cfg.peak_sizes or ((1024, 2048) if cfg.device == "cpu" else (4096, 8192))
    _measure_peaks(cfg, peak_sizes, result, threads)
    extra = sum(len(set(b) - set(cfg.batch_sizes)) for b in cfg.extra_batch_sizes.values())
    total = (n_sources * len(cfg.batch_sizes) + extra) * len(cfg.backends) * len(cfg.precisions)
    for source in sources:
        with tempfile.TemporaryDirectory(prefix="vismlp-bench-") as workdir:
            # ORT spinning off: the forms alternate call by call, and a session whose idle threads
            # spin steals a core from the next one (measured: resmlp_12 train 320 -> 252 ms on 2 cores)
            factory = RunnerFactory(source, cfg.device, workdir, threads, max(_batches(cfg, source.name)),
                                    exported(source.name), ort_spin=False)
            _sweep_one(source, cfg, factory, result,
                       lambda desc: on_step(desc, total) if on_step else None)
    _measure_peaks(cfg, peak_sizes, result, threads)  # again at the end: the best of both, if the load changed
    _fill_fractions(result)
    return result


def _measure_peaks(cfg: SweepConfig, sizes: tuple[int, ...], result: BenchResult, threads: int) -> None:
    ort_cpu = cfg.device == "cpu" and "onnxruntime" in cfg.backends
    for p in cfg.precisions:
        try:
            if p == "int8":  # int8 GEMMs: ONNX Runtime's MatMulInteger (torch has no int8 GEMM to offer here)
                peaks = [ort_int8_gemm_peak(sizes, threads=threads)] if ort_cpu else []
            else:
                peaks = [gemm_peak(cfg.device, p, sizes=sizes)]
                if ort_cpu and p == "fp32":
                    peaks.append(ort_gemm_peak(sizes, threads=threads))
        except RuntimeError as e:  # e.g. a dtype without a GEMM kernel on this device
            if not any(s.model == "gemm-peak" and s.precision == p for s in result.skipped):
                result.skipped.append(Skip("gemm-peak", "torch", p, "-", None, str(e).splitlines()[0]))
            continue
        for peak in peaks:
            if p not in result.peaks or peak.gflops > result.peaks[p].gflops:
                result.peaks[p] = peak


def _fill_fractions(result: BenchResult) -> None:
    for r in result.records:
        peak = result.peaks.get(r.precision)
        r.fraction_of_peak = r.gflops_per_sec / peak.gflops if r.gflops_per_sec is not None and peak else None
    forms = {(r.model, r.backend, r.batch, r.precision, r.form): r for r in result.records}
    for q in result.ratios:
        train, deploy = (forms.get((q.model, q.backend, q.batch, q.precision, f)) for f in ("train", "deploy"))
        peak = result.peaks.get(q.precision)
        if train and deploy and deploy.flops_per_image and peak:
            # train time / (deploy FLOPs at the peak) = peak / (deploy FLOPs per image × train images/s)
            q.gemm_bound = peak.gflops * 1e9 / (deploy.flops_per_image * train.images_per_sec)


def _set_threads(cfg: SweepConfig) -> int:
    """Fix the CPU thread count for the whole run (torch here, ORT through its session options)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.get_num_threads()


def _family(source: Source) -> str | None:
    model = source.train or source.deploy
    arch = getattr(model, "arch", None)
    if not arch:
        return None
    from ..models.registry import get_format

    return get_format(arch).family


def _sweep_one(source: Source, cfg: SweepConfig, factory: RunnerFactory, result: BenchResult,
               step: Callable[[str], None]) -> None:
    family = _family(source)
    example = random_images(source.input_size, 1, cfg.seed)
    flops = {form: count_flops(m, example) for form, m in source.forms.items()}
    for backend in cfg.backends:
        for precision in cfg.precisions:
            runners = {}
            for form in factory.forms(backend):
                try:
                    runners[form] = factory.runner(backend, form, precision)
                except Unavailable as e:
                    result.skipped.append(Skip(source.name, backend, precision, form, None, str(e)))
                except Exception as e:  # an exporter/compiler failure on one model must not end a sweep
                    result.skipped.append(Skip(source.name, backend, precision, form, None, _why(e)))
            if not factory.forms(backend):
                result.skipped.append(Skip(source.name, backend, precision, "-", None, "no torch form in an ONNX file"))
            for batch in _batches(cfg, source.name):
                step(f"{source.name} {backend} {precision} batch {batch}")
                _measure_group(source, family, backend, precision, batch, runners, flops, cfg, result)
            for runner in runners.values():
                runner.deactivate()
            del runners


def _batches(cfg: SweepConfig, name: str) -> list[int]:
    return sorted({*cfg.batch_sizes, *cfg.extra_batch_sizes.get(name, ())})


def _measure_group(source, family, backend, precision, batch, runners, flops, cfg: SweepConfig,
                   result: BenchResult) -> None:
    x = random_images(source.input_size, batch, cfg.seed)
    cands = {}
    for form, runner in runners.items():
        try:  # the first warm-up call: compile/capture failures become a skip, not a crash
            cands[form] = candidate(runner, x, cfg.cuda_graphs)
            cands[form].clock.time(cands[form].fn)
        except Exception as e:
            cands.pop(form, None)
            result.skipped.append(Skip(source.name, backend, precision, form, batch, _why(e)))
    if not cands:
        return
    timings = measure(cands, warmup=max(cfg.warmup - 1, 0), repeats=cfg.repeats, min_repeats=cfg.min_repeats,
                      max_time_s=cfg.max_time_s)
    ips = {}
    for form, t in timings.items():
        ips[form] = batch / t.median
        f = flops.get(form)
        gf = f * ips[form] / 1e9 if f else None
        result.records.append(Record(source.name, family, backend, form, batch, precision, cfg.device,
                                     list(source.input_size), ips[form],
                                     t.latency_ms(), t.spread, len(t.samples), f, gf, None))
    if "train" in ips and "deploy" in ips:
        per_round = paired_ratios(timings["train"], timings["deploy"])
        result.ratios.append(Ratio(source.name, backend, batch, precision, per_round.median,
                                   per_round.quantile(0.25), per_round.quantile(0.75)))


def _why(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
