"""cprop.sklearn: scikit-learn's estimator checks, tools (Pipeline, GridSearchCV, pickle,
clone), accuracy next to sklearn's own MLP, and step-for-step agreement with it."""
import pickle
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

pytest.importorskip("sklearn", minversion="1.6")

from sklearn import neural_network as sk  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import cprop  # noqa: E402
from cprop.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: on a shared 2-core machine, OpenMP threads that wait on a
    busy core cost far more than they save. Results do not depend on the thread count
    (test_threads_do_not_change_the_fit)."""
    before = cprop._threads._num_threads
    cprop.set_num_threads(1)
    yield
    cprop.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    X, y = cprop.datasets.load_digits()
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def digits64():
    """300 digits in float64, for the step-for-step comparisons."""
    X, y = cprop.datasets.load_digits()
    return X[:300].astype(np.float64), y[:300]


def smooth_target(X):
    return np.sin(2 * X[:, 0]) + X[:, 1] ** 2 - X[:, 0] * X[:, 2]


# -- scikit-learn's own estimator checks ---------------------------------------------

@parametrize_with_checks([
    MLPClassifier(hidden_layer_sizes=(10,), max_iter=100, random_state=0),
    MLPRegressor(hidden_layer_sizes=(10,), max_iter=100, learning_rate_init=0.01, random_state=0),
    MLPClassifier(hidden_layer_sizes=(10,), solver="lbfgs", max_iter=100, random_state=0),
    MLPRegressor(hidden_layer_sizes=(10,), solver="lbfgs", max_iter=100, random_state=0),
])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# -- working with scikit-learn's tools -------------------------------------------------

def test_pipeline_and_grid_search(digits):
    X_train, X_test, y_train, y_test = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier(learning_rate_init=0.01, max_iter=30,
                                                       random_state=0))
    grid = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(8,), (32,)],
                               "mlpclassifier__alpha": [1e-4, 1e-2]}, cv=3)

    grid.fit(X_train[:600], y_train[:600])

    assert grid.best_params_["mlpclassifier__hidden_layer_sizes"] == (32,)
    assert grid.score(X_test, y_test) > 0.9
    assert len(grid.cv_results_["mean_test_score"]) == 4


def test_pickle_round_trip_predicts_identically_and_keeps_training(digits):
    X_train, X_test, y_train, _ = digits
    clf = MLPClassifier((16,), max_iter=5, random_state=0).fit(X_train, y_train)

    loaded = pickle.loads(pickle.dumps(clf))

    assert_array_equal(loaded.predict_proba(X_test), clf.predict_proba(X_test))
    assert_array_equal(loaded.predict(X_test), clf.predict(X_test))
    # coefs_ are again views of the loaded network, and training carries on alike
    assert loaded.coefs_[0].base is not None
    clf.partial_fit(X_train, y_train)
    loaded.partial_fit(X_train, y_train)
    for a, b in zip(loaded.coefs_ + loaded.intercepts_, clf.coefs_ + clf.intercepts_):
        assert_array_equal(a, b)


def test_clone_gives_an_unfitted_copy_with_the_same_parameters(digits):
    X_train, _, y_train, _ = digits
    clf = MLPClassifier((16,), solver="sgd", alpha=1e-3, max_iter=3, random_state=0).fit(X_train, y_train)

    copy = clone(clf)

    assert copy.get_params() == clf.get_params()
    with pytest.raises(NotFittedError):
        copy.predict(X_train)
    copy.fit(X_train, y_train)
    assert_array_equal(copy.predict_proba(X_train), clf.predict_proba(X_train))


# -- learning: next to scikit-learn's MLP ------------------------------------------------

@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_digits_accuracy_comparable_to_sklearn(digits, solver):
    X_train, X_test, y_train, y_test = digits
    params = dict(hidden_layer_sizes=(64,), solver=solver, max_iter=60, random_state=0,
                  learning_rate_init=0.01 if solver == "sgd" else 0.001)

    ours = MLPClassifier(**params).fit(X_train, y_train).score(X_test, y_test)
    theirs = sk.MLPClassifier(**params).fit(X_train, y_train).score(X_test, y_test)

    assert ours >= 0.95 and theirs >= 0.95
    assert abs(ours - theirs) <= 0.02


def test_regression_of_a_smooth_target_reaches_high_r2():
    X = np.random.default_rng(0).uniform(-1, 1, (600, 3))
    X_train, X_test, y_train, y_test = train_test_split(X, smooth_target(X), random_state=0)

    reg = MLPRegressor(hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=300, random_state=0)
    reg.fit(X_train, y_train)

    assert reg.score(X_test, y_test) > 0.95


# -- the conventions, step for step against scikit-learn ----------------------------------

def exact_params(**overrides):
    """SGD without shuffling: cprop and sklearn then take the same steps from the same
    initial weights (drawn the same way from random_state)."""
    params = dict(hidden_layer_sizes=(16, 8), activation="tanh", solver="sgd", shuffle=False,
                  learning_rate_init=0.05, momentum=0.9, alpha=1e-4, batch_size=64, max_iter=5,
                  tol=0.0, random_state=0)
    params.update(overrides)
    return params


def targets(kind, X, y):
    return {"multiclass": y, "binary": y % 2,
            "multilabel": np.c_[y % 2, y > 4, y == 3].astype(int),
            "multioutput": np.c_[np.sin(3 * X[:, 10]) + X[:, 20], X[:, 30] ** 2],
            "regression": np.sin(3 * X[:, 10]) + X[:, 20]}[kind]


def fit_both(X, t, regression, **params):
    ours, theirs = (MLPRegressor, sk.MLPRegressor) if regression else (MLPClassifier, sk.MLPClassifier)
    return ours(**params).fit(X, t), theirs(**params).fit(X, t)


def assert_same_fit(ours, theirs, loss_rtol=1e-10):
    assert ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    assert ours.out_activation_ == theirs.out_activation_
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert a.dtype == b.dtype
        assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=loss_rtol)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=loss_rtol)


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "multioutput", "regression"])
def test_sgd_matches_sklearn_step_for_step(digits64, kind, nesterov):
    X, y = digits64
    ours, theirs = fit_both(X, targets(kind, X, y), kind in ("multioutput", "regression"),
                            **exact_params(nesterovs_momentum=nesterov))

    # weights to rounding; loss_curve_ to the interpolated L2 term (see cprop.sklearn)
    assert_same_fit(ours, theirs, loss_rtol=1e-5)


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "multioutput"])
def test_full_batch_loss_curve_is_exact(digits64, kind):
    X, y = digits64
    ours, theirs = fit_both(X, targets(kind, X, y), kind == "multioutput",
                            **exact_params(batch_size=len(X), alpha=1e-2))

    assert_same_fit(ours, theirs)


@pytest.mark.parametrize("schedule", [
    dict(learning_rate="invscaling", learning_rate_init=0.5, power_t=0.5),
    dict(learning_rate="adaptive", tol=10.0, n_iter_no_change=1, max_iter=12),
    dict(learning_rate="adaptive", tol=10.0, n_iter_no_change=1, max_iter=40, learning_rate_init=1e-5),
    dict(learning_rate="constant", tol=1e-2, max_iter=200),
    dict(momentum=0.0, nesterovs_momentum=False),
], ids=["invscaling", "adaptive", "adaptive-stops", "tol-stops", "no-momentum"])
def test_schedules_and_stopping_match_sklearn(digits64, schedule):
    X, y = digits64
    ours, theirs = fit_both(X, y, False, **exact_params(batch_size=len(X), **schedule))

    assert_same_fit(ours, theirs)
    assert ours._optimizer.learning_rate == pytest.approx(theirs._optimizer.learning_rate, rel=1e-12)


def test_early_stopping_matches_sklearn_and_restores_the_best_weights(digits64):
    X, y = digits64
    ours, theirs = fit_both(X, y, False, **exact_params(early_stopping=True, n_iter_no_change=3,
                                                        max_iter=40, batch_size=50))

    assert_same_fit(ours, theirs, loss_rtol=1e-5)
    assert_allclose(ours.validation_scores_, theirs.validation_scores_)
    assert ours.best_validation_score_ == theirs.best_validation_score_
    assert ours.best_loss_ is None and theirs.best_loss_ is None


def test_weights_copied_from_sklearn_train_on_alike(digits64):
    """Assigned coefs_/intercepts_ are adopted: continue sklearn's fit in cprop."""
    X, y = digits64
    theirs = sk.MLPClassifier(**exact_params(random_state=1, max_iter=2, warm_start=True)).fit(X, y)
    ours = MLPClassifier(**exact_params(random_state=2, max_iter=1, warm_start=True)).fit(X, y)

    ours.coefs_ = [W.copy() for W in theirs.coefs_]
    ours.intercepts_ = [b.copy() for b in theirs.intercepts_]
    assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-12)
    ours.set_params(max_iter=3).fit(X, y)
    theirs.set_params(max_iter=3).fit(X, y)

    assert_allclose(ours.loss_curve_[1:], theirs.loss_curve_[2:], rtol=1e-5)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 1e-4])
