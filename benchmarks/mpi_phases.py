"""2 ranks against 2 threads, and the compiled distributed epoch against the Python loop, in one MPI job.

    mpiexec --bind-to none -n 2 python benchmarks/mpi_phases.py                  # deep, 10 rounds
    mpiexec --bind-to none -n 2 python benchmarks/mpi_phases.py --workload wide --rounds 6 --scale 0.2

A ``cprop bench`` workload (random data, relu hidden layers, SGD lr 0.01 momentum 0.9,
float32) trains one epoch at a time in three configurations, their order rotated every
round, so that the epochs of a round run seconds apart, under the same load of a shared
machine: every rank with ``Trainer(comm=MPI.COMM_WORLD, n_threads=1)``, its epoch compiled
(phase 2) and, with ``CPROP_MPI_EPOCH=python``, the Python loop (phase 1); then rank 0
alone with ``n_threads=2`` and no comm, the others sleeping (polling a nonblocking barrier
every 2 ms, not spinning in MPI). Rank 0 prints each configuration's median time per global
batch (an MPI epoch's time is the slowest rank's), the medians over rounds of 2 threads'
time over each phase's (the efficiency of 2 ranks × 1 thread against 1 process × 2
threads), and the load average. Launch with ``--bind-to none``: bound to one core, rank 0's
two threads would share it. ``benchmarks/mpi_scaling.py`` runs one job per configuration.
This is a benchmark: it measures and asserts nothing.
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="deep")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--scale", type=float, default=0.5, help="epoch length relative to cprop bench's")
    args = p.parse_args()
    from mpi4py import MPI

    from cprop import bench
    comm = MPI.COMM_WORLD
    if comm.rank == 0 and len(os.sched_getaffinity(0)) < 2:
        print(f"rank 0 may run on {len(os.sched_getaffinity(0))} core: launch with mpiexec --bind-to none",
              file=sys.stderr, flush=True)
        comm.Abort(2)
    w = bench.WORKLOADS[args.workload]
    n = w.epoch_samples(args.scale)
    X, y = w.make_data(n)
    ranks = w.trainer(comm, n_threads=1)
    threads = w.trainer(n_threads=2) if comm.rank == 0 else None

    def epoch(config):
        """One epoch's seconds (rank 0's; None on the others)."""
        comm.Barrier()
        if config == "threads":
            if threads is not None:
                threads.fit(X, y, epochs=1)
            done = comm.Ibarrier()
            while not done.Test():
                time.sleep(0.002)
            return None if threads is None else threads.history.time[-1]
        os.environ["CPROP_MPI_EPOCH"] = config
        ranks.fit(X, y, epochs=1)
        return ranks.history.time[-1]

    configs = ("compiled", "python", "threads")
    for config in configs:              # warm-up: pages, buffers, caches
        epoch(config)
    seconds = {config: [] for config in configs}
    loads = []
    for r in range(args.rounds):
        for config in configs[r % 3:] + configs[:r % 3]:
            loads.append(os.getloadavg()[0])
            seconds[config].append(epoch(config))
    if comm.rank == 0:
        steps = -(-n // w.batch_size)
        ms = {config: 1e3 * statistics.median(s) / steps for config, s in seconds.items()}
        eff = {phase: statistics.median(t / m for t, m in zip(seconds["threads"], seconds[phase]))
               for phase in ("compiled", "python")}
        print(f"{args.workload} ({w.layers}, batch {w.batch_size}), {comm.Get_size()} ranks, {args.rounds} rounds: "
              f"ms per global batch, phase 2 {ms['compiled']:.3f}, phase 1 {ms['python']:.3f}, "
              f"1 process x 2 threads {ms['threads']:.3f}; 2 threads / 2 ranks, median of rounds: "
              f"phase 2 {eff['compiled']:.0%}, phase 1 {eff['python']:.0%}; "
              f"load average {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
