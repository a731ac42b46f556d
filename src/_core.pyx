# cprop's compiled core: the Python-callable face of the kernels in the .pxd
# files, and the training epoch that runs them all without the GIL.
#
# Private: cprop/ validates every argument (shapes, dtypes, contiguity, label
# range) before calling in here; these functions trust what they are given.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport isfinite
from libc.string cimport memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "Python.h":
    # declared here without an exception clause: a KeyboardInterrupt raised by
    # a signal handler must stay set for train_epoch to propagate, not be
    # reported and swallowed inside the noexcept epoch
    int PyErr_CheckSignals()

from _openmp cimport CPROP_OPENMP, omp_get_max_threads
from _activations cimport activation_grad as _activation_grad
from _dense cimport (dense_forward as _dense_forward, dense_param_grads, dense_param_grads_part,
                     dense_input_grad, threads_for)
from _losses cimport loss_and_grad, CROSS_ENTROPY
from _optim cimport Optim, optim_range, optim_step, ADAM

OPENMP = bool(CPROP_OPENMP)

# status codes of train_epoch
cdef enum:
    STATUS_OK = 0
    STATUS_NONFINITE_LOSS = 1
    STATUS_NONFINITE_STEP = 2
    STATUS_INTERRUPTED = 3

OK = STATUS_OK
NONFINITE_LOSS = STATUS_NONFINITE_LOSS
NONFINITE_STEP = STATUS_NONFINITE_STEP
INTERRUPTED = STATUS_INTERRUPTED

# how often the nogil epoch takes the GIL to let Ctrl-C through
cdef double SIGNAL_CHECK_SECONDS = 0.05


def max_threads():
    """Threads OpenMP would use by default (OMP_NUM_THREADS honoured); 1 without OpenMP."""
    return omp_get_max_threads()


def dense_forward(const floating[:, ::1] X, const floating[:, ::1] W, const floating[::1] b,
                  floating[:, ::1] Y, int activation, int n_threads):
    """Y = f(X·W + b)."""
    with nogil:
        _dense_forward(&X[0, 0], &W[0, 0], &b[0], &Y[0, 0], X.shape[0], W.shape[0], W.shape[1],
                       activation, n_threads)


def forward(const floating[:, ::1] X, const floating[::1] params, const Py_ssize_t[::1] sizes,
            const int[::1] activations, floating[::1] work, floating[:, ::1] out,
            Py_ssize_t chunk_rows, int n_threads):
    """out = the network's raw output for X, in chunks of chunk_rows rows so that the
    intermediate outputs (ping-ponging between the two halves of `work`, each
    chunk_rows × the widest layer) stay in cache. One call, no GIL, nothing kept."""
    cdef Py_ssize_t L = sizes.shape[0] - 1, n = X.shape[0], start, rows, l, off
    cdef Py_ssize_t half = work.shape[0] // 2
    cdef const floating* inp
    cdef floating* dst
    with nogil:
        start = 0
        while start < n:
            rows = chunk_rows if start + chunk_rows <= n else n - start
            inp = &X[start, 0]
            off = 0
            for l in range(L):
                dst = &out[start, 0] if l == L - 1 else &work[0] + (l % 2) * half
                _dense_forward(inp, &params[0] + off, &params[0] + off + sizes[l] * sizes[l + 1], dst,
                               rows, sizes[l], sizes[l + 1], activations[l], n_threads)
                off += sizes[l] * sizes[l + 1] + sizes[l + 1]
                inp = dst
            start += rows


def activation_grad(const floating[:, ::1] G, const floating[:, ::1] Y, floating[:, ::1] delta,
                    int activation):
    """δ = G ⊙ f'(z), with f' written through the output Y = f(z)."""
    with nogil:
        _activation_grad(&G[0, 0], &Y[0, 0], &delta[0, 0], G.shape[0] * G.shape[1], activation)


def dense_backward(const floating[:, ::1] X, const floating[:, ::1] W, const floating[:, ::1] delta,
                   floating[:, ::1] dW, floating[::1] db, floating[:, ::1] dX, int n_threads):
    """dW = Xᵀ·δ, db = Σ_rows δ and, when dX is not None, dX = δ·Wᵀ."""
    cdef floating* dX_ptr = NULL if dX is None else &dX[0, 0]
    cdef Py_ssize_t n = X.shape[0], n_in = W.shape[0], n_out = W.shape[1]
    with nogil:
        dense_param_grads(&X[0, 0], &delta[0, 0], &dW[0, 0], &db[0], n, n_in, n_out, n_threads)
        if dX_ptr != NULL:
            dense_input_grad(&delta[0, 0], &W[0, 0], dX_ptr, <floating*> NULL, 0,
                             n, n_in, n_out, n_threads)


