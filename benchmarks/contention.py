"""Fit times on a quiet and on a loaded machine: does a cprop fit degrade gracefully?

On a machine whose cores are taken by other processes, threads that meet at a
barrier every minibatch can collapse: a thread that arrives first waits for a
peer the scheduler is not running. This script measures it: every
configuration fits the same scikit-learn-style classifier in a fresh
subprocess, in rounds that alternate the configurations and the background
load (``--load 0,2``: no load, then two busy-looping processes, as many as
this machine's cores), and reports median fit times and their ratios.

Configurations (``--configs``, comma-separated):

- ``cprop:N``        cprop.sklearn.MLPClassifier with ``cprop.set_num_threads(N)``
                     (the default thread count: the fit may fall back to one thread)
- ``fixed:N``        cprop.sklearn.MLPClassifier(n_threads=N): exactly N threads
- ``baseline:N``     the same with the cprop found at ``--baseline PATH`` (a
                     built checkout of another commit), for A/B comparisons
- ``sklearn``        sklearn.neural_network.MLPClassifier, default threads
- a suffix ``:KEY=VALUE`` (repeatable) sets an environment variable for that
  configuration's process only

Cases (``--cases``): ``digits`` (the bundled 1,797 × 64 digits, hidden 100,
adam, batch 200, 100 epochs: the issue's drop-in fit) and ``mnist`` (20,000 ×
784 random Gaussian inputs with random labels of 10 classes, hidden 128,
adam, batch 200, 3 epochs). Every fit runs exactly its epochs (``tol=0``), after
a one-epoch warm-up fit in the same process that is not timed.

    python benchmarks/contention.py                       # 5 rounds, loads 0 and 2
    python benchmarks/contention.py --baseline /tmp/base --configs cprop:2,baseline:2,cprop:1
    python benchmarks/contention.py --json out.json

Benchmarks measure, tests check: nothing here asserts.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES = {
    "digits": {"hidden_layer_sizes": (100,), "max_iter": 100},
    "mnist": {"hidden_layer_sizes": (128,), "max_iter": 3},
}
BUSY_LOOP = "while True: pass"


def load_case(name):
    """(X, y) of a case."""
    import numpy as np

    if name == "digits":
        from cprop.datasets import load_digits
        return load_digits()
    rng = np.random.default_rng(0)
    return rng.standard_normal((20_000, 784), dtype=np.float32), rng.integers(0, 10, 20_000)


def child(case, impl, threads):
    """One configuration's process: a warm-up fit, then one timed fit; prints JSON."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    X, y = load_case(case)
    params = dict(CASES[case], solver="adam", batch_size=200, tol=0.0,
                  n_iter_no_change=CASES[case]["max_iter"], random_state=0)
    epoch_threads = []
    if impl == "sklearn":
        from sklearn.neural_network import MLPClassifier
    else:
        import cprop
        from cprop._lazy import core
        from cprop.sklearn import MLPClassifier
        if impl == "fixed":
            params["n_threads"] = threads
        else:
            cprop.set_num_threads(threads)
        real_epoch = core.train_epoch

        def train_epoch(*args, **kwargs):   # the thread count of every epoch: did the fit fall back?
            settings = args[4]                 # train_epoch(table, hyper, row_width, n_bstats, settings, ...)
            epoch_threads.append(settings["n_threads"])
            return real_epoch(*args, **kwargs)

        core.train_epoch = train_epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        MLPClassifier(**dict(params, max_iter=1, n_iter_no_change=1)).fit(X, y)
        del epoch_threads[:]
        start = time.perf_counter()
        model = MLPClassifier(**params).fit(X, y)
        seconds = time.perf_counter() - start
    one = sum(t == 1 for t in epoch_threads) / len(epoch_threads) if epoch_threads else None
    print(json.dumps({"seconds": seconds, "n_iter": int(model.n_iter_), "one_thread_epochs": one}))


