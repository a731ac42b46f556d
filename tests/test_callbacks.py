"""Between epochs: callbacks (early stopping, checkpoints, plain functions), validation_split,
learning-rate schedules against their formulas, progress output and History."""
import json
import math
import re
import sys

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import cprop
from cprop.callbacks import Callback, Checkpoint, EarlyStopping
from cprop.schedules import Constant, CosineAnnealing, ExponentialLR, InverseScaling, ReduceLROnPlateau, StepLR

from conftest import make_net, make_targets

N_SAMPLES, N_FEATURES, N_CLASSES = 60, 4, 3


def mentions(*words):
    """A `match=` pattern that finds every one of `words` in the message, in any order."""
    return "(?is)^" + "".join(f"(?=.*{re.escape(w)})" for w in words)


def problem(n=N_SAMPLES, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, N_FEATURES)), rng.integers(0, N_CLASSES, n)


def make_trainer(lr=0.1, momentum=0.0, shuffle=True, batch_size=16, seed=0):
    return cprop.Trainer(make_net([N_FEATURES, 8, N_CLASSES]), loss="cross_entropy",
                         optimizer=cprop.SGD(lr=lr, momentum=momentum), batch_size=batch_size,
                         shuffle=shuffle, seed=seed)


class Recorder(Callback):
    """Records, after each epoch, the epoch number, a copy of the parameters and the logs;
    optionally first puts a rigged value from `rigged` under `key` into the logs, so that a
    callback after it monitors a sequence fixed in advance."""

    def __init__(self, key=None, rigged=None):
        self.key, self.rigged = key, rigged
        self.epochs, self.params, self.logs = [], {}, []
        self.begun = self.ended = 0

    def on_train_begin(self, trainer):
        self.begun += 1

    def on_epoch_end(self, trainer, epoch, logs):
        if self.key is not None:
            logs[self.key] = self.rigged[epoch - 1]
        self.epochs.append(epoch)
        self.params[epoch] = trainer.net.params.copy()
        self.logs.append(dict(logs))

    def on_train_end(self, trainer):
        self.ended += 1


# -- EarlyStopping -------------------------------------------------------------------------------

@pytest.mark.parametrize("patience", [0, 1, 4])
def test_early_stopping_stops_once_patience_is_exhausted(patience):
    # lr = 0: the parameters never move, so val_loss is the same number every epoch. Epoch 1
    # sets the best value; each later epoch is one without improvement. `patience` such epochs
    # are tolerated (as torch's ReduceLROnPlateau and scikit-learn's n_iter_no_change count
    # them); the next one stops training.
    X, y = problem()
    trainer = make_trainer(lr=0.0)
    stopper = EarlyStopping(monitor="val_loss", patience=patience)

    history = trainer.fit(X, y, epochs=50, validation_data=problem(seed=1), callbacks=[stopper])

    assert len(set(history.val_loss)) == 1
    assert trainer.epochs_done == len(history) == patience + 2
    assert stopper.stopped_epoch == patience + 2
    assert stopper.best_epoch == 1 and stopper.best == history.val_loss[0]


def test_early_stopping_does_not_stop_while_improving():
    X, y = problem()
    rigged = [10.0 - i for i in range(8)]       # improves every epoch
    recorder = Recorder("score", rigged)
    stopper = EarlyStopping(monitor="score", patience=0)

    make_trainer().fit(X, y, epochs=8, callbacks=[recorder, stopper])

    assert recorder.epochs == list(range(1, 9))
    assert stopper.stopped_epoch is None and stopper.best_epoch == 8


def test_early_stopping_restores_the_best_epochs_parameters_exactly():
    # the rigged score is best at epoch 4; patience 2 tolerates epochs 5 and 6 and stops at 7
    X, y = problem()
    trainer = make_trainer(lr=0.1, momentum=0.9)
    recorder = Recorder("score", [3.0, 2.0, 2.5, 1.5, 1.6, 1.55, 1.7, 1.8, 1.9, 2.0])
    stopper = EarlyStopping(monitor="score", patience=2, restore_best=True)

    trainer.fit(X, y, epochs=10, callbacks=[recorder, stopper])

    assert recorder.epochs == [1, 2, 3, 4, 5, 6, 7] and trainer.epochs_done == 7
    assert stopper.best_epoch == 4 and stopper.best == 1.5 and stopper.stopped_epoch == 7
    assert not np.array_equal(recorder.params[4], recorder.params[7])   # training did move on
    assert_array_equal(trainer.net.params, recorder.params[4])
    # the layers' W and b are views of params: they show the restored values too
    assert_array_equal(trainer.net.layers[0].W.ravel(), recorder.params[4][:N_FEATURES * 8])