def loss(int kind, const floating[:, ::1] out, const floating[:, ::1] T,
         const Py_ssize_t[::1] labels, floating[:, ::1] G, double scale=1.0):
    """scale × mean loss of `out` against T (mse, binary_cross_entropy) or labels
    (cross_entropy); G = ∂(that)/∂out."""
    cdef const floating* T_ptr = &T[0, 0] if T.shape[0] else NULL
    cdef const Py_ssize_t* labels_ptr = &labels[0] if labels.shape[0] else NULL
    cdef double value
    with nogil:
        value = loss_and_grad(kind, &out[0, 0], T_ptr, labels_ptr, &G[0, 0],
                              out.shape[0], out.shape[1], scale)
    return value


cdef Optim make_optim(dict config):
    cdef Optim opt
    opt.kind = config["kind"]
    opt.lr = config["lr"]
    opt.momentum = config.get("momentum", 0.0)
    opt.weight_decay = config.get("weight_decay", 0.0)
    opt.beta1 = config.get("beta1", 0.9)
    opt.beta2 = config.get("beta2", 0.999)
    opt.eps = config.get("eps", 1e-8)
    opt.nesterov = config.get("nesterov", False)
    opt.decoupled = config.get("decoupled", False)
    opt.decay_bias = config.get("decay_bias", True)
    opt.decay_per_sample = config.get("decay_per_sample", False)
    opt.step = config.get("step", 0)
    return opt


cdef Py_ssize_t _optimizer_step(Optim* opt, floating* params, const floating* grads,
                                floating* a, floating* b, const Py_ssize_t* sizes,
                                Py_ssize_t n_layers, Py_ssize_t batch_rows, int n_threads) noexcept nogil:
    """One step on every layer's W (decayed) and b (decayed when opt.decay_bias), laid out W0 b0 W1 b1 …"""
    cdef Py_ssize_t l, off = 0, n_W, rejected = 0
    if opt.kind == ADAM:
        opt.step += 1
    for l in range(n_layers):
        n_W = sizes[l] * sizes[l + 1]
        rejected += optim_step(opt, params, grads, a, b, off, off + n_W, True, batch_rows, n_threads)
        off += n_W
        rejected += optim_step(opt, params, grads, a, b, off, off + sizes[l + 1],
                               opt.decay_bias, batch_rows, n_threads)
        off += sizes[l + 1]
    return rejected


