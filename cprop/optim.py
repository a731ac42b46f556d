"""Optimizers, with torch.optim's conventions, each step one fused compiled pass.

SGD:   g' = g + wd·p;  v = μ·v + g';  p -= lr·v   (Nesterov: p -= lr·(g' + μ·v))
Adam:  g' = g + wd·p;  m = β1·m + (1-β1)·g';  v = β2·v + (1-β2)·g'²;
       p -= lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + ε)
AdamW: as Adam, but decay is decoupled: p *= 1 - lr·wd, and g' = g.
Adam(sklearn_style=True), scikit-learn's: ε added to √v before the bias correction,
       p -= lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + ε)
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _fpenv
from ._lazy import core as _core
from ._threads import resolve_threads, single_threaded_blas
from ._validation import check_bool, check_positive_int, check_real, is_pinned, pinned_copy, pinned_zeros

# Adam's step count is a C Py_ssize_t the kernels advance by one per step: bounded far
# enough below 2**63 that no run can overflow it
MAX_STEP_COUNT = 2**62


def check_eps_survives_flushing(optimizer, dtype):
    """ValueError for an Adam eps that the flushed passes would read as 0 (see
    cprop.set_flush_denormals): a subnormal number of the network's dtype. Checked as a
    Trainer is set up and again before every compiled step (eps or the flush may change)."""
    eps = getattr(optimizer, "eps", None)
    tiny = np.finfo(dtype).tiny
    if eps is not None and eps < tiny and _fpenv.get_flush_denormals():
        raise ValueError(f"{type(optimizer).__name__} eps={eps!r} is below the smallest normal "
                         f"{np.dtype(dtype).name} number ({tiny:.3g}) and reads as 0 while cprop flushes "
                         "subnormals: use a larger eps, or cprop.set_flush_denormals(False)")


def _check_clip(value):
    """clip_norm: None (no clipping) or a real number > 0."""
    return None if value is None else check_real(value, "clip_norm", low=0, low_open=True)


def _clip_from_config(cfg):
    """clip_norm from a saved config: 0 (and files from before it: absent) is None; anything
    but a real number >= 0 is refused."""
    value = cfg.get("clip_norm", 0.0)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"clip_norm must be a real number, got {value!r}")
    return None if value == 0 else _check_clip(value)


class Optimizer:
    """Base class: holds hyper-parameters and per-network state (flat arrays like the parameters)."""

    lr: float
    weight_decay: float
    _CORE: str | None = None     # the compiled update this class runs (a key of _core.OPTIMIZERS)
    full_batch = False   # True: Trainer hands it the whole data set each epoch (L-BFGS)
    # Gradient clipping by global norm before every step, as torch.nn.utils.clip_grad_norm_
    # (Keras: global_clipnorm): ‖g‖ = √Σg² over every parameter's gradient, then
    # g *= clip_norm / (‖g‖ + 1e-6) when that is below 1. None: no clipping.
    clip_norm: float | None = None

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

    @property
    def state(self):
        """The state arrays (momentum; Adam's moments), flat like the parameters, or None.

        Reading gives views of the optimizer's own arrays (modify them in place);
        assigning copies the arrays in, so that two slots, or a slot and the network's
        parameters, never share memory the compiled step writes."""
        if not isinstance(self._state, list):
            return self._state           # None, or whatever was assigned (replaced at the next step)
        return [s.view() if isinstance(s, np.ndarray) else s for s in self._state]

    @state.setter
    def state(self, value):
        if value is None or not isinstance(value, (list, tuple)):
            self._state = value          # anything else is replaced by zeros at the next step
        else:
            self._state = [np.array(s) if isinstance(s, np.ndarray) else s for s in value]

    def config(self) -> dict:
        """The hyper-parameters as the compiled step reads them, checked again here: they
        are plain attributes that may have been changed since construction."""
        self.clip_norm = _check_clip(self.clip_norm)
        self.lr = check_real(self.lr, "lr", low=0)
        self.weight_decay = check_real(self.weight_decay, "weight_decay", low=0)
        self.decay_bias = check_bool(self.decay_bias, "decay_bias")
        self.decay_per_sample = check_bool(self.decay_per_sample, "decay_per_sample")
        self.step_count = check_positive_int(self.step_count, "step_count", minimum=0, maximum=MAX_STEP_COUNT)
        return {"kind": self.kind, "lr": self.lr, "weight_decay": self.weight_decay,
                "decay_bias": self.decay_bias, "decay_per_sample": self.decay_per_sample,
                "step": self.step_count, "clip_norm": 0.0 if self.clip_norm is None else self.clip_norm,
                **self._hyper()}

    def _hyper(self):
        """The optimizer's own hyper-parameters, validated."""
        raise NotImplementedError

    def _clip_repr(self):
        return "" if self.clip_norm is None else f", clip_norm={self.clip_norm}"

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
        check_eps_survives_flushing(self, params.dtype)
        n = 2 if cfg["kind"] == _core.OPTIMIZERS["adam"] else (1 if cfg.get("momentum") else 0)
        shape = params.shape if n else (1,)
        state = self._state      # our own arrays (the setter copies): views of them to check
        state = [s.view() for s in state] if isinstance(state, list) and all(
            isinstance(s, np.ndarray) for s in state) else None
        fresh = state is None or len(state) != max(n, 1) or any(
            s.shape != shape or s.dtype != params.dtype or not s.flags.c_contiguous
            or not s.flags.writeable for s in state)
        if fresh:
            self.step_count = 0
            cfg["step"] = 0
        if fresh or not all(is_pinned(s, self.__dict__.get("_pins", ())) for s in self._state):
            # the compiled step reads the state without the GIL: memory Python cannot free or
            # move (pinned_zeros); an assigned state is copied in once
            pinned = ([pinned_zeros(shape[0], params.dtype) for _ in range(max(n, 1))] if fresh
                      else [pinned_copy(s) for s in self._state])
            self._state = [a for a, _ in pinned]
            self._pins = tuple(pin for _, pin in pinned)
        state = [s.view() for s in self._state]
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

    def __getstate__(self):
        # the pins of the state's memory are this process's: made again at the next step
        return {k: v for k, v in self.__dict__.items() if k != "_pins"}

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
    clip_norm : float > 0 or None, default None
        Clip the gradient by its global norm before each step (torch's
        ``clip_grad_norm_(params, clip_norm)``): g *= clip_norm / (‖g‖ + 1e-6) when that
        is below 1, ‖g‖ over every parameter's gradient together (weight decay after).
    """

    _CORE = "sgd"

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, clip_norm: float | None = None) -> None:
        super().__init__()
        self.clip_norm = _check_clip(clip_norm)
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
                f"weight_decay={self.weight_decay}{self._clip_repr()})")

    @classmethod
    def from_config(cls, cfg):
        return cls(lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                   weight_decay=cfg["weight_decay"], clip_norm=_clip_from_config(cfg))

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
    clip_norm : float > 0 or None, default None
        Clip the gradient by its global norm before each step, as :class:`SGD` does.
    """

    _CORE = "adam"
    n_state = property(lambda self: 2, doc="Adam keeps two state arrays (first and second moments).")
    decoupled = False

    def __init__(self, lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, sklearn_style: bool = False,
                 clip_norm: float | None = None) -> None:
        super().__init__()
        self.clip_norm = _check_clip(clip_norm)
        self.lr = check_real(lr, "lr", low=0)
        self.betas = betas
        self.eps = eps
        self.weight_decay = check_real(weight_decay, "weight_decay", low=0)
        self.sklearn_style = sklearn_style
        self._hyper()

    def __repr__(self):
        style = ", sklearn_style=True" if self.sklearn_style else ""
        return (f"{type(self).__name__}(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}{style}{self._clip_repr()})")

    @classmethod
    def from_config(cls, cfg):
        opt = cls(lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                  weight_decay=cfg["weight_decay"], clip_norm=_clip_from_config(cfg))
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
                 weight_decay: float = 0.01, *, clip_norm: float | None = None) -> None:
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip_norm=clip_norm)


