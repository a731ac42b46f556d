# cprop's compiled core: the Python-callable face of the kernels in the .pxd
# files, and the training epoch that runs them all without the GIL.
#
# Private: cprop/ validates every argument (shapes, dtypes, contiguity, label
# range) before calling in here; these functions trust what they are given.
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport isfinite
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "Python.h":
    # declared here without an exception clause: a KeyboardInterrupt raised by
    # a signal handler must stay set for train_epoch to propagate, not be
    # reported and swallowed inside the noexcept epoch
    int PyErr_CheckSignals()

from libc.stdlib cimport calloc, free
from _openmp cimport (CPROP_OPENMP, omp_get_max_threads, omp_get_num_threads, cprop_barrier,
                      cprop_team_barrier, cprop_barrier_init, cprop_barrier_join, cprop_barrier_leave,
                      cprop_take_team_stats)
from _activations cimport activation_grad as _activation_grad
from _dense cimport (dense_forward as _dense_forward, dense_forward_block, dense_param_grads,
                     dense_param_grads_part, dense_input_grad, dense_input_grad_block, gather_rows,
                     threads_for, _col_split)
from _losses cimport loss_and_grad, CROSS_ENTROPY
from _optim cimport Optim, optim_range, optim_step, ADAM

OPENMP = bool(CPROP_OPENMP)

# status codes of train_epoch
cdef enum:
    STATUS_OK = 0
    STATUS_NONFINITE_LOSS = 1
    STATUS_NONFINITE_STEP = 2
    STATUS_INTERRUPTED = 3
    STATUS_NO_MEMORY = 4

OK = STATUS_OK
NONFINITE_LOSS = STATUS_NONFINITE_LOSS
NONFINITE_STEP = STATUS_NONFINITE_STEP
INTERRUPTED = STATUS_INTERRUPTED

# how often the nogil epoch takes the GIL to let Ctrl-C through
cdef double SIGNAL_CHECK_SECONDS = 0.05


def max_threads():
    """Threads OpenMP would use by default (OMP_NUM_THREADS honoured); 1 without OpenMP."""
    return omp_get_max_threads()


def take_team_stats():
    """(threads, waited, worked, share) of the last team this thread led through an epoch:
    its size, its threads' summed seconds waiting at barriers and CPU seconds working, and
    the share of a CPU they got while runnable (their CPU time over the time they were not
    asleep at a barrier: about 1 on a quiet machine); (1, 0.0, 0.0, 1.0) when no
    multi-threaded epoch ran on this thread since the last call."""
    cdef long long waited_ns, worked_ns, cpu_ns, runnable_ns
    cdef int size = cprop_take_team_stats(&waited_ns, &worked_ns, &cpu_ns, &runnable_ns)
    share = min(1.0, <double> cpu_ns / runnable_ns) if runnable_ns > 0 else 1.0
    return size, waited_ns * 1e-9, worked_ns * 1e-9, share


def dense_forward(const floating[:, ::1] X, const floating[:, ::1] W, const floating[::1] b,
                  floating[:, ::1] Y, int activation, int n_threads):
    """Y = f(X·W + b)."""
    with nogil:
        _dense_forward(&X[0, 0], &W[0, 0], &b[0], &Y[0, 0], X.shape[0], W.shape[0], W.shape[1],
                       activation, n_threads)


cdef void _forward_rows(const floating* X, const floating* params, const Py_ssize_t[::1] sizes,
                        const int[::1] activations, floating* work, Py_ssize_t half,
                        floating* out, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t chunk_rows) noexcept nogil:
    """out[r0:r1] = the network's raw output for X[r0:r1], chunk_rows rows at a time on this
    thread, the intermediate outputs ping-ponging between work[:half] and work[half:]."""
    cdef Py_ssize_t L = sizes.shape[0] - 1, d = sizes[0], m = sizes[L], start, rows, l, off
    cdef const floating* inp
    cdef floating* dst
    start = r0
    while start < r1:
        rows = chunk_rows if start + chunk_rows <= r1 else r1 - start
        inp = X + start * d
        off = 0
        for l in range(L):
            dst = out + start * m if l == L - 1 else work + (l % 2) * half
            dense_forward_block(inp, params + off, params + off + sizes[l] * sizes[l + 1], dst,
                                0, rows, 0, sizes[l + 1], sizes[l], sizes[l + 1], activations[l])
            off += sizes[l] * sizes[l + 1] + sizes[l + 1]
            inp = dst
        start += rows


