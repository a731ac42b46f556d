"""Trainer: minibatch training where each epoch is one compiled call without the GIL."""
from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np
from numpy.typing import ArrayLike

from ._lazy import core as _core
from . import io as _io
from ._threads import ThreadFallback, single_threaded_blas
from ._threads import MAX_THREADS
from ._validation import check_X, check_bool, check_positive_int, check_real
from .callbacks import Checkpoint, as_callbacks
from .losses import LOSSES, loss_code, prepare_targets
from .network import Sequential, network_from_meta
from .optim import OPTIMIZERS, SGD, Optimizer


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameter; the model keeps its last finite parameters."""


class History:
    """Per-epoch records of a fit: ``loss``, ``val_loss``, ``val_accuracy``, ``lr``, ``time``,
    ``samples_per_second`` (lists of floats, one per completed epoch)."""

    FIELDS = ("loss", "val_loss", "val_accuracy", "lr", "time", "samples_per_second")

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, [])

    def __len__(self):
        return len(self.loss)

    def __repr__(self):
        last = {k: getattr(self, k)[-1] for k in self.FIELDS if getattr(self, k)}
        return f"History(epochs={len(self)}, last={last})"

    def append(self, **values):
        """Record one epoch: the keyword arguments named in FIELDS (others are ignored)."""
        for name in self.FIELDS:
            if name in values and values[name] is not None:
                getattr(self, name).append(float(values[name]))

    def as_dict(self) -> dict:
        """The records as a dict of lists (JSON-serialisable; saved with the trainer)."""
        return {k: list(getattr(self, k)) for k in self.FIELDS}

    def plot(self, path: str | os.PathLike | None = None):
        """Draw loss (and validation loss) and, when logged, validation accuracy per epoch.

        Needs matplotlib (``pip install "cprop[plot]"``). Saves a PNG to `path`
        when given; returns the matplotlib Figure.
        """
        try:
            import matplotlib
            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError('History.plot needs matplotlib: pip install "cprop[plot]"') from None
        epochs = np.arange(1, len(self) + 1)
        panels = 2 if self.val_accuracy else 1
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
        ax = axes[0, 0]
        ax.plot(epochs, self.loss, label="loss")
        if self.val_loss:
            ax.plot(epochs[:len(self.val_loss)], self.val_loss, label="val_loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if min(self.loss, default=1) > 0 else "linear")
        ax.legend()
        if self.val_accuracy:
            ax = axes[0, 1]
            ax.plot(epochs[:len(self.val_accuracy)], self.val_accuracy, label="val_accuracy", color="C2")
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy")
            ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig

    @classmethod
    def from_dict(cls, d: dict) -> History:
        """A History from :meth:`as_dict`'s output."""
        h = cls()
        for k in cls.FIELDS:
            getattr(h, k).extend(float(v) for v in d.get(k, []))
        return h


