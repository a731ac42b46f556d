"""scikit-learn drop-in estimators: :class:`MLPClassifier` and :class:`MLPRegressor`.

They take scikit-learn's ``sklearn.neural_network`` parameters (same names,
defaults and meaning) and train with cprop: a :class:`cprop.Sequential` of
:class:`cprop.Dense` layers (the output layer is identity: the loss fuses the
softmax or sigmoid) and one :meth:`cprop.Trainer.fit` call. For "sgd" and
"adam" its per-epoch callback does scikit-learn's bookkeeping (loss curve,
``tol`` / ``n_iter_no_change``, early stopping, learning-rate schedules,
ConvergenceWarning); "lbfgs" is one run of :class:`cprop.LBFGS`.

scikit-learn's conventions and how cprop reproduces them:

- loss and gradient: sklearn's squared error has gradient ``(p - y)/n``, i.e.
  cprop's ``mse`` × n_outputs/2; its log-loss is cprop's
  ``binary_cross_entropy`` × n_outputs (binary, multi-label) or
  ``cross_entropy`` × 1 (softmax). The factor is ``Trainer(loss_scale=...)``.
- L2: ``alpha·W / batch_size`` added to the weights' gradient, biases not
  decayed: ``weight_decay=alpha, decay_bias=False, decay_per_sample=True``.
- SGD: sklearn's ``v = μv - lr·g; p += v`` (Nesterov ``p += μv - lr·g``) is
  torch's ``v = μv + g; p -= lr·v`` with sklearn's v = -lr × torch's v; when
  the learning rate changes between epochs (invscaling, adaptive) cprop's
  velocity is rescaled by old_lr/new_lr so the two stay the same update.
- Adam: sklearn's update, ``p -= lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + ε)`` (ε added
  to √v before the bias correction; ``cprop.Adam(sklearn_style=True)``), where
  ``cprop.Adam`` keeps torch's; the private optimizer's ``learning_rate`` is
  sklearn's (the last bias-corrected step).
- L-BFGS: scipy's L-BFGS-B with sklearn's settings (``maxiter=max_iter``,
  ``maxfun=max_fun``, ``gtol=tol``) on the objective sklearn hands it, the loss
  plus ``alpha/(2n)·‖W‖²``, gradient plus ``alpha/n·W`` (weights only); for
  multi-output squared error that objective's value is averaged over outputs
  while its gradient sums over them, as sklearn's. ``n_iter_``, ``loss_`` (the
  objective) and the ConvergenceWarning are sklearn's; ``t_``, ``loss_curve_``
  and the stopping attributes are left alone, as sklearn leaves them.
- Poisson (``MLPRegressor(loss="poisson")``): an exp output, cprop's
  ``poisson`` loss (torch's Poisson NLL, ``e^z - y·z``) × n_outputs, whose
  gradient ``(p - y)/n`` is sklearn's; sklearn's half deviance also holds the
  term ``xlogy(y, y) - y``, which the drop-in adds to ``loss_`` and
  ``loss_curve_`` (and to L-BFGS's objective, whose stopping test sees it).
- sample_weight: each batch's loss is its weighted mean ``Σ w·l / Σ w`` and
  the L2 term is divided by the batch's ``Σ w`` (as sklearn); early stopping
  splits the weights with the data and scores the validation set with them.
- sparse X (any scipy.sparse format; CSR and CSC kept by sklearn's validation,
  the others converted to CSR): the first layer multiplies each minibatch's CSR
  rows in place and its dW = Xᵀ·δ is a sparse product, as sklearn's
  ``safe_sparse_dot``; the result is the dense input's to rounding.
- initial weights: drawn exactly as sklearn draws them (Glorot-uniform weights
  *and* biases from ``check_random_state(random_state)``), so the same
  ``random_state`` starts both from the same point.

Known differences from scikit-learn (documented, deliberate):

- Poisson targets must be >= 0 (ValueError; sklearn takes negative ones and
  reports a NaN loss).
- negative sample weights are refused (sklearn takes them); a batch whose
  weights are all 0 is skipped (sklearn fails on it, dividing by Σ w = 0).
- ``momentum`` must be < 1 (sklearn allows 1).
- ``loss_`` / ``loss_curve_``: the data term is exact (summed over the epoch's
  batches at their pre-update weights, as sklearn). sklearn adds
  ``alpha/2·‖W‖²/n`` once per *batch* at that batch's weights; cprop knows the
  weights only at epoch boundaries and interpolates ‖W‖² linearly between them
  (exact with one batch per epoch, second order otherwise). With sample weights
  and shuffling it also takes each batch's ``Σ w`` (and Poisson's constant
  term) as the average's.
- the shuffling order differs (cprop's generator, seeded from random_state).
- log-loss is computed from logits without sklearn's clipping of
  probabilities at machine epsilon.
- a diverging fit stops at the failing batch with the last finite weights
  (sklearn carries on with NaN): ValueError, or with early stopping a
  RuntimeWarning and the best weights, as sklearn ends up. L-BFGS alike: a
  line search that meets a loss that is not finite ends the run at the last
  finite iterate, and fit raises ValueError (sklearn warns and reports a NaN loss).
- with L-BFGS, the same iterations as sklearn's to rounding; over hundreds of
  iterations of a non-convex problem the rounding of different summation
  orders grows, and the two end at nearby points of similar loss and score.
- ``coefs_`` and ``intercepts_`` are views of the live cprop network's
  parameters: modify them in place (``coefs_[0][...] = W``) to change the
  model; assigning new arrays to the lists does not.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from numbers import Integral, Real
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import expit, log_expit, xlogy

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context, is_classifier
except ImportError as exc:   # scikit-learn is an optional extra
    raise ImportError('cprop.sklearn needs scikit-learn: pip install "cprop[sklearn]" '
                      f"(or pip install scikit-learn); the import failed with: {exc}") from exc
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, column_or_1d
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.optimize import _check_optimize_result

try:
    from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
except ImportError as exc:  # validate_data is public from scikit-learn 1.6 on
    raise ImportError("cprop.sklearn needs scikit-learn >= 1.6") from exc

from ._threads import MAX_THREADS
from ._validation import check_sparse_X, is_sparse
from .layers import Dense
from .network import Sequential
from .optim import LBFGS, SGD, Adam
from .trainer import DivergenceError, Trainer

_Estimator = TypeVar("_Estimator", bound="_BaseMLP")

__all__ = ["MLPClassifier", "MLPRegressor"]

# the sparse formats sklearn's validation keeps (others become CSR), as sklearn's MLP
_SPARSE = ["csr", "csc"]

# sklearn's activation names -> cprop's
_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}

# out_activation_ -> (cprop loss, loss_scale(n_outputs) that gives sklearn's gradient)
_LOSSES = {
    "softmax": ("cross_entropy", lambda n_outputs: 1.0),
    "logistic": ("binary_cross_entropy", lambda n_outputs: float(n_outputs)),
    "identity": ("mse", lambda n_outputs: n_outputs / 2.0),
    "exp": ("poisson", lambda n_outputs: float(n_outputs)),
}


class _SGD(SGD):
    """The drop-in's SGD; ``learning_rate`` answers as scikit-learn's SGDOptimizer's."""

    @property
    def learning_rate(self):
        """The current learning rate (scikit-learn's name for it)."""
        return self.lr


