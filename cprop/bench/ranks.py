"""``cprop bench --ranks N``: training over MPI at 1, 2, 4, ... N ranks, and an α-β model.

Run under an MPI launcher with at least N ranks (``mpiexec -n 4 cprop bench --ranks 4``).
For every rank count k, the first k ranks of COMM_WORLD train the workload together
(``Trainer(comm=...)``, each rank ``--threads`` threads, default 1) while the others wait; the
counts take turns, in an order rotated from round to round, and each reports the median over
rounds of one epoch's samples/s (the slowest rank's time). The efficiency of k ranks is their
samples/s over k times one rank's: weak scaling per rank would be different, this is the same
global batch split k ways (what `batch_size` means under comm).

The model: allreduce of n bytes over p ranks takes the faster of ring allreduce,
``2(p-1)·α + 2(p-1)/p·n·β``, and recursive doubling, ``⌈log2 p⌉·(α + n·β)`` (latency α per
message, β seconds per byte), as MPI libraries choose by message size. α and β are fitted
to allreduces timed between the first two ranks; the table then predicts, for p ranks that
each compute the workload's batch (the global batch growing with p, as clusters are used),
t being one rank's time per batch
measured here (gradient and step), the efficiency of synchronous training
``t / (t + T(p, gradient))`` and of local SGD averaging every H steps
(``Trainer(average_every=H)``), which still allreduces the loss and flags every step and
averages parameters and momentum every H: ``t / (t + T(p, 16 B) + 2·T(p, parameters)/H)``;
for the α and β measured here and for typical 10 GbE and 100 Gb/s InfiniBand links.
"""
import math
import statistics
import sys
import time

import numpy as np

from .measure import rotated, settle
from .workloads import SEED

# typical links, for the model: (name, α seconds, β seconds per byte)
LINKS = [("10 GbE (TCP)", 30e-6, 8 / 10e9), ("100 Gb/s InfiniBand", 2e-6, 8 / 100e9)]
MODEL_RANKS = (8, 64, 512)
# None: synchronous (the gradient allreduced every step); H: local SGD averaging every H steps
MODEL_AVERAGE_EVERY = (None, 8)
# what local SGD averages in the bench's recipe (SGD with momentum): parameters and momentum
AVERAGED_ARRAYS = 2
# what it still allreduces every step: the loss and the status flags
FLAG_BYTES = 16
ALLREDUCE_BYTES = [2 ** k for k in range(3, 24, 2)]      # 8 B .. 8 MB


def rank_counts(n):
    """1, 2, 4, ... below n, and n."""
    counts, k = [], 1
    while k < n:
        counts.append(k)
        k *= 2
    return counts + [n]


def _world(n_ranks):
    try:
        from mpi4py import MPI
    except ImportError:
        raise ValueError("--ranks needs mpi4py (pip install 'cprop[mpi]')") from None
    world = MPI.COMM_WORLD
    if n_ranks < 1 or n_ranks > world.Get_size():
        raise ValueError(f"--ranks {n_ranks} needs at least that many MPI ranks; this run has "
                         f"{world.Get_size()}: launch with `mpiexec -n {max(n_ranks, 2)} cprop bench "
                         f"--ranks {max(n_ranks, 2)}`")
    return MPI, world


def _epoch_rates(MPI, world, workload, counts, n_threads, rounds, dtype, scale, average_every):
    """{k: [samples/s of each round]} (on world rank 0), every count taking its turn each round."""
    n = workload.epoch_samples(scale)
    X, y = workload.make_data(n, dtype, SEED)
    trainers = {}
    for k in counts:   # every rank takes part in every Split, in the same order
        sub = world.Split(0 if world.rank < k else MPI.UNDEFINED, world.rank)
        if sub != MPI.COMM_NULL:
            trainers[k] = workload.trainer(sub if k > 1 else None, n_threads, dtype, average_every=average_every)
            trainers[k].fit(X, y, epochs=1)          # warm-up: buffers, pools, caches
    rates = {k: [] for k in counts}
    for r in range(rounds):
        for k in rotated(counts, r):
            world.Barrier()
            if k in trainers:
                settle()
                trainers[k].fit(X, y, epochs=1)
                if world.rank == 0:      # the epoch's time is already the slowest rank's
                    rates[k].append(n / trainers[k].history.time[-1])
    return n, rates


