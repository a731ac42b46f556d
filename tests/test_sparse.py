"""Sparse (CSR) input: the kernels of src/_sparse.pxd against NumPy's dense products,
training on a sparse matrix against training on the same matrix dense, the validation
of what reaches the kernels, and the scikit-learn drop-ins on CSR/CSC as on dense X."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

import cprop
from cprop._lazy import core
from cprop._validation import CSRInput, check_sparse_X
from cprop.losses import loss_code, prepare_targets

import reference as ref
from conftest import TOLERANCES, make_net


def random_csr(n_rows, n_cols, density, rng, dtype=np.float64, index_dtype=np.int32, empty_rows=(),
               unsorted=False, duplicates=False):
    """A CSR matrix with the requested oddities: rows without nonzeros, unsorted column
    indices within rows, duplicate (row, column) entries (scipy sums them)."""
    X = sp.random(n_rows, n_cols, density=density, format="csr", dtype=np.float64,
                  random_state=np.random.RandomState(int(rng.integers(2**31))))
    X = X.tolil()
    for r in empty_rows:
        X[r, :] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    data, indices, indptr = X.data.astype(dtype), X.indices.copy(), X.indptr.copy()
    if unsorted:
        for r in range(n_rows):
            lo, hi = indptr[r], indptr[r + 1]
            indices[lo:hi], data[lo:hi] = indices[lo:hi][::-1].copy(), data[lo:hi][::-1].copy()
    if duplicates:
        # every row's first entry twice: the second copy adds 1 to its value
        rows = np.repeat(np.arange(n_rows), np.diff(indptr))
        first = indptr[:-1][np.diff(indptr) > 0]
        rows = np.concatenate([rows, rows[first]])
        indices = np.concatenate([indices, indices[first]])
        data = np.concatenate([data, np.ones(first.shape[0], dtype=dtype)])
        order = np.argsort(rows, kind="stable")
        rows, indices, data = rows[order], indices[order], data[order]
        indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n_rows))]
    out = sp.csr_matrix((data, indices.astype(index_dtype), indptr.astype(index_dtype)),
                        shape=(n_rows, n_cols))
    assert out.has_canonical_format == (not unsorted and not duplicates)
    return out


def csr_args(X, dtype):
    v = check_sparse_X(X, dtype)
    return v.data, v.indices, v.indptr


# -- the kernels ----------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("oddity", ["canonical", "unsorted", "duplicates"])
@pytest.mark.parametrize("n_rows", [1, 7, 33])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_sparse_kernels_equal_dense_products(dtype, tol, rng, index_dtype, oddity, n_rows, n_threads):
    X = random_csr(n_rows, 40, 0.15, rng, dtype, index_dtype, empty_rows=(0,) if n_rows > 1 else (),
                   unsorted=oddity == "unsorted", duplicates=oddity == "duplicates")
    dense = X.toarray().astype(np.float64)     # scipy sums the duplicates
    W = rng.normal(size=(40, 6)).astype(dtype)
    b = rng.normal(size=6).astype(dtype)
    data, indices, indptr = csr_args(X, dtype)

    Y = np.empty((n_rows, 6), dtype=dtype)
    core.sparse_forward(data, indices, indptr, W, b, Y, core.ACTIVATIONS["tanh"], n_threads)
    assert_allclose(Y, ref.dense_forward(dense, W.astype(np.float64), b.astype(np.float64), "tanh"), **tol)

    delta = rng.normal(size=(n_rows, 6)).astype(dtype)
    dW = np.full((40, 6), np.nan, dtype=dtype)    # every entry must be written
    db = np.full(6, np.nan, dtype=dtype)
    core.sparse_backward(data, indices, indptr, delta, dW, db, n_threads)
    assert_allclose(dW, dense.T @ delta.astype(np.float64), **tol)
    assert_allclose(db, delta.astype(np.float64).sum(axis=0), **tol)

    out = np.full((n_rows, 40), np.nan, dtype=dtype)
    core.sparse_to_dense(data, indices, indptr, out)
    assert_allclose(out, dense, **tol)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_sparse_kernels_follow_a_row_order(dtype, tol, rng, n_threads):
    """A shuffled minibatch: row r of the batch is X's row rows[r], read in place."""
    X = random_csr(20, 30, 0.2, rng, dtype, empty_rows=(3,))
    dense = X.toarray().astype(np.float64)
    rows = np.array([5, 3, 19, 0, 5], dtype=np.intp)
    W = rng.normal(size=(30, 4)).astype(dtype)
    b = np.zeros(4, dtype=dtype)
    data, indices, indptr = csr_args(X, dtype)
    Y = np.empty((5, 4), dtype=dtype)
    core.sparse_forward(data, indices, indptr, W, b, Y, core.ACTIVATIONS["identity"], n_threads, rows=rows)
    assert_allclose(Y, dense[rows] @ W.astype(np.float64), **tol)
    delta = rng.normal(size=(5, 4)).astype(dtype)
    dW = np.empty((30, 4), dtype=dtype)
    db = np.empty(4, dtype=dtype)
    core.sparse_backward(data, indices, indptr, delta, dW, db, n_threads, rows=rows)
    assert_allclose(dW, dense[rows].T @ delta.astype(np.float64), **tol)