def test_early_stopping_without_restore_keeps_the_last_parameters():
    X, y = problem()
    trainer = make_trainer(lr=0.1, momentum=0.9)
    recorder = Recorder("score", [3.0, 2.0, 2.5, 2.6, 2.7])
    stopper = EarlyStopping(monitor="score", patience=1, restore_best=False)

    trainer.fit(X, y, epochs=10, callbacks=[recorder, stopper])

    assert recorder.epochs == [1, 2, 3, 4]
    assert_array_equal(trainer.net.params, recorder.params[4])


def test_early_stopping_restores_the_best_parameters_when_the_fit_runs_to_the_end():
    X, y = problem()
    trainer = make_trainer(lr=0.1, momentum=0.9)
    recorder = Recorder("score", [3.0, 1.0, 2.0, 2.5])
    stopper = EarlyStopping(monitor="score", patience=10)

    trainer.fit(X, y, epochs=4, callbacks=[recorder, stopper])

    assert trainer.epochs_done == 4 and stopper.stopped_epoch is None
    assert_array_equal(trainer.net.params, recorder.params[2])


def test_early_stopping_restores_the_best_epochs_running_statistics_too():
    """BatchNorm's running statistics are part of the model: the restored network evaluates
    to the best epoch's val_loss exactly."""
    rng = np.random.default_rng(0)
    X, Xv = rng.normal(size=(400, 8)), rng.normal(size=(200, 8))
    y, yv = (X[:, 0] * X[:, 1] > 0).astype(int), (Xv[:, 0] * Xv[:, 1] > 0).astype(int)
    net = cprop.Sequential([cprop.Dense(8, 32), cprop.BatchNorm(32, activation="relu"), cprop.Dense(32, 2)],
                           dtype="float64", seed=0)
    trainer = cprop.Trainer(net, "cross_entropy", cprop.SGD(lr=0.5, momentum=0.9), batch_size=16, seed=0)
    stopper = EarlyStopping(patience=3)

    history = trainer.fit(X, y, epochs=40, validation_data=(Xv, yv), callbacks=[stopper])

    assert stopper.stopped_epoch is not None and stopper.best_epoch < stopper.stopped_epoch
    assert trainer.evaluate(Xv, yv)["loss"] == history.val_loss[stopper.best_epoch - 1]


@pytest.mark.parametrize("make", [lambda: EarlyStopping(monitor=5), lambda: ReduceLROnPlateau(monitor=None)])
def test_a_monitor_that_is_not_a_name_is_refused(make):
    with pytest.raises(TypeError, match="monitor must be the name of a logged value"):
        make()


@pytest.mark.parametrize("rigged, mode, min_delta, stopped, best", [
    # "acc" in the name: mode auto maximises
    ([0.5, 0.6, 0.6, 0.59, 0.7], "auto", 0.0, 4, 2),
    # min_delta: 0.61 is not more than 0.05 above 0.6
    ([0.5, 0.6, 0.61, 0.64, 0.9], "auto", 0.05, 4, 2),
    # mode min on an accuracy-named key: falling counts as improving
    ([0.5, 0.4, 0.45, 0.41, 0.1], "min", 0.0, 4, 2),
], ids=["auto-max", "min_delta", "forced-min"])
def test_early_stopping_mode_and_min_delta(rigged, mode, min_delta, stopped, best):
    X, y = problem()
    recorder = Recorder("score_acc", rigged)
    stopper = EarlyStopping(monitor="score_acc", patience=1, mode=mode, min_delta=min_delta)

    make_trainer().fit(X, y, epochs=len(rigged), callbacks=[recorder, stopper])

    assert stopper.stopped_epoch == stopped and stopper.best_epoch == best


