"""Training over MPI against threads: 2 ranks × 1 thread against 1 process × 2 threads.

    python benchmarks/mpi_scaling.py                      # mnist, deep, wide; 5 rounds
    python benchmarks/mpi_scaling.py --workload wide --rounds 3 --epochs 2

Each round launches, in an order rotated from round to round, one job per
configuration: ``mpiexec -n 2`` with ``Trainer(comm=MPI.COMM_WORLD, n_threads=1)``,
its epoch compiled with the allreduce inside (phase 2) and, as an A/B, the same job with
``CPROP_MPI_EPOCH=python`` (phase 1: the allreduce from Python between compiled calls);
one process with ``n_threads=2`` (the fused compiled epoch); one with
``n_threads=1``. Every job trains the workload of ``cprop bench`` (random data,
relu hidden layers, SGD lr 0.01 momentum 0.9, float32) in one fit of 1 + E
epochs and takes the median of the last E epochs' wall times, each from the end
of one epoch's callbacks to the next's (the MPI job: on rank 0, which waits
for the others at every batch), so that the per-epoch agreement of the ranks
is counted too. The report is the median over rounds of the ratios of each
round (jobs of one round run back to back, so a slow spell of a shared machine
falls on them alike), with each configuration's median samples/s and the load
average seen when the jobs started. The MPI job also times, per batch of each rank's share, the gradient
call, one allreduce of the gradient buffer and one optimizer step, which
account for where the time goes. This is a benchmark: it measures and asserts
nothing.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = ("2 ranks x 1 thread", "2 ranks x 1 thread, phase 1", "1 process x 2 threads",
           "1 process x 1 thread")
MPI_CONFIGS = CONFIGS[:2]


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args):
    """One job: train, time, print one JSON line (rank 0)."""
    from cprop import bench
    comm = None
    if args.mpi:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    w = bench.WORKLOADS[args.workload]
    n = w.epoch_samples(args.scale)
    X, y = w.make_data(n)
    trainer = w.trainer(comm, n_threads=args.threads)
    ends = []
    # the first epoch warms up pages, pools and caches; it ends the first interval
    trainer.fit(X, y, epochs=1 + args.epochs, callbacks=[lambda t, e, logs: ends.append(time.perf_counter())])
    epoch_seconds = statistics.median(np.diff(ends))
    result = {"samples_per_second": n / epoch_seconds}
    if comm is not None:
        result.update(_parts(trainer, comm, X, y, w, args))
    if comm is None or comm.rank == 0:
        print(json.dumps(result), flush=True)


def _parts(trainer, comm, X, y, w, args):
    """The per-batch cost of the MPI job's three parts, each timed alone (the slowest rank's)."""
    from mpi4py import MPI

    from cprop import losses
    net = trainer.net
    share = w.batch_size // comm.Get_size()
    Xs, ys = X[:share], y[:share]
    T, labels = losses.prepare_targets(w.loss, ys, share, net.n_outputs, net.dtype)
    code = losses.get(w.loss).code
    gradient = _median_seconds(lambda: net._batch_gradient(Xs, T, labels, code, 0.5, 0, args.threads), 30)
    pack = np.zeros(net.n_params + 3, dtype=net.dtype)

    def allreduce():
        comm.Allreduce(MPI.IN_PLACE, pack, op=MPI.SUM)
    comm.Barrier()
    reduce = _median_seconds(allreduce, 30)
    optimizer = trainer.optimizer
    step = _median_seconds(lambda: optimizer.step(net, n_threads=args.threads), 30)
    per_batch = comm.allgather((gradient, reduce, step))
    return {"batch_ms": {"gradient": 1e3 * max(p[0] for p in per_batch),
                         "allreduce": 1e3 * max(p[1] for p in per_batch),
                         "step": 1e3 * max(p[2] for p in per_batch)},
            "gradient_bytes": pack.nbytes}


def launch(config, args, mpiexec):
    """One job of `config`; its JSON result."""
    script = [sys.executable, os.path.abspath(__file__), "--worker", "--workload", args.workload,
              "--epochs", str(args.epochs), "--scale", str(args.scale)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if config in MPI_CONFIGS:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   CPROP_MPI_EPOCH="python" if config == CONFIGS[1] else "compiled")
        cmd = [mpiexec, *args.mpiexec_args.split(), "-x", "CPROP_MPI_EPOCH", "-n", "2", *script, "--mpi",
               "--threads", "1"]
    else:
        cmd = [*script, "--threads", "2" if config == CONFIGS[2] else "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def driver(args):
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("mpiexec not found: pip install \"cprop[mpi]\"")
    import platform
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# {model}, {os.cpu_count()} cores, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
          f"mpiexec {' '.join(args.mpiexec_args.split())}, {args.rounds} rounds", flush=True)
    from cprop import bench
    rows = []
    for name in args.workload.split(","):
        args_w = argparse.Namespace(**{**vars(args), "workload": name})
        results = {c: [] for c in CONFIGS}
        loads = []
        for r in range(args.rounds):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            for config in order:
                time.sleep(0.5)        # let the previous job's threads stop spinning
                loads.append(os.getloadavg()[0])
                results[config].append(launch(config, args_w, mpiexec))
        sps = {c: statistics.median(x["samples_per_second"] for x in results[c]) for c in CONFIGS}
        # each MPI job against the 1 x 2 and 1 x 1 jobs of its round
        ratios = [[statistics.median(a["samples_per_second"] / b["samples_per_second"]
                                     for a, b in zip(results[m], results[c])) for c in CONFIGS[2:]]
                  for m in MPI_CONFIGS]
        parts = {k: statistics.median(x["batch_ms"][k] for x in results[CONFIGS[0]])
                 for k in ("gradient", "allreduce", "step")}
        w = bench.WORKLOADS[name]
        rows.append((name, w, sps, ratios, parts, results[CONFIGS[0]][0]["gradient_bytes"], loads))
        # a global batch's wall time in each configuration, beside the parts timed alone
        per_batch = {c: 1e3 * w.batch_size / sps[c] for c in CONFIGS}
        print(json.dumps({"workload": name, "samples_per_second": sps, "batch_ms": parts,
                          "global_batch_ms": per_batch, "load": loads,
                          "rounds": {c: [round(x["samples_per_second"]) for x in results[c]] for c in CONFIGS}}),
              flush=True)
    print()
    print("| workload | layers | batch | 2 ranks × 1 thread / 1 × 2 threads: phase 2, phase 1 "
          "| 2 ranks × 1 thread / 1 × 1 thread: phase 2, phase 1 "
          "| samples/s: 2 × 1 (phase 2, phase 1), 1 × 2, 1 × 1 | per batch and rank, phase 1's parts "
          "alone, ms: gradient of the share, allreduce (MB), step | load average |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w, sps, ratios, parts, nbytes, loads in rows:
        print(f"| {name} | {w.layers} | {w.batch_size} | {ratios[0][0]:.0%}, {ratios[1][0]:.0%} "
              f"| {ratios[0][1]:.2f}x, {ratios[1][1]:.2f}x "
              f"| {', '.join(f'{sps[c]:,.0f}' for c in CONFIGS)} | {parts['gradient']:.2f}, "
              f"{parts['allreduce']:.2f} ({nbytes / 1e6:.2f}), {parts['step']:.2f} "
              f"| {min(loads):.1f}-{max(loads):.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="mnist,deep,wide")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=4, help="epochs timed per job (after one warm-up)")
    p.add_argument("--scale", type=float, default=1.0, help="epoch length relative to cprop bench's")
    p.add_argument("--mpiexec-args", default="--bind-to core", help="extra mpiexec options")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