# -- training on CSR is training on the dense matrix -------------------------------------

def fit_both(make_layers, optimizer, X, y, loss="cross_entropy", dtype=np.float64, epochs=3,
             n_threads=2, shuffle=True, **fit_kw):
    """[(params, predict_raw, evaluate's loss, history's losses)] after the same fit on X
    sparse, then on X dense."""
    results = []
    for Xin in (X, X.toarray()):
        net = cprop.Sequential(make_layers(), dtype=dtype, seed=0)
        trainer = cprop.Trainer(net, loss=loss, optimizer=optimizer(), batch_size=16, seed=5,
                                n_threads=n_threads, shuffle=shuffle)
        history = trainer.fit(Xin, y, epochs=epochs, **fit_kw)
        results.append((net.params.copy(), net.predict_raw(Xin), trainer.evaluate(Xin, y)["loss"],
                        history.loss))
    return results


OPTIMIZERS = {"sgd": lambda: cprop.SGD(lr=0.05, momentum=0.9),
              "adam": lambda: cprop.Adam(lr=0.01),
              "lbfgs": lambda: cprop.LBFGS(max_iter=15)}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "lbfgs"])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n_threads", [1, 2, 4])
def test_training_on_csr_equals_training_on_dense(dtype, optimizer, shuffle, n_threads, rng):
    # 101 rows in batches of 16: a ragged last batch of 5; two rows without nonzeros
    X = random_csr(101, 60, 0.08, rng, empty_rows=(0, 50))
    y = rng.integers(0, 4, 101)
    tol = dict(TOLERANCES[dtype])
    (p_sparse, out_sparse, loss_sparse, hist_sparse), (p_dense, out_dense, loss_dense, hist_dense) = fit_both(
        lambda: [cprop.Dense(60, 12, "relu"), cprop.Dense(12, 4)], OPTIMIZERS[optimizer], X, y, dtype=dtype,
        n_threads=n_threads, shuffle=shuffle)
    assert not np.array_equal(p_sparse, cprop.Sequential(
        [cprop.Dense(60, 12, "relu"), cprop.Dense(12, 4)], dtype=dtype, seed=0).params)   # it trained
    if optimizer == "lbfgs":
        # line searches amplify the rounding of different summation orders (float32 most):
        # the runs end at nearby points of the same loss (the gradient itself is held to
        # the dense one in test_full_batch_gradient_on_csr_equals_dense)
        assert_allclose(loss_sparse, loss_dense, rtol=1e-2 if dtype == np.float32 else 1e-6)
        if dtype == np.float64:
            assert_allclose(p_sparse, p_dense, rtol=1e-5, atol=1e-6)
        return
    assert_allclose(p_sparse, p_dense, **tol)
    assert_allclose(out_sparse, out_dense, **tol)
    assert_allclose(hist_sparse, hist_dense, **tol)
    assert_allclose(loss_sparse, loss_dense, **tol)


