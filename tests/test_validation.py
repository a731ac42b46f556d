"""Input validation at every public entry: what is accepted (and converted), what is refused,
with which exception and which message, and that a refused call changes nothing.

The kernels run without the GIL and without bounds checks, so every check here is the
only thing standing between a wrong argument and reading or writing outside an array.
"""
import gzip
import json
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import cprop

N_SAMPLES, N_FEATURES, N_HIDDEN, N_CLASSES = 8, 5, 6, 3


def mentions(*words):
    """A `match=` pattern that finds every one of `words` in the message, in any order."""
    return "(?is)^" + "".join(f"(?=.*{re.escape(w)})" for w in words)


def make_net(n_outputs=N_CLASSES, dtype="float32", seed=0):
    return cprop.Sequential([cprop.Dense(N_FEATURES, N_HIDDEN, "tanh"), cprop.Dense(N_HIDDEN, n_outputs)],
                            dtype=dtype, seed=seed)


def make_trainer(loss="cross_entropy", dtype="float32", **kwargs):
    n_outputs = 1 if loss != "cross_entropy" else N_CLASSES
    kwargs.setdefault("optimizer", cprop.SGD(lr=0.1, momentum=0.9))
    return cprop.Trainer(make_net(n_outputs, dtype), loss=loss, batch_size=4, seed=0, **kwargs)


def problem(seed=0):
    """X (8, 5) of halves (exact in every float type and in float16) and labels in [0, 3)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-4, 5, (N_SAMPLES, N_FEATURES)) / 2.0, rng.integers(0, N_CLASSES, N_SAMPLES)


X_GOOD, Y_GOOD = problem()


class Unchanged:
    """Asserts that a refused call left the trainer's network, optimizer and history as they were."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        t = self.trainer
        self.params, self.grads = t.net.params.copy(), t.net.grads.copy()
        self.state = None if t.optimizer.state is None else [s.copy() for s in t.optimizer.state]
        self.counts = (t.epochs_done, len(t.history), t.optimizer.step_count, t.rng.bit_generator.state)
        return t

    def __exit__(self, *exc):
        t = self.trainer
        assert_array_equal(t.net.params, self.params)
        assert_array_equal(t.net.grads, self.grads)
        if self.state is None:
            assert t.optimizer.state is None
        else:
            for before, after in zip(self.state, t.optimizer.state):
                assert_array_equal(after, before)
        assert (t.epochs_done, len(t.history), t.optimizer.step_count, t.rng.bit_generator.state) == self.counts
        return False


@pytest.fixture
def trainer():
    t = make_trainer()
    t.fit(X_GOOD, Y_GOOD, epochs=1)      # momentum state exists, so a refused call could disturb it
    return t


# Every public entry that takes X, as f(trainer, X). y is only passed along where the
# entry needs one; the X check must fire first.
X_ENTRIES = {
    "Sequential.forward": lambda t, X: t.net.forward(X),
    "Sequential.predict_raw": lambda t, X: t.net.predict_raw(X),
    "Trainer.fit": lambda t, X: t.fit(X, Y_GOOD),
    "Trainer.fit validation_data": lambda t, X: t.fit(X_GOOD, Y_GOOD, validation_data=(X, Y_GOOD)),
    "Trainer.evaluate": lambda t, X: t.evaluate(X, Y_GOOD),
    "Trainer.predict": lambda t, X: t.predict(X),
    "Trainer.predict_proba": lambda t, X: t.predict_proba(X),
    "gradient_check": lambda t, X: cprop.gradient_check(t.net, X, Y_GOOD, loss="cross_entropy"),
}

# Every public entry that takes class labels y, as f(trainer, y)
Y_ENTRIES = {
    "Trainer.fit": lambda t, y: t.fit(X_GOOD, y),
    "Trainer.fit validation_data": lambda t, y: t.fit(X_GOOD, Y_GOOD, validation_data=(X_GOOD, y)),
    "Trainer.evaluate": lambda t, y: t.evaluate(X_GOOD, y),
    "losses.cross_entropy": lambda t, y: cprop.losses.cross_entropy(t.net.forward(X_GOOD), y),
    "gradient_check": lambda t, y: cprop.gradient_check(t.net, X_GOOD, y, loss="cross_entropy"),
}

# ... and real-valued targets, as f(loss, y) on a 1-output network
TARGET_ENTRIES = {
    "Trainer.fit": lambda loss, y: make_trainer(loss).fit(X_GOOD, y),
    "Trainer.evaluate": lambda loss, y: make_trainer(loss).evaluate(X_GOOD, y),
    "losses": lambda loss, y: getattr(cprop.losses, loss)(make_net(1).forward(X_GOOD), y),
    "gradient_check": lambda loss, y: cprop.gradient_check(make_net(1), X_GOOD, y, loss=loss),
}


def x_name(entry):
    return "validation X" if "validation" in entry else "X"


# -- arrays that are accepted, and converted ---------------------------------------------------

def memmap_of(array, path):
    """A read-only np.memmap of a temporary file holding `array` (order kept)."""
    order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    writer = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape, order=order)
    writer[...] = array
    writer.flush()
    del writer
    return np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape, order=order)


def read_only(array):
    array = array.copy()
    array.flags.writeable = False
    return array


X_FORMS = {
    "list of floats": lambda X, tmp: X.tolist(),
    "list of ints": lambda X, tmp: (X * 2).astype(int).tolist(),
    "tuple of tuples": lambda X, tmp: tuple(map(tuple, X.tolist())),
    "int64": lambda X, tmp: (X * 2).astype(np.int64),
    "int8": lambda X, tmp: (X * 2).astype(np.int8),
    "uint64": lambda X, tmp: np.abs(X * 2).astype(np.uint64),
    "bool": lambda X, tmp: X > 0,
    "float16": lambda X, tmp: X.astype(np.float16),
    "float32": lambda X, tmp: X.astype(np.float32),
    "float64": lambda X, tmp: X,
    "big-endian float64": lambda X, tmp: X.astype(">f8"),
    "Fortran order": lambda X, tmp: np.asfortranarray(X),
    "strided view": lambda X, tmp: np.repeat(np.repeat(X, 2, axis=0), 3, axis=1)[::2, ::3],
    "transposed view": lambda X, tmp: np.ascontiguousarray(X.T).T,
    "read-only": lambda X, tmp: read_only(X.astype(np.float32)),
    "read-only memmap float32": lambda X, tmp: memmap_of(X.astype(np.float32), tmp / "X32.dat"),
    "read-only memmap float64 Fortran": lambda X, tmp: memmap_of(np.asfortranarray(X), tmp / "X64.dat"),
}


@pytest.mark.parametrize("form", X_FORMS)
def test_x_forms_are_accepted_and_give_the_same_results(form, tmp_path):
    X = X_FORMS[form](X_GOOD, tmp_path)
    canonical = np.ascontiguousarray(np.asarray(X), dtype=np.float32)   # the values cprop must see
    reference, trainer = make_trainer(), make_trainer()

    assert_array_equal(trainer.net.forward(X), reference.net.forward(canonical))
    assert_array_equal(trainer.net.predict_raw(X), reference.net.predict_raw(canonical))
    assert_array_equal(trainer.predict(X), reference.predict(canonical))
    assert_array_equal(trainer.predict_proba(X), reference.predict_proba(canonical))
    trainer.fit(X, Y_GOOD, epochs=2, validation_data=(X, Y_GOOD))
    reference.fit(canonical, Y_GOOD, epochs=2, validation_data=(canonical, Y_GOOD))
    assert_array_equal(trainer.net.params, reference.net.params)
    assert trainer.history.as_dict().keys() == reference.history.as_dict().keys()
    assert trainer.history.loss == reference.history.loss
    assert trainer.evaluate(X, Y_GOOD) == reference.evaluate(canonical, Y_GOOD)
    assert cprop.gradient_check(trainer.net, X, Y_GOOD, loss="cross_entropy") < 1e-4
    if isinstance(X, np.ndarray):
        assert X.flags.writeable == (form not in ("read-only", "read-only memmap float32",
                                                  "read-only memmap float64 Fortran"))