def test_adam_takes_sklearns_steps_on_digits(alpha):
    """The drop-in's Adam is scikit-learn's (ε added to √v before the bias correction):
    30 epochs on all of digits in float64 end on sklearn's weights (torch's placement of ε,
    cprop.Adam's default, drifts by 0.23 here)."""
    X, y = cprop.datasets.load_digits()
    params = exact_params(hidden_layer_sizes=(64,), activation="relu", solver="adam",
                          learning_rate_init=0.001, batch_size=200, max_iter=30, alpha=alpha)
    ours, theirs = fit_both(X.astype(np.float64), y, False, **params)

    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert_allclose(a, b, rtol=0, atol=1e-10)
    assert ours.n_iter_ == theirs.n_iter_ == 30
    assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-6 if alpha else 1e-12)
    # sklearn's code reads the optimizer's learning_rate: the last bias-corrected step
    assert ours._optimizer.learning_rate == pytest.approx(theirs._optimizer.learning_rate, rel=1e-14)
    assert ours._optimizer.learning_rate != ours._optimizer.lr


def test_private_adam_learning_rate_answers_as_sklearns():
    from sklearn.neural_network._stochastic_optimizers import AdamOptimizer

    from cprop.sklearn import _Adam
    net = cprop.Sequential([cprop.Dense(3, 1)], dtype=np.float64, seed=0)
    ours = _Adam(lr=0.005, betas=(0.8, 0.99), eps=1e-8)
    theirs = AdamOptimizer([np.zeros(4)], 0.005, 0.8, 0.99, 1e-8)

    assert ours.learning_rate == theirs.learning_rate == 0.005     # before any step
    for _ in range(3):
        net.forward(np.ones((2, 3)))
        net.backward(np.ones((2, 1)))
        ours.step(net)
        theirs.update_params([np.zeros(4)], [np.ones(4)])
        assert ours.learning_rate == pytest.approx(theirs.learning_rate, rel=1e-15)


