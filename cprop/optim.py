"""Optimizers, with torch.optim's conventions, each step one fused compiled pass.

SGD:   g' = g + wd·p;  v = μ·v + g';  p -= lr·v   (Nesterov: p -= lr·(g' + μ·v))
Adam:  g' = g + wd·p;  m = β1·m + (1-β1)·g';  v = β2·v + (1-β2)·g'²;
       p -= lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + ε)
AdamW: as Adam, but decay is decoupled: p *= 1 - lr·wd, and g' = g.
Adam(sklearn_style=True), scikit-learn's: ε added to √v before the bias correction,
       p -= lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + ε)
"""
from __future__ import annotations

import numpy as np

from ._lazy import core as _core
from ._threads import resolve_threads, single_threaded_blas
from ._validation import check_bool, check_positive_int, check_real


class Optimizer:
    """Base class: holds hyper-parameters and per-network state (flat arrays like the parameters)."""

    _CORE = None     # the compiled update this class runs (a key of _core.OPTIMIZERS)

    @property
    def kind(self) -> int:
        """The compiled update's code for this optimizer class (read-only)."""
        return _core.OPTIMIZERS[type(self)._CORE]

    def __init__(self):
        self.state = None      # list of flat arrays, shaped like the network's parameters
        self.step_count = 0
        # torch applies weight decay to every parameter; scikit-learn's alpha
        # only to weights, divided by the batch's size (cprop.sklearn sets these)
        self.decay_bias = True
        self.decay_per_sample = False

    @property
    def n_state(self):
        """How many parameter-sized state arrays the update keeps (momentum: 1; Adam: 2)."""
        raise NotImplementedError

    def config(self) -> dict:
        """The hyper-parameters as the compiled step reads them, checked again here: they
        are plain attributes that may have been changed since construction."""
        self.lr = check_real(self.lr, "lr", low=0)
        self.weight_decay = check_real(self.weight_decay, "weight_decay", low=0)
        self.decay_bias = check_bool(self.decay_bias, "decay_bias")
        self.decay_per_sample = check_bool(self.decay_per_sample, "decay_per_sample")
        self.step_count = check_positive_int(self.step_count, "step_count", minimum=0, maximum=None)
        return {"kind": self.kind, "lr": self.lr, "weight_decay": self.weight_decay,
                "decay_bias": self.decay_bias, "decay_per_sample": self.decay_per_sample,
                "step": self.step_count, **self._hyper()}

    def _hyper(self):
        """The optimizer's own hyper-parameters, validated."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: dict) -> Optimizer:
        """An optimizer from :meth:`config`'s dict (as saved with a trainer); KeyError when
        a hyper-parameter is missing, ValueError/TypeError when one is invalid."""
        raise NotImplementedError

    def _kernel_state(self, net, cfg):
        """The two state arrays the compiled step with `cfg` reads and writes, checked here,
        right before the call, against the network's own parameter array.

        What the step needs follows from `cfg` (Adam: 2 arrays, SGD with momentum: 1, else
        none, passed as a 1-element placeholder), not from attributes that may have changed
        since. State that does not fit (``state = None``, another network, a reshaped
        array) is replaced by zeros, and the step count restarts.
        """
        params = net._params
        n = 2 if cfg["kind"] == _core.OPTIMIZERS["adam"] else (1 if cfg.get("momentum") else 0)
        shape = params.shape if n else (1,)
        state = self.state
        state = [s.view() for s in state] if isinstance(state, (list, tuple)) and all(
            isinstance(s, np.ndarray) for s in state) else None   # views: ours to check
        if state is None or len(state) != max(n, 1) or any(
                s.shape != shape or s.dtype != params.dtype or not s.flags.c_contiguous
                or not s.flags.writeable for s in state):
            state = [np.zeros(shape, dtype=params.dtype) for _ in range(max(n, 1))]
            self.state = list(state)
            self.step_count = 0
            cfg["step"] = 0
        return state[0], state[-1]

    def step(self, net, n_threads: int | None = None) -> None:
        """Apply one update to every parameter of `net` from its gradients.

        Parameters
        ----------
        net : Sequential
            A network whose :meth:`~cprop.Sequential.backward` has run.
        n_threads : int, optional

        Raises
        ------
        RuntimeError — no gradients yet.
        FloatingPointError — the update would have made parameters non-finite;
            those keep their previous values.
        """
        from .network import Sequential
        if not isinstance(net, Sequential):
            raise TypeError(f"step needs the cprop.Sequential to update, got {type(net).__name__}")
        if not net._has_grads:
            raise RuntimeError("no gradients to step with: call net.backward(grad) after net.forward(X)")
        cfg = self.config()
        a, b = self._kernel_state(net, cfg)
        n_threads = resolve_threads(n_threads)
        with net._training("optimizer step"), single_threaded_blas():
            rejected, self.step_count = _core.optimizer_step(
                cfg, net._plan[0], net._params, net._grads, a, b, net._grad_rows, n_threads)
        if rejected:
            raise FloatingPointError(
                f"the update would have made {rejected} parameter(s) non-finite; "
                "they keep their previous values (lower the learning rate)")

    def reset(self) -> None:
        """Forget the state (momentum, moments, step count)."""
        self.state = None
        self.step_count = 0


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov and weight decay (as torch.optim.SGD).

    Parameters
    ----------
    lr : float, default 0.01
    momentum : float in [0, 1), default 0
    nesterov : bool, default False (needs momentum > 0)
    weight_decay : float >= 0, default 0; L2 added to the gradient of every parameter
    """

    _CORE = "sgd"

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr = check_real(lr, "lr", low=0)
        self.momentum = check_real(momentum, "momentum", low=0, high=1, high_open=True)
        self.nesterov = nesterov
        self.weight_decay = check_real(weight_decay, "weight_decay", low=0)
        self._hyper()

    @property
    def n_state(self):
        return 1 if self.momentum else 0

    def __repr__(self):
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")

    @classmethod
    def from_config(cls, cfg):
        return cls(lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                   weight_decay=cfg["weight_decay"])

    def _hyper(self):
        self.momentum = check_real(self.momentum, "momentum", low=0, high=1, high_open=True)
        self.nesterov = check_bool(self.nesterov, "nesterov")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        return {"momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam (as torch.optim.Adam): L2 weight decay added to the gradient.

    Parameters
    ----------
    lr : float, default 0.001
    betas : (float, float) in [0, 1), default (0.9, 0.999)
    eps : float > 0, default 1e-8
    weight_decay : float >= 0, default 0
    sklearn_style : bool, default False
        Where ε goes. False (torch's): ``p -= lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + ε)``.
        True (scikit-learn's AdamOptimizer): ``p -= lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + ε)``,
        computed as scikit-learn computes it, so that both take the same steps. The two
        differ by ε scaled by √(1-β2ᵗ): most in the first steps and when √v is near ε.
    """

    _CORE = "adam"
    n_state = property(lambda self: 2, doc="Adam keeps two state arrays (first and second moments).")
    decoupled = False

    def __init__(self, lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, sklearn_style: bool = False) -> None:
        super().__init__()
        self.lr = check_real(lr, "lr", low=0)
        self.betas = betas
        self.eps = eps
        self.weight_decay = check_real(weight_decay, "weight_decay", low=0)
        self.sklearn_style = sklearn_style
        self._hyper()

    def __repr__(self):
        style = ", sklearn_style=True" if self.sklearn_style else ""
        return (f"{type(self).__name__}(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}{style})")

    @classmethod
    def from_config(cls, cfg):
        opt = cls(lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                  weight_decay=cfg["weight_decay"])
        opt.sklearn_style = cfg.get("sklearn_style", False)   # files from before it: torch's
        opt._hyper()
        return opt

    def _hyper(self):
        betas = self.betas
        if isinstance(betas, np.ndarray):
            betas = betas.tolist()
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        self.betas = (check_real(betas[0], "beta1", low=0, high=1, high_open=True),
                      check_real(betas[1], "beta2", low=0, high=1, high_open=True))
        self.eps = check_real(self.eps, "eps", low=0, low_open=True)
        self.sklearn_style = check_bool(self.sklearn_style, "sklearn_style")
        return {"beta1": self.betas[0], "beta2": self.betas[1], "eps": self.eps,
                "decoupled": self.decoupled, "sklearn_style": self.sklearn_style}


class AdamW(Adam):
    """AdamW (as torch.optim.AdamW): decoupled weight decay ``p *= 1 - lr·wd``; default wd 0.01."""

    decoupled = True

    def __init__(self, lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# name (as saved in trainer files) -> class: Trainer.load and the CLI read this table
OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
