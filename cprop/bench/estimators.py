"""``cprop bench --estimators``: the scikit-learn drop-in against scikit-learn's own MLP.

Both estimators get the same parameters and the same data split; each fit
runs exactly ``max_iter`` epochs (``tol=0`` and ``n_iter_no_change=max_iter``,
so neither stops early and both do the same work), otherwise scikit-learn's
defaults: adam or sgd at their default learning rates, ``batch_size="auto"``
(min(200, n)), ``alpha=1e-4``, relu. The two fit in alternation, after
:func:`cprop.bench.measure.settle`, for several rounds; the report gives the median
fit time, its ratio and the held-out accuracy of each, so a speed-up is only
claimed with the accuracy beside it.
"""
import statistics
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .machine import machine_info
from .measure import rotated, settle
from .report import format_header, format_row
from .workloads import SEED


@dataclass(frozen=True)
class EstimatorCase:
    """One comparison: a data set and the MLPClassifier parameters both estimators get."""

    name: str
    data: str           # "digits" (bundled), "synthetic" (784 features, 10 classes) or "sparse"
                        # (CSR, 50,000 features at 0.1% density, 5 classes)
    params: tuple       # (name, value) pairs, on top of scikit-learn's defaults

    def estimator_params(self, epochs_scale=1.0):
        """The parameters, with max_iter scaled and early stopping switched off."""
        params = dict(self.params)
        params["max_iter"] = max(1, int(round(params["max_iter"] * epochs_scale)))
        params.update(tol=0.0, n_iter_no_change=params["max_iter"], random_state=SEED)
        return params


ESTIMATOR_CASES = {c.name: c for c in [
    EstimatorCase("digits-adam", "digits", (("hidden_layer_sizes", (100,)), ("solver", "adam"),
                                             ("max_iter", 100))),
    EstimatorCase("digits-sgd", "digits", (("hidden_layer_sizes", (100,)), ("solver", "sgd"),
                                            ("max_iter", 100))),
    EstimatorCase("synthetic-adam", "synthetic", (("hidden_layer_sizes", (128,)), ("solver", "adam"),
                                                   ("max_iter", 10))),
    EstimatorCase("digits-lbfgs", "digits", (("hidden_layer_sizes", (100,)), ("solver", "lbfgs"),
                                              ("max_iter", 100))),
    EstimatorCase("sparse-adam", "sparse", (("hidden_layer_sizes", (100,)), ("solver", "adam"),
                                            ("max_iter", 3))),
]}