def test_threads_do_not_change_the_fit(digits64):
    X, y = digits64
    params = exact_params(hidden_layer_sizes=(64,), shuffle=True, max_iter=3)
    one = MLPClassifier(**params).fit(X, y)
    cprop.set_num_threads(2)
    try:
        two = MLPClassifier(**params).fit(X, y)
    finally:
        cprop.set_num_threads(1)

    for a, b in zip(one.coefs_ + one.intercepts_, two.coefs_ + two.intercepts_):
        assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# -- L-BFGS ----------------------------------------------------------------------------

def lbfgs_params(**overrides):
    params = dict(hidden_layer_sizes=(16, 8), activation="tanh", solver="lbfgs", alpha=1e-3,
                  max_iter=15, random_state=0)
    params.update(overrides)
    return params


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "multioutput", "regression"])
def test_lbfgs_matches_sklearn_iteration_for_iteration(digits64, kind):
    """From the same initial weights, L-BFGS-B sees the same objective and gradient (L2
    term included; for multi-output squared error sklearn's value averaged over outputs
    while its gradient sums them) and so takes the same iterations."""
    X, y = digits64
    ours, theirs = fit_both(X, targets(kind, X, y), kind in ("multioutput", "regression"),
                            **lbfgs_params())

    assert ours.n_iter_ == theirs.n_iter_ == 15 and ours.t_ == theirs.t_ == 0
    assert ours.out_activation_ == theirs.out_activation_
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert a.dtype == b.dtype
        assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-10)
    # as sklearn: no loss curve nor stopping bookkeeping for L-BFGS
    for name in ("loss_curve_", "best_loss_", "validation_scores_"):
        assert hasattr(ours, name) == hasattr(theirs, name) == False   # noqa: E712


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "regression", "multioutput"])
def test_lbfgs_reaches_sklearns_scores(kind):
    """Fits to convergence (or to max_iter) score as sklearn's on held-out data. Long runs
    part ways by rounding (different summation orders grow over hundreds of iterations
    of a non-convex problem), so the comparison is of scores, not weights."""
    X, y = cprop.datasets.load_digits()
    X = X.astype(np.float64)
    regression = kind in ("regression", "multioutput")
    t = targets(kind, X, y)
    X_train, X_test, t_train, t_test = train_test_split(X, t, test_size=0.3, random_state=0)
    params = lbfgs_params(hidden_layer_sizes=(32,), max_iter=300, alpha=1e-2)
    ours, theirs = fit_both(X_train, t_train, regression, **params)

    ours_score, theirs_score = ours.score(X_test, t_test), theirs.score(X_test, t_test)
    assert ours_score > (0.8 if regression else 0.9) and theirs_score > (0.8 if regression else 0.9)
    assert abs(ours_score - theirs_score) <= 0.02
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=0.2)