def forward(const floating[:, ::1] X, const floating[::1] params, const Py_ssize_t[::1] sizes,
            const int[::1] activations, floating[::1] work, floating[:, ::1] out,
            Py_ssize_t chunk_rows, int n_threads):
    """out = the network's raw output for X: one call, no GIL, nothing kept.

    Each thread takes a contiguous share of the rows and carries it through
    every layer, chunk_rows rows at a time, in its own slice of `work`
    (n_threads slices of 2 × chunk_rows × the widest layer): no thread waits
    for another, and each chunk's intermediate outputs stay in its core's cache.
    """
    cdef Py_ssize_t L = sizes.shape[0] - 1, n = X.shape[0], l, per_thread
    cdef double flops = 0
    cdef int t, nt
    for l in range(L):
        flops += 2.0 * n * sizes[l] * sizes[l + 1]
    nt = threads_for(flops, n, n_threads)
    per_thread = work.shape[0] // n_threads   # each thread's slice: two halves
    with nogil:
        if nt == 1:
            _forward_rows(&X[0, 0], &params[0], sizes, activations, &work[0], per_thread // 2,
                          &out[0, 0], 0, n, chunk_rows)
        else:
            for t in prange(nt, num_threads=nt, schedule='static'):
                _forward_rows(&X[0, 0], &params[0], sizes, activations, &work[0] + t * per_thread,
                              per_thread // 2, &out[0, 0], n * t // nt, n * (t + 1) // nt, chunk_rows)


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


cdef int _epoch_worker(const floating[:, ::1] X, const floating[:, ::1] T,
                       const Py_ssize_t[::1] labels, const Py_ssize_t[::1] order, bint gather,
                       floating[::1] params, floating[::1] grads,
                       floating[::1] state_a, floating[::1] state_b,
                       floating[::1] work, Py_ssize_t[::1] label_buf,
                       const Py_ssize_t[::1] sizes, const int[::1] activations,
                       int loss_kind, double loss_scale, Py_ssize_t batch_size, Optim* shared_opt,
                       int t, int nt, double* part_loss, Py_ssize_t* part_rejected,
                       int* interrupted, double* loss_sum, Py_ssize_t* n_seen) noexcept nogil:
    """Thread t of nt's share of one epoch; every thread runs this same loop.

    Thread t owns rows r0:r1 of each minibatch: it gathers them, carries them
    forward through every layer, takes their loss and carries their δ back
    through every layer, touching no other thread's rows. Then (barrier) it
    computes its slice of each layer's dW = inpᵀ·δ over the whole batch and
    steps those parameters; (barrier) the next batch. Two barriers a batch,
    no thread start-up, and each thread's activations stay in its own cache.
    Every decision (non-finite loss or step, Ctrl-C) is taken by all threads
    alike from the shared per-thread partials, so they leave the loop together.
    """
    cdef Py_ssize_t L = sizes.shape[0] - 1, n = X.shape[0], d = sizes[0], m = sizes[L]
    cdef Py_ssize_t l, i, k, start, bs, off, w_off, r0, r1, rejected
    cdef Optim opt = shared_opt[0]   # a private copy: Adam's step count advances in each alike
    cdef floating* p = &params[0]
    cdef floating* dp = &grads[0]
    cdef floating* Xb = &work[0]
    cdef floating* Tb
    cdef const floating* X_in
    cdef const floating* inp
    cdef const floating* T_in = NULL
    cdef const Py_ssize_t* labels_in = NULL
    cdef double batch_loss
    cdef timespec last
    cdef int status = STATUS_OK
    cdef bint shared
    # per-layer pointers into the flat parameters and the workspace
    cdef floating* W[64]
    cdef floating* b[64]
    cdef floating* Y[64]
    cdef floating* G[64]
    cdef Py_ssize_t offsets[64]

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
        r0 = bs * t // nt
        r1 = bs * (t + 1) // nt

        # this thread's rows of the minibatch: rows order[start+r0 : start+r1] of X
        # gathered into Xb (or, unshuffled, X's own rows in place)
        if gather:
            gather_rows(&X[0, 0], &order[start], Xb, r0, r1, d)
            X_in = Xb
        else:
            X_in = &X[start, 0]
        if loss_kind == CROSS_ENTROPY:  # integer labels
            if gather:
                for i in range(r0, r1):
                    label_buf[i] = labels[order[start + i]]
                labels_in = &label_buf[0]
            else:
                labels_in = &labels[start]
        elif gather:
            gather_rows(&T[0, 0], &order[start], Tb, r0, r1, m)
            T_in = Tb
        else:
            T_in = &T[start, 0]

        # forward: Y_l = f_l(Y_{l-1}·W_l + b_l), on this thread's rows, or on its
        # columns of all rows for a layer much wider than the batch (where
        # splitting rows would have every thread pack all of W); around those,
        # barriers, as their input and output rows are every thread's
        inp = X_in
        shared = False   # whether the last output written is whole (all threads synced)
        for l in range(L):
            if nt > 1 and bs < sizes[l + 1] and sizes[l + 1] >= 32 * nt:
                if not shared:
                    cprop_barrier()
                dense_forward_block(inp, W[l], b[l], Y[l], 0, bs,
                                    _col_split(sizes[l + 1], t, nt), _col_split(sizes[l + 1], t + 1, nt),
                                    sizes[l], sizes[l + 1], activations[l])
                cprop_barrier()
                shared = True
            else:
                dense_forward_block(inp, W[l], b[l], Y[l], r0, r1, 0, sizes[l + 1],
                                    sizes[l], sizes[l + 1], activations[l])
                shared = False
            inp = Y[l]

        # this thread's part of the batch's mean loss, and its rows of
        # G = ∂L/∂Y_last (the scale makes a share of rows count as such)
        part_loss[t] = 0
        if r1 > r0:
            part_loss[t] = loss_and_grad(loss_kind, Y[L - 1] + r0 * m,
                                         T_in + r0 * m if T_in != NULL else NULL,
                                         labels_in + r0 if labels_in != NULL else NULL,
                                         G[L - 1] + r0 * m, r1 - r0, m,
                                         loss_scale * (r1 - r0) / bs)
            _activation_grad(G[L - 1] + r0 * m, Y[L - 1] + r0 * m, G[L - 1] + r0 * m,
                             (r1 - r0) * m, activations[L - 1])
        shared = False

        # backward, last layer first: δ_{l-1} = (δ_l·W_lᵀ) ⊙ f'_{l-1}(Y_{l-1}), with
        # every W_l still unchanged; split like the forward pass, by dX's width
        for l in range(L - 1, 0, -1):
            if nt > 1 and bs < sizes[l] and sizes[l] >= 32 * nt:
                if not shared:
                    cprop_barrier()
                dense_input_grad_block(G[l], W[l], G[l - 1], Y[l - 1], activations[l - 1],
                                       0, bs, _col_split(sizes[l], t, nt), _col_split(sizes[l], t + 1, nt),
                                       sizes[l], sizes[l + 1])
                cprop_barrier()
                shared = True
            else:
                dense_input_grad_block(G[l], W[l], G[l - 1], Y[l - 1], activations[l - 1],
                                       r0, r1, 0, sizes[l], sizes[l], sizes[l + 1])
                shared = False
        if not shared:
            cprop_barrier()

        batch_loss = 0
        for k in range(nt):
            batch_loss += part_loss[k]
        if not isfinite(batch_loss):
            status = STATUS_NONFINITE_LOSS   # before this step changed anything
            break

        # dW_l = Y_{l-1}ᵀ·δ_l, db_l = Σ δ_l over the whole batch, and the step on
        # W_l, b_l: thread t takes its slice of W's rows and of b
        if opt.kind == ADAM:
            opt.step += 1
        rejected = 0
        for l in range(L - 1, -1, -1):
            rejected += _layer_step_part(&opt, X_in if l == 0 else Y[l - 1], G[l], p, dp,
                                         &state_a[0], &state_b[0], offsets[l], bs,
                                         sizes[l], sizes[l + 1],
                                         sizes[l] * t // nt, sizes[l] * (t + 1) // nt,
                                         sizes[l + 1] * t // nt, sizes[l + 1] * (t + 1) // nt)
        part_rejected[t] = rejected
        if t == 0:
            interrupted[0] = _interrupted(&last)
        cprop_barrier()

        rejected = 0
        for k in range(nt):
            rejected += part_rejected[k]
        if rejected:
            status = STATUS_NONFINITE_STEP
            break
        if t == 0:
            loss_sum[0] += batch_loss * bs
            n_seen[0] += bs
        if interrupted[0]:
            status = STATUS_INTERRUPTED
            break
        start += bs
    if t == 0:
        shared_opt.step = opt.step
    return status


cdef int _train_epoch(const floating[:, ::1] X, const floating[:, ::1] T,
                      const Py_ssize_t[::1] labels, const Py_ssize_t[::1] order, bint gather,
                      floating[::1] params, floating[::1] grads,
                      floating[::1] state_a, floating[::1] state_b,
                      floating[::1] work, Py_ssize_t[::1] label_buf,
                      const Py_ssize_t[::1] sizes, const int[::1] activations,
                      int loss_kind, double loss_scale, Py_ssize_t batch_size, Optim* opt,
                      int n_threads, double* loss_sum, Py_ssize_t* n_seen) noexcept nogil:
    """The epoch on as many of n_threads as a batch's work is worth (see _epoch_worker)."""
    cdef Py_ssize_t l
    cdef double flops = 0
    cdef int t, nt, status = STATUS_OK, interrupted = 0
    cdef int* statuses
    cdef double* part_loss
    cdef Py_ssize_t* part_rejected
    cdef cprop_team_barrier barrier
    for l in range(sizes.shape[0] - 1):
        flops += 6.0 * batch_size * sizes[l] * sizes[l + 1]
    nt = threads_for(flops, batch_size, n_threads)
    # shared between the threads (anything assigned inside the parallel block is private)
    statuses = <int*> calloc(nt, sizeof(int))
    part_loss = <double*> calloc(nt, sizeof(double))
    part_rejected = <Py_ssize_t*> calloc(nt, sizeof(Py_ssize_t))
    if statuses != NULL and part_loss != NULL and part_rejected != NULL:
        if nt == 1:
            statuses[0] = _epoch_worker(X, T, labels, order, gather, params, grads, state_a, state_b,
                                        work, label_buf, sizes, activations, loss_kind, loss_scale,
                                        batch_size, opt, 0, 1, part_loss, part_rejected, &interrupted,
                                        loss_sum, n_seen)
        else:
            cprop_barrier_init(&barrier)
            with parallel(num_threads=nt):
                t = cprop_barrier_join(&barrier)
                # the team OpenMP gave (OMP_DYNAMIC, OMP_THREAD_LIMIT: maybe fewer than nt)
                statuses[t] = _epoch_worker(X, T, labels, order, gather, params, grads, state_a,
                                            state_b, work, label_buf, sizes, activations, loss_kind,
                                            loss_scale, batch_size, opt, t, omp_get_num_threads(),
                                            part_loss, part_rejected, &interrupted, loss_sum, n_seen)
                cprop_barrier_leave()
        status = statuses[0]
    else:
        status = STATUS_NO_MEMORY
    free(statuses)
    free(part_loss)
    free(part_rejected)
    return status


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
    if status == STATUS_NO_MEMORY:
        raise MemoryError("cprop could not allocate the training loop's per-thread buffers")
    if status == STATUS_INTERRUPTED:
        optimizer["step"] = opt.step
        _raise_pending()
    return status, loss_sum, n_seen, opt.step