class Trainer:
    """Trains a :class:`Sequential` by minibatch gradient descent.

    Parameters
    ----------
    net : Sequential
    loss : {"mse", "cross_entropy", "binary_cross_entropy"}
    optimizer : cprop.SGD, cprop.Adam or cprop.AdamW; default SGD(lr=0.01)
    batch_size : int, default 32
    shuffle : bool, default True — reshuffle the sample order every epoch
    seed : int or None — seed of the shuffling
    n_threads : int or None — threads for the kernels (default: cprop.get_num_threads(),
        and a fit whose threads stall each other on a busy machine goes on with one)
    on_divergence : {"raise", "warn"} — what fit does when the loss or an update
        becomes non-finite; either way it stops at that batch and the network
        keeps its last finite parameters.
    loss_scale : float > 0, default 1 — multiplies the loss and its gradient
        (cprop.sklearn uses it to reproduce scikit-learn's loss conventions).
    """

    def __init__(self, net: Sequential, loss: str = "mse", optimizer: Optimizer | None = None,
                 batch_size: int = 32, shuffle: bool = True, seed: int | None = None,
                 n_threads: int | None = None, on_divergence: str = "raise",
                 loss_scale: float = 1.0) -> None:
        self.net = net
        self.loss = loss
        self.optimizer = optimizer if optimizer is not None else SGD(lr=0.01)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.n_threads = n_threads
        self.on_divergence = on_divergence
        self.loss_scale = loss_scale
        self._check_settings()
        self.epochs_done = 0
        self.history = History()
        self.extra = {}   # JSON-serialisable notes saved with the trainer (the CLI keeps classes, scaling)

    def _check_settings(self):
        """Validate the settings (again at each fit: they are plain attributes users may change)."""
        if not isinstance(self.net, Sequential):
            raise TypeError(f"net must be a cprop.Sequential, got {type(self.net).__name__}")
        loss_code(self.loss)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be a cprop optimizer such as cprop.SGD(...), got {self.optimizer!r}")
        if self.on_divergence not in ("raise", "warn"):
            raise ValueError(f"on_divergence must be 'raise' or 'warn', got {self.on_divergence!r}")
        if self.loss == "cross_entropy" and self.net.n_outputs < 2:
            raise ValueError(f"cross_entropy needs a network with >= 2 outputs, this one has {self.net.n_outputs}")
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        self.shuffle = check_bool(self.shuffle, "shuffle")
        if self.n_threads is not None:
            self.n_threads = check_positive_int(self.n_threads, "n_threads", maximum=MAX_THREADS)
        self.loss_scale = check_real(self.loss_scale, "loss_scale", low=0, low_open=True)
        self.optimizer.config()

    # -- training ----------------------------------------------------------
    def _prepare(self, X, y, name="X"):
        X = check_X(X, self.net.dtype, self.net.n_inputs, name=name)
        T, labels = prepare_targets(self.loss, y, X.shape[0], self.net.n_outputs, self.net.dtype)
        return X, T, labels

    def fit(self, X: ArrayLike, y: ArrayLike, epochs: int = 1,
            validation_data: tuple[ArrayLike, ArrayLike] | None = None,
            validation_split: float | None = None, callbacks=(), verbose: bool = False,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1) -> History:
        """Train for `epochs` passes over (X, y); returns the History (also ``self.history``).

        Each epoch runs in one compiled call without the GIL: shuffle by index,
        gather each minibatch, forward, loss, backward and update for every
        batch (including a ragged last one), with every buffer allocated once
        here. X is not copied when it is already C-contiguous in the network's dtype.
        For the whole fit, callbacks and validation included, the BLAS behind
        ``scipy.linalg`` is held at one thread (cprop's threads call it).

        Parameters
        ----------
        X : array-like (n_samples, n_features)
        y : labels (n_samples,) for cross_entropy; targets (n_samples, n_outputs)
            (or (n_samples,) for one output) for mse and binary_cross_entropy
        epochs : int >= 0
        validation_data : (X_val, y_val), optional — logs val_loss (and val_accuracy)
        validation_split : float in (0, 1), optional — hold out this fraction of
            (X, y), chosen at random with the trainer's seed, as validation data
        callbacks : Callback or callables ``f(trainer, epoch, logs)`` run after
            each epoch; returning True stops training (see cprop.callbacks,
            cprop.schedules)
        verbose : bool — show progress (a tqdm bar when tqdm is installed,
            else one line per epoch)
        checkpoint : path, optional — save the trainer there (atomically) every
            `checkpoint_every` epochs and at the end; ``Trainer.load`` resumes it

        Raises
        ------
        DivergenceError — the loss or an update became non-finite (with
            ``on_divergence="raise"``); the network keeps its last finite parameters.
        KeyboardInterrupt — Ctrl-C takes effect between batches; the network keeps
            the parameters of the last completed step, the history its completed epochs.
        """
        epochs = check_positive_int(epochs, "epochs", minimum=0, maximum=None)
        self._check_settings()
        X, T, labels = self._prepare(X, y)
        if validation_split is not None:
            if validation_data is not None:
                raise ValueError("pass validation_data or validation_split, not both")
            (X, T, labels), (Xv, Tv, labels_v) = self._split(X, T, labels, validation_split)
        elif validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            Xv, Tv, labels_v = self._prepare(*validation_data, name="validation X")
        has_validation = validation_split is not None or validation_data is not None
        callbacks = as_callbacks(callbacks)
        if checkpoint is not None:
            checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
            directory = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
            callbacks.append(Checkpoint(checkpoint, checkpoint_every))

        buffers = self._buffers(X.shape[0])
        progress = _Progress(epochs, verbose)
        for cb in callbacks:
            cb.on_train_begin(self)
        # BLAS is held at one thread for the whole fit, not set and restored
        # around every epoch: an epoch that starts right after a restore found
        # OpenBLAS's pool awake on the cores it needs (measured: 6% slower short epochs;
        # digits fits of 100 epochs 1-3% faster held once, in two A/B runs)
        try:
            with single_threaded_blas():
                for _ in range(epochs):
                    logs = self._epoch(X, T, labels, buffers)
                    if logs is None:          # diverged, with on_divergence="warn"
                        break
                    if has_validation:
                        logs.update(self._evaluate_prepared(Xv, Tv, labels_v, prefix="val_"))
                    self.history.append(**logs)
                    progress.update(self.epochs_done, logs)
                    # every callback sees every epoch, even when an earlier one asks to stop
                    stop = [_is_true(cb.on_epoch_end(self, self.epochs_done, logs)) for cb in callbacks]
                    if any(stop):
                        break
        finally:
            progress.close()
        for cb in callbacks:
            cb.on_train_end(self)
        return self.history

    def _buffers(self, n):
        """What every epoch of a fit over n samples reuses: batch size, workspace, label buffer,
        thread count, sample order (shuffled in place of the identity when shuffling)."""
        batch_size = min(self.batch_size, n)
        net = self.net
        return {"batch_size": batch_size, "gather": self.shuffle,
                "work": np.empty(_core.workspace_size(net.sizes, batch_size, self.shuffle), dtype=net.dtype),
                "label_buf": np.empty(batch_size, dtype=np.intp),
                "threads": ThreadFallback(self.n_threads),
                "order": np.arange(n, dtype=np.intp)}

    def _epoch(self, X, T, labels, buffers):
        """One compiled epoch over (X, T, labels): its logs, or None when it diverged and
        on_divergence is "warn" (with "raise", DivergenceError)."""
        net, n, batch_size = self.net, X.shape[0], buffers["batch_size"]
        order = self.rng.permutation(n).astype(np.intp, copy=False) if self.shuffle else buffers["order"]
        cfg = self.optimizer.config()     # a callback may have changed the optimizer
        state_a, state_b = self.optimizer._state_pair(net)
        cfg["step"] = self.optimizer.step_count
        start = time.perf_counter()
        try:
            status, loss_sum, n_seen, step = _core.train_epoch(
                X, T, labels, order, buffers["gather"], net.params, net.grads, state_a, state_b,
                buffers["work"], buffers["label_buf"], net.sizes, net.activations, LOSSES[self.loss],
                self.loss_scale, batch_size, cfg, buffers["threads"].n_threads)
        except KeyboardInterrupt:
            # the interrupted epoch's completed steps are kept; Adam's count with them
            self.optimizer.step_count = cfg["step"]
            net._has_grads = False
            raise
        self.optimizer.step_count = step
        net._has_grads, net._grad_rows = True, n - (n - 1) // batch_size * batch_size
        elapsed = time.perf_counter() - start
        buffers["threads"].after_epoch(elapsed)   # one thread for the rest of the fit if they stall
        if status != _core.OK:
            self._diverged(status, n_seen)
            return None
        self.epochs_done += 1
        return {"loss": loss_sum / n_seen, "lr": self.optimizer.lr, "time": elapsed,
                "samples_per_second": n / elapsed if elapsed > 0 else math.inf}

    def _split(self, X, T, labels, fraction):
        """((X, T, labels) to train on, the same held out): a random `fraction` of the
        samples, drawn with the trainer's generator, held out for validation."""
        fraction = check_real(fraction, "validation_split", low=0, high=1, low_open=True, high_open=True)
        n_val = int(round(fraction * X.shape[0]))
        if n_val < 1 or n_val >= X.shape[0]:
            raise ValueError(f"validation_split={fraction} leaves {n_val} of {X.shape[0]} samples for "
                             "validation; need at least 1 and fewer than all")
        perm = self.rng.permutation(X.shape[0])
        parts = np.sort(perm[n_val:]), np.sort(perm[:n_val])
        # T (float targets) or labels is an empty placeholder, depending on the loss
        return tuple(tuple(a[idx] if a.shape[0] else a for a in (X, T, labels)) for idx in parts)

    def _diverged(self, status, n_seen):
        what = "loss" if status == _core.NONFINITE_LOSS else "update"
        msg = (f"training diverged in epoch {self.epochs_done + 1} after {n_seen} samples: "
               f"the {what} became non-finite. The network keeps its last finite parameters; "
               "lower the learning rate or scale the inputs.")
        if self.on_divergence == "raise":
            raise DivergenceError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)   # _diverged < _epoch < fit < the caller

    # -- evaluation --------------------------------------------------------
    def _evaluate_prepared(self, X, T, labels, prefix=""):
        out = self.net.predict_raw(X, n_threads=self.n_threads)
        grad = np.empty_like(out)
        result = {prefix + "loss": _core.loss(LOSSES[self.loss], out, T, labels, grad, self.loss_scale)}
        if self.loss == "cross_entropy":
            result[prefix + "accuracy"] = float(np.mean(out.argmax(axis=1) == labels))
        elif self.loss == "binary_cross_entropy":
            result[prefix + "accuracy"] = float(np.mean((out > 0) == (T > 0.5)))
        return result

    def evaluate(self, X: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """Mean loss on (X, y), and accuracy for the classification losses.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_inputs)
        y : targets, as for :meth:`fit`

        Returns
        -------
        dict — ``{"loss": float}``, plus ``"accuracy"`` for cross_entropy and
        binary_cross_entropy
        """
        return self._evaluate_prepared(*self._prepare(X, y))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predictions for X.

        Returns
        -------
        ndarray — class labels of shape (n_samples,) for cross_entropy; 0/1 for
        binary_cross_entropy (shape (n_samples,) with one output, else
        (n_samples, n_outputs)); values for mse, likewise.
        """
        out = self.net.predict_raw(X, n_threads=self.n_threads)
        if self.loss == "cross_entropy":
            return out.argmax(axis=1)
        if self.loss == "binary_cross_entropy":
            y = (out > 0).astype(np.intp)
            return y[:, 0] if y.shape[1] == 1 else y
        return out[:, 0] if out.shape[1] == 1 else out

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities for X.

        Returns
        -------
        ndarray of shape (n_samples, n_outputs), float64 — softmax of the
        logits (cross_entropy) or their sigmoid (binary_cross_entropy).

        Raises
        ------
        ValueError — the trainer's loss is mse.
        """
        out = self.net.predict_raw(X, n_threads=self.n_threads).astype(np.float64)
        if self.loss == "cross_entropy":
            out -= out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
            return out / out.sum(axis=1, keepdims=True)
        if self.loss == "binary_cross_entropy":
            return 1.0 / (1.0 + np.exp(-out))
        raise ValueError("predict_proba needs a classification loss")

    # -- files -------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write everything needed to continue training to `path`.

        The archive (npz, no pickle, written atomically) holds the network, the
        optimizer's hyper-parameters and state, the epoch count, the shuffling
        generator's state and the history: :meth:`load` then :meth:`fit`
        continues exactly as if training had never stopped.
        """
        opt = self.optimizer
        meta = {
            "kind": "trainer",
            "architecture": self.net.architecture(),
            "loss": self.loss,
            "optimizer": {"name": type(opt).__name__.lower(), "config": opt.config(),
                          "step_count": opt.step_count},
            "batch_size": self.batch_size, "shuffle": self.shuffle, "loss_scale": self.loss_scale,
            "epochs_done": self.epochs_done,
            "rng_state": self.rng.bit_generator.state,
            "history": self.history.as_dict(),
            "extra": self.extra,
        }
        arrays = {"params": self.net.params}
        if opt.state is not None:
            arrays.update({f"state_{i}": s for i, s in enumerate(opt.state)})
        _io.save_archive(path, meta, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trainer:
        """A Trainer exactly as saved by :meth:`save`.

        Fitting 2 epochs, saving, loading and fitting 2 more gives the same
        weights, bit for bit, as fitting 4.

        Raises
        ------
        cprop.CpropFileError — not a valid cprop trainer file.
        """
        meta, arrays = _io.load_archive(path, kind=("trainer",))
        net = network_from_meta(meta, arrays, path)
        try:
            o = meta["optimizer"]
            cfg = o["config"]
            name = o["name"]
            if name == "sgd":
                opt = SGD(lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                          weight_decay=cfg["weight_decay"])
            elif name in ("adam", "adamw"):
                opt = OPTIMIZERS[name](lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                                       weight_decay=cfg["weight_decay"])
            else:
                raise ValueError(f"unknown optimizer {name!r}")
            opt.decay_bias = bool(cfg.get("decay_bias", True))
            opt.decay_per_sample = bool(cfg.get("decay_per_sample", False))
            trainer = cls(net, loss=meta["loss"], optimizer=opt, batch_size=meta["batch_size"],
                          shuffle=meta["shuffle"], loss_scale=meta.get("loss_scale", 1.0))
            states = [arrays[k] for k in sorted(arrays) if k.startswith("state_")]
            if states:
                expected = max(opt.n_state, 1)
                shape = net.params.shape if opt.n_state else (1,)
                if len(states) != expected or any(s.shape != shape or s.dtype != net.dtype for s in states):
                    raise ValueError("optimizer state does not match the network")
                if not all(np.isfinite(s).all() for s in states):
                    raise ValueError("optimizer state contains non-finite values")
                opt.state = [np.ascontiguousarray(s).copy() for s in states]
            opt.step_count = check_positive_int(o["step_count"], "step_count", minimum=0)
            trainer.epochs_done = check_positive_int(meta["epochs_done"], "epochs_done", minimum=0)
            trainer.rng.bit_generator.state = meta["rng_state"]
            if not isinstance(meta["history"], dict) or not isinstance(meta["shuffle"], bool):
                raise ValueError("history must be a mapping and shuffle a boolean")
            trainer.history = History.from_dict(meta["history"])
            trainer.extra = meta.get("extra", {})
            if not isinstance(trainer.extra, dict):
                raise ValueError("extra must be a mapping")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _io.CpropFileError(f"{path!r}: invalid trainer in file ({exc})") from None
        return trainer


def _is_true(value):
    """A callback's "stop": True or numpy's True; None (no return) and anything else go on."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


class _Progress:
    """Per-epoch progress for fit(verbose=True): a tqdm bar when tqdm is installed, else lines."""

    def __init__(self, epochs, verbose):
        self.bar = None
        self.verbose = bool(verbose)
        if self.verbose:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=epochs, unit="epoch", desc="fit")

    @staticmethod
    def _describe(logs):
        parts = [f"loss {logs['loss']:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in logs.items() if k.startswith("val_")]
        parts.append(f"{logs['samples_per_second']:,.0f} samples/s")
        return parts

    def update(self, epoch, logs):
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.set_postfix_str("  ".join(self._describe(logs)), refresh=False)
            self.bar.update(1)
        else:
            print(f"epoch {epoch:4d}  " + "  ".join(self._describe(logs)), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