LABEL_FORMS = {
    "list": lambda y, tmp: y.tolist(),
    "int8": lambda y, tmp: y.astype(np.int8),
    "uint64": lambda y, tmp: y.astype(np.uint64),
    "integral floats": lambda y, tmp: y.astype(np.float64),
    "float16": lambda y, tmp: y.astype(np.float16),
    "column (n, 1)": lambda y, tmp: y[:, None],
    "Fortran column": lambda y, tmp: np.asfortranarray(y[:, None]),
    "strided view": lambda y, tmp: np.repeat(y, 2)[::2],
    "read-only memmap": lambda y, tmp: memmap_of(y.astype(np.int64), tmp / "y.dat"),
}


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_label_forms_are_accepted(form, tmp_path):
    y = LABEL_FORMS[form](Y_GOOD, tmp_path)
    trainer, reference = make_trainer(), make_trainer()

    trainer.fit(X_GOOD, y, epochs=2)
    reference.fit(X_GOOD, Y_GOOD, epochs=2)

    assert_array_equal(trainer.net.params, reference.net.params)
    assert trainer.evaluate(X_GOOD, y) == reference.evaluate(X_GOOD, Y_GOOD)
    out = trainer.net.forward(X_GOOD)
    value, grad = cprop.losses.cross_entropy(out, y)
    expected_value, expected_grad = cprop.losses.cross_entropy(out, Y_GOOD)
    assert value == expected_value
    assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
@pytest.mark.parametrize("form", ["list", "bool", "int8", "column (n, 1)", "read-only memmap float32"])
def test_target_forms_are_accepted(loss, form, tmp_path):
    targets = (Y_GOOD % 2).astype(np.float64)
    y = {"list": lambda: targets.tolist(),
         "bool": lambda: targets.astype(bool),
         "int8": lambda: targets.astype(np.int8),
         "column (n, 1)": lambda: targets[:, None],
         "read-only memmap float32": lambda: memmap_of(targets.astype(np.float32)[:, None], tmp_path / "t.dat"),
         }[form]()
    trainer, reference = make_trainer(loss), make_trainer(loss)

    trainer.fit(X_GOOD, y, epochs=2)
    reference.fit(X_GOOD, targets, epochs=2)

    assert_array_equal(trainer.net.params, reference.net.params)
    out = trainer.net.forward(X_GOOD)
    value, grad = getattr(cprop.losses, loss)(out, y)
    expected_value, expected_grad = getattr(cprop.losses, loss)(out, targets)
    assert value == expected_value
    assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("form", ["Fortran", "strided", "read-only", "float64 for a float32 net"])
def test_loss_outputs_and_gradients_in_any_layout_are_accepted(form):
    net = make_net()
    out = net.forward(X_GOOD)
    variant = {"Fortran": lambda a: np.asfortranarray(a),
               "strided": lambda a: np.repeat(a, 2, axis=0)[::2],
               "read-only": read_only,
               "float64 for a float32 net": lambda a: a.astype(np.float64)}[form]
    value, grad = cprop.losses.cross_entropy(variant(out), Y_GOOD)
    expected_value, expected_grad = cprop.losses.cross_entropy(out.astype(variant(out).dtype), Y_GOOD)
    assert value == expected_value
    assert_array_equal(grad, expected_grad)

    net.backward(variant(grad.astype(np.float32)))
    grads = net.grads.copy()
    net.forward(X_GOOD)
    net.backward(np.ascontiguousarray(grad, dtype=np.float32))
    assert_array_equal(net.grads, grads)


# -- arrays that are refused: TypeError for what is not real numbers --------------------------

NOT_REAL = {
    "object": lambda shape: np.ones(shape, dtype=object),
    "str": lambda shape: np.full(shape, "1"),
    "bytes": lambda shape: np.full(shape, b"1"),
    "complex": lambda shape: np.ones(shape, dtype=np.complex128),
    "datetime": lambda shape: np.zeros(shape, dtype="datetime64[s]"),
    "structured": lambda shape: np.zeros(shape, dtype=[("a", "f4")]),
}


@pytest.mark.parametrize("kind", NOT_REAL)
@pytest.mark.parametrize("entry", X_ENTRIES)
def test_x_that_is_not_real_numbers_is_a_type_error(entry, kind, trainer):
    X = NOT_REAL[kind]((N_SAMPLES, N_FEATURES))
    with Unchanged(trainer), pytest.raises(TypeError, match=mentions(x_name(entry), str(X.dtype))):
        X_ENTRIES[entry](trainer, X)


@pytest.mark.parametrize("value", [None, "1 2 3", {"a": 1}, object(), {1, 2}], ids=repr)
@pytest.mark.parametrize("entry", X_ENTRIES)
def test_x_that_is_not_array_like_is_a_type_error(entry, value, trainer):
    with Unchanged(trainer), pytest.raises(TypeError, match=x_name(entry)):
        X_ENTRIES[entry](trainer, value)


@pytest.mark.parametrize("kind", NOT_REAL)
@pytest.mark.parametrize("entry", Y_ENTRIES)
def test_labels_that_are_not_real_numbers_are_a_type_error(entry, kind, trainer):
    y = NOT_REAL[kind](N_SAMPLES)
    with Unchanged(trainer), pytest.raises(TypeError, match=mentions("y", str(y.dtype))):
        Y_ENTRIES[entry](trainer, y)


@pytest.mark.parametrize("kind", NOT_REAL)
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
@pytest.mark.parametrize("entry", TARGET_ENTRIES)
def test_targets_that_are_not_real_numbers_are_a_type_error(entry, loss, kind):
    y = NOT_REAL[kind](N_SAMPLES)
    with pytest.raises(TypeError, match=mentions("y", str(y.dtype))):
        TARGET_ENTRIES[entry](loss, y)


