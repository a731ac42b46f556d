"""Sparse input: cprop.sklearn.MLPClassifier against scikit-learn's MLPClassifier on a CSR matrix.

The data is a synthetic bag of words (cprop.bench.estimators.sparse_classification):
20,000 × 50,000 CSR at 0.1% density (about 50 draws a row, columns as frequent as
words, 1/(k + 10)), float32, 5 classes from a sparse linear model, split 80/20
with a fixed seed. Both estimators get the
same parameters (hidden 100, relu, scikit-learn's defaults otherwise) and run exactly
``--epochs`` epochs (``tol=0``); they fit in alternation, ``--rounds`` times each,
after a one-epoch warm-up that is not timed. The report gives the median fit time
of each, the ratio sklearn/cprop, and the held-out accuracy of each beside it.

Neither densifies the data: scikit-learn multiplies the CSR batch with
``safe_sparse_dot``, cprop's first layer reads the batch's CSR rows in place
(src/_sparse.pxd). Both update every weight of the 50,000 × 100 first layer each
batch (Adam and L2 touch the rows of features absent from the batch too), which
dominates either fit.

    python benchmarks/sparse.py                          # adam and sgd, 3 rounds, 5 epochs
    python benchmarks/sparse.py --solvers adam --rounds 5 --json sparse.json

Benchmarks measure, tests check: nothing here asserts.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # the checkout's cprop, built in place


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", default="adam,sgd", help="comma-separated: adam, sgd")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="cprop's threads and the BLAS limit")
    parser.add_argument("--json", metavar="PATH", help="write the figures and the machine info to PATH")
    args = parser.parse_args(argv)

    from cprop.bench.estimators import EstimatorCase, bench_estimator, format_estimators
    from cprop.bench.machine import machine_info

    load_before = os.getloadavg()
    entries = []
    for solver in [s.strip() for s in args.solvers.split(",") if s.strip()]:
        case = EstimatorCase(f"sparse-{solver}", "sparse", (("hidden_layer_sizes", (100,)), ("solver", solver),
                                                            ("max_iter", args.epochs)))
        entries.append(bench_estimator(case, args.threads, args.rounds))
    load_after = os.getloadavg()
    info = machine_info()
    info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE", "(unset)")
    info["load_average_before_after"] = [load_before, load_after]
    print(f"cprop {info['cprop']} ({info['cprop_simd']} build), scikit-learn {info['scikit-learn']}: "
          f"{info['cpu']}, {args.threads} threads, {args.rounds} rounds, "
          f"OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}, load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("data: 20,000 × 50,000 CSR, 0.1% density drawn, float32, 5 classes; 16,000 rows train, "
          "4,000 held out")
    print(format_estimators(entries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "settings": vars(args), "estimators": entries}, f, indent=1)


if __name__ == "__main__":
    main()
