"""What surrounds the kernels: the first fit of a process, and the drop-in against Trainer.fit.

1. **First fit.** A fresh process imports cprop and fits a small network once. The
   core binds scipy's sgemm/dgemm by dlsym from the library that
   ``scipy.linalg.cython_blas`` links to (src/_core.pyx, ``_bind_blas``); with
   ``CPROP_BLAS=cython_blas`` it imports that module instead, which imports all of
   scipy.linalg, as the core did before. Each round runs one process of each, in
   alternating order; reported: the medians of the time from before ``import cprop``
   to the end of the first fit, and of the first kernel call (the core's load).
2. **Drop-in overhead.** ``cprop.sklearn.MLPClassifier`` against a plain
   ``Trainer.fit`` with the same network and settings on digits (batch 200, float64,
   no early stopping; scikit-learn's defaults, adam and 100 hidden units, over 100
   epochs, and a short SGD fit, 64 hidden units over 30 epochs), alternating in one
   process; reported: the median of each and their ratio.

    python benchmarks/overhead.py [--rounds 9]

Benchmarks measure, tests check: nothing here asserts.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

FIRST_FIT = """
import json, time
start = time.perf_counter()
import numpy as np
import cprop
imported = time.perf_counter()
cprop.show_config(file=open("/dev/null", "w"))   # loads the core, binding its BLAS
loaded = time.perf_counter()
X = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
y = (X[:, 0] > 0).astype(np.int64)
net = cprop.Sequential([cprop.Dense(16, 32, "relu"), cprop.Dense(32, 2)], seed=0)
cprop.Trainer(net, loss="cross_entropy", batch_size=32, seed=0).fit(X, y, epochs=1)
print(json.dumps({"core_load": loaded - imported, "first_fit": time.perf_counter() - start,
                  "blas": cprop.show_config(file=open("/dev/null", "w"))["gemm"]}))
"""


def first_fit(rounds):
    results = {"dlsym": [], "cython_blas": []}
    for r in range(rounds):
        for mode in (("dlsym", "cython_blas") if r % 2 == 0 else ("cython_blas", "dlsym")):
            env = dict(os.environ, CPROP_BLAS="" if mode == "dlsym" else "cython_blas")
            out = subprocess.run([sys.executable, "-c", FIRST_FIT], env=env, capture_output=True, text=True,
                                 check=True, cwd=os.path.expanduser("~"))
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {mode: {key: statistics.median(r[key] for r in runs) for key in ("core_load", "first_fit")}
            for mode, runs in results.items()}


# (name, hidden width, solver, epochs): scikit-learn's defaults (adam, 100 hidden) over 100
# epochs, and a short SGD fit where the per-fit validation weighs most
DROPIN_CASES = [("adam-100x100", 100, "adam", 100), ("sgd-64x30", 64, "sgd", 30)]


def _dropin_case(X, y, hidden, solver, epochs, rounds):
    """(median seconds of the drop-in, of Trainer.fit, their ratio) for one case."""
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    import cprop
    import cprop.sklearn

    def dropin():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            cprop.sklearn.MLPClassifier(
                hidden_layer_sizes=(hidden,), solver=solver, learning_rate_init=0.01 if solver == "adam" else 0.1,
                momentum=0.9, nesterovs_momentum=False, batch_size=200, max_iter=epochs, tol=0,
                n_iter_no_change=10**6, random_state=0).fit(X, y)

    def trainer():
        net = cprop.Sequential([cprop.Dense(64, hidden, "relu"), cprop.Dense(hidden, 10)], seed=0,
                               dtype=np.float64)
        optimizer = cprop.Adam(lr=0.01, eps=1e-8) if solver == "adam" else cprop.SGD(lr=0.1, momentum=0.9)
        cprop.Trainer(net, loss="cross_entropy", batch_size=200, seed=0, optimizer=optimizer).fit(X, y, epochs=epochs)

    runs = {"drop-in": dropin, "Trainer.fit": trainer}
    seconds = {key: [] for key in runs}
    dropin(), trainer()          # warm-up
    for r in range(rounds):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[key]()
            seconds[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(s) for key, s in seconds.items()}
    return medians["drop-in"], medians["Trainer.fit"], medians["drop-in"] / medians["Trainer.fit"]


def dropin_overhead(rounds):
    """{case: (median seconds of the drop-in, of Trainer.fit, their ratio)}."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return {name: _dropin_case(X, y, hidden, solver, epochs, rounds)
            for name, hidden, solver, epochs in DROPIN_CASES}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(f"machine load average at start: {os.getloadavg()[0]:.2f}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    fit = first_fit(args.rounds)
    print(f"first fit of a fresh process (median of {args.rounds}):")
    for mode, m in fit.items():
        print(f"  {mode:<12} core load {m['core_load'] * 1e3:7.1f} ms   import to end of first fit "
              f"{m['first_fit'] * 1e3:7.1f} ms")
    saved = fit["cython_blas"]["first_fit"] - fit["dlsym"]["first_fit"]
    print(f"  dlsym saves {saved * 1e3:.0f} ms of the first fit "
          f"({fit['cython_blas']['first_fit'] / fit['dlsym']['first_fit']:.2f}x)")
    print(f"drop-in against Trainer.fit on digits, the same network and settings (median of {args.rounds}):")
    for name, (dropin, trainer, ratio) in dropin_overhead(args.rounds).items():
        print(f"  {name:<14} drop-in {dropin * 1e3:7.1f} ms   Trainer.fit {trainer * 1e3:7.1f} ms   "
              f"ratio {ratio:.3f}")
    print(f"machine load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