@pytest.mark.parametrize("out", [
    [[0.0, 1.0, 2.0]] * N_SAMPLES,
    np.ones((N_SAMPLES, N_CLASSES), dtype=np.int64),
    np.ones((N_SAMPLES, N_CLASSES), dtype=np.float16),
    np.ones((N_SAMPLES, N_CLASSES), dtype=np.complex128),
    np.ones((N_SAMPLES, N_CLASSES), dtype=object),
    None,
], ids=["list", "int64", "float16", "complex", "object", "None"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
def test_loss_output_that_is_not_a_float_array_is_a_type_error(loss, out):
    y = Y_GOOD if loss == "cross_entropy" else np.zeros((N_SAMPLES, N_CLASSES))
    with pytest.raises(TypeError, match="out"):
        getattr(cprop.losses, loss)(out, y)


@pytest.mark.parametrize("grad", [
    [[0.0] * N_CLASSES] * N_SAMPLES,
    np.ones((N_SAMPLES, N_CLASSES), dtype=np.complex128),
    np.ones((N_SAMPLES, N_CLASSES), dtype=object),
    np.full((N_SAMPLES, N_CLASSES), "1"),
    None,
], ids=["list", "complex", "object", "str", "None"])
def test_backward_gradient_that_is_not_a_real_array_is_a_type_error(grad, trainer):
    trainer.net.forward(X_GOOD)
    with Unchanged(trainer), pytest.raises(TypeError, match="grad"):
        trainer.net.backward(grad)


# -- NaN and infinity: ValueError naming the array ---------------------------------------------

NON_FINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("entry", X_ENTRIES)
def test_non_finite_x_is_a_value_error_naming_it(entry, dtype, value, trainer):
    X = X_GOOD.astype(dtype)
    X[N_SAMPLES - 1, N_FEATURES - 1] = value          # the very last element
    with Unchanged(trainer), pytest.raises(ValueError, match=rf"(?i)\b{x_name(entry)}\b.*(nan|inf)"):
        X_ENTRIES[entry](trainer, X)


def test_non_finite_x_in_a_list_is_a_value_error(trainer):
    X = X_GOOD.tolist()
    X[3][2] = float("nan")
    with Unchanged(trainer), pytest.raises(ValueError, match=r"(?i)\bX\b.*nan"):
        trainer.fit(X, Y_GOOD)


def test_finite_x_that_overflows_the_networks_dtype_is_a_value_error(trainer):
    # 1e300 is finite in float64 but not in the network's float32: it must not reach the kernels
    X = X_GOOD.copy()
    X[0, 0] = 1e300
    with Unchanged(trainer), pytest.raises(ValueError, match=r"\bX\b"):
        trainer.fit(X, Y_GOOD)


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_raw_finds_every_non_finite_entry_in_its_compiled_check(dtype, value):
    # predict_raw leaves the NaN/inf check of a ready X to the compiled forward's threads:
    # anywhere in any thread's share or chunk, and in the tail beyond the 16-wide sums
    net = cprop.Sequential([cprop.Dense(37, 6, "relu"), cprop.Dense(6, 2)], dtype=dtype, seed=0)
    X = np.random.default_rng(0).standard_normal((301, 37)).astype(dtype)
    for row, col in [(0, 0), (300, 36), (150, 17), (151, 0), (299, 35), (7, 36)]:
        bad = X.copy()
        bad[row, col] = value
        for n_threads, chunk_size in [(1, None), (2, None), (2, 7), (3, 1)]:
            with pytest.raises(ValueError, match=r"(?i)\bX\b.*(nan|inf)"):
                net.predict_raw(bad, n_threads=n_threads, chunk_size=chunk_size)
    # the largest finite values pass: the check multiplies by 0 instead of summing, and X·W
    # overflowing (non-finite products of finite X) is told apart by reading X
    huge = X.copy()
    huge[::2] = np.finfo(dtype).max
    assert net.predict_raw(huge, n_threads=2, chunk_size=7).shape == (301, 2)   # no ValueError


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_raw_finds_non_finite_x_through_zero_weights_and_other_first_layers(dtype, value):
    # a finite X·W clears X: so X·W must be non-finite wherever X is, even where the feature's
    # weights are all 0 (±inf·0 is NaN) and whatever the first layer's activation does to it
    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 5)).astype(dtype)
    bad = X.copy()
    bad[40, 3] = value
    dead = cprop.Sequential([cprop.Dense(5, 8, "relu"), cprop.Dense(8, 1)], dtype=dtype, seed=0)
    dead.layers[0].W[3, :] = 0                           # feature 3 feeds nothing
    assert not dead.layers[0].W[3].any()
    assert np.isfinite(dead.predict_raw(X)).all()
    for first in (dead, cprop.Sequential([cprop.LayerNorm(5), cprop.Dense(5, 1)], dtype=dtype, seed=0),
                  cprop.Sequential([cprop.Dropout(0.5), cprop.Dense(5, 1)], dtype=dtype, seed=0)):
        for n_threads, chunk_size in [(1, None), (2, 16), (1, 1)]:
            with pytest.raises(ValueError, match=r"(?i)\bX\b.*(nan|inf)"):
                first.predict_raw(bad, n_threads=n_threads, chunk_size=chunk_size)


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("entry", Y_ENTRIES)
def test_non_finite_labels_are_a_value_error_naming_them(entry, value, trainer):
    y = Y_GOOD.astype(np.float64)
    y[-1] = value
    with Unchanged(trainer), pytest.raises(ValueError, match=r"(?i)\by\b.*(nan|inf)"):
        Y_ENTRIES[entry](trainer, y)


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
@pytest.mark.parametrize("entry", TARGET_ENTRIES)
def test_non_finite_targets_are_a_value_error_naming_them(entry, loss, value):
    y = (Y_GOOD % 2).astype(np.float64)
    y[-1] = value
    with pytest.raises(ValueError, match=r"(?i)\by\b.*(nan|inf)"):
        TARGET_ENTRIES[entry](loss, y)


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_non_finite_loss_output_and_gradient_are_value_errors(value, trainer):
    out = trainer.net.forward(X_GOOD)
    out[2, 1] = value
    for loss, y in [("mse", np.zeros(out.shape)), ("cross_entropy", Y_GOOD),
                    ("binary_cross_entropy", np.zeros(out.shape))]:
        with pytest.raises(ValueError, match=r"(?i)\bout\b.*(nan|inf)"):
            getattr(cprop.losses, loss)(out, y)
    with Unchanged(trainer), pytest.raises(ValueError, match=r"(?i)grad.*(nan|inf)"):
        trainer.net.backward(out)


# -- shapes, lengths, label ranges, empty data: ValueError saying expected and given ----------

@pytest.mark.parametrize("X, words", [
    (np.ones(N_FEATURES), ["2-D", f"({N_FEATURES},)"]),
    (np.ones((N_SAMPLES, N_FEATURES, 1)), ["2-D", f"({N_SAMPLES}, {N_FEATURES}, 1)"]),
    (np.float64(1.0), ["2-D", "()"]),
    (np.ones((N_SAMPLES, 7)), ["7", str(N_FEATURES), "feature"]),
    (np.ones((N_SAMPLES, 0)), ["0", str(N_FEATURES), "feature"]),
    (np.ones((0, N_FEATURES)), ["empty", f"(0, {N_FEATURES})"]),
    ([], ["2-D", "(0,)"]),
    ([[]], ["0", str(N_FEATURES), "feature"]),
], ids=["1-D", "3-D", "0-D", "7 features", "0 features", "0 samples", "[]", "[[]]"])
@pytest.mark.parametrize("entry", X_ENTRIES)
def test_x_of_the_wrong_shape_is_a_value_error(entry, X, words, trainer):
    with Unchanged(trainer), pytest.raises(ValueError, match=mentions(x_name(entry), *words)):
        X_ENTRIES[entry](trainer, X)


@pytest.mark.parametrize("y, words", [
    (Y_GOOD[:-1], [str(N_SAMPLES - 1), str(N_SAMPLES)]),
    (np.append(Y_GOOD, 0), [str(N_SAMPLES + 1), str(N_SAMPLES)]),
    ([], ["0", str(N_SAMPLES)]),
    (np.zeros((N_SAMPLES, 2), dtype=int), [f"({N_SAMPLES}, 2)", f"({N_SAMPLES},)"]),
    (np.zeros((N_SAMPLES, 1, 1), dtype=int), [f"({N_SAMPLES}, 1, 1)", f"({N_SAMPLES},)"]),
    (0, ["()", f"({N_SAMPLES},)"]),
    (np.where(np.arange(N_SAMPLES) == 5, 7, Y_GOOD), [f"[0, {N_CLASSES})", "7"]),
    (np.where(np.arange(N_SAMPLES) == 5, -1, Y_GOOD), [f"[0, {N_CLASSES})", "-1"]),
    (np.where(np.arange(N_SAMPLES) == 5, 2 ** 40, Y_GOOD), [f"[0, {N_CLASSES})", str(2 ** 40)]),
    (np.where(np.arange(N_SAMPLES) == 5, 1.5, Y_GOOD), ["integer"]),
    (np.where(np.arange(N_SAMPLES) == 5, 1e30, Y_GOOD), [f"[0, {N_CLASSES})"]),
], ids=["one short", "one long", "empty", "2 columns", "3-D", "scalar", "label = n_classes",
        "label -1", "label 2**40", "label 1.5", "label 1e30"])