def test_lbfgs_limits_warn_as_sklearns(digits64):
    X, y = digits64
    for limit, words in [(dict(max_fun=10), "EVALUATIONS EXCEEDS LIMIT"),
                         (dict(max_iter=5), "Increase the number of iterations")]:
        with pytest.warns(ConvergenceWarning, match=words) as ours_warned:
            ours = MLPClassifier(**lbfgs_params(**limit)).fit(X, y)
        with pytest.warns(ConvergenceWarning, match=words) as theirs_warned:
            theirs = sk.MLPClassifier(**lbfgs_params(**limit)).fit(X, y)
        assert ours.n_iter_ == theirs.n_iter_
        assert str(ours_warned[0].message) == str(theirs_warned[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        converged = MLPClassifier(**lbfgs_params(max_iter=500, tol=1e-2)).fit(X, y % 2)
    assert converged.n_iter_ < 500


def test_lbfgs_warm_start_continues_as_sklearns(digits64):
    X, y = digits64
    ours = MLPClassifier(**lbfgs_params(max_iter=5, warm_start=True)).fit(X, y)
    theirs = sk.MLPClassifier(**lbfgs_params(max_iter=5, warm_start=True)).fit(X, y)

    ours.fit(X, y)
    theirs.fit(X, y)

    assert ours.n_iter_ == theirs.n_iter_ == 5
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    # then on with Adam from the L-BFGS weights (sklearn fails here: no loss curve to append to)
    before = [W.copy() for W in ours.coefs_]
    ours.set_params(solver="adam", max_iter=3).fit(X, y)
    assert len(ours.loss_curve_) == ours.n_iter_ == 3
    assert not np.array_equal(before[0], ours.coefs_[0])


def test_lbfgs_diverging_fit_raises_and_keeps_finite_weights(digits64, monkeypatch):
    X, y = digits64
    monkeypatch.setattr(cprop.Sequential, "_batch_gradient", lambda *args, **kwargs: np.inf)
    clf = MLPClassifier(**lbfgs_params())

    with pytest.raises(ValueError, match="non-finite"):
        clf.fit(X, y)
    assert all(np.isfinite(W).all() for W in clf.coefs_ + clf.intercepts_)


# -- sample weights ---------------------------------------------------------------------

def some_weights(n, seed=0):
    w = np.random.default_rng(seed).uniform(0, 2, n)
    w[:n // 10] = 0
    return w


def fit_both_weighted(X, t, w, regression, **params):
    ours, theirs = (MLPRegressor, sk.MLPRegressor) if regression else (MLPClassifier, sk.MLPClassifier)
    return ours(**params).fit(X, t, sample_weight=w), theirs(**params).fit(X, t, sample_weight=w)


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "multioutput", "regression"])
@pytest.mark.parametrize("setting", [
    dict(batch_size=64), dict(batch_size=300, alpha=1e-2),
    dict(solver="adam", learning_rate_init=0.01, batch_size=64),
    dict(early_stopping=True, n_iter_no_change=3, max_iter=20, batch_size=50),
], ids=["sgd", "sgd-full-batch", "adam", "early-stopping"])
def test_sample_weight_matches_sklearn_step_for_step(digits64, kind, setting):
    """sklearn's normalisation: each batch's loss is its weighted mean, L2 divided by the
    batch's summed weights; early stopping splits the weights and scores with them."""
    X, y = digits64
    ours, theirs = fit_both_weighted(X, targets(kind, X, y), some_weights(len(X)),
                                     kind in ("multioutput", "regression"), **exact_params(**setting))

    full_batch = setting.get("batch_size") == len(X)
    assert_same_fit(ours, theirs, loss_rtol=1e-10 if full_batch else 1e-4)
    if setting.get("early_stopping"):
        assert_allclose(ours.validation_scores_, theirs.validation_scores_, rtol=1e-12)


@pytest.mark.parametrize("kind", ["multiclass", "multioutput"])
def test_sample_weight_with_lbfgs_matches_sklearn(digits64, kind):
    X, y = digits64
    ours, theirs = fit_both_weighted(X, targets(kind, X, y), some_weights(len(X)), kind == "multioutput",
                                     **lbfgs_params())

    assert ours.n_iter_ == theirs.n_iter_ == 15
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-10)


