"""Measurement: timed epochs in alternating rounds, the GEMM peak probe, medians.

In each round every framework runs one epoch, in an order rotated from round
to round so that a slow spell of a shared machine does not always fall on the
same one; the report is the median over rounds. Every timed call starts after
:func:`settle`.
"""
import math
import statistics
import time

import numpy as np

from .machine import blas_limits
from .runners import RUNNERS, PeerUnavailable
from .workloads import SEED

# After each call OpenBLAS's worker threads keep spinning for about 2**28
# cycles (~0.1 s), and OpenMP pools for a while too: on a small machine they
# take the cores from whichever framework runs next (benchmarks/README.md:
# how much slower cprop's epochs ran right after a numpy matmul). So every
# timed call starts after this pause.
SETTLE_SECONDS = 0.15


def settle():
    """Wait until the thread pools of whatever ran before have gone to sleep."""
    time.sleep(SETTLE_SECONDS)


def timed(fn):
    """Seconds one call of fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def seconds_per_call(fn, seconds=0.01):
    """Mean seconds of fn() over at least 3 calls and about `seconds` (a first call that
    wakes sleeping threads averages out): for choosing repetitions, not for reporting."""
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


class GemmProbe:
    """This machine's practical GEMM peak: numpy size×size matmuls at n_threads, timed one per call.

    ``cprop bench`` calls it a few times up front and once more in every
    round, in the rotation with the frameworks, so the peak is measured under
    the same load as they are (a busy shared machine otherwise gives
    percentages of a peak it never reached).
    """

    def __init__(self, n_threads, dtype="float32", size=2048):
        rng = np.random.default_rng(SEED)
        self.A = rng.standard_normal((size, size), dtype=np.dtype(dtype).type)
        self.B = rng.standard_normal((size, size), dtype=np.dtype(dtype).type)
        self.C = np.empty_like(self.A)
        self.n_threads, self.size = n_threads, size
        self.seconds = []
        with blas_limits(n_threads):
            np.matmul(self.A, self.B, out=self.C)  # warm-up: page in, start the BLAS threads

    def __call__(self):
        """Time one more matmul."""
        with blas_limits(self.n_threads):
            settle()
            self.seconds.append(timed(lambda: np.matmul(self.A, self.B, out=self.C)))

    @property
    def gflops(self):
        """GFLOP/s of the median matmul so far."""
        return 2.0 * self.size ** 3 / statistics.median(self.seconds) / 1e9


def rotated(items, k):
    """`items` rotated left by k: round k's running order."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def bench_training(workload, frameworks, n_threads, rounds, dtype="float32", scale=1.0, seed=SEED,
                   probe=None):
    """Time one-epoch training of `workload` for every framework, alternating within each round.

    Returns the epoch length, ``{name: {"seconds": [...], "warmup_seconds": s,
    "unavailable": reason or None, "error": str or None}}`` and the runners (for
    the inference timing that follows). Each framework's first epoch is a
    warm-up (compilation, caches), timed apart as ``warmup_seconds``. A
    framework that raises :class:`PeerUnavailable` is left out with its
    reason; one that raises anything else is dropped from later rounds and its
    error kept. `probe`, when given, is called once per round in the rotation
    (see :class:`GemmProbe`).
    """
    n_samples = workload.epoch_samples(scale)
    X, y = workload.make_data(n_samples, dtype, seed)
    results = {name: {"seconds": [], "warmup_seconds": None, "unavailable": None, "error": None}
               for name in frameworks}
    runners = {}
    for name in frameworks:
        try:
            runners[name] = RUNNERS[name](workload, X, y, n_threads, seed)
            with runners[name].limits():
                results[name]["warmup_seconds"] = timed(runners[name].epoch)
        except PeerUnavailable as exc:
            results[name]["unavailable"] = str(exc)
            runners.pop(name, None)
        except Exception as exc:  # a peer failing must not stop the others
            results[name]["error"] = f"{type(exc).__name__}: {exc}"
            runners.pop(name, None)
    slots = list(frameworks) + ([probe] if probe else [])
    for r in range(rounds):
        for name in rotated(slots, r):
            if name is probe:
                probe()
                continue
            if name not in runners:
                continue
            runner = runners[name]
            try:
                with runner.limits():
                    settle()
                    results[name]["seconds"].append(timed(runner.epoch))
            except Exception as exc:
                results[name]["error"] = f"{type(exc).__name__}: {exc}"
                del runners[name]
    return n_samples, results, runners


def bench_inference(runners, X, rounds, min_seconds=0.05):
    """Time every runner's forward pass over X, alternating; per label the seconds per pass of each round.

    Each round repeats a call enough times to last `min_seconds` (calibrated
    by :func:`seconds_per_call`), so small networks are not timed at clock resolution.
    """
    calls = []
    for runner in runners.values():
        with runner.limits():
            for label, fn in runner.inference(X):
                reps = max(1, math.ceil(min_seconds / max(seconds_per_call(fn), 1e-7)))
                calls.append((label, runner, fn, reps))
    seconds = {label: [] for label, *_ in calls}
    for r in range(rounds):
        for label, runner, fn, reps in rotated(calls, r):
            with runner.limits():
                settle()
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                seconds[label].append((time.perf_counter() - start) / reps)
    return seconds


def summarise(seconds, n_samples):
    """Median samples/s and relative spread (max - min) / median of the per-round rates."""
    rates = [n_samples / s for s in seconds]
    median = statistics.median(rates)
    return median, (max(rates) - min(rates)) / median