@pytest.mark.parametrize("entry", Y_ENTRIES)
def test_labels_of_the_wrong_shape_or_range_are_a_value_error(entry, y, words, trainer):
    with Unchanged(trainer), pytest.raises(ValueError, match=mentions("y", *words)):
        Y_ENTRIES[entry](trainer, y)


def test_labels_too_large_for_intp_are_not_wrapped_into_range(trainer):
    # 2**64 - 1 as uint64 would be -1 as intp, and 2**64 + 1 would be 1: refused, not wrapped
    for y in (np.full(N_SAMPLES, 2 ** 64 - 1, dtype=np.uint64), [2 ** 64 + 1] * N_SAMPLES,
              np.full(N_SAMPLES, 2.0 ** 64 + 2 ** 12)):
        with Unchanged(trainer), pytest.raises((ValueError, TypeError), match="y"):
            trainer.fit(X_GOOD, y)


@pytest.mark.parametrize("y, words", [
    (np.zeros(N_SAMPLES - 1), [str(N_SAMPLES - 1), str(N_SAMPLES)]),
    (np.zeros((N_SAMPLES, 2)), [f"({N_SAMPLES}, 2)", f"({N_SAMPLES}, 1)"]),
    (np.zeros((N_SAMPLES, 1, 1)), [f"({N_SAMPLES}, 1, 1)", f"({N_SAMPLES}, 1)"]),
    ([], ["0", str(N_SAMPLES)]),
], ids=["one short", "2 columns", "3-D", "empty"])
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
@pytest.mark.parametrize("entry", TARGET_ENTRIES)
def test_targets_of_the_wrong_shape_are_a_value_error(entry, loss, y, words):
    with pytest.raises(ValueError, match=mentions("y", *words)):
        TARGET_ENTRIES[entry](loss, y)


@pytest.mark.parametrize("entry", TARGET_ENTRIES)
def test_binary_targets_must_be_zero_or_one(entry):
    y = (Y_GOOD % 2).astype(np.float64)
    y[3] = 0.5
    with pytest.raises(ValueError, match=mentions("y", "0/1")):
        TARGET_ENTRIES[entry]("binary_cross_entropy", y)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
def test_loss_output_of_the_wrong_shape_is_a_value_error(loss):
    for out, y in [(np.zeros(N_CLASSES), [0]), (np.zeros((0, N_CLASSES)), []),
                   (np.zeros((N_SAMPLES, 0)), np.zeros((N_SAMPLES, 0))), (np.zeros((2, 3, 1)), [0, 0])]:
        with pytest.raises(ValueError, match=mentions("out", str(out.shape))):
            getattr(cprop.losses, loss)(out, y)


def test_cross_entropy_needs_two_outputs():
    with pytest.raises(ValueError, match=mentions("cross_entropy", ">= 2", "1")):
        cprop.losses.cross_entropy(np.zeros((4, 1)), [0, 0, 0, 0])
    with pytest.raises(ValueError, match=mentions("cross_entropy", "2")):
        cprop.Trainer(make_net(1), loss="cross_entropy")


@pytest.mark.parametrize("rows, cols", [(N_SAMPLES - 1, N_CLASSES), (N_SAMPLES, N_CLASSES + 1),
                                        (N_SAMPLES, 1), (N_SAMPLES * N_CLASSES, None)],
                         ids=["one row short", "one column too many", "one column", "flat"])
def test_backward_gradient_of_the_wrong_shape_is_a_value_error(rows, cols, trainer):
    trainer.net.forward(X_GOOD)
    grad = np.zeros(rows if cols is None else (rows, cols), dtype=np.float32)
    with Unchanged(trainer), pytest.raises(ValueError, match=mentions(f"({N_SAMPLES}, {N_CLASSES})",
                                                                        str(grad.shape))):
        trainer.net.backward(grad)


# -- ragged Python lists: a clean ValueError or TypeError -----------------------------------------

RAGGED = [[[1, 2, 3, 4, 5], [1, 2]], [[1, 2, 3, 4, 5], 7], [[1, 2, 3, 4, [5]]] * 2,
          [[1, 2, 3, 4, 5], [1, 2, 3, 4, "x"]], [[1, 2, 3, 4, 5], None], [[[1, 2, 3, 4, 5]], [1, 2, 3, 4, 5]]]


@pytest.mark.parametrize("X", RAGGED, ids=range(len(RAGGED)))
@pytest.mark.parametrize("entry", X_ENTRIES)
def test_ragged_x_is_a_clean_error(entry, X, trainer):
    with Unchanged(trainer), pytest.raises((ValueError, TypeError)):
        X_ENTRIES[entry](trainer, X)


@pytest.mark.parametrize("y", [[0, [1]] + [0] * (N_SAMPLES - 2), [[0], [1, 2]] + [[0]] * (N_SAMPLES - 2),
                               [0, "1"] + [0] * (N_SAMPLES - 2), [0, None] + [0] * (N_SAMPLES - 2)],
                         ids=range(4))
@pytest.mark.parametrize("entry", Y_ENTRIES)
def test_ragged_labels_are_a_clean_error(entry, y, trainer):
    with Unchanged(trainer), pytest.raises((ValueError, TypeError)):
        Y_ENTRIES[entry](trainer, y)


def test_ragged_loss_targets_and_gradients_are_clean_errors(trainer):
    out = trainer.net.forward(X_GOOD)
    ragged = [[0.0, 1.0, 0.0], [1.0]] + [[0.0, 0.0, 1.0]] * (N_SAMPLES - 2)
    for loss in ("mse", "binary_cross_entropy"):
        with pytest.raises((ValueError, TypeError)):
            getattr(cprop.losses, loss)(out, ragged)
        with pytest.raises((ValueError, TypeError)):
            cprop.losses.mse(ragged, ragged)
    with Unchanged(trainer), pytest.raises((ValueError, TypeError)):
        trainer.net.backward(ragged)


# -- parameters ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, error, words", [
    ((0, 3), ValueError, ["n_in", "0"]),
    ((-2, 3), ValueError, ["n_in", "-2"]),
    ((3, 0), ValueError, ["n_out", "0"]),
    ((3, -1), ValueError, ["n_out", "-1"]),
    ((2.5, 3), TypeError, ["n_in", "2.5"]),
    ((3.0, 3), TypeError, ["n_in", "3.0"]),
    (("3", 3), TypeError, ["n_in", "'3'"]),
    ((None, 3), TypeError, ["n_in", "None"]),
    ((True, 3), TypeError, ["n_in", "True"]),
    ((3, 2, "softmax"), ValueError, ["activation", "softmax"]),
    ((3, 2, "ReLU"), ValueError, ["activation", "ReLU"]),
    ((3, 2, ""), ValueError, ["activation"]),
], ids=str)
def test_dense_refuses_bad_arguments(args, error, words):
    with pytest.raises(error, match=mentions(*words)):
        cprop.Dense(*args)


