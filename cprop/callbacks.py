"""Callbacks: code that runs between epochs of :meth:`cprop.Trainer.fit`.

A callback is a :class:`Callback` or any callable ``f(trainer, epoch, logs)``
(called after each epoch; returning True stops training). ``logs`` holds the
epoch's ``loss``, ``lr``, ``time``, ``samples_per_second`` and, with validation
data, ``val_loss`` (and ``val_accuracy``).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np

from ._validation import check_positive_int, check_real

if TYPE_CHECKING:
    from .trainer import Trainer

# what an epoch's callbacks are given: "loss", "lr", "time", ... (see the module's docstring)
Logs = dict[str, float]
# a plain function callback: f(trainer, epoch, logs), True to stop
CallbackFunction = Callable[["Trainer", int, Logs], Optional[bool]]
CallbackLike = Union["Callback", CallbackFunction]


class Callback:
    """Base class: override the hooks you need."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first epoch of a fit."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: Logs) -> bool | None:
        """After each epoch (`epoch` counts from 1 over the trainer's life); return True to stop."""
        return None

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch of a fit, stopped early or not."""


class FunctionCallback(Callback):
    """Wraps a plain function ``f(trainer, epoch, logs)`` as an epoch-end callback."""

    def __init__(self, fn: CallbackFunction) -> None:
        if not callable(fn):
            raise TypeError(f"callbacks must be callables or cprop.callbacks.Callback, got {fn!r}")
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: Logs) -> bool | None:
        return self.fn(trainer, epoch, logs)


def as_callbacks(callbacks: CallbackLike | Sequence[CallbackLike] | None) -> list[Callback]:
    """A list of Callback objects from Callbacks and plain callables."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or callable(callbacks):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a Callback, a callable or a list of them, got {callbacks!r}")
    return [cb if isinstance(cb, Callback) else FunctionCallback(cb) for cb in callbacks]


class EarlyStopping(Callback):
    """Stop after more than `patience` epochs without improvement of a monitored value
    (counted as scikit-learn's n_iter_no_change and torch's ReduceLROnPlateau count).

    Parameters
    ----------
    monitor : str, default "val_loss" — a key of the epoch logs ("loss", "val_loss", "val_accuracy")
    patience : int, default 10 — epochs without improvement tolerated; the next one stops
    min_delta : float, default 0 — smaller changes do not count as improvement
    mode : {"auto", "min", "max"} — "auto": max for accuracies, min otherwise
    restore_best : bool, default True — put back the best epoch's parameters (and running
        statistics: BatchNorm's) at the end
    """

    best_epoch: int | None
    best_params: np.ndarray | None
    best_buffers: np.ndarray | None
    stopped_epoch: int | None

    def __init__(self, monitor: str = "val_loss", patience: int = 10, min_delta: float = 0.0, mode: str = "auto",
                 restore_best: bool = True) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be the name of a logged value (a str such as 'val_loss'), "
                            f"got {monitor!r}")
        self.monitor = monitor
        self.patience = check_positive_int(patience, "patience", minimum=0)
        self.min_delta = check_real(min_delta, "min_delta", low=0)
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.mode = ("max" if "acc" in monitor else "min") if mode == "auto" else mode
        self.restore_best = bool(restore_best)

    def on_train_begin(self, trainer: Trainer) -> None:
        self.best = -math.inf if self.mode == "max" else math.inf
        self.best_epoch = None
        self.best_params = None
        self.best_buffers = None
        self.wait = 0
        self.stopped_epoch = None

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: Logs) -> bool:
        if self.monitor not in logs:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which this fit does not log "
                             f"(it logs {sorted(logs)}); pass validation_data or validation_split")
        value = logs[self.monitor]
        better = (value > self.best + self.min_delta) if self.mode == "max" else (value < self.best - self.min_delta)
        if better:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_params = trainer.net.params.copy()
                self.best_buffers = trainer.net.buffers.copy()
            return False
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, trainer: Trainer) -> None:
        if self.restore_best and self.best_params is not None:
            trainer.net.params[...] = self.best_params
            if self.best_buffers is not None:
                trainer.net.buffers[...] = self.best_buffers


class Checkpoint(Callback):
    """Save the trainer (``trainer.save(path)``, atomic) every `every` epochs and at the end.

    Under MPI (a trainer with ``comm``) rank 0 writes; the others wait for it at the end of
    the epoch, and an error writing stops every rank."""

    def __init__(self, path: str | os.PathLike, every: int = 1) -> None:
        self.path = path
        self.every = check_positive_int(every, "checkpoint_every")

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: Logs) -> None:
        if epoch % self.every == 0 and getattr(trainer, "rank", 0) == 0:
            trainer.save(self.path)

    def on_train_end(self, trainer: Trainer) -> None:
        if getattr(trainer, "rank", 0) == 0:
            trainer.save(self.path)