def _allreduce_seconds(MPI, world, dtype, repeats=20):
    """{bytes: median seconds of an in-place allreduce between world ranks 0 and 1}."""
    sub = world.Split(0 if world.rank < 2 else MPI.UNDEFINED, world.rank)
    result = {}
    for size in ALLREDUCE_BYTES:
        world.Barrier()
        if sub == MPI.COMM_NULL:
            continue
        buf = np.ones(max(1, size // np.dtype(dtype).itemsize), dtype=dtype)
        times = []
        for _ in range(repeats):
            sub.Barrier()
            start = time.perf_counter()
            sub.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - start)
        result[buf.nbytes] = statistics.median(sub.allreduce(t, op=MPI.MAX) for t in times)
    return result


def fit_alpha_beta(seconds_by_bytes):
    """(α, β) of T(n) = 2α + n·β, the 2-rank ring allreduce, by least squares (α, β >= 0)."""
    n = np.array(sorted(seconds_by_bytes), dtype=float)
    t = np.array([seconds_by_bytes[k] for k in sorted(seconds_by_bytes)])
    # relative errors: the small messages (α) count as much as the large ones (β)
    A = np.stack([2 * np.ones_like(n), n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    return max(float(alpha), 0.0), max(float(beta), 0.0)


def ring_allreduce_seconds(p, n_bytes, alpha, beta):
    """2(p-1)·α + 2(p-1)/p·n·β."""
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n_bytes * beta


def allreduce_seconds(p, n_bytes, alpha, beta):
    """The faster of ring allreduce and recursive doubling (⌈log2 p⌉·(α + n·β)), as MPI
    libraries pick by message size: latency-bound small messages take the second."""
    if p <= 1:
        return 0.0
    doubling = math.ceil(math.log2(p)) * (alpha + n_bytes * beta)
    return min(ring_allreduce_seconds(p, n_bytes, alpha, beta), doubling)


def model_efficiency(batch_seconds, n_bytes, p, alpha, beta, average_every=None, averaged_arrays=AVERAGED_ARRAYS):
    """Efficiency of p ranks each computing one batch per step (t = batch_seconds).

    Synchronous: t / (t + T(p, n)), the gradient (n bytes) allreduced every step, T the faster
    of ring and recursive doubling (:func:`allreduce_seconds`). Local SGD every H steps: the
    loss and flags are still allreduced every step, and every H steps
    `averaged_arrays` arrays of n bytes (parameters and optimizer state, one allreduce each):
    t / (t + T(p, FLAG_BYTES) + k·T(p, n)/H).
    """
    if average_every is None:
        return batch_seconds / (batch_seconds + allreduce_seconds(p, n_bytes, alpha, beta))
    per_step = (allreduce_seconds(p, FLAG_BYTES, alpha, beta)
                + averaged_arrays * allreduce_seconds(p, n_bytes, alpha, beta) / average_every)
    return batch_seconds / (batch_seconds + per_step)


def run_ranks(workloads, n_ranks, n_threads, rounds, dtype, scale, average_every=None):
    """Measure, print (world rank 0) and return the report of ``cprop bench --ranks``."""
    MPI, world = _world(n_ranks)
    counts = rank_counts(n_ranks)
    report = {"ranks": counts, "threads_per_rank": n_threads, "average_every": average_every,
              "rounds": rounds, "dtype": dtype, "workloads": []}
    for workload in workloads:
        if world.rank == 0 and sys.stderr.isatty():
            print(f"cprop bench --ranks: {workload.name} ...", file=sys.stderr, flush=True)
        n, rates = _epoch_rates(MPI, world, workload, counts, n_threads, rounds, dtype, scale, average_every)
        if world.rank == 0:
            medians = {k: statistics.median(v) for k, v in rates.items()}
            n_params = workload.network(dtype).n_params
            report["workloads"].append({
                "name": workload.name, "layers": workload.layers, "batch_size": workload.batch_size,
                "epoch_samples": n, "gradient_bytes": n_params * np.dtype(dtype).itemsize,
                "samples_per_second": medians,
                "efficiency": {k: medians[k] / (k * medians[1]) for k in counts}})
    if n_ranks >= 2:
        seconds = _allreduce_seconds(MPI, world, dtype)
        if world.rank == 0:
            alpha, beta = fit_alpha_beta(seconds)
            report["allreduce"] = {"seconds_by_bytes": seconds, "alpha": alpha, "beta": beta}
    if world.rank == 0:
        print(format_ranks(report))
    return report if world.rank == 0 else None


def format_ranks(report):
    """The tables of ``cprop bench --ranks``: measured scaling, then the α-β model."""
    counts = report["ranks"]
    lines = [f"training over MPI: {report['threads_per_rank']} thread(s) per rank, {report['dtype']}, "
             f"median of {report['rounds']} round(s), "
             + ("synchronous (gradient allreduced every step)" if report["average_every"] is None
                else f"local SGD averaging every {report['average_every']} steps"),
             "the same global batch split over k ranks; efficiency = samples/s / (k x one rank's)", ""]
    head = f"{'workload':<8} {'layers':<22} {'batch':>5} " + " ".join(f"{f'{k} rank(s)':>18}" for k in counts)
    lines += [head, "-" * len(head)]
    for w in report["workloads"]:
        cells = " ".join(f"{w['samples_per_second'][k]:>9,.0f} ({w['efficiency'][k]:>4.0%})" for k in counts)
        lines.append(f"{w['name']:<8} {w['layers']:<22} {w['batch_size']:>5} {cells}")
    ar = report.get("allreduce")
    if ar:
        alpha, beta = ar["alpha"], ar["beta"]
        lines += ["", f"allreduce between 2 ranks here: α = {alpha * 1e6:.1f} µs, β = {beta * 1e9:.3f} ns/byte "
                      f"({1 / beta / 1e9 if beta else float('inf'):.1f} GB/s) fitted to "
                      + ", ".join(f"{b:,} B {s * 1e6:.0f} µs" for b, s in sorted(ar["seconds_by_bytes"].items())
                                  if b in (8, 2048, 131072, 8388608)),
                  "model: p ranks each computing one batch per step, t = one rank's batch time above;",
                  "T = ring allreduce or recursive doubling, whichever is faster; sync: t / (t + T(p, gradient));",
                  f"local SGD every H steps: t / (t + T(p, flags) + {AVERAGED_ARRAYS}·T(p, parameters) / H),",
                  "parameters and momentum averaged"]
        links = [("here", alpha, beta)] + LINKS
        head = f"{'workload':<8} {'link':<20} {'H':>4} " + " ".join(f"{f'p={p}':>7}" for p in MODEL_RANKS)
        lines += [head, "-" * len(head)]
        for w in report["workloads"]:
            t = w["batch_size"] / w["samples_per_second"][1]
            for name, a, b in links:
                for h in MODEL_AVERAGE_EVERY:
                    cells = " ".join(f"{model_efficiency(t, w['gradient_bytes'], p, a, b, h):>7.0%}"
                                     for p in MODEL_RANKS)
                    lines.append(f"{w['name']:<8} {name:<20} {'sync' if h is None else h:>4} {cells}")
    return "\n".join(lines)