@pytest.mark.filterwarnings("ignore:Got `batch_size`")    # 500: the whole of either set
@pytest.mark.parametrize("params", [lbfgs_params(), exact_params(batch_size=500, max_iter=10)],
                         ids=["lbfgs", "sgd-full-batch"])
@pytest.mark.parametrize("regression", [False, True], ids=["classifier", "regressor"])
def test_zero_weights_drop_rows_and_integer_weights_repeat_them(digits64, params, regression):
    X, y = digits64
    t = targets("regression" if regression else "multiclass", X, y)
    w = np.random.default_rng(1).integers(0, 4, len(X))
    repeat = np.repeat(np.arange(len(X)), w)
    Estimator = MLPRegressor if regression else MLPClassifier

    weighted = Estimator(**params).fit(X, t, sample_weight=w)
    repeated = Estimator(**params).fit(X[repeat], t[repeat])

    for a, b in zip(weighted.coefs_ + weighted.intercepts_, repeated.coefs_ + repeated.intercepts_):
        assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    predict = weighted.predict if regression else weighted.predict_proba
    assert_allclose(predict(X), (repeated.predict if regression else repeated.predict_proba)(X),
                    rtol=1e-7, atol=1e-9)


def test_partial_fit_takes_sample_weight_as_sklearn(digits64):
    X, y = digits64
    w = some_weights(len(X))
    ours = MLPClassifier(**exact_params())
    theirs = sk.MLPClassifier(**exact_params())
    for _ in range(3):   # positionally, as sklearn's: (X, y, sample_weight, classes)
        ours.partial_fit(X, y, w, np.arange(10))
        theirs.partial_fit(X, y, w, np.arange(10))

    assert_same_fit(ours, theirs, loss_rtol=1e-4)
    reg = MLPRegressor(**exact_params()).partial_fit(X, targets("regression", X, y), w)
    sk_reg = sk.MLPRegressor(**exact_params()).partial_fit(X, targets("regression", X, y), w)
    assert_same_fit(reg, sk_reg, loss_rtol=1e-4)


def test_negative_sample_weights_are_refused(digits64):
    X, y = digits64
    w = np.ones(len(X))
    w[3] = -1
    with pytest.raises(ValueError, match="[Nn]egative"):
        MLPClassifier(**exact_params()).fit(X, y, sample_weight=w)


# -- Poisson regression ------------------------------------------------------------------

def counts(X, n_outputs):
    rng = np.random.default_rng(0)
    rates = np.exp(np.c_[0.3 * X[:, 10] + 0.1 * X[:, 20] - 1, 0.2 * X[:, 30]])[:, :n_outputs]
    return rng.poisson(rates).astype(np.float64).squeeze()


@pytest.mark.parametrize("n_outputs", [1, 2])
@pytest.mark.parametrize("setting", [
    dict(batch_size=64), dict(batch_size=300),
    dict(solver="adam", batch_size=64, sample_weight=True),
    dict(early_stopping=True, n_iter_no_change=3, max_iter=20, batch_size=50, sample_weight=True),
    dict(batch_size=64, sample_weight=True),
], ids=["sgd", "sgd-full-batch", "adam-weighted", "early-stopping-weighted", "sgd-weighted"])
def test_poisson_matches_sklearn_step_for_step(digits64, n_outputs, setting):
    """exp output and sklearn's half Poisson deviance, whose term xlogy(y, y) - y cprop's
    loss (torch's Poisson NLL) leaves out and the drop-in adds to loss_ and loss_curve_."""
    X, _ = digits64
    setting = dict(setting)
    w = some_weights(len(X)) if setting.pop("sample_weight", False) else None
    params = exact_params(loss="poisson", learning_rate_init=0.01, **setting)
    ours = MLPRegressor(**params).fit(X, counts(X, n_outputs), sample_weight=w)
    theirs = sk.MLPRegressor(**params).fit(X, counts(X, n_outputs), sample_weight=w)

    assert_same_fit(ours, theirs, loss_rtol=1e-10 if setting.get("batch_size") == len(X) else 1e-4)
    assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-9)
    assert ours.out_activation_ == "exp" and (ours.predict(X) > 0).all()


