"""Plain-NumPy reference of every cprop kernel: the oracle the tests hold cprop against.

Written for reading, not speed: each function is its formula. Arrays keep the
dtype they are given, so the tests pass float64 copies to get an exact oracle.
A network is a list of (W, b) pairs with W of shape (n_in, n_out), plus one
activation name per layer.
"""
import numpy as np

LEAKY_SLOPE = 0.01

# -- activations: y = f(z), and f'(z) written through the output y --------

def identity(z):
    return z                                          # f(z) = z


def relu(z):
    return np.maximum(z, 0)                           # f(z) = max(z, 0)


def leaky_relu(z):
    return np.where(z > 0, z, LEAKY_SLOPE * z)         # f(z) = z if z > 0 else 0.01·z


def sigmoid(z):
    return np.exp(-np.logaddexp(0, -z))               # f(z) = 1 / (1 + e^-z), without overflow


def tanh(z):
    return np.tanh(z)                                 # f(z) = tanh z


ACTIVATIONS = {"identity": identity, "relu": relu, "leaky_relu": leaky_relu,
               "sigmoid": sigmoid, "tanh": tanh}

# activations added with the network plan; their derivatives are checked by finite
# differences of these (some need z, not y: gelu, gelu_tanh, silu)
def elu(z):
    return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))            # z or e^z - 1


def softplus(z):
    return np.where(z > 20, z, np.logaddexp(0, z))                    # log(1 + e^z), z above 20


def gelu(z):
    from scipy.special import erf
    return 0.5 * z * (1 + erf(z / np.sqrt(2)))                        # z·Φ(z)


