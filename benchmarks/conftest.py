"""Shared settings of the pytest-benchmark suite: threads, dtype, epoch length, and one timing helper.

Run with ``pytest benchmarks --benchmark-only``. The suite is outside the
project's ``testpaths``, so a plain ``pytest`` never collects it. Settings come
from the environment:

CPROP_BENCH_THREADS  threads for every framework (default: all cores)
CPROP_BENCH_DTYPE    float32 (default) or float64
CPROP_BENCH_SCALE    epoch length as a fraction of ``cprop bench``'s (default 0.25)
"""
import importlib.util
import math
import os

import pytest

from cprop import bench

if importlib.util.find_spec("pytest_benchmark") is None:
    # without the plugin there is no `benchmark` fixture: collect nothing rather than error
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def n_threads():
    """Threads for cprop's kernels and every peer."""
    return int(os.environ.get("CPROP_BENCH_THREADS", bench.available_cores()))


@pytest.fixture(scope="session")
def dtype():
    """Floating-point type of every array."""
    value = os.environ.get("CPROP_BENCH_DTYPE", "float32")
    if value not in ("float32", "float64"):
        raise pytest.UsageError(f"CPROP_BENCH_DTYPE must be float32 or float64, got {value!r}")
    return value


@pytest.fixture(scope="session")
def samples_scale():
    """Epoch length relative to ``cprop bench``'s default workloads."""
    return float(os.environ.get("CPROP_BENCH_SCALE", "0.25"))


@pytest.fixture
def measure(benchmark):
    """``measure(fn, rounds=5, flops=None, samples=None, min_round_seconds=0.002)``: time fn().

    Iterations per round are calibrated so that a round lasts about
    `min_round_seconds` (microsecond kernels are not timed at clock
    resolution); 0 means one call per round, each after ``bench.settle()``
    (see ``cprop.bench.measure.SETTLE_SECONDS``). With `flops` or
    `samples` (per call), GFLOP/s or samples/s of the median round go into
    the report's extra_info. Nothing is asserted: benchmarks measure.
    """
    def run(fn, rounds=5, flops=None, samples=None, min_round_seconds=0.002):
        if min_round_seconds > 0:
            once = bench.seconds_per_call(fn)
            iterations = max(1, min(10_000, math.ceil(min_round_seconds / max(once, 1e-7))))
            bench.settle()  # let the previous test's BLAS / OpenMP threads go idle
            benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
        else:  # long calls: settle before every round
            benchmark.pedantic(fn, setup=bench.settle, rounds=rounds, warmup_rounds=1)
        if benchmark.stats is None:   # --benchmark-disable: each fn ran once, as a smoke test
            return
        median = benchmark.stats.stats.median
        if flops:
            benchmark.extra_info["GFLOP/s"] = round(flops / median / 1e9, 2)
        if samples:
            benchmark.extra_info["samples/s"] = round(samples / median)
    return run