@pytest.mark.parametrize("weighted", [False, True])
def test_poisson_lbfgs_matches_sklearn(digits64, weighted):
    X, _ = digits64
    w = some_weights(len(X)) if weighted else None
    ours = MLPRegressor(**lbfgs_params(loss="poisson")).fit(X, counts(X, 2), sample_weight=w)
    theirs = sk.MLPRegressor(**lbfgs_params(loss="poisson")).fit(X, counts(X, 2), sample_weight=w)

    assert ours.n_iter_ == theirs.n_iter_ == 15
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-10)


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_poisson_reaches_sklearns_score(solver):
    X, _ = cprop.datasets.load_digits()
    X = X.astype(np.float64)
    y = np.random.default_rng(0).poisson(np.exp(2 * X[:, 10] - 1.5 * X[:, 20] + X[:, 42])).astype(float)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)
    params = dict(loss="poisson", solver=solver, hidden_layer_sizes=(16,), alpha=1.0, max_iter=300,
                  random_state=0)
    ours = MLPRegressor(**params).fit(X_train, y_train)
    theirs = sk.MLPRegressor(**params).fit(X_train, y_train)

    ours_score, theirs_score = ours.score(X_test, y_test), theirs.score(X_test, y_test)
    assert ours_score > 0.6 and theirs_score > 0.6
    assert abs(ours_score - theirs_score) <= 0.02


def test_poisson_needs_targets_that_are_not_negative(digits64):
    X, _ = digits64
    with pytest.raises(ValueError, match="poisson needs targets >= 0"):
        MLPRegressor(loss="poisson", max_iter=2).fit(X, X[:, 10] - 1)


# -- targets, dtypes, attributes ------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_network_dtype_follows_X(digits, dtype):
    X_train, _, y_train, _ = digits
    X = (X_train[:200] * 16).astype(dtype)
    expected = np.float32 if dtype == np.float32 else np.float64

    clf = MLPClassifier((8,), max_iter=2, random_state=0).fit(X, y_train[:200])
    reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y_train[:200].astype(float))

    for est in (clf, reg):
        assert all(a.dtype == expected for a in est.coefs_ + est.intercepts_)
    assert clf.predict_proba(X).dtype == expected
    assert reg.predict(X).dtype == expected


def test_multilabel_classification(digits):
    X_train, X_test, y_train, y_test = digits
    Y_train = np.c_[y_train % 2, y_train > 4, y_train == 3]

    clf = MLPClassifier((32,), max_iter=100, random_state=0).fit(X_train, Y_train)

    assert clf.out_activation_ == "logistic" and clf.n_outputs_ == 3
    assert_array_equal(clf.classes_, [0, 1, 2])
    proba = clf.predict_proba(X_test)
    assert proba.shape == (len(X_test), 3) and ((proba >= 0) & (proba <= 1)).all()
    assert_array_equal(clf.predict(X_test), proba > 0.5)
    assert clf.score(X_test, np.c_[y_test % 2, y_test > 4, y_test == 3]) > 0.85


def test_multioutput_regression():
    X = np.random.default_rng(1).uniform(-1, 1, (400, 3))
    Y = np.c_[smooth_target(X), X[:, 0] - 2 * X[:, 1]]

    reg = MLPRegressor(hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=200, random_state=0).fit(X, Y)

    assert reg.n_outputs_ == 2 and reg.out_activation_ == "identity"
    assert reg.predict(X).shape == (400, 2)
    assert reg.score(X, Y) > 0.9