def gelu_tanh(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def silu(z):
    return z * sigmoid(z)                                             # z·σ(z)


ACTIVATIONS.update(elu=elu, softplus=softplus, gelu=gelu, gelu_tanh=gelu_tanh, silu=silu)


# -- the other layer kinds (evaluation and training forward) ---------------

def layernorm(X, gamma, beta, eps):
    """(x - mean_row) / √(var_row + ε) · γ + β."""
    mean = X.mean(axis=1, keepdims=True)
    return (X - mean) / np.sqrt(X.var(axis=1, keepdims=True) + eps) * gamma + beta


def batchnorm_train(X, gamma, beta, eps):
    """(x - mean_batch) / √(var_batch + ε) · γ + β, the batch's biased variance."""
    return (X - X.mean(axis=0)) / np.sqrt(X.var(axis=0) + eps) * gamma + beta


def batchnorm_eval(X, gamma, beta, running_mean, running_var, eps):
    """(x - running mean) / √(running var + ε) · γ + β."""
    return (X - running_mean) / np.sqrt(running_var + eps) * gamma + beta


def dropout(X, mask, p):
    """X ⊙ mask / (1 - p), mask of 0/1."""
    return X * mask / (1 - p)


DERIVATIVES = {
    "identity": lambda y: np.ones_like(y),                            # f' = 1
    "relu": lambda y: (y > 0).astype(y.dtype),                        # f' = [y > 0]
    "leaky_relu": lambda y: np.where(y > 0, 1, LEAKY_SLOPE).astype(y.dtype),  # f' = 1 or 0.01
    "sigmoid": lambda y: y * (1 - y),                                 # f' = y(1 - y)
    "tanh": lambda y: 1 - y * y,                                      # f' = 1 - y²
}


# -- the dense layer -------------------------------------------------------

def dense_forward(X, W, b, activation):
    """Y = f(X·W + b)."""
    return ACTIVATIONS[activation](X @ W + b)


def dense_backward(X, W, Y, G, activation):
    """delta = G ⊙ f'(Y);  dW = Xᵀ·delta,  db = Σ_rows delta,  dX = delta·Wᵀ."""
    delta = G * DERIVATIVES[activation](Y)
    return X.T @ delta, delta.sum(axis=0), delta @ W.T


def forward(layers, activations, X):
    """Every layer's output [Y_0, …, Y_L-1] for input X."""
    outputs = []
    for (W, b), activation in zip(layers, activations):
        X = dense_forward(X, W, b, activation)
        outputs.append(X)
    return outputs


def backward(layers, activations, X, outputs, G):
    """[(dW, db)] per layer from G = ∂L/∂output: the chain rule, last layer first."""
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        inp = X if i == 0 else outputs[i - 1]
        dW, db, G = dense_backward(inp, layers[i][0], outputs[i], G, activations[i])
        grads.append((dW, db))
    return grads[::-1]


# -- losses: (mean loss, gradient with respect to the raw output) -----------

def mse(out, y):
    """L = mean((out - y)²) over all elements;  G = 2(out - y) / out.size."""
    y = np.asarray(y, dtype=out.dtype).reshape(out.shape)
    return np.mean((out - y) ** 2), 2 * (out - y) / out.size


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(out, labels):
    """L = mean_i(logsumexp(out_i) - out_i[y_i]);  G = (softmax(out) - onehot(y)) / n."""
    labels = np.asarray(labels).astype(np.intp).ravel()
    n = out.shape[0]
    zmax = out.max(axis=1, keepdims=True)
    logsumexp = zmax[:, 0] + np.log(np.exp(out - zmax).sum(axis=1))
    onehot = np.eye(out.shape[1], dtype=out.dtype)[labels]
    return np.mean(logsumexp - out[np.arange(n), labels]), (softmax(out) - onehot) / n


def binary_cross_entropy(out, y):
    """L = mean(max(z, 0) - z·t + log(1 + e^-|z|)) on logits z;  G = (σ(z) - t) / out.size."""
    t = np.asarray(y, dtype=out.dtype).reshape(out.shape)
    loss = np.maximum(out, 0) - out * t + np.log1p(np.exp(-np.abs(out)))
    return np.mean(loss), (sigmoid(out) - t) / out.size


def poisson(out, y):
    """L = mean(e^out - y·out) (out: the log of the rate);  G = (e^out - y) / out.size."""
    y = np.asarray(y, dtype=out.dtype).reshape(out.shape)
    return np.mean(np.exp(out) - y * out), (np.exp(out) - y) / out.size


def l1(out, y):
    """L = mean(|out - y|);  G = sign(out - y) / out.size."""
    d = out - np.asarray(y, dtype=out.dtype).reshape(out.shape)
    return np.mean(np.abs(d)), np.sign(d) / out.size


def huber(out, y):
    """L = mean(½d² where |d| <= 1, |d| - ½ elsewhere), d = out - y;  G = clip(d, -1, 1) / out.size."""
    d = out - np.asarray(y, dtype=out.dtype).reshape(out.shape)
    a = np.abs(d)
    return np.mean(np.where(a <= 1, 0.5 * d * d, a - 0.5)), np.clip(d, -1, 1) / out.size


LOSSES = {"mse": mse, "cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy,
          "poisson": poisson, "l1": l1, "huber": huber}


def weighted(loss, out, y, w):
    """L = Σ_i w_i·l_i / Σ w, l_i the loss of row i alone (a batch's mean loss is the mean of
    its rows'); G_i = w_i·∂l_i/∂out_i / Σ w."""
    values, grads = zip(*(LOSSES[loss](out[i:i + 1], y[i:i + 1]) for i in range(len(out))))
    return np.dot(w, values) / w.sum(), np.vstack(grads) * (w / w.sum())[:, None]


# -- optimizers, with torch.optim's conventions, on lists of arrays in place --

def sgd_step(params, grads, velocity, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """g' = g + wd·p;  v = μ·v + g';  p -= lr·v  (Nesterov: p -= lr·(g' + μ·v)).

    `velocity` is a list of arrays like `params`, zeros before the first step.
    """
    for p, g, v in zip(params, grads, velocity):
        g = g + weight_decay * p
        if momentum:
            v[...] = momentum * v + g
            g = g + momentum * v if nesterov else v
        p -= lr * g


def adam_step(params, grads, m, v, t, lr=0.001, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0, decoupled=False, sklearn_style=False):
    """Step t (from 1) of Adam, or AdamW when `decoupled`:
    g' = g + wd·p (AdamW: p *= 1 - lr·wd);  m = β1·m + (1-β1)·g';  v = β2·v + (1-β2)·g'²;
    p -= lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + ε)
    (sklearn_style: p -= lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + ε))."""
    beta1, beta2 = betas
    for p, g, m_p, v_p in zip(params, grads, m, v):
        if decoupled:
            p *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * p
        m_p[...] = beta1 * m_p + (1 - beta1) * g
        v_p[...] = beta2 * v_p + (1 - beta2) * g * g
        if sklearn_style:
            p -= lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) * m_p / (np.sqrt(v_p) + eps)
        else:
            p -= lr / (1 - beta1 ** t) * m_p / (np.sqrt(v_p) / np.sqrt(1 - beta2 ** t) + eps)


def clip_grads(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_: ‖g‖ = √Σg² over all arrays together; every g times
    max_norm / (‖g‖ + 1e-6) when that is below 1. Returns the arrays and ‖g‖."""
    norm = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads))
    factor = max_norm / (norm + 1e-6)
    if factor < 1:
        grads = [g * g.dtype.type(factor) for g in grads]
    return grads, norm


# -- one training epoch ------------------------------------------------------

def train_epoch(layers, activations, X, y, loss, order, batch_size, lr, momentum=0.0,
                nesterov=False, weight_decay=0.0, velocity=None, weights=None, clip_norm=None):
    """One epoch of minibatch SGD in `order`, updating `layers` (a list of (W, b)) in place.

    Batch by batch (the last one may be short): gather, forward, loss, backward, (clip,)
    update. With sample `weights`, each batch's loss is its weighted mean (a batch of
    weight 0 is skipped). Returns the batches' losses averaged by their sizes.
    """
    params = [p for layer in layers for p in layer]
    if velocity is None:
        velocity = [np.zeros_like(p) for p in params]
    y = np.asarray(y)
    total, counted = 0.0, 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        Xb, yb = X[rows], y[rows]
        if weights is not None and not weights[rows].any():
            continue
        outputs = forward(layers, activations, Xb)
        if weights is None:
            value, G = LOSSES[loss](outputs[-1], yb)
        else:
            value, G = weighted(loss, outputs[-1], yb, weights[rows])
        grads = [g for pair in backward(layers, activations, Xb, outputs, G) for g in pair]
        if clip_norm is not None:
            grads, _ = clip_grads(grads, clip_norm)
        sgd_step(params, grads, velocity, lr, momentum, nesterov, weight_decay)
        total += value * len(rows)
        counted += len(rows)
    return total / counted
