"""The timing loop: warm-up, interleaved repeats, per-call clocks, median/p90/p99/spread.

Candidates measured against each other (train vs deploy form of one backend) run
*interleaved*: each round calls every candidate once, in a rotated order, so slow drift of
a shared machine (frequency, other tenants) hits all of them alike and their ratio stays
meaningful even when the absolute numbers move.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Per-call wall times (seconds) of one candidate."""

    samples: list[float]

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile, q in [0, 1]."""
        s = sorted(self.samples)
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = the middle half within 5 %)."""
        return (self.quantile(0.75) - self.quantile(0.25)) / self.median if self.median > 0 else 0.0

    def latency_ms(self) -> dict[str, float]:
        return {"median": 1e3 * self.median, "p90": 1e3 * self.quantile(0.9), "p99": 1e3 * self.quantile(0.99)}


def paired_ratios(slow: Timing, fast: Timing) -> Timing:
    """Per-round ratios ``slow / fast`` of two candidates timed in the same rounds of :func:`measure`.

    Each ratio compares two calls made back to back, so drift between rounds (frequency,
    other tenants) cancels inside it; their median is the speed-up estimate and their
    quartiles show how much it moves from round to round.
    """
    if len(slow.samples) != len(fast.samples):
        raise ValueError("paired ratios need timings from the same rounds")
    return Timing([s / f for s, f in zip(slow.samples, fast.samples)])


class Clock:
    """Times one call on the host: ``sync`` (the backend's synchronize) closes the interval."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync = sync

    def time(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


class CudaEventClock(Clock):
    """Times one call with CUDA events on the current stream (GPU time, no host jitter)."""

    def __init__(self) -> None:
        super().__init__(torch.cuda.synchronize)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def time(self, fn: Callable[[], object]) -> float:
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


@dataclass
class Candidate:
    """One thing to time: a zero-argument call and the clock that times it."""

    fn: Callable[[], object]
    clock: Clock


def measure(candidates: dict[str, Candidate], *, warmup: int = 2, repeats: int = 10, min_repeats: int = 3,
            max_time_s: float | None = None) -> dict[str, Timing]:
    """Warm up each candidate, then run ``repeats`` interleaved rounds (one call each per round).

    ``max_time_s`` caps the measuring time of the whole group: once spent, rounds stop after
    at least ``min_repeats`` (big models on small machines still finish; the samples kept
    are full rounds, so every candidate has the same count).
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name].clock.time(candidates[name].fn)
    samples: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for r in range(max(repeats, 1)):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate: no candidate always runs first (cache, turbo)
            samples[name].append(candidates[name].clock.time(candidates[name].fn))
        if max_time_s is not None and r + 1 >= min_repeats and time.perf_counter() - t0 > max_time_s:
            break
    return {n: Timing(s) for n, s in samples.items()}
