"""A hypothesis stateful campaign against one network, its trainer and its optimizer.

Random sequences of what ordinary Python code can do: call the API (forward,
backward, predict, fit with callbacks that meddle, optimizer steps, save/load,
thread settings), set public attributes to odd values, reshape or write into the
arrays the API hands out, and call from a second thread. Any Python exception is
an acceptable answer; a crash of the interpreter, a kernel error reported as
"Exception ignored", an exception type outside ACCEPTED, or non-finite parameters
left behind by a call that returned normally is a failure.

Run by tests/test_stateful_fuzz.py in a subprocess (a crash then fails that test
instead of killing pytest): ``python tests/stateful_campaign.py EXAMPLES SEED``.
"""
import os
import sys
import tempfile
import threading
import warnings

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import cprop

ACCEPTED = (ValueError, TypeError, RuntimeError, AttributeError, FloatingPointError, KeyError,
            IndexError, OverflowError)
TMP = tempfile.mkdtemp(prefix="cprop-campaign-")

ODD_VALUES = st.sampled_from([0, 1, -1, 3, 1000, 10**12, 2.5, -0.0, float("nan"), float("inf"), None,
                              "relu", "cross_entropy", "mse", "", (), [1, 2], np.int64(2),
                              np.float32(0.5), True, np.zeros(3), np.ones((2, 2))])
TRAINER_ATTRS = ["loss", "batch_size", "shuffle", "n_threads", "loss_scale", "on_divergence", "seed",
                 "epochs_done", "rng", "optimizer", "net"]
OPTIMIZER_ATTRS = ["lr", "momentum", "nesterov", "weight_decay", "betas", "eps", "step_count", "state",
                   "decay_bias", "decay_per_sample", "kind", "n_state", "decoupled", "sklearn_style"]
LAYER_ATTRS = ["n_in", "n_out", "activation", "activation_code", "W", "b", "dW", "db"]
NETWORK_ATTRS = ["layers", "sizes", "activations", "dtype", "params", "grads", "seed"]


def attempt(f, *args, **kwargs):
    try:
        return f(*args, **kwargs)
    except ACCEPTED:
        return None


