"""The compiled distributed epoch (phase 2) against the Python loop (phase 1), in one MPI job.

    mpiexec -n 2 python benchmarks/mpi_phases.py                   # deep, 10 pairs
    mpiexec -n 2 python benchmarks/mpi_phases.py --workload wide --pairs 6 --scale 0.2

One trainer (``Trainer(comm=MPI.COMM_WORLD, n_threads=1)``, a ``cprop bench`` workload:
random data, relu hidden layers, SGD lr 0.01 momentum 0.9, float32) fits one epoch at a
time, the phases alternating (``CPROP_MPI_EPOCH=python`` forces phase 1; the order flips
every pair), so the two epochs of a pair run seconds apart, under the same load of a shared
machine. Rank 0 prints each phase's median time per global batch (an epoch's time is the
slowest rank's), the median over pairs of phase 1's time over phase 2's, and the load
average. ``benchmarks/mpi_scaling.py`` sets both against threads, one job per configuration.
This is a benchmark: it measures and asserts nothing.
"""
import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="deep")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--scale", type=float, default=0.5, help="epoch length relative to cprop bench's")
    args = p.parse_args()
    from mpi4py import MPI

    from cprop import bench
    comm = MPI.COMM_WORLD
    w = bench.WORKLOADS[args.workload]
    n = w.epoch_samples(args.scale)
    X, y = w.make_data(n)
    trainer = w.trainer(comm, n_threads=1)
    trainer.fit(X, y, epochs=1)          # warm-up: pages, buffers, caches
    seconds = {"compiled": [], "python": []}
    loads = []
    for r in range(args.pairs):
        for phase in ("compiled", "python") if r % 2 == 0 else ("python", "compiled"):
            os.environ["CPROP_MPI_EPOCH"] = phase
            comm.Barrier()
            loads.append(os.getloadavg()[0])
            trainer.fit(X, y, epochs=1)
            seconds[phase].append(trainer.history.time[-1])
    if comm.rank == 0:
        steps = -(-n // w.batch_size)
        ms = {phase: 1e3 * statistics.median(s) / steps for phase, s in seconds.items()}
        ratio = statistics.median(a / b for a, b in zip(seconds["python"], seconds["compiled"]))
        print(f"{args.workload} ({w.layers}, batch {w.batch_size}), {comm.Get_size()} ranks, {args.pairs} pairs: "
              f"ms per global batch, phase 2 {ms['compiled']:.3f}, phase 1 {ms['python']:.3f}; "
              f"phase 1 / phase 2, median of pairs {ratio:.2f}; load average {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