def test_binary_classification_has_one_logistic_output(digits):
    X_train, X_test, y_train, _ = digits
    labels = np.where(y_train % 2, "odd", "even")

    clf = MLPClassifier((16,), max_iter=20, random_state=0).fit(X_train, labels)

    assert clf.out_activation_ == "logistic" and clf.n_outputs_ == 1
    assert clf.coefs_[-1].shape == (16, 1)
    proba = clf.predict_proba(X_test)
    assert proba.shape == (len(X_test), 2)
    assert_array_equal(clf.predict(X_test), clf.classes_[(proba[:, 1] > 0.5).astype(int)])


def test_predict_proba_rows_sum_to_one_and_log_proba_is_its_log(digits):
    X_train, X_test, y_train, _ = digits
    clf = MLPClassifier((16,), max_iter=20, random_state=0).fit(X_train, y_train)

    proba = clf.predict_proba(X_test)

    assert clf.out_activation_ == "softmax" and proba.shape == (len(X_test), 10)
    assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)
    assert_allclose(clf.predict_log_proba(X_test), np.log(proba), rtol=1e-5, atol=1e-6)
    assert_array_equal(clf.predict(X_test), clf.classes_[proba.argmax(axis=1)])


@pytest.mark.parametrize("labels", [lambda y: y, lambda y: y % 2], ids=["softmax", "logistic"])
def test_log_proba_of_confident_predictions(digits64, labels):
    X, y = digits64
    clf = MLPClassifier((16,), max_iter=5, random_state=0).fit(X, labels(y))
    underflowed = near_one = 0
    for _ in range(3):
        clf.coefs_[-1][...] *= 10      # logits in the tens, hundreds, thousands

        proba, log_proba = clf.predict_proba(X), clf.predict_log_proba(X)

        # -inf exactly where the probability underflows to 0 (log_proba is log of proba) ...
        assert_array_equal(np.isneginf(log_proba), proba == 0)
        underflowed += np.count_nonzero(proba == 0)
        # ... and, from the logits, a log-probability a little below 0 where proba rounds to 1
        rounded = log_proba[(proba == 1) & (log_proba < 0)]
        assert np.all(rounded > -1e-15)
        near_one += rounded.size
    assert underflowed and near_one


def test_fitted_attributes(digits):
    X_train, _, y_train, _ = digits
    clf = MLPClassifier((16, 8), max_iter=4, random_state=0).fit(X_train, y_train)

    assert clf.n_features_in_ == 64 and clf.n_layers_ == 4 and clf.n_outputs_ == 10
    assert [W.shape for W in clf.coefs_] == [(64, 16), (16, 8), (8, 10)]
    assert [b.shape for b in clf.intercepts_] == [(16,), (8,), (10,)]
    assert clf.n_iter_ == 4 and clf.t_ == 4 * len(X_train) and len(clf.loss_curve_) == 4
    assert clf.loss_ == clf.loss_curve_[-1] and clf.best_loss_ == min(clf.loss_curve_)
    assert clf.validation_scores_ is None and clf.best_validation_score_ is None


def test_coefs_are_live_views_of_the_network(digits):
    X_train, X_test, y_train, _ = digits
    clf = MLPClassifier((16,), max_iter=3, random_state=0).fit(X_train, y_train)
    before = clf.predict_proba(X_test)

    clf.coefs_[-1][...] = 0
    clf.intercepts_[-1][...] = 0

    assert_allclose(clf.predict_proba(X_test), 0.1, rtol=1e-6)
    assert not np.allclose(before, 0.1)


# -- partial_fit, warm start, stopping ----------------------------------------------------

def test_partial_fit(digits):
    X_train, X_test, y_train, y_test = digits
    clf = MLPClassifier((32,), random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X_train, y_train)

    clf.partial_fit(X_train[:100], y_train[:100], classes=np.arange(10))
    first_loss = clf.loss_
    for _ in range(30):
        clf.partial_fit(X_train, y_train)

    assert clf.n_iter_ == 1 and len(clf.loss_curve_) == 31
    assert clf.t_ == 100 + 30 * len(X_train)
    assert clf.loss_ < first_loss / 3
    assert clf.score(X_test, y_test) > 0.9
    with pytest.raises(ValueError, match="not in `self.classes_`"):
        clf.partial_fit(X_train[:5], y_train[:5] + 10)


def test_partial_fit_regressor_matches_fit_epoch_by_epoch(digits64):
    X, y = digits64
    t = targets("regression", X, y)
    fitted = MLPRegressor(**exact_params(max_iter=3)).fit(X, t)
    stepped = MLPRegressor(**exact_params())
    for _ in range(3):
        stepped.partial_fit(X, t)

    for a, b in zip(stepped.coefs_, fitted.coefs_):
        assert_allclose(a, b, rtol=1e-12)
    assert_allclose(stepped.loss_curve_, fitted.loss_curve_, rtol=1e-12)