@pytest.mark.parametrize("first", ["dropout", "batchnorm", "layernorm"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_a_first_layer_that_is_not_dense_gets_dense_batches(first, shuffle, rng):
    X = random_csr(70, 30, 0.1, rng, empty_rows=(2,))
    y = rng.normal(size=(70, 2))
    layer = {"dropout": lambda: cprop.Dropout(0.3), "batchnorm": lambda: cprop.BatchNorm(30),
             "layernorm": lambda: cprop.LayerNorm(30)}[first]
    for optimizer in ("adam", "lbfgs"):
        (p_s, out_s, _, _), (p_d, out_d, _, _) = fit_both(
            lambda: [layer(), cprop.Dense(30, 8, "tanh"), cprop.Dense(8, 2)], OPTIMIZERS[optimizer], X, y,
            loss="mse", epochs=2, shuffle=shuffle)
        assert_allclose(p_s, p_d, rtol=1e-10, atol=1e-12)
        assert_allclose(out_s, out_d, rtol=1e-10, atol=1e-12)


def test_sample_weight_and_validation_split_on_csr(rng):
    X = random_csr(90, 25, 0.15, rng)
    y = rng.integers(0, 3, 90)
    w = rng.integers(0, 3, 90).astype(float)
    (p_s, _, _, h_s), (p_d, _, _, h_d) = fit_both(
        lambda: [cprop.Dense(25, 10, "tanh"), cprop.Dense(10, 3)], OPTIMIZERS["adam"], X, y,
        sample_weight=w, validation_split=0.25)
    assert_allclose(p_s, p_d, rtol=1e-10, atol=1e-12)
    assert_allclose(h_s, h_d, rtol=1e-10)


def test_weight_zero_on_csr_drops_the_rows(rng):
    """Full batch (L-BFGS): rows of weight 0 are as if absent, on sparse input too."""
    X = random_csr(40, 20, 0.2, rng)
    y = rng.normal(size=(40, 1))
    w = np.ones(40)
    w[::3] = 0
    keep = w > 0
    params = []
    for Xin, yin, win in ((X, y, w), (X[np.flatnonzero(keep)], y[keep], None)):
        net = make_net([20, 6, 1])
        cprop.Trainer(net, optimizer=cprop.LBFGS(max_iter=10), shuffle=False).fit(Xin, yin, sample_weight=win)
        params.append(net.params.copy())
    assert_allclose(params[0], params[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fmt", ["csc", "coo", "lil", "dok", "bsr"])
def test_every_sparse_format_is_taken(fmt, rng):
    X = random_csr(30, 12, 0.3, rng)
    net = make_net([12, 5, 2])
    assert_allclose(net.predict_raw(X.asformat(fmt)), net.predict_raw(X.toarray()), rtol=1e-12, atol=1e-12)
    assert_allclose(net.predict_raw(sp.csr_array(X)), net.predict_raw(X.toarray()), rtol=1e-12, atol=1e-12)


def test_predict_raw_on_csr_in_chunks_and_threads(dtype, tol, rng):
    X = random_csr(1000, 50, 0.05, rng, empty_rows=(999,))
    net = make_net([50, 16, 3], dtype=dtype)
    expected = net.predict_raw(X.toarray())
    for chunk_size, n_threads in ((7, 1), (64, 2), (1000, 3)):
        assert_allclose(net.predict_raw(X, n_threads=n_threads, chunk_size=chunk_size), expected, **tol)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_full_batch_gradient_on_csr_equals_dense(dtype, tol, rng, n_threads):
    X = random_csr(57, 40, 0.1, rng, empty_rows=(0, 56), unsorted=True)
    y = rng.normal(size=(57, 3))
    net = make_net([40, 9, 3], dtype=dtype)
    T, labels = prepare_targets("mse", y, 57, 3, dtype)
    values, grads = [], []
    for Xin in (check_sparse_X(X, dtype), X.toarray().astype(dtype)):
        values.append(net._batch_gradient(Xin, T, labels, loss_code("mse"), n_threads=n_threads))
        grads.append(net.grads.copy())
    assert_allclose(values[0], values[1], **tol)
    assert_allclose(grads[0], grads[1], **tol)


def test_gradient_on_csr_matches_finite_differences(rng):
    """The full-batch gradient on sparse input (the sparse dW = Xᵀ·δ and every layer after
    it) against central differences of the loss, every parameter."""
    X = random_csr(12, 15, 0.25, rng, empty_rows=(4,), duplicates=True)
    y = rng.integers(0, 3, 12)
    net = make_net([15, 5, 3], hidden="tanh")
    Xv = check_sparse_X(X, np.float64)
    T, labels = prepare_targets("cross_entropy", y, 12, 3, np.float64)
    code = loss_code("cross_entropy")
    net._batch_gradient(Xv, T, labels, code)
    analytic = net.grads.copy()
    assert np.count_nonzero(analytic[:15 * 5]) > 0
    h = 1e-6
    numeric = np.empty_like(analytic)
    for i in range(net.params.size):
        saved = net.params[i]
        net.params[i] = saved + h
        up = ref.cross_entropy(net.predict_raw(X), labels)[0]
        net.params[i] = saved - h
        down = ref.cross_entropy(net.predict_raw(X), labels)[0]
        net.params[i] = saved
        numeric[i] = (up - down) / (2 * h)
    assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


# -- validation -----------------------------------------------------------------------

def test_the_validated_matrix_is_cprops_own(rng):
    X = random_csr(10, 8, 0.4, rng)
    v = check_sparse_X(X, np.float32)
    assert isinstance(v, CSRInput) and v.data.dtype == np.float32
    assert v.indices.dtype == np.intp and v.indptr.dtype == np.intp
    for mine, theirs in ((v.data, X.data), (v.indices, X.indices), (v.indptr, X.indptr)):
        assert not np.shares_memory(mine, theirs)
    X64 = X.astype(np.float64)
    X64.indices = X64.indices.astype(np.int64)
    assert not np.shares_memory(check_sparse_X(X64, np.float64).data, X64.data)


def bad_csr(rng, what):
    X = random_csr(6, 5, 0.5, rng)
    data, indices, indptr = X.data.copy(), X.indices.copy(), X.indptr.copy()
    if what == "index too large":
        indices[0] = 5
    elif what == "negative index":
        indices[0] = -1
    elif what == "indptr decreasing":
        indptr[2], indptr[3] = indptr[3], indptr[2] - 1
    elif what == "indptr not from 0":
        indptr[0] = 1
    elif what == "indptr beyond nnz":
        indptr[-1] = indices.shape[0] + 3
    Y = sp.csr_matrix((6, 5))
    Y.data, Y.indices, Y.indptr = data, indices, indptr   # scipy checks nothing when assigning
    return Y


@pytest.mark.parametrize("what, message", [
    ("index too large", r"column indices must lie in \[0, 5\)"),
    ("negative index", r"column indices must lie in \[0, 5\)"),
    ("indptr decreasing", "never decrease"),
    ("indptr not from 0", "must start at 0"),
    ("indptr beyond nnz", "nonzeros but it holds"),
])
def test_malformed_csr_is_refused_with_a_clear_error(rng, what, message):
    X = bad_csr(rng, what)
    net = make_net([5, 3, 2])
    with pytest.raises(ValueError, match=message):
        net.predict_raw(X)
    with pytest.raises(ValueError, match=message):
        cprop.Trainer(net).fit(X, np.zeros((6, 2)))


def test_a_float_indptr_is_refused_not_truncated(rng):
    X = random_csr(6, 5, 0.5, rng)
    X.indptr = X.indptr.astype(np.float64) + 0.5     # cast to integers, it would re-cut the rows
    with pytest.raises(TypeError, match="indptr must be integers"):
        make_net([5, 3, 2]).predict_raw(X)


def test_lbfgs_densifies_a_sparse_x_once_for_a_first_layer_that_is_not_dense(rng, monkeypatch):
    from cprop._validation import CSRInput
    X = random_csr(40, 6, 0.4, rng)
    y = rng.integers(0, 2, 40)
    calls = []
    toarray = CSRInput.toarray
    monkeypatch.setattr(CSRInput, "toarray", lambda self: calls.append(1) or toarray(self))
    net = cprop.Sequential([cprop.Dropout(0.0), cprop.Dense(6, 4, "tanh"), cprop.Dense(4, 2)], seed=0,
                           dtype=np.float64)
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.LBFGS(max_iter=20), seed=0)
    trainer.fit(X, y, epochs=3)
    assert len(calls) == 1 and trainer.optimizer.result.nfev > 2


def test_wrong_shape_and_non_finite_values_are_refused(rng):
    net = make_net([5, 3, 2])
    with pytest.raises(ValueError, match="has 6 features per sample, the network expects 5"):
        net.predict_raw(random_csr(4, 6, 0.5, rng))
    with pytest.raises(ValueError, match="is empty"):
        net.predict_raw(sp.csr_matrix((0, 5)))
    X = random_csr(4, 5, 0.5, rng)
    X.data[1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        net.predict_raw(X)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cprop.Trainer(net).fit(X, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="beyond the range of float32"):
        make_net([5, 3, 2], dtype=np.float32).predict_raw(sp.csr_matrix(np.full((2, 5), 1e300)))
    with pytest.raises(TypeError, match="real numbers"):
        net.predict_raw(sp.csr_matrix(np.ones((2, 5), dtype=complex)))


def test_changing_the_matrix_during_a_fit_cannot_reach_the_kernels(rng):
    """A callback that corrupts the user's matrix after fit started: the kernels read
    cprop's validated copies, so training goes on as if nothing happened."""
    X = random_csr(50, 10, 0.3, rng)
    y = rng.normal(size=(50, 1))
    reference = make_net([10, 4, 1])
    cprop.Trainer(reference, optimizer=cprop.SGD(lr=0.01), seed=1).fit(X.copy(), y, epochs=3)

    def corrupt(trainer, epoch, logs):
        X.indices[:] = 10**9
        X.indptr[1:] = 10**9
        X.data[:] = np.nan

    net = make_net([10, 4, 1])
    cprop.Trainer(net, optimizer=cprop.SGD(lr=0.01), seed=1).fit(X, y, epochs=3, callbacks=[corrupt])
    assert_array_equal(net.params, reference.params)


def test_the_tape_api_refuses_sparse_input(rng):
    # (under comm, sparse input is refused on every rank alike: tests/distributed)
    net = make_net([5, 3, 2])
    X = random_csr(4, 5, 0.5, rng)
    with pytest.raises(TypeError, match=r"Sequential.forward.*X.toarray\(\)"):
        net.forward(X)


# -- the scikit-learn drop-ins ------------------------------------------------------------

@pytest.mark.parametrize("solver", ["sgd", "adam", "lbfgs"])
@pytest.mark.parametrize("estimator", ["classifier", "regressor"])
def test_dropins_on_csr_and_csc_equal_the_dense_result(solver, estimator, rng):
    """scikit-learn's test_sparse_matrices, held tighter: CSR and CSC give the dense
    result's weights (to rounding) and the same predictions."""
    from cprop.sklearn import MLPClassifier, MLPRegressor
    X = random_csr(120, 40, 0.1, rng, empty_rows=(7,))
    y = rng.integers(0, 3, 120) if estimator == "classifier" else rng.normal(size=120)
    w = rng.uniform(0.2, 2, 120)
    Est = MLPClassifier if estimator == "classifier" else MLPRegressor
    fitted = []
    for Xin in (X.toarray(), X, X.tocsc()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # ConvergenceWarning after max_iter
            model = Est(hidden_layer_sizes=(10,), solver=solver, max_iter=30, random_state=1)
            model.fit(Xin, y, sample_weight=w)
            if solver != "lbfgs":
                model.partial_fit(Xin, y)
        fitted.append((model, Xin))
    (dense, X_dense), *sparse = fitted
    tol = {"rtol": 1e-6, "atol": 1e-8} if solver == "lbfgs" else {"rtol": 1e-10, "atol": 1e-12}
    for model, Xin in sparse:
        for a, b in zip(model.coefs_ + model.intercepts_, dense.coefs_ + dense.intercepts_):
            assert_allclose(a, b, **tol)
        assert_array_equal(model.predict(Xin), dense.predict(X_dense)) if estimator == "classifier" else \
            assert_allclose(model.predict(Xin), dense.predict(X_dense), **tol)
        assert_allclose(model.score(Xin, y), dense.score(X_dense, y), **tol)
        if estimator == "classifier":
            assert_allclose(model.predict_proba(Xin), dense.predict_proba(X_dense), **tol)


def test_dropin_early_stopping_with_sample_weight_on_csr(rng):
    from cprop.sklearn import MLPClassifier
    X = random_csr(150, 30, 0.1, rng)
    y = rng.integers(0, 2, 150)
    w = rng.uniform(0, 2, 150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # ConvergenceWarning after max_iter
        models = [MLPClassifier(hidden_layer_sizes=(6,), early_stopping=True, max_iter=15, random_state=0,
                                n_iter_no_change=100).fit(Xin, y, sample_weight=w)
                  for Xin in (X, X.toarray())]
    assert_allclose(models[0].validation_scores_, models[1].validation_scores_, rtol=1e-12)
    for a, b in zip(models[0].coefs_, models[1].coefs_):
        assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_dropin_on_csr_reproduces_scikit_learn_on_csr(rng):
    """Same random_state, unshuffled SGD: scikit-learn's own MLP on the same CSR matrix."""
    from sklearn.neural_network import MLPClassifier as SkMLP

    from cprop.sklearn import MLPClassifier
    X = random_csr(80, 30, 0.15, rng)
    y = rng.integers(0, 3, 80)
    kw = {"hidden_layer_sizes": (8,), "solver": "sgd", "shuffle": False, "max_iter": 10,
          "random_state": 3, "learning_rate_init": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = MLPClassifier(**kw).fit(X, y), SkMLP(**kw).fit(X, y)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-9)