class Campaign(RuleBasedStateMachine):
    @initialize(dtype=st.sampled_from(["float32", "float64"]),
                hidden=st.integers(1, 40), loss=st.sampled_from(["mse", "cross_entropy",
                                                                  "binary_cross_entropy"]),
                optimizer=st.sampled_from(["sgd", "momentum", "adam", "adamw"]))
    def build(self, dtype, hidden, loss, optimizer):
        self.rng = np.random.default_rng(0)
        self.n_in, self.n_out = 6, 3
        self.net = cprop.Sequential([cprop.Dense(self.n_in, hidden, "relu"),
                                     cprop.Dense(hidden, self.n_out)], dtype=dtype, seed=0)
        opt = {"sgd": cprop.SGD(lr=0.01), "momentum": cprop.SGD(lr=0.01, momentum=0.9),
               "adam": cprop.Adam(), "adamw": cprop.AdamW()}[optimizer]
        self.trainer = cprop.Trainer(self.net, loss=loss, optimizer=opt, batch_size=8, seed=0)
        self.opt = opt      # the trainer's optimizer attribute itself may be set to anything
        self.X = self.rng.normal(size=(40, self.n_in))
        self.y = {"mse": self.rng.normal(size=(40, self.n_out)),
                  "cross_entropy": self.rng.integers(0, self.n_out, 40),
                  "binary_cross_entropy": self.rng.integers(0, 2, (40, self.n_out))}[loss]
        self.loss = loss

    # -- the API --------------------------------------------------------------------
    @rule(rows=st.integers(1, 300), threads=st.sampled_from([None, 1, 2, 3]))
    def forward(self, rows, threads):
        attempt(self.net.forward, self.rng.normal(size=(rows, self.n_in)), n_threads=threads)

    @rule(rows=st.integers(1, 300), scale=st.sampled_from([1.0, 0.0, 1e30]))
    def backward(self, rows, scale):
        attempt(self.net.backward, np.full((rows, self.n_out), scale))

    @rule(rows=st.integers(1, 3000), chunk=st.sampled_from([None, 1, 7, 4096]),
          threads=st.sampled_from([None, 1, 2]))
    def predict_raw(self, rows, chunk, threads):
        attempt(self.net.predict_raw, self.rng.normal(size=(rows, self.n_in)), n_threads=threads,
                chunk_size=chunk)

    @rule(which=st.sampled_from(["predict", "predict_proba", "evaluate"]))
    def predict(self, which):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if which == "evaluate":
                attempt(self.trainer.evaluate, self.X, self.y)
            else:
                attempt(getattr(self.trainer, which), self.X)

    @rule(epochs=st.integers(0, 3), meddle=st.sampled_from([None] + TRAINER_ATTRS + ["X", "lr", "state"]),
          value=ODD_VALUES, split=st.booleans())
    def fit(self, epochs, meddle, value, split):
        X = self.X.copy()

        def callback(trainer, epoch, logs):
            if meddle == "X":
                X.shape = (X.shape[0] * X.shape[1] // 2, 2)
            elif meddle == "lr":
                trainer.optimizer.lr = value
            elif meddle == "state":
                trainer.optimizer.state = value
            elif meddle is not None:
                setattr(trainer, meddle, value)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attempt(self.trainer.fit, X, self.y, epochs=epochs, callbacks=[callback],
                    validation_split=0.25 if split else None)

    @rule(threads=st.sampled_from([None, 1, 2]))
    def step(self, threads):
        attempt(self.opt.step, self.net, n_threads=threads)

    @rule()
    def save_and_load(self):
        path = os.path.join(TMP, "trainer.npz")
        if attempt(self.trainer.save, path) is None and os.path.exists(path):
            loaded = attempt(cprop.Trainer.load, path)
            if loaded is not None:
                attempt(loaded.predict, self.X)

    @rule(n=st.sampled_from([None, 1, 2, 3, 0, -1, 10**6, 2.5]))
    def set_threads(self, n):
        attempt(cprop.set_num_threads, n)

    @rule(flush=st.sampled_from([True, False, np.True_, 1, None, "no"]))
    def set_flush(self, flush):
        attempt(cprop.set_flush_denormals, flush)

    @rule()
    def copy(self):
        net = attempt(self.net.copy)
        if net is not None:
            attempt(net.predict_raw, self.X)

    # -- attributes and arrays handed out -----------------------------------------------
    @rule(name=st.sampled_from(TRAINER_ATTRS), value=ODD_VALUES)
    def set_trainer_attr(self, name, value):
        attempt(setattr, self.trainer, name, value)

    @rule(name=st.sampled_from(OPTIMIZER_ATTRS), value=ODD_VALUES)
    def set_optimizer_attr(self, name, value):
        attempt(setattr, self.opt, name, value)

    @rule(layer=st.integers(0, 1), name=st.sampled_from(LAYER_ATTRS), value=ODD_VALUES)
    def set_layer_attr(self, layer, name, value):
        attempt(setattr, self.net.layers[layer], name, value)

    @rule(name=st.sampled_from(NETWORK_ATTRS), value=ODD_VALUES)
    def set_network_attr(self, name, value):
        attempt(setattr, self.net, name, value)

    @rule(what=st.sampled_from(["params", "grads", "sizes", "activations", "W", "b", "state"]),
          action=st.sampled_from(["reshape", "write", "writeable", "resize"]))
    def abuse_array(self, what, action):
        if what in ("W", "b"):
            array = getattr(self.net.layers[0], what)
        elif what == "state":
            state = self.opt.state
            array = state[0] if isinstance(state, list) and state and isinstance(state[0], np.ndarray) else None
        else:
            array = getattr(self.net, what)
        if not isinstance(array, np.ndarray):
            return
        if action == "reshape" and array.size % 2 == 0:
            attempt(setattr, array, "shape", (2, -1))
        elif action == "write":
            attempt(array.__setitem__, Ellipsis, 0)
        elif action == "writeable":
            attempt(setattr, array.flags, "writeable", True)
        elif action == "resize":
            attempt(array.resize, (array.size + 1000,))

    @rule(rows=st.integers(1, 2000))
    def threads_at_once(self, rows):
        """A big forward in another thread while this one trains and predicts."""
        X_big = self.rng.normal(size=(rows, self.n_in))
        worker = threading.Thread(target=attempt, args=(self.net.forward, X_big))
        worker.start()
        attempt(self.net.forward, self.X[:5])
        attempt(self.net.backward, np.ones((5, self.n_out)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attempt(self.trainer.fit, self.X, self.y, epochs=1)
        worker.join()

    @invariant()
    def numpy_keeps_gradual_underflow(self):
        # cprop's passes flush subnormals in their own threads only (src/_fpenv.pxd)
        assert np.finfo(np.float64).tiny * 0.5 > 0 and np.float32(1e-39) * np.float32(0.5) > 0

    @invariant()
    def structure_is_intact(self):
        if not hasattr(self, "net"):
            return
        assert list(self.net.sizes) == [self.n_in, self.net.layers[0].n_out, self.n_out]
        assert self.net.params.shape == (self.net.n_params,)
        assert all(layer.W.shape == (layer.n_in, layer.n_out) for layer in self.net.layers)


def main(examples, seed):
    import random
    random.seed(seed)
    Campaign.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=25, deadline=None, derandomize=False,
        database=None, suppress_health_check=list(HealthCheck))
    test = Campaign.TestCase("runTest")
    test.runTest()
    print(f"campaign: {examples} sequences of up to 25 steps, no crash")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