class LBFGS(Optimizer):
    """Limited-memory BFGS over the whole data set: ``scipy.optimize.minimize(method="L-BFGS-B")``
    on the network's flat parameters, each evaluation of the loss and its gradient over all
    samples one compiled call without the GIL.

    The objective is the trainer's loss (``loss_scale`` × the mean over all samples) plus
    ``weight_decay/2·‖p‖²`` over the decayed parameters (weights; biases too when
    ``decay_bias``; ``weight_decay/n_samples`` when ``decay_per_sample``), so that its
    gradient is the one SGD and Adam step with.

    With :class:`Trainer`, each epoch is one L-BFGS run over all of (X, y) from the current
    weights, of up to `max_iter` iterations (as one step of ``torch.optim.LBFGS``); the next
    epoch starts a new run (its curvature history is not kept). ``batch_size`` and
    ``shuffle`` have no effect; Dropout draws one set of masks per run, so that every
    evaluation of a run sees the same function.

    Parameters
    ----------
    max_iter : int >= 1, default 200 — iterations per run
    max_fun : int >= 1, default 15000 — evaluations of loss and gradient per run (checked
        at the end of each iteration, so a run may take a few more)
    tol : float >= 0, default 1e-4 — stop when every component of the gradient is at most
        `tol` in absolute value (scipy's ``gtol``)
    history : int >= 1, default 10 — corrections kept for the inverse-Hessian estimate
        (scipy's ``maxcor``)
    weight_decay : float >= 0, default 0

    Attributes
    ----------
    result : scipy.optimize.OptimizeResult or None — the last run's: ``fun`` (the
        objective, decay term included), ``nit``, ``nfev``, ``status`` (0 converged, 1 a
        limit reached, 2 stopped otherwise), ``message``.
    step_count : int — iterations taken over all runs
    """

    full_batch = True
    n_state = property(lambda self: 0, doc="L-BFGS keeps no state between runs.")
    # the objective's value is loss × _value_scale + _value_offset (+ decay), its gradient
    # the loss's: 1 and 0 keep the two consistent. cprop.sklearn hands L-BFGS what
    # scikit-learn hands it: for multi-output squared error the value averaged over outputs
    # while the gradient sums them (1/n_outputs), for Poisson the deviance's constant term
    _value_scale = 1.0
    _value_offset = 0.0

    def __init__(self, max_iter: int = 200, max_fun: int = 15000, tol: float = 1e-4, history: int = 10,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.max_iter = max_iter
        self.max_fun = max_fun
        self.tol = tol
        self.history = history
        self.weight_decay = weight_decay
        self.result = None
        self.config()

    def __repr__(self):
        return (f"LBFGS(max_iter={self.max_iter}, max_fun={self.max_fun}, tol={self.tol}, "
                f"history={self.history}, weight_decay={self.weight_decay})")

    @property
    def kind(self):
        raise AttributeError("L-BFGS has no compiled update (it runs scipy's L-BFGS-B)")

    def config(self) -> dict:
        """The settings, checked again here (they are plain attributes)."""
        if self.clip_norm is not None:
            raise ValueError("L-BFGS takes no clip_norm (it steps along its own search "
                             "directions); set clip_norm on SGD, Adam or AdamW")
        self.max_iter = check_positive_int(self.max_iter, "max_iter", maximum=None)
        self.max_fun = check_positive_int(self.max_fun, "max_fun", maximum=None)
        self.tol = check_real(self.tol, "tol", low=0)
        self.history = check_positive_int(self.history, "history", maximum=None)
        self.weight_decay = check_real(self.weight_decay, "weight_decay", low=0)
        self.decay_bias = check_bool(self.decay_bias, "decay_bias")
        self.decay_per_sample = check_bool(self.decay_per_sample, "decay_per_sample")
        self.step_count = check_positive_int(self.step_count, "step_count", minimum=0, maximum=None)
        return {"max_iter": self.max_iter, "max_fun": self.max_fun, "tol": self.tol,
                "history": self.history, "weight_decay": self.weight_decay,
                "decay_bias": self.decay_bias, "decay_per_sample": self.decay_per_sample,
                "step": self.step_count}

    @classmethod
    def from_config(cls, cfg):
        return cls(max_iter=cfg["max_iter"], max_fun=cfg["max_fun"], tol=cfg["tol"],
                   history=cfg["history"], weight_decay=cfg["weight_decay"])

    def step(self, net, n_threads=None):
        """Not available: L-BFGS needs the loss over the whole data set, not one gradient."""
        raise TypeError("LBFGS minimises the loss over a whole data set: use it with "
                        "cprop.Trainer(net, loss, optimizer=cprop.LBFGS()).fit(X, y)")

    def _decayed_ranges(self, net):
        """(start, stop) of each flat parameter range the decay term covers."""
        table, names = net._plan[0], _core.PLAN_INT
        ranges = []
        for row in table:
            n_param = int(row[names["n_param"]])
            if n_param == 0:
                continue
            off = int(row[names["param"]])
            n_w = (int(row[names["n_in"]]) * int(row[names["n_out"]])
                   if row[names["kind"]] == _core.LAYER_KINDS["dense"] else int(row[names["n_out"]]))
            ranges.append((off, off + (n_param if self.decay_bias else n_w)))
        return ranges

    def minimize(self, net, X, T, labels, settings, weights=None, guard=None):
        """One L-BFGS run on `net` over validated (X, T or labels) and sample weights (or
        None); `settings`: the loss's code, loss_scale, seed (of the dropout masks) and
        n_threads, as Trainer passes them. With weights the loss is the weighted mean and
        ``decay_per_sample`` divides by their sum. `guard` (Trainer's): run before every
        evaluation, it raises if the data's memory was replaced meanwhile.

        Leaves the run's last iterate in the network and returns scipy's result (also
        :attr:`result`), with ``data_loss``: ``loss_scale`` × the mean loss there (decay
        term excluded), and ``overflowed``: whether the run ended in a line search that met
        a loss or gradient that is not finite. Such a point counts as +inf, and L-BFGS-B's
        line search, unable to step past it, returns to the last iterate: the run then
        ends there (status 2), or at the starting weights (``data_loss`` NaN when even
        those overflow). On Ctrl-C the network keeps the last completed iteration's weights.
        """
        from scipy.optimize import minimize
        cfg = self.config()
        params, grads = net._params, net._grads
        n = X.shape[0]
        # Trainer hands over weights divided by their mean, and that mean as weight_scale
        total_weight = n if weights is None else float(np.sum(weights, dtype=np.float64)) * settings.get(
            "weight_scale", 1.0)
        decay = cfg["weight_decay"] / total_weight if cfg["decay_per_sample"] else cfg["weight_decay"]
        ranges = self._decayed_ranges(net) if decay > 0 else []
        work = net._gradient_workspace(n)    # one workspace for every evaluation of the run
        x0 = params.astype(np.float64)
        last = {"x": x0, "overflows": 0}     # the last completed iteration; overflows since

        def decay_term(x):
            return sum(0.5 * decay * float(np.dot(x[lo:hi], x[lo:hi])) for lo, hi in ranges)

        def objective(x):
            params[...] = x
            value = net._batch_gradient(X, T, labels, settings["loss"], settings["loss_scale"],
                                        settings["seed"], settings["n_threads"], work=work,
                                        weights=weights, guard=guard)
            grad = grads.astype(np.float64)      # scipy's, in float64 (a copy it may keep)
            value = value * self._value_scale + self._value_offset + decay_term(x)
            for lo, hi in ranges:
                grad[lo:hi] += decay * x[lo:hi]
            if not (math.isfinite(value) and np.isfinite(grad).all()):
                last["overflows"] += 1
                return math.inf, np.zeros_like(grad)
            return value, grad

        def iteration_done(intermediate_result):
            # after an overflow L-BFGS-B may report as its next iterate one that is not
            # finite, or the last one again (its line search fell back to step 0): neither
            # is progress past the overflow
            x = intermediate_result.x
            if (math.isfinite(intermediate_result.fun) and np.isfinite(x).all()
                    and not np.array_equal(x, last["x"])):
                last["x"], last["overflows"] = x.copy(), 0

        try:
            result = minimize(objective, x0, jac=True, method="L-BFGS-B", callback=iteration_done,
                              options={"maxiter": cfg["max_iter"], "maxfun": cfg["max_fun"],
                                       "gtol": cfg["tol"], "maxcor": cfg["history"]})
        except BaseException:
            # Ctrl-C, or any exception (a signal handler's) raised at a trial point
            params[...] = last["x"]
            net._has_grads = False
            raise
        self.result = result
        self.step_count += int(result.nit)
        result.overflowed = last["overflows"] > 0 or not (
            math.isfinite(result.fun) and np.isfinite(result.x).all())
        if result.overflowed:
            result.x, result.success, result.status = last["x"], False, 2
            result.message = ("ABNORMAL: the loss or its gradient is not finite at the line search's "
                              "trial points; the run ends at the last finite iterate")
            result.fun = objective(last["x"])[0]     # leaves last["x"] in the network
        else:
            params[...] = result.x
        result.data_loss = ((result.fun - self._value_offset - decay_term(result.x)) / self._value_scale
                            if math.isfinite(result.fun) else math.nan)
        return result


# name (as saved in trainer files) -> class: Trainer.load and the CLI read this table
OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "lbfgs": LBFGS}