def test_early_stopping_on_val_accuracy_maximises():
    assert EarlyStopping(monitor="val_accuracy").mode == "max"
    assert EarlyStopping(monitor="val_loss").mode == "min"
    assert EarlyStopping(monitor="loss").mode == "min"


def test_early_stopping_refuses_a_key_this_fit_does_not_log():
    X, y = problem()
    trainer = make_trainer()

    with pytest.raises(ValueError, match=mentions("val_loss", "validation_data", "validation_split")):
        trainer.fit(X, y, epochs=3, callbacks=[EarlyStopping()])
    with pytest.raises(ValueError, match=mentions("'typo'", "loss")):
        trainer.fit(X, y, epochs=3, validation_data=(X, y), callbacks=[EarlyStopping(monitor="typo")])


@pytest.mark.parametrize("kwargs, error", [({"patience": -1}, ValueError), ({"patience": 1.5}, TypeError),
                                           ({"mode": "up"}, ValueError), ({"min_delta": -0.1}, ValueError)],
                         ids=str)
def test_early_stopping_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        EarlyStopping(**kwargs)


# -- Checkpoint ----------------------------------------------------------------------------------

def assert_file_holds(path, epochs_done, params, history):
    loaded = cprop.Trainer.load(path)
    assert loaded.epochs_done == epochs_done
    assert_array_equal(loaded.net.params, params)
    assert loaded.history.as_dict() == history


class FileInspector(Callback):
    """At each epoch end, loads the checkpoint file and records what it holds."""

    def __init__(self, path):
        self.path, self.seen, self.now = path, {}, {}

    def on_epoch_end(self, trainer, epoch, logs):
        if self.path.exists():
            loaded = cprop.Trainer.load(self.path)
            self.seen[epoch] = (loaded.epochs_done, loaded.net.params.copy(), loaded.history.as_dict())
        # what the trainer holds right now, for comparison
        self.now[epoch] = (trainer.epochs_done, trainer.net.params.copy(), trainer.history.as_dict())


def test_checkpoint_callback_saves_every_n_epochs_and_at_the_end(tmp_path):
    X, y = problem()
    path = tmp_path / "ckpt.npz"
    trainer = make_trainer(momentum=0.9)
    inspector = FileInspector(path)

    # the inspector runs after the Checkpoint: at epoch e it sees what the Checkpoint wrote by then
    trainer.fit(X, y, epochs=5, callbacks=[Checkpoint(path, every=2), inspector])

    assert sorted(inspector.seen) == [2, 3, 4, 5]          # nothing written before epoch 2
    for epoch, (epochs_done, params, history) in inspector.seen.items():
        saved_at = epoch - epoch % 2
        assert epochs_done == saved_at
        assert_array_equal(params, inspector.now[saved_at][1])
        assert history == inspector.now[saved_at][2]
    # and on_train_end wrote the final state (epoch 5 is not a multiple of 2)
    assert_file_holds(path, 5, trainer.net.params, trainer.history.as_dict())


def test_fit_checkpoint_argument_writes_a_resumable_trainer(tmp_path):
    X, y = problem()
    path = tmp_path / "fit.npz"
    trainer = make_trainer(momentum=0.9)
    inspector = FileInspector(path)

    # fit's own checkpoint runs after the user's callbacks: at epoch e the file holds the
    # last multiple of 3 before e
    trainer.fit(X, y, epochs=4, callbacks=[inspector], checkpoint=str(path), checkpoint_every=3)

    assert sorted(inspector.seen) == [4]
    epochs_done, params, history = inspector.seen[4]
    assert epochs_done == 3
    assert_array_equal(params, inspector.now[3][1])
    assert history == inspector.now[3][2]
    assert_file_holds(path, 4, trainer.net.params, trainer.history.as_dict())
    loaded = cprop.Trainer.load(path)
    assert loaded.optimizer.step_count == trainer.optimizer.step_count
    assert_array_equal(loaded.optimizer.state[0], trainer.optimizer.state[0])


