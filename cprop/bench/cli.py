"""``cprop bench``: its options and the command that runs the workloads and prints the report."""
import importlib.util
import json
import os
import sys

from .machine import available_cores, machine_info
from .measure import GemmProbe, bench_inference, bench_training
from .report import format_report, inference_entry, plot, training_entry
from .runners import PEERS, RUNNERS, installed_peers, peer_installed
from .workloads import LEARNING_RATE, MOMENTUM, SEED, WORKLOADS


def add_arguments(parser):
    """Add ``cprop bench``'s options to an argparse parser."""
    parser.add_argument("--workload", action="append", metavar="NAME",
                        help=f"workload(s) to run, repeatable or comma-separated: "
                             f"{', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for every framework (default: all cores)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per workload, median reported (default 5; 1 with --quick)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="floating-point type of data and parameters (default float32)")
    parser.add_argument("--peers", default=None, metavar="LIST",
                        help=f"comma-separated peers among {', '.join(PEERS)}, or 'none' "
                             "(default: all installed)")
    parser.add_argument("--samples-scale", type=float, default=None, metavar="S",
                        help="multiply every workload's epoch length by S (default 1; 0.05 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine info to PATH")
    parser.add_argument("--plot", metavar="PATH", help="bar chart of samples/s (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="one round on short epochs: a smoke test")
    parser.add_argument("--estimators", action="store_true",
                        help="instead of the workloads, compare cprop.sklearn.MLPClassifier with "
                             "scikit-learn's on the same settings: fit time and held-out accuracy "
                             "(--samples-scale scales the epochs; --threads, --rounds, --quick and "
                             "--json apply)")
    parser.add_argument("--ranks", type=int, default=None, metavar="N",
                        help="under mpiexec (with at least N ranks): train each workload over MPI at "
                             "1, 2, 4, ... N ranks (--threads per rank, default 1), print samples/s and "
                             "the scaling efficiency, and an alpha-beta model of larger runs")
    parser.add_argument("--average-every", type=int, default=None, metavar="H",
                        help="with --ranks: local SGD, averaging every H steps (Trainer(average_every=H))")


def _parse_workloads(values):
    names = [n.strip() for v in (values or [",".join(WORKLOADS)]) for n in v.split(",") if n.strip()]
    for name in names:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    return list(dict.fromkeys(names))


def _parse_peers(value):
    if value is None:
        return installed_peers()
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; expected some of {', '.join(PEERS)} or 'none'")
        if not peer_installed(name):
            raise ValueError(f"peer {name!r} is not installed (pip install {RUNNERS[name].package})")
    return list(dict.fromkeys(names))


def run(args):
    """Run ``cprop bench`` with parsed arguments; print the tables; returns the exit code."""
    ranks = getattr(args, "ranks", None)
    n_threads = args.threads if args.threads is not None else (1 if ranks else available_cores())
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    scale = args.samples_scale if args.samples_scale is not None else (0.05 if args.quick else 1.0)
    if n_threads < 1:
        raise ValueError(f"--threads must be >= 1, got {n_threads}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if not scale > 0:
        raise ValueError(f"--samples-scale must be > 0, got {scale}")
    if getattr(args, "estimators", False):
        return _run_estimators(args, n_threads, rounds, scale)
    average_every = getattr(args, "average_every", None)
    if ranks is not None:
        return _run_ranks(args, ranks, average_every, n_threads, rounds, scale)
    if average_every is not None:
        raise ValueError("--average-every is for --ranks")
    workloads = [WORKLOADS[n] for n in _parse_workloads(args.workload)]
    peers = _parse_peers(args.peers)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("cprop bench: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    frameworks = ["cprop"] + peers
    dtype = args.dtype
    n_infer = 2_000 if args.quick else 10_000

    info = machine_info()
    probe = GemmProbe(n_threads, dtype)
    for _ in range(2 if args.quick else 5):
        probe()
    report = {"machine": info,
              "settings": {"threads": n_threads, "rounds": rounds, "dtype": dtype, "samples_scale": scale,
                           "frameworks": frameworks, "quick": bool(args.quick),
                           "lr": LEARNING_RATE, "momentum": MOMENTUM},
              "training": [], "inference": []}
    measured = []
    for workload in workloads:
        if sys.stderr.isatty():
            print(f"cprop bench: {workload.name} ...", file=sys.stderr, flush=True)
        n_samples, results, runners = bench_training(workload, frameworks, n_threads, rounds, dtype, scale,
                                                     probe=probe)
        X_infer, _ = workload.make_data(n_infer, dtype, SEED + 1)
        inference = bench_inference(runners, X_infer, rounds if args.quick else max(rounds, 5))
        measured.append((workload, n_samples, results, inference))
    peak = probe.gflops
    report["gemm"] = {"size": probe.size, "seconds": probe.seconds, "gflops": peak}
    for workload, n_samples, results, inference in measured:
        report["training"].append(training_entry(workload, n_samples, results, peak))
        report["inference"].append(inference_entry(workload, n_infer, inference, peak))

    print(format_report(report))
    try:
        report["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    except OSError:
        pass
    _write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_estimators(args, n_threads, rounds, scale):
    """``cprop bench --estimators``: see :mod:`cprop.bench.estimators`."""
    for option, given in (("--plot", args.plot), ("--workload", args.workload), ("--peers", args.peers),
                          ("--dtype float64", args.dtype != "float32")):
        if given:
            raise ValueError(f"{option} is for the workloads; --estimators compares float32 "
                             "MLPClassifier fits of its own cases")
    if importlib.util.find_spec("sklearn") is None:
        raise ValueError("--estimators needs scikit-learn (pip install scikit-learn)")
    from .estimators import run_estimators
    report = run_estimators(n_threads, rounds, scale)
    _write_json(report, args.json)
    return 0


def _run_ranks(args, n_ranks, average_every, n_threads, rounds, scale):
    """``cprop bench --ranks N``: see :mod:`cprop.bench.ranks`."""
    if args.peers not in (None, "none") or args.plot or args.estimators:
        raise ValueError("--ranks measures cprop alone over MPI: drop --peers, --plot and --estimators")
    if average_every is not None and average_every < 1:
        raise ValueError(f"--average-every must be >= 1, got {average_every}")
    from .ranks import run_ranks
    workloads = [WORKLOADS[n] for n in _parse_workloads(args.workload)]
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        # said now, not after minutes of measurement
        raise ValueError(f"--json {args.json}: its directory does not exist")
    report = run_ranks(workloads, n_ranks, n_threads, rounds, args.dtype, scale, average_every)
    if report is not None:      # MPI rank 0
        report["machine"] = machine_info()
        _write_json(report, args.json)
    return 0


def _write_json(report, path):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {path}")