def sparse_classification(n_samples=20_000, n_features=50_000, density=0.001, n_classes=5, seed=SEED):
    """(X, y): a CSR matrix like a bag of words, float32, and labels a sparse linear model
    gives it.

    Each row holds Binomial(n_features, density) nonzeros (duplicates summed), values
    uniform in [0.1, 1), at columns drawn as words are, column k with probability
    ∝ 1/(k + 10), so that some features recur often enough to be learnt; the labels
    are argmax(X·B + noise) for a Gaussian B (n_features × n_classes) and Gaussian
    noise of 0.3.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    indptr = np.r_[0, np.cumsum(rng.binomial(n_features, density, n_samples))]
    frequency = 1.0 / (np.arange(n_features) + 10.0)
    indices = rng.choice(n_features, indptr[-1], p=frequency / frequency.sum())
    data = rng.uniform(0.1, 1.0, indptr[-1]).astype(np.float32)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_samples, n_features))
    X.sum_duplicates()
    B = rng.standard_normal((n_features, n_classes)).astype(np.float32)
    y = (X @ B + 0.3 * rng.standard_normal((n_samples, n_classes))).argmax(axis=1)
    return X, y


def load_case_data(data):
    """(X_train, X_test, y_train, y_test), float32, an 80/20 split fixed by SEED.

    "digits": the bundled UCI digits (1,797 × 64). "synthetic": an MNIST-sized
    problem from scikit-learn's make_classification (20,000 × 784, 10 classes,
    64 informative features, class_sep 3), standardised. "sparse": 20,000 × 50,000
    CSR at 0.1% density from :func:`sparse_classification`.
    """
    from sklearn.model_selection import train_test_split

    if data == "digits":
        from ..datasets import load_digits
        X, y = load_digits()
    elif data == "sparse":
        X, y = sparse_classification()
    else:
        from sklearn.datasets import make_classification
        X, y = make_classification(n_samples=20_000, n_features=784,
                                   n_informative=64, n_redundant=0, n_classes=10, class_sep=3.0,
                                   random_state=SEED)
        X = ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)
    return train_test_split(X, y, test_size=0.2, random_state=SEED, stratify=y)


def _fit_and_score(make, params, data):
    from sklearn.exceptions import ConvergenceWarning

    X_train, X_test, y_train, y_test = data
    model = make(**params)
    with warnings.catch_warnings():
        # max_iter is reached by design: no early stopping in a speed test
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        model.fit(X_train, y_train)
        seconds = time.perf_counter() - start
    return seconds, float(model.score(X_test, y_test)), int(model.n_iter_)


def bench_estimator(case, n_threads, rounds, scale=1.0):
    """Fit cprop.sklearn's and scikit-learn's MLPClassifier on `case`, alternating, `rounds` times
    each, for the case's epochs times `scale`.

    Returns the case's report: its data size and parameters, ``estimators``
    (``{"cprop": {...}, "sklearn": {...}}``, each with per-round ``seconds``,
    ``accuracy`` and ``n_iter``) and ``sklearn_over_cprop``, the ratio of the
    median fit times.
    """
    from sklearn.neural_network import MLPClassifier as SklearnMLP
    from threadpoolctl import threadpool_limits

    from .. import _threads
    from ..sklearn import MLPClassifier as CpropMLP

    data = load_case_data(case.data)
    params = case.estimator_params(scale)
    makers = {"cprop": CpropMLP, "sklearn": SklearnMLP}
    results = {name: {"seconds": [], "accuracy": [], "n_iter": []} for name in makers}
    with _threads.num_threads(n_threads), threadpool_limits(limits=n_threads, user_api="blas"):
        for make in makers.values():   # one-off costs (cprop's core, caches) outside the timing
            _fit_and_score(make, dict(params, max_iter=1, n_iter_no_change=1), data)
        for r in range(rounds):
            for name in rotated(list(makers), r):
                settle()
                seconds, accuracy, n_iter = _fit_and_score(makers[name], params, data)
                results[name]["seconds"].append(seconds)
                results[name]["accuracy"].append(accuracy)
                results[name]["n_iter"].append(n_iter)
    return {"case": case.name, "data": case.data, "n_train": data[0].shape[0], "n_features": data[0].shape[1],
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
            "estimators": results,
            "sklearn_over_cprop": (statistics.median(results["sklearn"]["seconds"])
                                   / statistics.median(results["cprop"]["seconds"]))}


COLUMNS = [("case", 14, "l"), ("train", 7, "r"), ("epochs", 6, "r"), ("estimator", 9, "l"),
           ("fit s", 7, "r"), ("spread", 6, "r"), ("speed-up", 8, "r"), ("accuracy", 8, "r")]


def format_estimators(entries):
    """The printed table of :func:`bench_estimator` results."""
    lines = ["scikit-learn drop-in: cprop.sklearn.MLPClassifier against sklearn.neural_network.MLPClassifier,",
             "same parameters and split, max_iter epochs each; median fit time over rounds; accuracy on the "
             "held-out 20%"]
    lines += format_header(COLUMNS)
    for entry in entries:
        for i, (name, res) in enumerate(entry["estimators"].items()):
            median = statistics.median(res["seconds"])
            spread = (max(res["seconds"]) - min(res["seconds"])) / median if len(res["seconds"]) > 1 else None
            lead = [entry["case"], f"{entry['n_train']:,}", entry["params"]["max_iter"]] if i == 0 else [""] * 3
            lines.append(format_row(COLUMNS, lead + [
                name, f"{median:.3f}", "-" if spread is None else f"{100 * spread:.0f}%",
                f"{entry['sklearn_over_cprop']:.2f}x" if name == "cprop" else "",
                f"{statistics.median(res['accuracy']):.4f}"]))
    return "\n".join(lines)


def run_estimators(n_threads, rounds, scale=1.0, cases=None):
    """``cprop bench --estimators``: every case (or `cases`) at `n_threads`, printed; returns the report."""
    entries = []
    for case in (cases or ESTIMATOR_CASES.values()):
        entries.append(bench_estimator(case, n_threads, rounds, scale))
    report = {"machine": machine_info(),
              "settings": {"threads": n_threads, "rounds": rounds, "samples_scale": scale},
              "estimators": entries}
    info = report["machine"]
    print(f"cprop {info['cprop']} ({info['cprop_simd']} build), scikit-learn {info['scikit-learn']}: "
          f"{info['cpu']}, {n_threads} thread{'s' * (n_threads != 1)}, {rounds} round{'s' * (rounds != 1)}")
    print(format_estimators(entries))
    return report