@pytest.mark.parametrize("activation", [1, len, ["relu"]], ids=["int", "function", "list"])
def test_dense_refuses_an_activation_that_is_not_a_name(activation):
    with pytest.raises((TypeError, ValueError), match="activation"):
        cprop.Dense(3, 2, activation)


def test_dense_accepts_numpy_integers_and_every_activation():
    for activation in ["identity", "relu", "leaky_relu", "sigmoid", "tanh", None]:
        layer = cprop.Dense(np.int64(3), np.uint8(2), activation)
        assert (layer.n_in, layer.n_out) == (3, 2) and type(layer.n_in) is int


@pytest.mark.parametrize("sizes", [(2 ** 64, 1), (1, 2 ** 63), (2 ** 70, 2 ** 70), (2 ** 40, 2 ** 40)], ids=str)
def test_sequential_refuses_layer_sizes_beyond_memory_cleanly(sizes):
    # not an OverflowError from NumPy's integer conversion, nor an attempt to allocate
    with pytest.raises((ValueError, MemoryError)):
        cprop.Sequential([cprop.Dense(*sizes)])


@pytest.mark.parametrize("layers, error, words", [
    ([], ValueError, ["at least one"]),
    ([cprop.Dense(4, 3), cprop.Dense(5, 2)], ValueError, ["chain", "3", "5"]),
    ([cprop.Dense(4, 3), cprop.Dense(3, 2), cprop.Dense(3, 1)], ValueError, ["chain", "layers[1]", "layers[2]"]),
    ([cprop.Dense(4, 3), "relu"], TypeError, ["layers[1]", "str"]),
    ([cprop.Dense(4, 3), None], TypeError, ["layers[1]", "NoneType"]),
    ([[cprop.Dense(4, 3)]], TypeError, ["layers[0]", "list"]),
    (None, TypeError, []),
    (3, TypeError, []),
], ids=["empty", "3 into 5", "third layer", "str", "None item", "nested", "None", "int"])
def test_sequential_refuses_bad_layers(layers, error, words):
    with pytest.raises(error, match=mentions(*words)):
        cprop.Sequential(layers)


def test_sequential_takes_many_layers_and_refuses_a_reused_layer(rng):
    # no fixed layer cap: the plan has a row per layer, however many
    net = cprop.Sequential([cprop.Dense(2, 2, "tanh") for _ in range(200)], dtype="float64", seed=0)
    X = rng.normal(size=(5, 2))
    expected = X
    for layer in net.layers:
        expected = np.tanh(expected @ layer.W + layer.b)
    np.testing.assert_allclose(net.predict_raw(X), expected, rtol=1e-10)
    cprop.Trainer(net, loss="mse", batch_size=2).fit(X, np.zeros((5, 2)), epochs=1)
    shared = cprop.Dense(3, 2)
    cprop.Sequential([shared])
    with pytest.raises(ValueError, match=mentions("layers[0]", "network")):
        cprop.Sequential([shared])


@pytest.mark.parametrize("dtype", ["float16", "int32", np.int64, "longdouble", object(), "complex128", "half"],
                         ids=str)
def test_sequential_refuses_dtypes_other_than_float32_and_float64(dtype):
    with pytest.raises(ValueError, match="dtype"):
        cprop.Sequential([cprop.Dense(3, 2)], dtype=dtype)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"loss": "hinge"}, ValueError, ["loss", "hinge", "mse"]),
    ({"loss": None}, ValueError, ["loss", "None"]),
    ({"loss": "MSE"}, ValueError, ["loss", "MSE"]),
    ({"optimizer": "sgd"}, TypeError, ["optimizer", "sgd"]),
    ({"optimizer": cprop.SGD}, TypeError, ["optimizer"]),
    ({"batch_size": 0}, ValueError, ["batch_size", "0"]),
    ({"batch_size": -32}, ValueError, ["batch_size", "-32"]),
    ({"batch_size": 32.0}, TypeError, ["batch_size", "32.0"]),
    ({"batch_size": "32"}, TypeError, ["batch_size"]),
    ({"batch_size": None}, TypeError, ["batch_size"]),
    ({"batch_size": True}, TypeError, ["batch_size"]),
    ({"n_threads": 0}, ValueError, ["n_threads", "0"]),
    ({"n_threads": 1.5}, TypeError, ["n_threads"]),
    ({"on_divergence": "ignore"}, ValueError, ["on_divergence", "ignore"]),
    ({"loss_scale": 0}, ValueError, ["loss_scale", "0"]),
    ({"loss_scale": -1.0}, ValueError, ["loss_scale", "-1"]),
    ({"loss_scale": float("nan")}, ValueError, ["loss_scale", "nan"]),
    ({"loss_scale": float("inf")}, ValueError, ["loss_scale", "inf"]),
    ({"loss_scale": "1"}, TypeError, ["loss_scale"]),
], ids=str)
def test_trainer_refuses_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=mentions(*words)):
        cprop.Trainer(make_net(), **kwargs)


@pytest.mark.parametrize("net", [None, cprop.Dense(3, 2), "net", [cprop.Dense(3, 2)]], ids=str)
def test_trainer_refuses_what_is_not_a_network(net):
    with pytest.raises(TypeError, match="Sequential"):
        cprop.Trainer(net)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"epochs": -1}, ValueError, ["epochs", "-1"]),
    ({"epochs": 1.5}, TypeError, ["epochs", "1.5"]),
    ({"epochs": 2.0}, TypeError, ["epochs", "2.0"]),
    ({"epochs": "3"}, TypeError, ["epochs"]),
    ({"epochs": None}, TypeError, ["epochs"]),
    ({"epochs": True}, TypeError, ["epochs"]),
    ({"validation_data": X_GOOD}, ValueError, ["validation_data", "pair"]),
    ({"validation_data": (X_GOOD,)}, ValueError, ["validation_data", "pair"]),
    ({"validation_data": (X_GOOD, Y_GOOD, Y_GOOD)}, ValueError, ["validation_data", "pair"]),
    ({"validation_data": "X, y"}, ValueError, ["validation_data"]),
], ids=str)
def test_fit_refuses_bad_arguments_before_training(kwargs, error, words, trainer):
    with Unchanged(trainer), pytest.raises(error, match=mentions(*words)):
        trainer.fit(X_GOOD, Y_GOOD, **kwargs)


@pytest.mark.parametrize("callbacks", [[None], [1], 42, ["stop"], [print, "stop"]], ids=str)
def test_fit_refuses_callbacks_that_are_not_callables_before_training(callbacks, trainer):
    # found only after the first epoch had already changed the weights, this would leave a
    # half-trained model behind a TypeError
    with Unchanged(trainer), pytest.raises(TypeError, match="callback"):
        trainer.fit(X_GOOD, Y_GOOD, epochs=2, callbacks=callbacks)


def test_zero_epochs_is_accepted_and_changes_nothing(trainer):
    with Unchanged(trainer):
        history = trainer.fit(X_GOOD, Y_GOOD, epochs=0)
    assert history is trainer.history


OPTIMIZERS = {"SGD": cprop.SGD, "Adam": cprop.Adam, "AdamW": cprop.AdamW}