def test_fit_checkpoint_saves_when_a_callback_stops_early(tmp_path):
    X, y = problem()
    path = tmp_path / "early.npz"
    trainer = make_trainer()

    trainer.fit(X, y, epochs=10, callbacks=[lambda t, epoch, logs: epoch == 2], checkpoint=path,
                checkpoint_every=5)

    assert trainer.epochs_done == 2
    assert_file_holds(path, 2, trainer.net.params, trainer.history.as_dict())


@pytest.mark.parametrize("every, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError)], ids=str)
def test_checkpoint_refuses_bad_intervals(every, error, tmp_path):
    with pytest.raises(error, match="checkpoint_every"):
        Checkpoint(tmp_path / "x.npz", every=every)
    X, y = problem()
    trainer = make_trainer()
    before = trainer.net.params.copy()
    with pytest.raises(error, match="checkpoint_every"):
        trainer.fit(X, y, epochs=2, checkpoint=tmp_path / "x.npz", checkpoint_every=every)
    assert_array_equal(trainer.net.params, before)
    assert not (tmp_path / "x.npz").exists()


# -- plain functions as callbacks ----------------------------------------------------------------

def test_a_function_returning_true_stops_and_every_callback_still_sees_each_epoch():
    X, y = problem()
    trainer = make_trainer()
    calls = {"first": [], "second": []}

    def stop_at_three(t, epoch, logs):
        calls["first"].append(epoch)
        return epoch == 3

    def watch(t, epoch, logs):
        calls["second"].append((epoch, sorted(logs)))
        return False

    recorder = Recorder()
    history = trainer.fit(X, y, epochs=10, callbacks=[stop_at_three, watch, recorder])

    assert trainer.epochs_done == len(history) == 3
    assert calls["first"] == [1, 2, 3]
    # the callbacks after the one that asked to stop still saw epoch 3
    assert [e for e, _ in calls["second"]] == [1, 2, 3]
    assert calls["second"][0][1] == ["loss", "lr", "samples_per_second", "time"]
    assert recorder.epochs == [1, 2, 3] and recorder.begun == recorder.ended == 1


def test_two_callbacks_asking_to_stop_in_the_same_epoch_are_both_called():
    X, y = problem()
    seen = []

    def stopper(name):
        def cb(t, epoch, logs):
            seen.append((name, epoch))
            return epoch == 2
        return cb

    make_trainer().fit(X, y, epochs=5, callbacks=[stopper("a"), stopper("b")])

    assert seen == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_a_single_callable_is_accepted_and_epochs_count_over_the_trainers_life():
    X, y = problem()
    trainer = make_trainer()
    epochs = []

    trainer.fit(X, y, epochs=2, callbacks=lambda t, epoch, logs: epochs.append(epoch))
    trainer.fit(X, y, epochs=2, callbacks=lambda t, epoch, logs: epochs.append(epoch))

    assert epochs == [1, 2, 3, 4]


@pytest.mark.parametrize("value", [None, False, np.False_, 0], ids=repr)
def test_callbacks_returning_nothing_or_false_do_not_stop(value):
    X, y = problem()
    trainer = make_trainer()

    trainer.fit(X, y, epochs=3, callbacks=[lambda t, epoch, logs: value])

    assert trainer.epochs_done == 3


def test_numpy_true_stops_training_like_true():
    # a callback that compares numpy values returns numpy's True, e.g. "stop once the
    # largest weight exceeds a bound"; it must stop training as Python's True does
    X, y = problem()
    trainer = make_trainer()

    trainer.fit(X, y, epochs=5, callbacks=[lambda t, epoch, logs: np.abs(t.net.params).max() >= 0])

    assert trainer.epochs_done == 1


# -- validation_split ----------------------------------------------------------------------------

def test_validation_split_logs_validation_figures_every_epoch():
    X, y = problem()
    trainer = make_trainer()
    recorder = Recorder()

    history = trainer.fit(X, y, epochs=4, validation_split=0.25, callbacks=[recorder])

    assert len(history.val_loss) == len(history.val_accuracy) == 4
    assert all(math.isfinite(v) and v > 0 for v in history.val_loss)
    # 15 of 60 samples held out: every accuracy is a multiple of 1/15
    assert all(0 <= a <= 1 and abs(a * 15 - round(a * 15)) < 1e-9 for a in history.val_accuracy)
    assert {"val_loss", "val_accuracy"} <= set(recorder.logs[0])


@pytest.mark.parametrize("loss, n_outputs", [("cross_entropy", 3), ("mse", 1), ("mse", 2),
                                             ("binary_cross_entropy", 3)])
def test_validation_split_partitions_the_samples(loss, n_outputs):
    # lr = 0: the network stays as initialised, so the epoch's training loss is the mean loss
    # over the kept rows and val_loss the mean over the held-out rows; together they must
    # make up the mean over all rows, each row on exactly one side
    rng = np.random.default_rng(3)
    X = rng.normal(size=(N_SAMPLES, N_FEATURES))
    y = make_targets(loss, N_SAMPLES, n_outputs, rng)
    if loss == "mse" and n_outputs == 1:
        y = y[:, 0]
    trainer = cprop.Trainer(make_net([N_FEATURES, 8, n_outputs]), loss=loss, optimizer=cprop.SGD(lr=0.0),
                            batch_size=16, seed=0)
    full = trainer.evaluate(X, y)["loss"]

    history = trainer.fit(X, y, epochs=1, validation_split=0.25)

    n_val = 15
    combined = ((N_SAMPLES - n_val) * history.loss[0] + n_val * history.val_loss[0]) / N_SAMPLES
    assert combined == pytest.approx(full, rel=1e-12)
    assert history.loss[0] != pytest.approx(full, rel=1e-9)     # the held-out rows were left out
    assert len(history.val_accuracy) == (0 if loss == "mse" else 1)


def test_validation_split_leaves_the_callers_arrays_alone():
    X, y = problem()
    X = np.ascontiguousarray(X, dtype=np.float64)     # the network's dtype: fit uses X uncopied
    X_before, y_before = X.copy(), y.copy()

    make_trainer().fit(X, y, epochs=3, validation_split=0.3)

    assert_array_equal(X, X_before)
    assert_array_equal(y, y_before)


def test_validation_split_refuses_validation_data_too():
    X, y = problem()
    trainer = make_trainer()
    before = trainer.net.params.copy()

    with pytest.raises(ValueError, match=mentions("validation_data", "validation_split")):
        trainer.fit(X, y, epochs=2, validation_data=(X, y), validation_split=0.2)
    assert_array_equal(trainer.net.params, before)
    assert trainer.epochs_done == 0


@pytest.mark.parametrize("n, split", [(10, 0.01), (10, 0.04), (10, 0.96), (10, 0.999), (1, 0.5)], ids=str)
def test_validation_split_refuses_splits_that_leave_no_sample_on_a_side(n, split):
    X, y = problem(n=n)
    trainer = make_trainer()
    before = trainer.net.params.copy()

    with pytest.raises(ValueError, match=mentions("validation_split", str(n))):
        trainer.fit(X, y, epochs=2, validation_split=split)
    assert_array_equal(trainer.net.params, before)
    assert trainer.epochs_done == 0 and len(trainer.history) == 0


@pytest.mark.parametrize("split, error", [(0, ValueError), (1, ValueError), (-0.2, ValueError),
                                          (1.5, ValueError), (float("nan"), ValueError), ("0.2", TypeError)],
                         ids=str)
def test_validation_split_must_be_a_fraction(split, error):
    X, y = problem()
    with pytest.raises(error, match="validation_split"):
        make_trainer().fit(X, y, validation_split=split)


# -- schedules -----------------------------------------------------------------------------------
# the formulas of cprop/schedules.py's docstring, t = epochs completed; history.lr[e] is the
# rate used during epoch e + 1, set after e epochs: formula(e)

BASE_LR = 0.2

SCHEDULES = {
    "Constant": (lambda: Constant(), lambda t: BASE_LR),
    "StepLR": (lambda: StepLR(step_size=3, gamma=0.5), lambda t: BASE_LR * 0.5 ** (t // 3)),
    "ExponentialLR": (lambda: ExponentialLR(gamma=0.8), lambda t: BASE_LR * 0.8 ** t),
    "InverseScaling": (lambda: InverseScaling(power_t=0.25), lambda t: BASE_LR / (t + 1) ** 0.25),
    "CosineAnnealing": (lambda: CosineAnnealing(t_max=6, lr_min=0.01),
                        lambda t: 0.01 + (BASE_LR - 0.01) * (1 + math.cos(math.pi * min(t, 6) / 6)) / 2),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_follows_its_formula(name):
    make_schedule, formula = SCHEDULES[name]
    X, y = problem()
    trainer = make_trainer(lr=BASE_LR)

    history = trainer.fit(X, y, epochs=9, callbacks=[make_schedule()])

    assert history.lr == pytest.approx([formula(t) for t in range(9)], rel=1e-13, abs=0)
    assert trainer.optimizer.lr == pytest.approx(formula(9), rel=1e-13, abs=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_keeps_counting_across_fits(name):
    make_schedule, formula = SCHEDULES[name]
    X, y = problem()
    trainer = make_trainer(lr=BASE_LR)
    schedule = make_schedule()

    trainer.fit(X, y, epochs=4, callbacks=[schedule])
    history = trainer.fit(X, y, epochs=5, callbacks=[schedule])

    assert history.lr == pytest.approx([formula(t) for t in range(9)], rel=1e-13, abs=0)


def test_the_scheduled_rate_is_the_rate_the_kernel_uses():
    # gamma = 0: epochs 1 and 2 at BASE_LR, then lr = 0 and plain SGD no longer moves
    X, y = problem()
    trainer = make_trainer(lr=BASE_LR)
    recorder = Recorder()

    history = trainer.fit(X, y, epochs=5, callbacks=[StepLR(step_size=2, gamma=0.0), recorder])

    assert history.lr == [BASE_LR, BASE_LR, 0.0, 0.0, 0.0]
    assert not np.array_equal(recorder.params[1], recorder.params[2])
    for epoch in (3, 4, 5):
        assert_array_equal(recorder.params[epoch], recorder.params[2])


def plateau_rates(values, base_lr, factor, patience, min_delta, lr_min, mode="min"):
    """The rate for each epoch under ReduceLROnPlateau, written from its description: lr is
    multiplied by `factor` (not below lr_min) once more than `patience` consecutive epochs
    failed to improve on the best value by more than min_delta; the count then restarts."""
    lr, best, bad, rates = base_lr, None, 0, []
    for value in values:
        rates.append(lr)
        improved = best is None or (best - value > min_delta if mode == "min" else value - best > min_delta)
        if improved:
            best, bad = value, 0
        else:
            bad += 1
            if bad > patience:
                lr, bad = max(lr * factor, lr_min), 0
    rates.append(lr)
    return rates


PLATEAU_CASES = {
    "min": ("score", [5.0, 4.0, 4.0, 3.99995, 4.1, 3.0, 3.5, 3.4, 3.2, 3.1, 3.3, 3.3],
            dict(factor=0.5, patience=1, min_delta=1e-4, lr_min=0.0)),
    "lr_min": ("score", [1.0] * 10, dict(factor=0.1, patience=0, min_delta=0.0, lr_min=0.001)),
    "max": ("score_accuracy", [0.1, 0.2, 0.2, 0.15, 0.3, 0.3, 0.3, 0.3, 0.31, 0.2, 0.2, 0.2],
            dict(factor=0.3, patience=2, min_delta=0.0, lr_min=0.0)),
}


@pytest.mark.parametrize("case", PLATEAU_CASES)
def test_reduce_lr_on_plateau_follows_its_rule(case):
    key, rigged, kwargs = PLATEAU_CASES[case]
    X, y = problem()
    trainer = make_trainer(lr=BASE_LR)
    schedule = ReduceLROnPlateau(monitor=key, **kwargs)

    history = trainer.fit(X, y, epochs=len(rigged), callbacks=[Recorder(key, rigged), schedule])

    expected = plateau_rates(rigged, BASE_LR, mode="max" if "acc" in key else "min", **kwargs)
    assert history.lr == pytest.approx(expected[:-1], rel=1e-13, abs=0)
    assert trainer.optimizer.lr == pytest.approx(expected[-1], rel=1e-13, abs=0)
    assert len(set(expected)) > 2          # the case does reduce, more than once


def test_reduce_lr_on_plateau_matches_torch():
    torch = pytest.importorskip("torch")
    key, rigged, kwargs = PLATEAU_CASES["min"]
    X, y = problem()
    trainer = make_trainer(lr=BASE_LR)
    trainer.fit(X, y, epochs=len(rigged), callbacks=[Recorder(key, rigged), ReduceLROnPlateau(key, **kwargs)])

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=kwargs["factor"], patience=kwargs["patience"],
        threshold=kwargs["min_delta"], threshold_mode="abs", min_lr=kwargs["lr_min"])
    torch_rates = []
    for value in rigged:
        torch_rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step(value)

    assert trainer.history.lr == pytest.approx(torch_rates, rel=1e-13, abs=0)


def test_reduce_lr_on_plateau_refuses_a_key_this_fit_does_not_log():
    X, y = problem()
    with pytest.raises(ValueError, match=mentions("val_loss", "loss")):
        make_trainer().fit(X, y, epochs=2, callbacks=[ReduceLROnPlateau()])


@pytest.mark.parametrize("make", [lambda: StepLR(0), lambda: StepLR(2, gamma=-1), lambda: ExponentialLR(-0.5),
                                  lambda: InverseScaling(-1), lambda: CosineAnnealing(0),
                                  lambda: ReduceLROnPlateau(factor=1.0), lambda: ReduceLROnPlateau(factor=0)],
                         ids=["step_size 0", "gamma<0", "exp gamma<0", "power_t<0", "t_max 0", "factor 1",
                              "factor 0"])
def test_schedules_refuse_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


# -- progress output -----------------------------------------------------------------------------

def test_verbose_fit_with_tqdm_shows_a_bar(capsys):
    pytest.importorskip("tqdm")
    X, y = problem()

    make_trainer().fit(X, y, epochs=3, validation_split=0.2, verbose=True)

    err = capsys.readouterr().err
    assert "3/3" in err and "epoch" in err
    assert "val_loss" in err


def test_verbose_fit_without_tqdm_prints_one_line_per_epoch(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    X, y = problem()
    trainer = make_trainer()

    history = trainer.fit(X, y, epochs=4, validation_data=problem(seed=1), verbose=True)

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for epoch, line in enumerate(lines, start=1):
        assert re.match(rf"epoch\s+{epoch}\b", line), line
        assert f"loss {history.loss[epoch - 1]:.4f}" in line
        assert f"val_loss {history.val_loss[epoch - 1]:.4f}" in line
        assert "val_accuracy" in line and "samples/s" in line


def test_quiet_fit_prints_nothing(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    X, y = problem()

    make_trainer().fit(X, y, epochs=2)

    assert capsys.readouterr() == ("", "")


# -- History -------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("validation", [False, True], ids=["loss only", "with validation"])
def test_history_plot_writes_a_png(validation, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    X, y = problem()
    history = make_trainer().fit(X, y, epochs=3, validation_split=0.2 if validation else None)
    path = tmp_path / "history.png"

    fig = history.plot(path)
    try:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert len(fig.axes) == (2 if validation else 1)
        assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [3] * (2 if validation else 1)
    finally:
        plt.close(fig)


def test_history_round_trips_through_a_dict_and_json():
    X, y = problem()
    history = make_trainer().fit(X, y, epochs=3, validation_split=0.2, callbacks=[ExponentialLR(0.5)])

    d = history.as_dict()
    again = cprop.History.from_dict(json.loads(json.dumps(d)))

    assert set(d) == set(cprop.History.FIELDS)
    assert again.as_dict() == d and len(again) == len(history) == 3
    for field in cprop.History.FIELDS:
        assert getattr(again, field) == getattr(history, field)
    d["loss"].append(99.0)                      # as_dict hands out copies
    assert len(history.loss) == 3


def test_history_from_a_partial_dict():
    history = cprop.History.from_dict({"loss": [1, 0.5]})

    assert history.loss == [1.0, 0.5] and all(type(v) is float for v in history.loss)
    assert history.val_loss == [] and len(history) == 2