cdef Py_ssize_t _layer_step_part(Optim* opt, const floating* inp, const floating* delta,
                                 floating* params, floating* grads, floating* a, floating* b_state,
                                 Py_ssize_t off, Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                                 Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Rows r0:r1 of dW = inpᵀ·δ and entries c0:c1 of db = Σδ, then the optimizer step on
    exactly those rows of W and entries of b, while they are still in this core's cache.
    The layer's W starts at params[off] (b follows it), its gradients likewise in grads;
    a, b_state: the optimizer's state arrays, laid out like params."""
    cdef Py_ssize_t b_off = off + n_in * n_out
    dense_param_grads_part(inp, delta, grads + off, grads + b_off, n, n_in, n_out, r0, r1, c0, c1)
    return (optim_range(opt, params, grads, a, b_state, off + r0 * n_out, off + r1 * n_out, True, n)
            + optim_range(opt, params, grads, a, b_state, b_off + c0, b_off + c1, opt.decay_bias, n))


cdef Py_ssize_t _layer_grads_and_step(Optim* opt, const floating* inp, const floating* delta,
                                      floating* params, floating* grads, floating* a,
                                      floating* b_state, Py_ssize_t off, Py_ssize_t n,
                                      Py_ssize_t n_in, Py_ssize_t n_out, int n_threads) noexcept nogil:
    """dW = inpᵀ·δ, db = Σδ and the step on W, b (at params[off:]), fused per thread;
    threads split the rows of W and the entries of b."""
    cdef int t, nt = threads_for(2.0 * n * n_in * n_out, n_in, n_threads)
    cdef Py_ssize_t rejected = 0
    if nt == 1:
        return _layer_step_part(opt, inp, delta, params, grads, a, b_state, off, n, n_in, n_out,
                                0, n_in, 0, n_out)
    for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
        rejected += _layer_step_part(opt, inp, delta, params, grads, a, b_state, off, n, n_in, n_out,
                                     n_in * t // nt, n_in * (t + 1) // nt,
                                     n_out * t // nt, n_out * (t + 1) // nt)
    return rejected


def optimizer_step(dict config, floating[::1] params, const floating[::1] grads,
                   floating[::1] state_a, floating[::1] state_b, const Py_ssize_t[::1] sizes,
                   Py_ssize_t batch_rows, int n_threads):
    """One optimizer step over the flat parameters; returns (rejected values, Adam's new step count)."""
    cdef Optim opt = make_optim(config)
    cdef Py_ssize_t rejected
    with nogil:
        rejected = _optimizer_step(&opt, &params[0], &grads[0], &state_a[0], &state_b[0],
                                   &sizes[0], sizes.shape[0] - 1, batch_rows, n_threads)
    return rejected, opt.step


def workspace_size(const Py_ssize_t[::1] sizes, Py_ssize_t batch_size, bint gather):
    """Length of the flat workspace train_epoch needs: [Xb] Y_0..Y_L-1 G_0..G_L-1 Tb."""
    cdef Py_ssize_t l, total = batch_size * sizes[0] if gather else 0
    for l in range(1, sizes.shape[0]):
        total += 2 * batch_size * sizes[l]
    return total + batch_size * sizes[sizes.shape[0] - 1]


cdef inline bint _interrupted(timespec* last) noexcept nogil:
    """Every SIGNAL_CHECK_SECONDS take the GIL and run Python's signal handlers.

    True means a handler raised (KeyboardInterrupt): the exception stays set
    for the caller to propagate once it holds the GIL again.
    """
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    if (now.tv_sec - last.tv_sec) + 1e-9 * (now.tv_nsec - last.tv_nsec) < SIGNAL_CHECK_SECONDS:
        return False
    last[0] = now
    with gil:
        return PyErr_CheckSignals() != 0


cdef int _train_epoch(const floating[:, ::1] X, const floating[:, ::1] T,
                      const Py_ssize_t[::1] labels, const Py_ssize_t[::1] order, bint gather,
                      floating[::1] params, floating[::1] grads,
                      floating[::1] state_a, floating[::1] state_b,
                      floating[::1] work, Py_ssize_t[::1] label_buf,
                      const Py_ssize_t[::1] sizes, const int[::1] activations,
                      int loss_kind, double loss_scale, Py_ssize_t batch_size, Optim* opt,
                      int n_threads, double* loss_sum, Py_ssize_t* n_seen) noexcept nogil:
    cdef Py_ssize_t L = sizes.shape[0] - 1, n = X.shape[0], d = sizes[0], m = sizes[L]
    cdef Py_ssize_t l, i, start, bs, off, w_off
    cdef floating* p = &params[0]
    cdef floating* dp = &grads[0]
    cdef floating* Xb = &work[0]
    cdef floating* Tb
    cdef const floating* X_in
    cdef const floating* T_in = NULL
    cdef const Py_ssize_t* labels_in = NULL
    cdef double batch_loss
    cdef timespec last
    # per-layer pointers into the flat parameters and the workspace
    cdef floating* W[64]
    cdef floating* b[64]
    cdef floating* Y[64]
    cdef floating* G[64]
    cdef Py_ssize_t offsets[64]
    cdef Py_ssize_t rejected

    off = batch_size * d if gather else 0
    w_off = 0
    for l in range(L):
        offsets[l] = w_off
        W[l] = p + w_off
        w_off += sizes[l] * sizes[l + 1]
        b[l] = p + w_off
        w_off += sizes[l + 1]
        Y[l] = &work[0] + off
        off += batch_size * sizes[l + 1]
    for l in range(L):
        G[l] = &work[0] + off
        off += batch_size * sizes[l + 1]
    Tb = &work[0] + off

    clock_gettime(CLOCK_MONOTONIC, &last)
    start = 0
    while start < n:
        bs = batch_size if start + batch_size <= n else n - start

        # the minibatch: rows order[start:start+bs] of X, gathered into Xb by
        # the first layer's threads (or, unshuffled, X's own rows in place)
        X_in = Xb if gather else &X[start, 0]
        if loss_kind == CROSS_ENTROPY:  # integer labels
            if gather:
                for i in range(bs):
                    label_buf[i] = labels[order[start + i]]
                labels_in = &label_buf[0]
            else:
                labels_in = &labels[start]
        elif gather:
            for i in range(bs):
                memcpy(Tb + i * m, &T[order[start + i], 0], m * sizeof(floating))
            T_in = Tb
        else:
            T_in = &T[start, 0]

        # forward: Y_l = f_l(Y_{l-1}·W_l + b_l)
        _dense_forward(X_in, W[0], b[0], Y[0], bs, d, sizes[1], activations[0], n_threads,
                       &X[0, 0], &order[start] if gather else NULL)
        for l in range(1, L):
            _dense_forward(Y[l - 1], W[l], b[l], Y[l], bs, sizes[l], sizes[l + 1], activations[l],
                           n_threads)

        # loss, G = ∂L/∂Y_last, then δ_last = G ⊙ f'(Y_last)
        batch_loss = loss_and_grad(loss_kind, Y[L - 1], T_in, labels_in, G[L - 1], bs, m, loss_scale)
        if not isfinite(batch_loss):
            return STATUS_NONFINITE_LOSS
        _activation_grad(G[L - 1], Y[L - 1], G[L - 1], bs * m, activations[L - 1])

        # backward, last layer first: δ_{l-1} = (δ_l·W_lᵀ) ⊙ f'_{l-1}(Y_{l-1}) while W_l is
        # still unchanged, then dW_l = Y_{l-1}ᵀ·δ_l, db_l = Σ δ_l and the optimizer's step
        # on W_l, b_l, fused per thread
        if opt.kind == ADAM:
            opt.step += 1
        rejected = 0
        for l in range(L - 1, -1, -1):
            if l > 0:
                dense_input_grad(G[l], W[l], G[l - 1], Y[l - 1], activations[l - 1],
                                 bs, sizes[l], sizes[l + 1], n_threads)
            rejected += _layer_grads_and_step(opt, X_in if l == 0 else Y[l - 1], G[l], p, dp,
                                              &state_a[0], &state_b[0], offsets[l], bs,
                                              sizes[l], sizes[l + 1], n_threads)
        if rejected:
            return STATUS_NONFINITE_STEP
        loss_sum[0] += batch_loss * bs
        n_seen[0] += bs
        start += bs
        if _interrupted(&last):
            return STATUS_INTERRUPTED
    return STATUS_OK


cdef int _raise_pending() except -1:
    """Propagate the exception a signal handler left set inside the nogil epoch."""
    return -1


def train_epoch(const floating[:, ::1] X, const floating[:, ::1] T, const Py_ssize_t[::1] labels,
                const Py_ssize_t[::1] order, bint gather,
                floating[::1] params, floating[::1] grads,
                floating[::1] state_a, floating[::1] state_b,
                floating[::1] work, Py_ssize_t[::1] label_buf,
                const Py_ssize_t[::1] sizes, const int[::1] activations,
                int loss_kind, double loss_scale, Py_ssize_t batch_size, dict optimizer,
                int n_threads):
    """One epoch of minibatch training, entirely without the GIL.

    Returns (status, summed loss over completed steps, samples in completed
    steps, Adam's step count). On a non-finite loss the epoch stops before
    that step changes anything; on a non-finite update it stops after it, the
    parameters whose new value would not be finite keeping their old one; on
    Ctrl-C it stops after the step in progress and the KeyboardInterrupt
    propagates.
    """
    cdef Optim opt = make_optim(optimizer)
    cdef double loss_sum = 0
    cdef Py_ssize_t n_seen = 0
    cdef int status
    if sizes.shape[0] - 1 > 64:
        raise ValueError("cprop's training loop supports at most 64 layers")
    with nogil:
        status = _train_epoch(X, T, labels, order, gather, params, grads, state_a, state_b,
                              work, label_buf, sizes, activations, loss_kind, loss_scale,
                              batch_size, &opt, n_threads, &loss_sum, &n_seen)
    if status == STATUS_INTERRUPTED:
        optimizer["step"] = opt.step
        _raise_pending()
    return status, loss_sum, n_seen, opt.step