@pytest.mark.parametrize("lr, error", [(-0.1, ValueError), (-1e-12, ValueError), (float("nan"), ValueError),
                                       (float("inf"), ValueError), (-float("inf"), ValueError),
                                       ("0.1", TypeError), (None, TypeError), (True, TypeError),
                                       (1j, TypeError)], ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_refuse_bad_learning_rates(name, lr, error):
    with pytest.raises(error, match="lr"):
        OPTIMIZERS[name](lr=lr)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_accept_numpy_scalars_and_zero(name):
    for lr in (0, 0.0, np.float32(0.5), np.float64(1e-3), np.int64(1)):
        assert OPTIMIZERS[name](lr=lr).lr == float(lr)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"momentum": -0.1}, ValueError, ["momentum", "-0.1"]),
    ({"momentum": 1.0}, ValueError, ["momentum", "1"]),
    ({"momentum": 1.5}, ValueError, ["momentum", "1.5"]),
    ({"momentum": float("nan")}, ValueError, ["momentum", "nan"]),
    ({"momentum": "0.9"}, TypeError, ["momentum"]),
    ({"nesterov": True}, ValueError, ["nesterov", "momentum"]),
    ({"weight_decay": -1e-4}, ValueError, ["weight_decay"]),
    ({"weight_decay": float("inf")}, ValueError, ["weight_decay"]),
    ({"weight_decay": None}, TypeError, ["weight_decay"]),
], ids=str)
def test_sgd_refuses_bad_hyper_parameters(kwargs, error, words):
    with pytest.raises(error, match=mentions(*words)):
        cprop.SGD(**kwargs)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"betas": (1.0, 0.999)}, ValueError, ["beta1"]),
    ({"betas": (0.9, 1.0)}, ValueError, ["beta2"]),
    ({"betas": (-0.1, 0.999)}, ValueError, ["beta1"]),
    ({"betas": (0.9, float("nan"))}, ValueError, ["beta2"]),
    ({"betas": (0.9,)}, ValueError, ["betas"]),
    ({"betas": (0.9, 0.99, 0.9)}, ValueError, ["betas"]),
    ({"betas": 0.9}, (TypeError, ValueError), ["betas"]),
    ({"betas": ("0.9", 0.999)}, TypeError, ["beta1"]),
    ({"eps": 0}, ValueError, ["eps"]),
    ({"eps": -1e-8}, ValueError, ["eps"]),
    ({"eps": float("nan")}, ValueError, ["eps"]),
    ({"weight_decay": -0.01}, ValueError, ["weight_decay"]),
], ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_refuses_bad_hyper_parameters(name, kwargs, error, words):
    with pytest.raises(error, match=mentions(*words)):
        OPTIMIZERS[name](**kwargs)


@pytest.mark.parametrize("value", ["yes", 1, None], ids=str)
def test_adam_sklearn_style_must_be_a_bool(value):
    with pytest.raises(TypeError, match="sklearn_style"):
        cprop.Adam(sklearn_style=value)
    adam = cprop.Adam()
    adam.sklearn_style = value          # changed after construction: refused at the next step
    with pytest.raises(TypeError, match="sklearn_style"):
        adam.config()


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError),
                                          (True, TypeError), (2.0, TypeError)], ids=str)
def test_set_num_threads_refuses_bad_values(value, error):
    before = cprop.get_num_threads()
    with pytest.raises(error, match="n_threads"):
        cprop.set_num_threads(value)
    assert cprop.get_num_threads() == before


@pytest.mark.parametrize("value", [2 ** 31, 2 ** 40, 2 ** 64], ids=str)
def test_set_num_threads_refuses_or_copes_with_absurd_counts(value):
    # either refused on the spot, or accepted and then usable: never an error deferred to
    # the first kernel call, far from the line that caused it
    try:
        cprop.set_num_threads(value)
    except ValueError as exc:
        assert "n_threads" in str(exc)
        return
    try:
        out = make_net().forward(X_GOOD[:2])
        assert out.shape == (2, N_CLASSES)
    finally:
        cprop.set_num_threads(None)


def test_set_num_threads_round_trip():
    default = cprop.get_num_threads()
    try:
        cprop.set_num_threads(np.int64(1))
        assert cprop.get_num_threads() == 1
        assert make_net().forward(X_GOOD).shape == (N_SAMPLES, N_CLASSES)
    finally:
        cprop.set_num_threads(None)
    assert cprop.get_num_threads() == default


@pytest.mark.parametrize("call", [
    lambda net: net.forward(X_GOOD, n_threads=0),
    lambda net: net.predict_raw(X_GOOD, n_threads=-1),
    lambda net: net.backward(np.zeros((N_SAMPLES, N_CLASSES)), n_threads=0),
], ids=["forward", "predict_raw", "backward"])
def test_per_call_thread_counts_are_checked(call):
    net = make_net()
    net.forward(X_GOOD)
    with pytest.raises(ValueError, match="n_threads"):
        call(net)


@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (-1, ValueError), (-16384, ValueError),
                                               (1.5, TypeError), ("64", TypeError)], ids=str)
def test_predict_raw_refuses_bad_chunk_sizes(chunk_size, error):
    # a negative chunk would skip the loop and return np.empty's uninitialised memory
    with pytest.raises(error, match="chunk_size"):
        make_net().predict_raw(X_GOOD, chunk_size=chunk_size)


def test_predict_raw_in_chunks_of_one_equals_in_one_chunk():
    net = make_net()
    assert_array_equal(net.predict_raw(X_GOOD, chunk_size=1), net.predict_raw(X_GOOD))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"eps": 0}, ValueError, ["eps"]),
    ({"eps": float("nan")}, ValueError, ["eps"]),
    ({"eps": float("inf")}, ValueError, ["eps"]),
    ({"eps": "1e-5"}, TypeError, ["eps"]),
    ({"max_params": 0}, ValueError, ["max_params", "0"]),
    ({"max_params": -1}, ValueError, ["max_params", "-1"]),
    ({"max_params": 2.5}, TypeError, ["max_params"]),
    ({"loss": "hinge"}, ValueError, ["loss", "hinge"]),
], ids=str)
def test_gradient_check_refuses_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=mentions(*words)):
        cprop.gradient_check(make_net(), X_GOOD, Y_GOOD, **{"loss": "cross_entropy", **kwargs})


@pytest.mark.parametrize("net", [None, cprop.Dense(3, 2), "net"], ids=str)
def test_gradient_check_refuses_what_is_not_a_network(net):
    with pytest.raises(TypeError, match="Sequential"):
        cprop.gradient_check(net, X_GOOD, Y_GOOD)


def test_gradient_check_leaves_the_network_alone():
    net = make_net()
    params = net.params.copy()
    assert cprop.gradient_check(net, X_GOOD, Y_GOOD, loss="cross_entropy", max_params=10) < 1e-4
    assert_array_equal(net.params, params)


# -- calls in the wrong order ---------------------------------------------------------------------

def test_backward_before_forward_is_a_runtime_error():
    net = make_net()
    with pytest.raises(RuntimeError, match="forward"):
        net.backward(np.zeros((N_SAMPLES, N_CLASSES), dtype=np.float32))
    assert not net.grads.any()


def test_backward_without_forward_is_a_runtime_error_even_after_predict_raw():
    # predict_raw keeps no activations, so it does not make backward possible
    net = make_net()
    net.predict_raw(X_GOOD)
    with pytest.raises(RuntimeError, match="forward"):
        net.backward(np.zeros((N_SAMPLES, N_CLASSES), dtype=np.float32))


def test_predict_raw_leaves_the_last_forward_for_backward():
    # inference in between does not disturb the activations backward pairs with
    grad = np.random.default_rng(1).standard_normal((N_SAMPLES, N_CLASSES)).astype(np.float32)
    a, b = make_net(), make_net()
    a.forward(X_GOOD)
    a.backward(grad)
    b.forward(X_GOOD)
    b.predict_raw(X_GOOD[:5] * 3)
    b.backward(grad)
    assert_array_equal(a.grads, b.grads)


