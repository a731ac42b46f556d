"""Learning-rate schedules, as callbacks that set ``trainer.optimizer.lr`` after each epoch.

Each remembers the optimizer's learning rate when training starts (``base_lr``)
and sets the rate for the next epoch, with ``t`` the epochs completed:

  Constant()                          lr = base_lr
  StepLR(step_size, gamma)            lr = base_lr · gamma^floor(t / step_size)
  ExponentialLR(gamma)                lr = base_lr · gamma^t
  InverseScaling(power_t)             lr = base_lr / (t + 1)^power_t
  CosineAnnealing(t_max, lr_min)      lr = lr_min + (base_lr - lr_min)·(1 + cos(π·min(t, t_max)/t_max))/2
  ReduceLROnPlateau(monitor, factor, patience, min_delta, lr_min)
                                      lr ·= factor after `patience` epochs without improvement
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ._validation import check_positive_int, check_real
from .callbacks import Callback, Logs

if TYPE_CHECKING:
    from .trainer import Trainer


class Schedule(Callback):
    """Base: ``rate(t, base_lr, logs)`` gives the learning rate after t epochs under this schedule."""

    base_lr: float | None = None   # the optimizer's lr when the schedule first starts
    t: int = 0                     # epochs completed under this schedule (it keeps counting across fits)

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.base_lr is None:
            self.base_lr = trainer.optimizer.lr

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: Logs) -> None:
        if self.base_lr is None:       # a schedule called outside a fit
            self.base_lr = trainer.optimizer.lr
        self.t += 1
        trainer.optimizer.lr = float(self.rate(self.t, self.base_lr, logs))

    def rate(self, t: int, base_lr: float, logs: Logs) -> float:
        """The learning rate after `t` epochs, from `base_lr` and the last epoch's logs."""
        raise NotImplementedError


class Constant(Schedule):
    """lr = base_lr."""

    def rate(self, t: int, base_lr: float, logs: Logs) -> float:
        return base_lr


class StepLR(Schedule):
    """lr = base_lr · gamma^floor(t / step_size) (torch.optim.lr_scheduler.StepLR)."""

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        self.step_size = check_positive_int(step_size, "step_size")
        self.gamma = check_real(gamma, "gamma", low=0)

    def rate(self, t: int, base_lr: float, logs: Logs) -> float:
        return base_lr * self.gamma ** (t // self.step_size)


class ExponentialLR(Schedule):
    """lr = base_lr · gamma^t."""

    def __init__(self, gamma: float) -> None:
        self.gamma = check_real(gamma, "gamma", low=0)

    def rate(self, t: int, base_lr: float, logs: Logs) -> float:
        return base_lr * self.gamma ** t


class InverseScaling(Schedule):
    """lr = base_lr / (t + 1)^power_t."""

    def __init__(self, power_t: float = 0.5) -> None:
        self.power_t = check_real(power_t, "power_t", low=0)

    def rate(self, t: int, base_lr: float, logs: Logs) -> float:
        return base_lr / (t + 1) ** self.power_t


class CosineAnnealing(Schedule):
    """lr = lr_min + (base_lr - lr_min)·(1 + cos(π·min(t, t_max)/t_max)) / 2."""

    def __init__(self, t_max: int, lr_min: float = 0.0) -> None:
        self.t_max = check_positive_int(t_max, "t_max")
        self.lr_min = check_real(lr_min, "lr_min", low=0)

    def rate(self, t: int, base_lr: float, logs: Logs) -> float:
        return self.lr_min + (base_lr - self.lr_min) * (1 + math.cos(math.pi * min(t, self.t_max) / self.t_max)) / 2


class ReduceLROnPlateau(Schedule):
    """Multiply lr by `factor` after more than `patience` epochs in which `monitor` did not improve
    by `min_delta` (counted as torch's ReduceLROnPlateau counts)."""

    best: float | None
    lr: float | None

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, min_delta: float = 1e-4,
                 lr_min: float = 0.0) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be the name of a logged value (a str such as 'val_loss'), "
                            f"got {monitor!r}")
        self.monitor = monitor
        self.factor = check_real(factor, "factor", low=0, high=1, low_open=True, high_open=True)
        self.patience = check_positive_int(patience, "patience", minimum=0)
        self.min_delta = check_real(min_delta, "min_delta", low=0)
        self.lr_min = check_real(lr_min, "lr_min", low=0)
        self.mode = "max" if "acc" in monitor else "min"
        self.best, self.wait, self.lr = None, 0, None

    def rate(self, t: int, base_lr: float, logs: Logs) -> float:
        if self.monitor not in logs:
            raise ValueError(f"ReduceLROnPlateau monitors {self.monitor!r}, which this fit does not log "
                             f"(it logs {sorted(logs)})")
        value, lr = logs[self.monitor], (self.lr if self.lr is not None else base_lr)
        sign = 1 if self.mode == "min" else -1
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait > self.patience:
                lr, self.wait = max(lr * self.factor, self.lr_min), 0
        self.lr = lr
        return lr