def parse_config(spec, baseline):
    """'cprop:2:KEY=VALUE' -> (label, impl, threads, python path, extra environment)."""
    parts = spec.split(":")
    impl, rest = parts[0], parts[1:]
    threads = None
    if impl in ("cprop", "baseline", "fixed"):
        if not rest or not rest[0].isdigit():
            raise SystemExit(f"configuration {spec!r}: expected {impl}:N, N threads")
        threads, rest = int(rest[0]), rest[1:]
    elif impl != "sklearn":
        raise SystemExit(f"configuration {spec!r}: expected cprop:N, fixed:N, baseline:N or sklearn")
    if impl == "baseline" and not baseline:
        raise SystemExit("baseline:N needs --baseline PATH")
    env = dict(kv.split("=", 1) for kv in rest)
    path = baseline if impl == "baseline" else ROOT
    return spec, ("cprop" if impl == "baseline" else impl), threads, path, env


def run_child(case, config, timeout):
    """One configuration's timed fit: {"seconds", "n_iter", "one_thread_epochs"} (None if it
    failed or timed out)."""
    label, impl, threads, path, extra = config
    env = dict(os.environ, PYTHONPATH=path, **extra)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, impl, str(threads or 0)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=path)
    except subprocess.TimeoutExpired:
        print(f"  {label} on {case}: timed out after {timeout} s", file=sys.stderr)
        return None
    if out.returncode != 0:
        print(f"  {label} on {case} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_load(n):
    """n busy-looping processes."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]


def stop_load(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def rotated(items, r):
    r %= len(items)
    return items[r:] + items[:r]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="cprop:2,cprop:1,sklearn")
    parser.add_argument("--cases", default="digits,mnist")
    parser.add_argument("--load", default="0,2", help="background busy processes, comma-separated levels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", help="path of a built cprop checkout for baseline:N")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", help="write every time to this file")
    args = parser.parse_args(argv)
    if args.child:
        case, impl, threads = args.child
        return child(case, impl, int(threads))

    configs = [parse_config(s, args.baseline) for s in args.configs.split(",")]
    cases = args.cases.split(",")
    loads = [int(n) for n in args.load.split(",")]
    times = {(load, case, c[0]): [] for load in loads for case in cases for c in configs}
    for r in range(args.rounds):
        for load in rotated(loads, r):
            procs = start_load(load)
            try:
                time.sleep(0.5)
                for case in cases:
                    for config in rotated(configs, r):
                        result = run_child(case, config, args.timeout)
                        if result is not None:
                            times[(load, case, config[0])].append(result)
            finally:
                stop_load(procs)
        print(f"round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.1f})", file=sys.stderr)

    report(times, loads, cases, configs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args),
                       "runs": [{"load": k[0], "case": k[1], "config": k[2], "results": v}
                                for k, v in times.items()]}, f, indent=1)


def machine():
    """CPU model, cores, OPENBLAS_CORETYPE."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def report(times, loads, cases, configs):
    """Median seconds per (load, case, configuration); each against the first one-thread
    cprop configuration at the same load; and the share of epochs that ran on one thread."""
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}")
    reference = next((c[0] for c in configs if c[1] != "sklearn" and c[2] == 1), None)
    print(f"{'load':>4}  {'case':7} {'config':24} {'median s':>9} {'min':>7} {'max':>7} {'n':>2}"
          + (f"  {'/ ' + reference:>11}" if reference else "") + "  1-thread epochs")
    for load in loads:
        for case in cases:
            ref = [r["seconds"] for r in times[(load, case, reference)]] if reference else []
            for c in configs:
                runs = times[(load, case, c[0])]
                if not runs:
                    print(f"{load:>4}  {case:7} {c[0]:24} {'failed':>9}")
                    continue
                t = [r["seconds"] for r in runs]
                med = statistics.median(t)
                ratio = f"  {med / statistics.median(ref):>10.2f}x" if ref else ""
                ones = [r["one_thread_epochs"] for r in runs if r.get("one_thread_epochs") is not None]
                share = f"  {100 * statistics.mean(ones):>5.0f}%" if ones and c[2] != 1 else ""
                print(f"{load:>4}  {case:7} {c[0]:24} {med:>9.3f} {min(t):>7.3f} {max(t):>7.3f} "
                      f"{len(t):>2}{ratio}{share}")


if __name__ == "__main__":
    sys.exit(main())