def test_backward_takes_the_shape_of_the_latest_forward():
    net = make_net()
    net.forward(X_GOOD)
    net.forward(X_GOOD[:3])
    with pytest.raises(ValueError, match=mentions(f"(3, {N_CLASSES})", f"({N_SAMPLES}, {N_CLASSES})")):
        net.backward(np.zeros((N_SAMPLES, N_CLASSES), dtype=np.float32))
    net.backward(np.zeros((3, N_CLASSES), dtype=np.float32))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_before_backward_is_a_runtime_error(name):
    net = make_net()
    optimizer = OPTIMIZERS[name]()
    params = net.params.copy()
    with pytest.raises(RuntimeError, match="backward"):
        optimizer.step(net)
    net.forward(X_GOOD)
    with pytest.raises(RuntimeError, match="backward"):
        optimizer.step(net)
    net.backward(np.ones((N_SAMPLES, N_CLASSES), dtype=np.float32))
    net.init_params(0)                       # fresh weights: the old gradients no longer apply
    with pytest.raises(RuntimeError, match="backward"):
        optimizer.step(net)
    assert_array_equal(net.params, params)
    assert optimizer.step_count == 0


@pytest.mark.parametrize("net", [None, "net", cprop.Dense(3, 2), np.zeros(10)], ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_on_what_is_not_a_network_is_a_type_error(name, net):
    with pytest.raises(TypeError, match="Sequential"):
        OPTIMIZERS[name]().step(net)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_refuses_a_bad_thread_count(name):
    net = make_net()
    net.forward(X_GOOD)
    net.backward(np.ones((N_SAMPLES, N_CLASSES), dtype=np.float32))
    params = net.params.copy()
    with pytest.raises(ValueError, match="n_threads"):
        OPTIMIZERS[name]().step(net, n_threads=0)
    assert_array_equal(net.params, params)


def test_predict_proba_needs_a_classification_loss():
    trainer = make_trainer("mse")
    with pytest.raises(ValueError, match="classification"):
        trainer.predict_proba(X_GOOD)


# -- hyper-parameters changed after construction are checked before a kernel uses them -----------
# Each case runs in its own interpreter: one of them corrupted the heap (an SGD made with
# momentum 0 has no velocity buffer, and the kernel then wrote a full velocity into it).

MUTATION_SCRIPT = """
import json, numpy as np, cprop
rng = np.random.default_rng(0)
X, y = rng.normal(size=(200, 20)), rng.integers(0, 4, 200)

def fresh(optimizer):
    net = cprop.Sequential([cprop.Dense(20, 300, "relu"), cprop.Dense(300, 4)], seed=0)
    return cprop.Trainer(net, loss="cross_entropy", optimizer=optimizer, batch_size=16, seed=0)

def by_step(trainer, epochs):
    for _ in range(epochs):
        for start in range(0, len(X), 16):
            _, grad = cprop.losses.cross_entropy(trainer.net.forward(X[start:start + 16]), y[start:start + 16])
            trainer.net.backward(grad)
            trainer.optimizer.step(trainer.net)

trainer = fresh({optimizer})
{mutate}
before = trainer.net.params.copy()
try:
    {run}(trainer, 2)
    outcome = {{"raised": None}}
except Exception as exc:
    outcome = {{"raised": type(exc).__name__, "message": str(exc),
                "unchanged": bool(np.array_equal(before, trainer.net.params))}}
reference = fresh({reference})
{run}(reference, 2)
outcome["finite"] = bool(np.isfinite(trainer.net.params).all())
outcome["as_reference"] = bool(np.array_equal(trainer.net.params, reference.net.params))
print(json.dumps(outcome))
"""

MUTATIONS = {
    # name: (optimizer, mutation, the optimizer it must then act as (None: must be refused), words)
    "SGD momentum 0 -> 0.9": ("cprop.SGD(lr=0.01)", "trainer.optimizer.momentum = 0.9",
                              "cprop.SGD(lr=0.01, momentum=0.9)", ["momentum"]),
    "SGD momentum 0.9 -> 1.5": ("cprop.SGD(lr=0.01, momentum=0.9)", "trainer.optimizer.momentum = 1.5",
                                None, ["momentum", "1.5"]),
    "lr -> nan": ("cprop.SGD(lr=0.01)", "trainer.optimizer.lr = float('nan')", None, ["lr", "nan"]),
    "lr -> -1": ("cprop.Adam()", "trainer.optimizer.lr = -1.0", None, ["lr", "-1"]),
    "batch_size -> 0": ("cprop.SGD(lr=0.01)", "trainer.batch_size = 0", None, ["batch_size", "0"]),
}


def run_isolated(script, cwd, timeout=120):
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
    assert proc.returncode == 0, f"the interpreter {how}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, run", [(case, run) for case in MUTATIONS for run in ("Trainer.fit", "Optimizer.step")
                                       if run == "Trainer.fit" or "batch_size" not in case])
def test_hyper_parameters_changed_after_construction(case, run, tmp_path):
    optimizer, mutate, acts_as, words = MUTATIONS[case]
    script = MUTATION_SCRIPT.format(optimizer=optimizer, mutate=mutate, reference=acts_as or optimizer,
                                    run="by_step" if run == "Optimizer.step" else
                                    "(lambda t, e: t.fit(X, y, epochs=e))")

    outcome = run_isolated(textwrap.dedent(script), cwd=tmp_path)

    assert outcome["finite"]
    if acts_as is None or outcome["raised"] is not None:
        # refused: a ValueError (TypeError) naming the parameter, before any update
        assert outcome["raised"] in ("ValueError", "TypeError"), outcome
        assert re.search(mentions(*words), outcome["message"]), outcome
        assert outcome["unchanged"], outcome
    else:
        # honoured: exactly what an optimizer built with that value does
        assert outcome["as_reference"], outcome


REBIND_SCRIPT = """
import json, numpy as np, cprop
net = cprop.Sequential([cprop.Dense(5, 6, "tanh"), cprop.Dense(6, 3)], seed=0)
X = np.ones((4, 5), np.float32)
try:
    {target}.{name} = np.ones({shape}, np.float32)
except (AttributeError, TypeError, ValueError) as exc:
    print(json.dumps({{"refused_at": "assignment", "error": type(exc).__name__}}))
    raise SystemExit
try:
    net.forward(X)
    cprop.Trainer(net, loss="cross_entropy").fit(X, [0, 1, 2, 0])
    print(json.dumps({{"refused_at": None}}))
except (TypeError, ValueError, RuntimeError) as exc:
    print(json.dumps({{"refused_at": "use", "error": type(exc).__name__, "message": str(exc)}}))
except FloatingPointError as exc:     # the kernels ran on it, and read garbage
    print(json.dumps({{"refused_at": None, "error": type(exc).__name__, "message": str(exc)}}))
"""


@pytest.mark.parametrize("target, name, shape", [("net.layers[0]", "W", (5000, 6)), ("net.layers[0]", "W", (5, 600)),
                                                 ("net.layers[0]", "b", (6000,)), ("net", "params", (3,)),
                                                 ("net", "grads", (3,))], ids=str)
def test_a_parameter_array_rebound_to_another_shape_is_refused(target, name, shape, tmp_path):
    # layer.W = ... replaces the view into the network's flat parameters; the kernels take their
    # sizes from it (or, for net.params, from the layer sizes), so a wrong-sized array would make
    # them read past the end of X or write past Y or the parameters
    outcome = run_isolated(textwrap.dedent(REBIND_SCRIPT.format(target=target, name=name, shape=shape)),
                           cwd=tmp_path)
    assert outcome["refused_at"] is not None, outcome