class _Adam(Adam):
    """The drop-in's Adam: scikit-learn's update (``sklearn_style``), and ``learning_rate``
    answering as scikit-learn's AdamOptimizer's."""

    def __init__(self, lr, betas, eps):
        super().__init__(lr=lr, betas=betas, eps=eps, sklearn_style=True)

    @property
    def learning_rate(self):
        """The bias-corrected step of the last update, lr·√(1-β2ᵗ)/(1-β1ᵗ) (lr before any)."""
        t = self.step_count
        if t == 0:
            return self.lr
        beta1, beta2 = self.betas
        return self.lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)


def _stochastic_solver(estimator):
    """partial_fit exists for the stochastic solvers only (as in scikit-learn)."""
    if estimator.solver not in ("sgd", "adam"):
        raise AttributeError(f"partial_fit is only available for stochastic optimizers. "
                             f"{estimator.solver} is not stochastic.")
    return True


class _BaseMLP(BaseEstimator):
    """Shared fit / partial_fit / predict machinery; use MLPClassifier or MLPRegressor."""

    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions({"identity", "logistic", "tanh", "relu"})],
        "solver": [StrOptions({"lbfgs", "sgd", "adam"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "invscaling", "adaptive"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "power_t": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [Interval(Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "momentum": [Interval(Real, 0, 1, closed="left")],   # cprop's SGD needs μ < 1
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "beta_1": [Interval(Real, 0, 1, closed="left")],
        "beta_2": [Interval(Real, 0, 1, closed="left")],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left"), Options(Real, {np.inf})],
        "max_fun": [Interval(Integral, 1, None, closed="left")],
        "n_threads": [Interval(Integral, 1, MAX_THREADS, closed="both"), None],
    }

    # -- set-up --------------------------------------------------------------
    def _hidden_layer_sizes(self):
        sizes = self.hidden_layer_sizes
        sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
        if any(s <= 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {sizes}.")
        return [int(s) for s in sizes]

    def _initialize(self, layer_units, dtype):
        """Fresh network (weights drawn as sklearn draws them) and fit bookkeeping."""
        self.n_iter_ = 0
        self.t_ = 0
        self.n_layers_ = len(layer_units)
        self.out_activation_ = self._output_activation()
        layers = [Dense(layer_units[i], layer_units[i + 1], _ACTIVATIONS[self.activation])
                  for i in range(len(layer_units) - 2)]
        layers.append(Dense(layer_units[-2], layer_units[-1], "identity"))
        self._net = Sequential(layers, dtype=dtype, seed=0)
        # sklearn's _init_coef: Glorot-uniform for weights and biases, in this order
        factor = 2.0 if self.activation == "logistic" else 6.0
        for layer in self._net.layers:
            bound = np.sqrt(factor / (layer.n_in + layer.n_out))
            layer.W[...] = self._random_state.uniform(-bound, bound, (layer.n_in, layer.n_out))
            layer.b[...] = self._random_state.uniform(-bound, bound, layer.n_out)
        self._bind_params()
        self._best_params = self._net.params.copy()
        if self.solver != "lbfgs":    # as sklearn: L-BFGS keeps no loss curve
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _bind_params(self):
        """coefs_ / intercepts_ as views of the network's live parameters."""
        self.coefs_ = [layer.W for layer in self._net.layers]
        self.intercepts_ = [layer.b for layer in self._net.layers]
        self._bound = tuple(self.coefs_), tuple(self.intercepts_)   # to tell later assignments

    def _network(self):
        """The cprop network, after adopting any coefs_ / intercepts_ arrays assigned since
        the last fit (in-place changes need nothing: the lists hold views)."""
        net = getattr(self, "_net", None)
        coefs, intercepts = list(self.coefs_), list(self.intercepts_)
        bound = getattr(self, "_bound", ((), ()))
        if (net is not None and len(coefs) == len(intercepts) == len(bound[0]) == len(net.layers)
                and all(c is bc and b is bb for c, b, bc, bb in zip(coefs, intercepts, *bound))):
            return net
        coefs = [np.asarray(c) for c in coefs]
        intercepts = [np.asarray(b).reshape(-1) for b in intercepts]
        if (not coefs or len(coefs) != len(intercepts) or any(c.ndim != 2 for c in coefs)
                or any(coefs[i].shape[1] != coefs[i + 1].shape[0] for i in range(len(coefs) - 1))
                or any(b.shape[0] != c.shape[1] for c, b in zip(coefs, intercepts))):
            raise ValueError("coefs_ and intercepts_ must be lists of chaining (n_in, n_out) "
                             "weight matrices and (n_out,) bias vectors")
        # the widths the fitted estimator's data had: a network of other widths would take
        # other inputs, or give outputs that are not its classes
        for what, attribute, given in (("inputs", "n_features_in_", coefs[0].shape[0]),
                                       ("outputs", "n_outputs_", coefs[-1].shape[1])):
            expected = getattr(self, attribute, None)
            if expected is not None and given != expected:
                raise ValueError(f"coefs_ describe a network of {given} {what}, the estimator was "
                                 f"fitted with {attribute}={expected}")
        dtype = net.dtype if net is not None else (
            np.float32 if coefs[0].dtype == np.float32 else np.float64)
        hidden = _ACTIVATIONS[self.activation]
        layers = [Dense(c.shape[0], c.shape[1], hidden) for c in coefs[:-1]]
        layers.append(Dense(coefs[-1].shape[0], coefs[-1].shape[1], "identity"))
        adopted = Sequential(layers, dtype=dtype, seed=0)
        for i, (layer, W, b) in enumerate(zip(adopted.layers, coefs, intercepts)):
            try:     # the layers' own checks: finite values, in the network's dtype
                layer.W, layer.b = W, b
            except (TypeError, ValueError) as exc:
                raise ValueError(f"coefs_[{i}] / intercepts_[{i}]: {exc}") from None
        self._net = adopted
        self._bind_params()
        self._best_params = self._net.params.copy()
        return self._net

    def _continue_with(self, layer_units):
        """Warm start / partial_fit: check the existing network still fits the data and parameters."""
        self._network()
        sizes = [int(s) for s in self._net.sizes]
        if sizes != list(layer_units):
            raise ValueError(
                f"cannot continue training a network of layer sizes {sizes} with data and "
                f"hidden_layer_sizes that need {list(layer_units)}; fit with warm_start=False")
        hidden = _ACTIVATIONS[self.activation]
        if any(layer.activation != hidden for layer in self._net.layers[:-1]):
            # as sklearn: the new activation applies to the existing weights
            arch = self._net.architecture()
            arch["activations"] = [hidden] * (len(sizes) - 2) + ["identity"]
            self._net = Sequential.from_architecture(arch, self._net.params)
            self._bind_params()
        if self.solver == "lbfgs":
            return
        # a warm start may switch early stopping on or off, or follow an L-BFGS fit
        if not hasattr(self, "loss_curve_"):
            self.loss_curve_, self._no_improvement_count = [], 0
        if self.early_stopping and getattr(self, "validation_scores_", None) is None:
            self.validation_scores_, self.best_validation_score_ = [], -np.inf
            self._best_params = self._net.params.copy()
        if not self.early_stopping and getattr(self, "best_loss_", None) is None:
            self.best_loss_ = np.inf

    def _new_optimizer(self):
        if self.solver == "sgd":
            opt = _SGD(lr=self.learning_rate_init, momentum=self.momentum,
                       nesterov=bool(self.nesterovs_momentum and self.momentum > 0))
        else:
            opt = _Adam(lr=self.learning_rate_init, betas=(self.beta_1, self.beta_2), eps=self.epsilon)
        # sklearn's L2: alpha·W / batch_size on weights only
        opt.weight_decay = float(self.alpha)
        opt.decay_bias = False
        opt.decay_per_sample = True
        return opt

    def _set_learning_rate(self, lr):
        """Change SGD's learning rate between epochs, keeping sklearn's velocity (-lr × cprop's)."""
        opt = self._optimizer
        if opt.momentum > 0 and opt.state is not None and lr > 0:
            ratio = opt.lr / lr
            rescaled = [np.multiply(v, ratio, dtype=np.float64) for v in opt.state]
            with np.errstate(over="ignore"):
                fits = all(np.isfinite(r.astype(v.dtype)).all() for r, v in zip(rescaled, opt.state))
            if not fits:
                # the velocity is kept as cprop's (sklearn's ÷ -lr): a learning rate that falls
                # this fast would need more range than the network's dtype has
                raise ValueError(
                    f"the learning rate fell from {opt.lr:.3g} to {lr:.3g} in one epoch "
                    f"(learning_rate={self.learning_rate!r}, power_t={self.power_t}); the momentum "
                    f"carried over cannot be held in {np.dtype(self._net.dtype).name} at that scale: "
                    "use a smaller power_t, or float64 X")
            for v, r in zip(opt.state, rescaled):
                v[...] = r
        opt.lr = lr

    # -- fitting ---------------------------------------------------------------
    def _fit(self, X, y, incremental=False, sample_weight=None):
        hidden = self._hidden_layer_sizes()
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        if sample_weight is not None:
            # sklearn's check, and weights >= 0 (a weighted mean needs them)
            sample_weight = _check_sample_weight(sample_weight, X, ensure_non_negative=True)
        if y.ndim == 1:
            y = y.reshape(-1, 1)
        layer_units = [X.shape[1], *hidden, y.shape[1]]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            # float32 X trains a float32 network; everything else float64 (as sklearn)
            self._initialize(layer_units, X.dtype)
        else:
            self._continue_with(layer_units)
        self.n_outputs_ = y.shape[1]      # once the network is known to have that many
        # a sparse X: validated (copied, indices checked) once, as the CSR the core reads
        X = (check_sparse_X(X, self._net.dtype) if is_sparse(X)
             else np.ascontiguousarray(X, dtype=self._net.dtype))
        if self.solver == "lbfgs":
            self._fit_lbfgs(X, y, sample_weight)
        else:
            self._fit_stochastic(X, y, incremental, sample_weight)
        return self

    def _loss_setup(self, y):
        """(cprop loss name, loss_scale giving sklearn's gradient, the factor from cprop's
        loss to the one sklearn reports, targets as the loss takes them). sklearn's Poisson
        loss adds a term that does not depend on the weights: :meth:`_loss_offset`."""
        loss_name, scale = _LOSSES[self.out_activation_]
        # sklearn reports the squared error averaged over outputs (its gradient sums over them)
        report = 1.0 / self.n_outputs_ if loss_name == "mse" else 1.0
        targets = np.ascontiguousarray(y.argmax(axis=1)) if loss_name == "cross_entropy" else y
        return loss_name, scale(self.n_outputs_), report, targets

    def _loss_offset(self, y, sample_weight, batch_size=None):
        """What sklearn's loss adds to cprop's (scaled) one: for poisson the half deviance's
        term xlogy(y, y) - y, summed over outputs and averaged as sklearn averages its loss,
        each batch's (weighted) mean counted by the batch's size; 0 for the other losses.
        Shuffled weighted batches are not known here: the overall weighted mean stands in."""
        if self.out_activation_ != "exp":
            return 0.0
        y = np.asarray(y, dtype=np.float64)
        term = (xlogy(y, y) - y).reshape(len(y), -1).sum(axis=1)
        if sample_weight is None:
            return float(term.mean())
        w = np.asarray(sample_weight, dtype=np.float64)
        if batch_size is None or batch_size >= len(y) or self.shuffle:
            return float(np.average(term, weights=w))
        starts = np.arange(0, len(y), batch_size)
        sizes = np.diff(np.r_[starts, len(y)])
        weight_sums = np.add.reduceat(w, starts)
        means = np.divide(np.add.reduceat(w * term, starts), weight_sums, out=np.zeros(len(starts)),
                          where=weight_sums > 0)
        return float(sizes @ means / len(y))

    def _fit_lbfgs(self, X, y, sample_weight):
        """sklearn's L-BFGS: one run of cprop.LBFGS over all of (X, y), its objective the
        (weighted) mean loss plus alpha/(2n)·‖W‖² (weights only; n: the summed sample
        weights), as sklearn's."""
        loss_name, scale, report, targets = self._loss_setup(y)
        opt = LBFGS(max_iter=self.max_iter, max_fun=self.max_fun, tol=self.tol,
                    weight_decay=float(self.alpha))
        opt.decay_bias = False
        opt.decay_per_sample = True
        # sklearn's objective, even where value and gradient disagree, Poisson's constant included
        opt._value_scale = report
        opt._value_offset = self._loss_offset(y, sample_weight)
        # (L-BFGS takes the whole data set: the trainer's batch size plays no part)
        trainer = Trainer(self._net, loss=loss_name, optimizer=opt, shuffle=False, loss_scale=scale)
        try:
            trainer.fit(X, targets, epochs=1, sample_weight=sample_weight)
        except DivergenceError as exc:
            raise ValueError("Solver produced non-finite parameter weights. The input data may "
                             f"contain large values and need to be preprocessed. ({exc})") from exc
        result = opt.result
        self.n_iter_ = _check_optimize_result("lbfgs", result, self.max_iter)
        self.loss_ = float(result.fun)

    def _fit_stochastic(self, X, y, incremental, sample_weight):
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._new_optimizer()
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        early_stopping = self.early_stopping
        sample_weight_val = None
        if early_stopping:
            # as sklearn: stratify single-output classification only
            stratify = y if is_classifier(self) and self.n_outputs_ == 1 else None
            # split the row numbers (sklearn's split of (X, y), which depends only on
            # their count and stratify), then take those rows of X, dense or CSR alike
            train, val = train_test_split(np.arange(X.shape[0]), random_state=self._random_state,
                                          test_size=self.validation_fraction, stratify=stratify)
            X, X_val, y, y_val = X[train], X[val], y[train], y[val]
            if sample_weight is not None:
                sample_weight, sample_weight_val = sample_weight[train], sample_weight[val]
                if not sample_weight.any():
                    raise ValueError("the training samples left after the validation split all "
                                     "have weight zero; use a different random_state")
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' "
                                 "or the size of your dataset.")
            if is_classifier(self):
                y_val = self._label_binarizer.inverse_transform(y_val)
        n_samples = X.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                # stacklevel 5: the caller of fit (< fit < sklearn's _fit_context < _fit < here)
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. "
                              "It is going to be clipped", stacklevel=5)
            batch_size = int(np.clip(self.batch_size, 1, n_samples))
        l2_factors = self._l2_factors(n_samples, batch_size, sample_weight)

        loss_name, scale, report, targets = self._loss_setup(y)
        offset = self._loss_offset(y, sample_weight, batch_size)
        seed = self._random_state.randint(np.iinfo(np.int32).max) if self.shuffle else None
        trainer = Trainer(self._net, loss=loss_name, optimizer=self._optimizer, batch_size=batch_size,
                          shuffle=self.shuffle, seed=seed, loss_scale=scale, n_threads=self.n_threads)
        alpha = float(self.alpha)
        sq_weights = [self._sum_squared_weights()] if alpha > 0 else None
        stopped = []     # the reason, when the callback stops training before max_iter

        def end_of_epoch(trainer, epoch, logs):
            """sklearn's per-iteration bookkeeping; True stops training."""
            self.n_iter_ += 1
            self.t_ += n_samples
            loss = logs["loss"] * report + offset
            if alpha > 0:
                # sklearn adds alpha/2·‖W_k‖²/n_k for every batch k at its pre-update weights
                # (n_k its size, or summed weights), counted × its size over n; interpolate
                # ‖W‖² linearly between this epoch's two ends
                start, end = sq_weights[0], self._sum_squared_weights()
                loss += 0.5 * alpha * (l2_factors[0] * start + l2_factors[1] * (end - start)) / n_samples
                sq_weights[0] = end
            self.loss_ = loss
            self.loss_curve_.append(loss)
            if self.verbose:
                print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
            if early_stopping:
                self._update_validation(X_val, y_val, sample_weight_val)
            else:
                self._update_no_improvement(loss)
            if self.solver == "sgd" and self.learning_rate == "invscaling":
                self._set_learning_rate(self.learning_rate_init / (self.t_ + 1) ** self.power_t)
            if self._no_improvement_count > self.n_iter_no_change:
                what = "Validation score" if early_stopping else "Training loss"
                msg = (f"{what} did not improve more than tol={self.tol:f} for "
                       f"{self.n_iter_no_change} consecutive epochs.")
                if (self.solver == "sgd" and self.learning_rate == "adaptive"
                        and self._optimizer.lr > 1e-6):
                    self._set_learning_rate(self._optimizer.lr / 5.0)
                    self._no_improvement_count = 0
                    if self.verbose:
                        print(msg + f" Setting learning rate to {self._optimizer.lr:f}")
                else:
                    if self.verbose:
                        print(msg + " Stopping.")
                    stopped.append("no improvement")
                    return True
            if incremental:
                stopped.append("one epoch")
                return True
            return False

        self.n_iter_ = 0
        try:
            trainer.fit(X, targets, epochs=1 if incremental else self.max_iter,
                        callbacks=[end_of_epoch], sample_weight=sample_weight)
        except DivergenceError as exc:
            if early_stopping:
                # as sklearn: a diverging fit with early stopping keeps its best weights
                warnings.warn(str(exc), RuntimeWarning, stacklevel=5)
            else:
                raise ValueError("Solver produced non-finite parameter weights. The input data may "
                                 f"contain large values and need to be preprocessed. ({exc})") from exc
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.", stacklevel=5)
        else:
            # after the fit rather than in its callback, so that the warning points at the
            # caller of fit whatever the frames between trainer.fit and the callback
            if not stopped and self.n_iter_ == self.max_iter:
                warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                              "optimization hasn't converged yet.", ConvergenceWarning, stacklevel=5)
        if early_stopping:
            self._net.params[...] = self._best_params   # restore the best weights

    def _l2_factors(self, n_samples, batch_size, sample_weight):
        """(Σ_k f_k, Σ_k f_k·k/n_batches) over an epoch's batches k, f_k = the batch's size
        over its summed sample weights (1 unweighted; 0 for a batch of weight 0, which is
        skipped): the weights of ‖W_k‖² in sklearn's L2 term, ‖W_k‖² interpolated in k.
        Shuffled batches' weights are not known here: f_k = n / Σ w for each (exact for
        one batch per epoch)."""
        n_batches = math.ceil(n_samples / batch_size)
        positions = np.arange(n_batches) / n_batches
        if sample_weight is None:
            factors = np.ones(n_batches)
        elif self.shuffle:
            factors = np.full(n_batches, n_samples / np.sum(sample_weight, dtype=np.float64))
        else:
            sizes = np.diff(np.r_[np.arange(0, n_samples, batch_size), n_samples])
            sums = np.add.reduceat(sample_weight.astype(np.float64), np.arange(0, n_samples, batch_size))
            factors = np.divide(sizes, sums, out=np.zeros(n_batches), where=sums > 0)
        return float(factors.sum()), float(factors @ positions)

    def _sum_squared_weights(self):
        with np.errstate(over="ignore"):   # huge but finite weights: an infinite L2 term
            return float(sum(np.dot(W.ravel(), W.ravel()) for W in self.coefs_))

    def _update_no_improvement(self, loss):
        if loss > self.best_loss_ - self.tol:
            self._no_improvement_count += 1
        else:
            self._no_improvement_count = 0
        if loss < self.best_loss_:
            self.best_loss_ = loss

    def _update_validation(self, X_val, y_val, sample_weight_val):
        score = self._score(X_val, y_val, sample_weight_val)
        self.validation_scores_.append(score)
        if self.verbose:
            print(f"Validation score: {score:f}")
        if score < self.best_validation_score_ + self.tol:
            self._no_improvement_count += 1
        else:
            self._no_improvement_count = 0
        if score > self.best_validation_score_:
            self.best_validation_score_ = score
            self._best_params = self._net.params.copy()

    def _score(self, X, y, sample_weight=None):
        """Validation score from validated X (accuracy or R²); NaN when predictions are not finite."""
        raw = self._net.predict_raw(X, n_threads=self.n_threads)
        if not np.isfinite(raw).all():
            return np.nan
        return self._score_function(y, self._predict_from_raw(raw), sample_weight=sample_weight)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self: _Estimator, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> _Estimator:
        """Fit the model to data matrix X and targets y.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Class labels (classification) or real targets (regression).
        sample_weight : array-like of shape (n_samples,), optional
            Weights >= 0, not all 0, normalised as sklearn's: each batch's loss is
            its weighted mean, and the L2 term is divided by the batch's summed
            weights. Weight 0 drops a sample, integer weight k repeats it k times.

        Returns
        -------
        self
        """
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    # -- prediction -------------------------------------------------------------
    def _raw_output(self, X):
        """The network's raw output (logits for classification) for unvalidated X."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32), accept_sparse=_SPARSE)
        return self._network().predict_raw(X, n_threads=self.n_threads)

    # -- pickling: coefs_ / intercepts_ are views, so rebind them after loading --
    def __getstate__(self):
        if "_net" in self.__dict__:
            self._network()   # adopt assigned coefs_ / intercepts_ before dropping them
        state = super().__getstate__()
        if "_net" in state:
            state = {k: v for k, v in state.items() if k not in ("coefs_", "intercepts_")}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_net" in self.__dict__:
            self._bind_params()
            opt = self.__dict__.get("_optimizer")
            if opt is not None and opt.state is not None:
                opt.state = [np.array(s) for s in opt.state]   # writable, even from a memmap


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier trained by cprop, with scikit-learn's interface.

    Parameters are those of :class:`sklearn.neural_network.MLPClassifier`
    (same names, defaults and meaning); see the module docstring for the
    small differences that remain. One parameter is cprop's own: ``n_threads``
    (int or None, default None), the threads fit and predict use; None follows
    :func:`cprop.get_num_threads` (``cprop.set_num_threads``, ``OMP_NUM_THREADS``,
    threadpoolctl's limits).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    loss_ : float — the loss of the last epoch (L-BFGS: at the end), L2 term included
    best_loss_ : float or None — the lowest loss_ (None with early stopping; sgd, adam)
    loss_curve_ : list of float — loss_ of every epoch (sgd, adam)
    validation_scores_ : list of float or None — accuracy on the held-out
        validation_fraction, per epoch (early stopping only; sgd, adam)
    best_validation_score_ : float or None
    t_ : int — training samples seen (sgd, adam)
    coefs_, intercepts_ : lists of ndarray — views of the network's W (n_in, n_out) and b
    n_features_in_, feature_names_in_, n_iter_, n_layers_, n_outputs_
    out_activation_ : {"softmax", "logistic"} — softmax for multi-class, one
        logistic output per label for binary and multi-label targets
    """

    def __init__(
        self,
        hidden_layer_sizes: int | Sequence[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: int | str = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
        tol: float = 1e-4,
        verbose: bool = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int = 10,
        max_fun: int = 15000,
        n_threads: int | None = None,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.n_threads = n_threads

    _score_function = staticmethod(accuracy_score)

    def _output_activation(self):
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, multi_output=True, dtype=(np.float64, np.float32),
                             accept_sparse=_SPARSE, reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        # as sklearn: (re)define classes_ on a fresh fit, else check compatibility
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in the "
                        f"previous call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {classes}.")
        # one column per output: (n, 1) binary, one-hot multi-class, indicator multi-label
        return X, self._label_binarizer.transform(y).astype(bool)

    @available_if(_stochastic_solver)
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None,
                    classes: ArrayLike | None = None) -> MLPClassifier:
        """One epoch over (X, y), continuing from the current state.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
        sample_weight : array-like of shape (n_samples,), optional — as for :meth:`fit`
        classes : array of shape (n_classes,) — all the classes; required on
            the first call (unless y is a multi-label indicator), ignored after.

        Returns
        -------
        self
        """
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def _proba_from_raw(self, raw):
        z = raw.astype(np.float64)
        if self.out_activation_ == "softmax":
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            return z
        return expit(z)

    def _predict_from_raw(self, raw):
        proba = self._proba_from_raw(raw)
        return self._label_binarizer.inverse_transform(proba.ravel() if self.n_outputs_ == 1 else proba)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predicted classes, shape (n_samples,) (or (n_samples, n_labels) for multi-label)."""
        return self._predict_from_raw(self._raw_output(X))

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Probability of each class in ``classes_`` order, shape (n_samples, n_classes).

        Binary targets give two columns (1 - p, p); multi-label targets one
        independent probability per label.
        """
        raw = self._raw_output(X)
        proba = self._proba_from_raw(raw)
        if self.n_outputs_ == 1:
            proba = np.hstack([1 - proba, proba])
        return proba.astype(raw.dtype, copy=False)

    def predict_log_proba(self, X: ArrayLike) -> np.ndarray:
        """log(predict_proba(X)), computed from the logits: accurate where a probability
        rounds to 1, and -inf exactly where predict_proba's probability is 0 (scikit-learn's
        checks hold it to be a transformation of predict_proba)."""
        raw = self._raw_output(X)
        z = raw.astype(np.float64)
        if self.out_activation_ == "softmax":
            z -= z.max(axis=1, keepdims=True)
            others = np.exp(z)
            others[np.arange(len(z)), z.argmax(axis=1)] = 0    # the max's exp(0) = 1 goes to log1p
            log_proba = z - np.log1p(others.sum(axis=1, keepdims=True))
        elif self.n_outputs_ == 1:
            log_proba = np.hstack([log_expit(-z), log_expit(z)])
        else:
            log_proba = log_expit(z)
        proba = self._proba_from_raw(raw)
        if self.n_outputs_ == 1:
            proba = np.hstack([1 - proba, proba])
        log_proba[proba.astype(raw.dtype, copy=False) == 0] = -np.inf
        return log_proba.astype(raw.dtype, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        tags.input_tags.sparse = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor trained by cprop, with scikit-learn's interface.

    Minimises the squared error, or with ``loss="poisson"`` the Poisson deviance
    of targets >= 0 (the network's output is the log of the rate, predict
    returns the rate); parameters are those of
    :class:`sklearn.neural_network.MLPRegressor` (same names, defaults and
    meaning). Multi-output targets (y of shape (n_samples, n_outputs)) train
    one network with n_outputs outputs. ``n_threads`` and the attributes as
    :class:`MLPClassifier` (without ``classes_``; ``validation_scores_`` holds R²;
    ``out_activation_`` is "identity", or "exp" for poisson).
    """

    _parameter_constraints: dict = {
        **_BaseMLP._parameter_constraints,
        "loss": [StrOptions({"squared_error", "poisson"})],
    }

    def __init__(
        self,
        loss: str = "squared_error",
        hidden_layer_sizes: int | Sequence[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: int | str = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
        tol: float = 1e-4,
        verbose: bool = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int = 10,
        max_fun: int = 15000,
        n_threads: int | None = None,
    ) -> None:
        self.loss = loss
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.n_threads = n_threads

    _score_function = staticmethod(r2_score)

    def _output_activation(self):
        return "exp" if self.loss == "poisson" else "identity"

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True,
                             dtype=(np.float64, np.float32), accept_sparse=_SPARSE, reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y

    @available_if(_stochastic_solver)
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> MLPRegressor:
        """One epoch over (X, y) (with sample weights, as for :meth:`fit`), continuing from
        the current state; returns self."""
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def _predict_from_raw(self, raw):
        if self.out_activation_ == "exp":    # poisson: the rate
            with np.errstate(over="ignore"):
                raw = np.exp(raw)
        return raw.ravel() if raw.shape[1] == 1 else raw

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predicted values, shape (n_samples,) or (n_samples, n_outputs)."""
        return self._predict_from_raw(self._raw_output(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.input_tags.sparse = True
        return tags