def test_warm_start_continues_from_the_fitted_weights(digits):
    X_train, _, y_train, _ = digits
    clf = MLPClassifier((16,), max_iter=5, warm_start=True, random_state=0).fit(X_train, y_train)
    loss_after_5 = clf.loss_

    clf.fit(X_train, y_train)

    assert len(clf.loss_curve_) == 10 and clf.n_iter_ == 5
    assert clf.loss_ < loss_after_5
    with pytest.raises(ValueError, match="same classes"):
        clf.fit(X_train, y_train % 3)


def test_convergence_warning_only_when_max_iter_is_reached(digits):
    X_train, _, y_train, _ = digits
    with pytest.warns(ConvergenceWarning, match="Maximum iterations \\(3\\)") as warned:
        MLPClassifier((8,), max_iter=3, random_state=0).fit(X_train, y_train)
    assert [w.filename for w in warned] == [__file__]      # the warning points at the call of fit

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = MLPClassifier((8,), max_iter=100, tol=1.0, n_iter_no_change=2, random_state=0)
        clf.fit(X_train, y_train)
        # epoch 1 sets best_loss_; epochs 2, 3, 4 do not improve on it by 1.0: 3 > 2 stops
        assert clf.n_iter_ == 4
        MLPClassifier((8,), max_iter=1, random_state=0).partial_fit(X_train, y_train, classes=np.unique(y_train))


def test_batch_size_larger_than_the_data_warns_at_the_call_of_fit(digits):
    X_train, _, y_train, _ = digits
    with pytest.warns(UserWarning, match="batch_size") as warned:
        MLPClassifier((8,), batch_size=10**6, max_iter=1, random_state=0).fit(X_train, y_train)
    assert [w.filename for w in warned if "batch_size" in str(w.message)] == [__file__]


def test_diverging_fit():
    X = np.random.default_rng(0).normal(size=(100, 4)) * 1e3
    y = X.sum(axis=1) ** 3
    params = dict(hidden_layer_sizes=(8,), activation="identity", solver="sgd",
                  learning_rate_init=10.0, max_iter=20, random_state=0)

    with pytest.raises(ValueError, match="non-finite"):
        MLPRegressor(**params).fit(X, y)
    with pytest.warns(RuntimeWarning, match="diverged"):
        reg = MLPRegressor(early_stopping=True, **params).fit(X, y)
    assert all(np.isfinite(W).all() for W in reg.coefs_ + reg.intercepts_)


# -- what is not supported says so ----------------------------------------------------------

def test_unsupported_options_raise_clearly(digits):
    X_train, _, y_train, _ = digits
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X_train, y_train, classes=np.arange(10))


def test_a_refused_partial_fit_leaves_the_fitted_attributes_as_they_were():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    reg = MLPRegressor(hidden_layer_sizes=(5,), max_iter=2).fit(X, rng.normal(size=(60, 2)))
    with pytest.raises(ValueError, match="cannot continue training"):
        reg.partial_fit(X, np.ones(60))
    assert reg.n_outputs_ == 2 and reg.predict(X).shape == (60, 2)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_learning_rate_falling_beyond_float32s_range_is_refused_with_finite_state():
    """invscaling with a huge power_t: the momentum carried over (cprop keeps sklearn's
    velocity ÷ -lr) would overflow float32; float64 follows scikit-learn."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 4)), rng.integers(0, 2, 200)
    params = dict(hidden_layer_sizes=(8,), solver="sgd", learning_rate="invscaling", power_t=20.0,
                  momentum=0.9, max_iter=5, random_state=0, learning_rate_init=0.1)
    clf = MLPClassifier(**params)
    with pytest.raises(ValueError, match="momentum carried over cannot be held in float32"):
        clf.fit(X.astype(np.float32), y)
    assert all(np.isfinite(s).all() for s in clf._optimizer.state) and np.isfinite(clf._net.params).all()
    ours = MLPClassifier(**params).fit(X, y)
    theirs = sk.MLPClassifier(**params).fit(X, y)
    assert ours.score(X, y) == pytest.approx(theirs.score(X, y), abs=0.02)