def test_a_layer_parameter_rebound_to_the_same_shape_stays_the_networks():
    # refused, or copied into the flat parameters: never a forward pass that uses weights
    # which training does not update
    net = cprop.Sequential([cprop.Dense(5, 6, "tanh"), cprop.Dense(6, 3)], seed=0)
    new_W = np.full((5, 6), 0.25, dtype=np.float32)
    try:
        net.layers[0].W = new_W
    except (AttributeError, TypeError, ValueError):
        return
    assert np.shares_memory(net.layers[0].W, net.params)
    assert_array_equal(net.layers[0].W, new_W)
    cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.5)).fit(X_GOOD, Y_GOOD)
    assert not np.array_equal(net.layers[0].W, new_W)          # training moved what forward uses


# -- files: paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("path, error", [(None, TypeError), (3.5, TypeError), ("/nonexistent/cprop/x.npz", OSError)],
                         ids=str)
def test_load_and_save_refuse_bad_paths(path, error, trainer):
    with pytest.raises(error):
        cprop.load(path)
    with pytest.raises(error):
        cprop.Trainer.load(path)
    with pytest.raises(error):
        trainer.net.save(path)
    with pytest.raises(error):
        trainer.save(path)


def test_load_refuses_a_directory(tmp_path):
    with pytest.raises((OSError, cprop.CpropFileError)):
        cprop.load(tmp_path)
    with pytest.raises((OSError, cprop.CpropFileError)):
        cprop.Trainer.load(tmp_path)


# -- datasets: IDX files ------------------------------------------------------------------------

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array):
    """`array` in IDX format: 0, 0, type code, ndim, then each dimension as big-endian uint32."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, IDX_CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write(path, data, gz=False):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_read_idx_round_trips(dtype, gz, tmp_path):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)

    result = cprop.datasets.read_idx(write(tmp_path / "a.idx", idx_bytes(array), gz))

    assert result.shape == array.shape and result.dtype.isnative
    assert result.dtype.kind == np.dtype(dtype).kind and result.dtype.itemsize == np.dtype(dtype).itemsize
    assert_array_equal(result, array)


def test_read_idx_of_empty_and_zero_dimensional_arrays(tmp_path):
    assert cprop.datasets.read_idx(write(tmp_path / "e.idx", idx_bytes(np.zeros((0, 28), np.uint8)))).shape == (0, 28)
    assert cprop.datasets.read_idx(write(tmp_path / "s.idx", idx_bytes(np.array(7, np.uint8)))) == 7


GOOD_IDX = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))

BAD_IDX = {
    "empty": (b"", ["magic"]),
    "three bytes": (b"\x00\x00\x08", ["magic"]),
    "first byte": (b"\x01" + GOOD_IDX[1:], ["magic"]),
    "second byte": (b"\x00\x07" + GOOD_IDX[2:], ["magic"]),
    "unknown type": (b"\x00\x00\x0a" + GOOD_IDX[3:], ["magic"]),
    "a PNG": (b"\x89PNG\r\n\x1a\n" + bytes(40), ["magic"]),
    "truncated header": (GOOD_IDX[:9], ["header"]),
    "truncated data": (GOOD_IDX[:-1], ["60", "59"]),
    "no data": (GOOD_IDX[:16], ["60", "0"]),
    "extra data": (GOOD_IDX + b"\x00", ["60", "61"]),
    # 65536⁴ = 2⁶⁴ elements: a 64-bit product wraps to 0 and matches the empty payload
    "overflowing dimensions": (bytes([0, 0, 8, 4]) + struct.pack(">4I", 65536, 65536, 65536, 65536), ["IDX"]),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", BAD_IDX)
def test_read_idx_refuses_what_is_not_an_idx_file(case, gz, tmp_path):
    data, words = BAD_IDX[case]
    path = write(tmp_path / "bad.idx", data, gz)
    with pytest.raises(ValueError, match=mentions("bad.idx", *words)):
        cprop.datasets.read_idx(path)


@pytest.mark.parametrize("damage", ["truncated", "cut in the middle", "crc", "not deflate"])
def test_read_idx_refuses_a_damaged_gzip_with_a_value_error(damage, tmp_path):
    # the file is there and readable; its content is wrong: a ValueError naming it, as for
    # every other malformed IDX file (not gzip's EOFError or BadGzipFile)
    gz = gzip.compress(GOOD_IDX)
    data = {"truncated": gz[:-1], "cut in the middle": gz[:len(gz) // 2],
            "crc": gz[:-8] + bytes([gz[-8] ^ 0xFF]) + gz[-7:],
            "not deflate": b"\x1f\x8b" + bytes(30)}[damage]
    path = write(tmp_path / "damaged.idx.gz", data)
    with pytest.raises(ValueError, match="damaged.idx.gz"):
        cprop.datasets.read_idx(path)


def test_read_idx_refuses_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        cprop.datasets.read_idx(tmp_path / "missing.idx")
    with pytest.raises(TypeError):
        cprop.datasets.read_idx(None)


def write_mnist(directory, kind="train", n=5, gz=False, images=None, labels=None):
    prefix = "train" if kind == "train" else "t10k"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8) if images is None else images
    labels = rng.integers(0, 10, n).astype(np.uint8) if labels is None else labels
    suffix = ".gz" if gz else ""
    write(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), gz)
    write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("kind", ["train", "test"])
def test_load_mnist_reads_small_idx_files(kind, gz, tmp_path):
    images, labels = write_mnist(tmp_path, kind, gz=gz)

    X, y = cprop.datasets.load_mnist(tmp_path, kind=kind)

    assert X.shape == (5, 784) and X.dtype == np.float32 and X.flags.c_contiguous
    assert_array_equal(X, images.reshape(5, 784) / np.float32(255))
    assert y.dtype == np.int64
    assert_array_equal(y, labels)
    trainer = cprop.Trainer(cprop.Sequential([cprop.Dense(784, 10)], seed=0), loss="cross_entropy")
    trainer.fit(X, y)           # what load_mnist returns is what fit takes


def test_load_mnist_refuses_a_bad_kind(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(ValueError, match=mentions("kind", "validation")):
        cprop.datasets.load_mnist(tmp_path, kind="validation")


def test_load_mnist_needs_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images"):
        cprop.datasets.load_mnist(tmp_path)
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels"):
        cprop.datasets.load_mnist(tmp_path)


@pytest.mark.parametrize("images, labels, words", [
    (np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8), ["(5, 28, 28)", "(4,)"]),
    (np.zeros((5, 784), np.uint8), np.zeros(5, np.uint8), ["(5, 784)"]),
    (np.zeros((5, 28, 28), np.uint8), np.zeros((5, 1), np.uint8), ["(5, 1)"]),
], ids=["counts differ", "2-D images", "2-D labels"])
def test_load_mnist_refuses_images_and_labels_that_do_not_match(images, labels, words, tmp_path):
    write_mnist(tmp_path, images=images, labels=labels)
    with pytest.raises(ValueError, match=mentions(*words)):
        cprop.datasets.load_mnist(tmp_path)


def test_load_mnist_refuses_a_truncated_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        cprop.datasets.load_mnist(tmp_path)


def test_loaders_name_a_missing_directory_and_check_their_flags(tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory .*nowhere"):
        cprop.datasets.load_mnist(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="scale"):
        cprop.datasets.load_digits(scale="x")
