# cprop's compiled core: the Python-callable face of the kernels in the .pxd
# files, and the training epoch that runs them all without the GIL.
#
# Private: cprop/ validates every argument (shapes, dtypes, contiguity, label
# range) before calling in here; these functions trust what they are given.
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport isfinite
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from cpython.ref cimport PyObject, Py_XDECREF

cdef extern from "Python.h":
    # declared here without an exception clause: a KeyboardInterrupt raised by
    # a signal handler must stay set for train_epoch to propagate, not be
    # reported and swallowed inside the noexcept epoch
    int PyErr_CheckSignals()
    # the data guard's call: NULL with its exception set when it raised
    PyObject* PyObject_CallNoArgs(PyObject* callable)

from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from _openmp cimport (CPROP_OPENMP, CPROP_OPENMP_VERSION, omp_get_max_threads, omp_get_num_threads,
                      cprop_barrier, cprop_team_barrier, cprop_barrier_init,
                      cprop_barrier_join, cprop_barrier_leave, cprop_take_team_stats)
from _activations cimport activation_grad as _activation_grad, needs_z, N_ACTIVATIONS
from _activations cimport (IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH, ELU, SOFTPLUS, GELU,
                           GELU_TANH, SILU)
from _blas cimport gemm
from _dense cimport (dense_forward as _dense_forward, dense_forward_block, dense_param_grads,
                     dense_param_grads_part, dense_input_grad, dense_input_grad_block,
                     gather_rows, threads_for, _col_split, all_finite)
from _dropout cimport dropout_rows
from _sparse cimport CSRBatch, csr_forward_rows, csr_weight_grad_features, csr_gather_dense
from _norm cimport (layernorm_forward_rows, layernorm_backward_rows, batchnorm_stats_cols,
                    batchnorm_forward_rows, batchnorm_eval_stats, batchnorm_grad_sums_cols,
                    batchnorm_backward_rows, affine_param_grads_cols)
from _losses cimport loss_and_grad, CROSS_ENTROPY, MSE, BINARY_CROSS_ENTROPY, POISSON, L1, HUBER
from _optim cimport (Optim, optim_range, ADAM, SGD, MIN_PARAMS_PER_THREAD, clip_blocks, grad_sq_blocks,
                     clip_factor, scale_range)
cimport _plan
from _plan cimport Plan, DENSE, DROPOUT, BATCHNORM, LAYERNORM

from _blas cimport cprop_bind_gemm, cprop_dlsym
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from _mpi cimport MpiSum, allreduce_sum, cprop_bind_mpi, cprop_mpi_allreduce
from _fpenv cimport CPROP_FLUSH_SUPPORTED, cprop_set_flush_denormals, cprop_get_flush_denormals
from _fpenv cimport cprop_fp_enter, cprop_fp_leave


cdef bint _gemm_works() noexcept:
    """Whether the bound sgemm and dgemm multiply [[1,2],[3,4]]·[[5,6],[7,8]] right."""
    cdef float As[4]
    cdef float Bs[4]
    cdef float Cs[4]
    cdef double Ad[4]
    cdef double Bd[4]
    cdef double Cd[4]
    cdef int i
    for i in range(4):
        As[i] = Ad[i] = i + 1
        Bs[i] = Bd[i] = i + 5
        Cs[i] = Cd[i] = 0
    gemm(False, False, 2, 2, 2, 1.0, As, 2, Bs, 2, 0.0, Cs, 2)
    gemm(False, False, 2, 2, 2, 1.0, Ad, 2, Bd, 2, 0.0, Cd, 2)
    return (Cs[0] == 19 and Cs[1] == 22 and Cs[2] == 43 and Cs[3] == 50
            and Cd[0] == 19 and Cd[1] == 22 and Cd[2] == 43 and Cd[3] == 50)


def _bind_blas():
    """Bind the sgemm/dgemm every product calls; returns where they came from.

    The functions are scipy's BLAS, the ones ``scipy.linalg.cython_blas`` calls.
    Importing that module imports all of scipy.linalg (a large import, see
    benchmarks/README.md), so they are first looked up in the shared library it
    links to, loaded without running its Python (dlopen/dlsym on the module's
    file, found without importing scipy). Where that fails (another platform, a scipy built differently), or
    ``CPROP_BLAS=cython_blas`` is set, they are taken from the C functions the
    imported module exports. Either way a 2x2 product checks them.
    """
    import os
    import importlib.machinery
    import importlib.util
    cdef void* s
    cdef void* d
    requested = os.environ.get("CPROP_BLAS", "").strip().lower()
    if requested not in ("", "cython_blas"):
        raise ImportError(f"CPROP_BLAS must be 'cython_blas' or unset, got {requested!r}")
    if requested != "cython_blas":
        spec = importlib.util.find_spec("scipy")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(folder, "linalg", "cython_blas" + suffix)
                if not os.path.isfile(path):
                    continue
                encoded = os.fsencode(path)
                for prefix in (b"scipy_", b""):
                    s = cprop_dlsym(encoded, prefix + b"sgemm_")
                    d = cprop_dlsym(encoded, prefix + b"dgemm_")
                    if s != NULL and d != NULL:
                        cprop_bind_gemm(s, d)
                        if _gemm_works():
                            return path
    from scipy.linalg import cython_blas
    capsules = cython_blas.__pyx_capi__
    cprop_bind_gemm(PyCapsule_GetPointer(capsules["sgemm"], PyCapsule_GetName(capsules["sgemm"])),
                    PyCapsule_GetPointer(capsules["dgemm"], PyCapsule_GetName(capsules["dgemm"])))
    if not _gemm_works():
        raise ImportError("cprop: scipy.linalg.cython_blas's sgemm/dgemm give wrong products")
    return "scipy.linalg.cython_blas"


# where the products' sgemm/dgemm come from (cprop.show_config prints it)
BLAS = _bind_blas()

OPENMP = bool(CPROP_OPENMP)
OPENMP_VERSION = CPROP_OPENMP_VERSION

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

# The compiled enums, for cprop's Python tables (cprop/activations.py, losses.py,
# optim.py, layers.py read their codes from here; a test checks every name)
ACTIVATIONS = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "sigmoid": SIGMOID,
               "tanh": TANH, "elu": ELU, "softplus": SOFTPLUS, "gelu": GELU, "gelu_tanh": GELU_TANH,
               "silu": SILU}
NEEDS_Z = frozenset(name for name, code in ACTIVATIONS.items() if needs_z(code))
LOSSES = {"mse": MSE, "cross_entropy": CROSS_ENTROPY, "binary_cross_entropy": BINARY_CROSS_ENTROPY,
          "poisson": POISSON, "l1": L1, "huber": HUBER}
OPTIMIZERS = {"sgd": SGD, "adam": ADAM}
LAYER_KINDS = {"dense": DENSE, "dropout": DROPOUT, "batchnorm": BATCHNORM, "layernorm": LAYERNORM}
PLAN_INT = {"kind": _plan.KIND, "act": _plan.ACT, "n_in": _plan.N_IN, "n_out": _plan.N_OUT,
            "param": _plan.PARAM, "n_param": _plan.N_PARAM, "buffer": _plan.BUFFER,
            "y": _plan.Y_COL, "z": _plan.Z_COL, "xhat": _plan.XHAT_COL, "stat": _plan.STAT_COL,
            "g": _plan.G_COL, "bstat": _plan.BSTAT}
PLAN_FLOAT = {"alpha": _plan.ALPHA, "p": _plan.DROP_P, "eps": _plan.EPS, "momentum": _plan.MOMENTUM}
N_PLAN_INT = _plan.N_PLAN_INT
N_PLAN_FLOAT = _plan.N_PLAN_FLOAT

# how often the nogil epoch takes the GIL to let Ctrl-C through
cdef double SIGNAL_CHECK_SECONDS = 0.05


def max_threads():
    """Threads OpenMP would use by default (OMP_NUM_THREADS honoured); 1 without OpenMP."""
    return omp_get_max_threads()


def set_flush_denormals(bint flush):
    """Whether the passes that follow flush subnormal numbers to zero (see src/_fpenv.pxd)."""
    cprop_set_flush_denormals(flush)


def flush_denormals():
    """Whether passes flush subnormal numbers to zero; FLUSH_SUPPORTED: whether this CPU can."""
    return bool(cprop_get_flush_denormals())


FLUSH_SUPPORTED = bool(CPROP_FLUSH_SUPPORTED)


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


# -- single kernels (the tests' subjects, and the per-layer reference points) ----------

def dense_forward(const floating[:, ::1] X, const floating[:, ::1] W, const floating[::1] b,
                  floating[:, ::1] Y, int activation, int n_threads, double alpha=0.01):
    """Y = f(X·W + b)."""
    with nogil:
        _dense_forward(&X[0, 0], &W[0, 0], &b[0], &Y[0, 0], X.shape[0], W.shape[0], W.shape[1],
                       activation, <floating> alpha, n_threads)


def activation_grad(const floating[:, ::1] G, const floating[:, ::1] Y, floating[:, ::1] delta,
                    int activation, double alpha=0.01, const floating[:, ::1] Z=None):
    """δ = G ⊙ f'(z), with f' written through the output Y = f(z) (or through Z when given)."""
    cdef const floating* Z_ptr = NULL if Z is None else &Z[0, 0]
    with nogil:
        _activation_grad(&G[0, 0], &Y[0, 0], &delta[0, 0], G.shape[0] * G.shape[1], activation,
                         <floating> alpha, Z_ptr)


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


def sparse_forward(const floating[::1] data, const Py_ssize_t[::1] indices,
                   const Py_ssize_t[::1] indptr, const floating[:, ::1] W, const floating[::1] b,
                   floating[:, ::1] Y, int activation, int n_threads, double alpha=0.01,
                   const Py_ssize_t[::1] rows=None):
    """Y = f(X·W + b) for the CSR matrix X (data, indices, indptr); with `rows`, Y's row r
    from X's row rows[r] (a shuffled minibatch). Threads split Y's rows."""
    cdef CSRBatch X
    cdef Py_ssize_t n = Y.shape[0], n_out = W.shape[1]
    cdef int t, nt = <int> max(1, min(n_threads, n))    # no thread without rows
    _csr(&X, data, indices, indptr)
    X.rows = NULL if rows is None else &rows[0]
    with nogil:
        for t in prange(nt, num_threads=nt, schedule='static'):
            csr_forward_rows(&X, &W[0, 0], &b[0], &Y[0, 0], n * t // nt, n * (t + 1) // nt, n_out,
                             activation, <floating> alpha)


def sparse_backward(const floating[::1] data, const Py_ssize_t[::1] indices,
                    const Py_ssize_t[::1] indptr, const floating[:, ::1] delta,
                    floating[:, ::1] dW, floating[::1] db, int n_threads,
                    const Py_ssize_t[::1] rows=None):
    """dW = Xᵀ·δ and db = Σ_rows δ for the CSR matrix X (with `rows`, δ's row r belongs
    to X's row rows[r]). Threads split dW's rows (the features) and db."""
    cdef CSRBatch X
    cdef Py_ssize_t n = delta.shape[0], n_in = dW.shape[0], n_out = dW.shape[1]
    cdef int t, nt = <int> max(1, min(n_threads, n_in))  # no thread without features
    _csr(&X, data, indices, indptr)
    X.rows = NULL if rows is None else &rows[0]
    with nogil:
        for t in prange(nt, num_threads=nt, schedule='static'):
            csr_weight_grad_features(&X, &delta[0, 0], &dW[0, 0], n, n_out, n_in * t // nt,
                                     n_in * (t + 1) // nt)
            dense_param_grads_part(<floating*> NULL, &delta[0, 0], &dW[0, 0], &db[0], n, n_in, n_out,
                                   0, 0, n_out * t // nt, n_out * (t + 1) // nt)


def sparse_to_dense(const floating[::1] data, const Py_ssize_t[::1] indices,
                    const Py_ssize_t[::1] indptr, floating[:, ::1] out,
                    const Py_ssize_t[::1] rows=None):
    """out[r] = row r of the CSR matrix (or row rows[r]) as a dense row, duplicates summed:
    the minibatch of a first layer that is not Dense."""
    cdef CSRBatch X
    _csr(&X, data, indices, indptr)
    X.rows = NULL if rows is None else &rows[0]
    with nogil:
        csr_gather_dense(&X, &out[0, 0], 0, out.shape[0], out.shape[1])


def loss(int kind, const floating[:, ::1] out, const floating[:, ::1] T,
         const Py_ssize_t[::1] labels, floating[:, ::1] G, double scale=1.0,
         const floating[::1] weights=None):
    """scale × mean loss of `out` against T (mse, binary_cross_entropy) or labels
    (cross_entropy); G = ∂(that)/∂out. With per-row weights, each row's terms are
    multiplied by its weight (and still divided by the row count)."""
    cdef const floating* T_ptr = &T[0, 0] if T.shape[0] else NULL
    cdef const Py_ssize_t* labels_ptr = &labels[0] if labels.shape[0] else NULL
    cdef const floating* w = NULL if weights is None else &weights[0]
    cdef double value
    with nogil:
        value = loss_and_grad(kind, &out[0, 0], T_ptr, labels_ptr, w, &G[0, 0],
                              out.shape[0], out.shape[1], scale)
    return value


# -- the plan ----------------------------------------------------------------------------

cdef Plan make_plan(const long long[:, ::1] table, const double[:, ::1] hyper, Py_ssize_t row_width,
                    Py_ssize_t n_bstats) except *:
    """The plan the kernels read, its layout checked first (_check_layout): what they index
    comes from it, and Python code can replace or even edit a network's plan."""
    cdef Plan P
    if hyper.shape[0] != table.shape[0] or hyper.shape[1] != _plan.N_PLAN_FLOAT:
        raise ValueError(f"the plan's float table is {hyper.shape[0]} x {hyper.shape[1]}, expected "
                         f"{table.shape[0]} x {_plan.N_PLAN_FLOAT}")
    _check_layout(&P, table, row_width, n_bstats, True)
    P.f = &hyper[0, 0]
    return P


cdef int _check_layout(Plan* P, const long long[:, ::1] table, Py_ssize_t row_width, Py_ssize_t n_bstats,
                       bint columns) except -1:
    """ValueError unless every row of the plan is one the kernels can run within its arrays:
    known kinds and activations, widths >= 1 that chain, parameters and running statistics
    laid out one after the other as each kind needs them, and (with `columns`) every
    workspace column and batch statistic inside row_width and n_bstats. The memory-safety
    half of cprop.network._check_plan (which also checks values and overlaps), in O(layers).
    Fills P's integer part (P.f: the caller's), with the counts of parameters and running
    statistics the rows lay out."""
    cdef Py_ssize_t i, n_in, n_out, kind, act, param_end = 0, buffer_end = 0, n_param
    cdef const long long* T
    cdef str bad = ""
    if table.shape[0] < 1 or table.shape[1] != _plan.N_PLAN_INT:
        raise ValueError(f"the plan's table is {table.shape[0]} x {table.shape[1]}, expected at least "
                         f"one row of {_plan.N_PLAN_INT}")
    if row_width < 0 or n_bstats < 0:
        raise ValueError("the plan's workspace sizes are negative")
    for i in range(table.shape[0]):
        T = &table[i, 0]
        kind, act, n_in, n_out, n_param = T[_plan.KIND], T[_plan.ACT], T[_plan.N_IN], T[_plan.N_OUT], T[_plan.N_PARAM]
        if not 0 <= kind < _plan.N_KINDS or not 0 <= act < N_ACTIVATIONS:
            bad = "an unknown kind or activation"
        elif n_in < 1 or n_out < 1 or (i > 0 and n_in != table[i - 1, _plan.N_OUT]) or (
                kind != DENSE and n_in != n_out):
            bad = "widths that do not chain"
        elif T[_plan.PARAM] != param_end or not (
                (kind == DENSE and n_param == n_in * n_out + n_out) or (kind == DROPOUT and n_param == 0)
                or ((kind == BATCHNORM or kind == LAYERNORM) and (n_param == 0 or n_param == 2 * n_out))):
            bad = "parameters out of place"
        elif (kind == BATCHNORM and (T[_plan.BUFFER] != buffer_end or T[_plan.BSTAT] < 0
                                     or (columns and T[_plan.BSTAT] + 4 * n_out > n_bstats))) or (
                kind != BATCHNORM and (T[_plan.BUFFER] != -1 or T[_plan.BSTAT] != -1)):
            bad = "running or batch statistics out of place"
        elif columns and not (_column_fits(T[_plan.Y_COL], n_out, row_width, False)
                              and _column_fits(T[_plan.G_COL], n_out, row_width, False)
                              and _column_fits(T[_plan.Z_COL], n_out, row_width, not needs_z(<int> act))
                              and _column_fits(T[_plan.XHAT_COL], n_out, row_width,
                                               kind != BATCHNORM and kind != LAYERNORM)
                              and _column_fits(T[_plan.STAT_COL], 1, row_width, kind != LAYERNORM)):
            bad = "workspace columns out of place"
        if bad:
            raise ValueError(f"the network's plan, row {i}, has {bad}: was it edited or replaced?")
        param_end += n_param
        if kind == BATCHNORM:
            buffer_end += 2 * n_out
    P.t = &table[0, 0]
    P.f = NULL
    P.n_layers = table.shape[0]
    P.row_width = row_width
    P.n_bstats = n_bstats
    P.n_params = param_end
    P.n_buffers = buffer_end
    return 0


cdef inline bint _column_fits(long long col, Py_ssize_t width, Py_ssize_t row_width, bint absent) noexcept:
    """Whether a workspace column is -1 when `absent`, else inside the row_width floats of a row."""
    if absent:
        return col == -1
    return 0 <= col and col + width <= row_width


cdef inline const long long* _row(const Plan* P, Py_ssize_t layer) noexcept nogil:
    return P.t + layer * _plan.N_PLAN_INT


cdef int _check_arrays(const Plan* P, str what, Py_ssize_t n_params, Py_ssize_t n_grads,
                       Py_ssize_t n_buffers, Py_ssize_t work, Py_ssize_t work_needed,
                       Py_ssize_t n_in=-1, Py_ssize_t n_out=-1) except -1:
    """ValueError unless the arrays fit the (checked) plan: the parameters and gradients
    (n_grads -1: none) as long as its layout, the running statistics (-1: not passed) at
    least, the workspace at least work_needed, X's width n_in and the targets' n_out (-1:
    not passed). Every compiled entry point that runs the plan calls it, so that a network
    rebuilt between calls (its plan or arrays replaced from Python) is refused instead of
    read out of bounds."""
    cdef Py_ssize_t need_params = P.n_params, need_buffers = P.n_buffers
    if n_params != need_params or (n_grads >= 0 and n_grads != need_params):
        raise ValueError(f"{what}: the network's plan lays out {need_params} parameters, its "
                         f"arrays hold {n_params} (gradients {n_grads}): was it rebuilt meanwhile?")
    if n_buffers >= 0 and n_buffers < need_buffers:
        raise ValueError(f"{what}: the plan needs {need_buffers} running statistics, the network holds "
                         f"{n_buffers}: was it rebuilt meanwhile?")
    if work < work_needed:
        raise ValueError(f"{what}: the workspace holds {work} values, the plan needs {work_needed}")
    if n_in >= 0 and n_in != _row(P, 0)[_plan.N_IN]:
        raise ValueError(f"{what}: X has {n_in} features, the network expects {_row(P, 0)[_plan.N_IN]}")
    if n_out >= 0 and n_out != _row(P, P.n_layers - 1)[_plan.N_OUT]:
        raise ValueError(f"{what}: the targets have {n_out} columns, the network outputs "
                         f"{_row(P, P.n_layers - 1)[_plan.N_OUT]}")
    return 0


cdef int _check_state(const Optim* opt, str what, Py_ssize_t n_params, Py_ssize_t n_a,
                      Py_ssize_t n_b) except -1:
    """ValueError unless the optimizer's state arrays cover the parameters it steps."""
    if (opt.kind == ADAM and (n_a < n_params or n_b < n_params)) or (
            opt.kind == SGD and opt.momentum != 0 and n_a < n_params):
        raise ValueError(f"{what}: the optimizer's state holds {n_a} and {n_b} values for "
                         f"{n_params} parameters")
    return 0


cdef inline const double* _hyper(const Plan* P, Py_ssize_t layer) noexcept nogil:
    return P.f + layer * _plan.N_PLAN_FLOAT


cdef inline floating* _col(floating* work, Py_ssize_t rows, long long col) noexcept nogil:
    """The (rows × width) buffer at column offset `col` of the per-row area, or NULL for -1."""
    return NULL if col < 0 else work + rows * col


cdef inline floating* _bstats(const Plan* P, floating* work, Py_ssize_t rows, const long long* T) noexcept nogil:
    return work + rows * P.row_width + T[_plan.BSTAT]


cdef inline bint _split_columns(Py_ssize_t bs, Py_ssize_t width, int nt) noexcept nogil:
    """Whether a product over bs rows into `width` columns splits the columns between threads:
    when the layer is much wider than the batch, splitting rows would have every thread
    pack all of W."""
    return nt > 1 and bs < width and width >= 32 * nt


cdef inline void _sync(int nt) noexcept nogil:
    """A barrier of the nt threads of the current pass (nothing to wait for on one)."""
    if nt > 1:
        cprop_barrier()


# -- the three passes of a batch, as thread t of nt runs them ------------------------------
#
# Thread t owns rows r0:r1 of a batch of bs rows and carries them through every
# layer; a Dense layer much wider than the batch is split by columns instead
# (barriers around it), and a BatchNorm needs every row for its statistics
# (barriers around them). The same code serves the training epoch, a training
# forward/backward from Python, and (one thread) the chunks of inference.

cdef void forward_pass(const Plan* P, floating* params, floating* buffers, floating* work,
                       Py_ssize_t rows, const floating* X_in, const CSRBatch* X_sparse, Py_ssize_t bs,
                       int t, int nt, bint training, unsigned long long seed,
                       long long row_base, int* product_finite=NULL) noexcept nogil:
    """Every layer's output for this thread's rows: Y_l = layer_l(Y_{l-1}), Y_{-1} = X_in,
    or, when X_sparse is not NULL, the CSR rows it names (the first layer is then Dense).
    `rows`: the row count the workspace was laid out for (>= bs). In evaluation BatchNorm
    reads its mean and rstd from the batch-statistics area, filled by the caller. With
    product_finite, a dense first Dense layer sets it to whether X_in·W was finite
    (see dense_forward_block)."""
    cdef Py_ssize_t layer, n_in, n_out, c0, c1
    cdef Py_ssize_t r0 = bs * t // nt, r1 = bs * (t + 1) // nt
    cdef const long long* T
    cdef const double* F
    cdef const floating* inp = X_in
    cdef floating* Y
    cdef floating* W
    cdef floating* gamma
    cdef floating* bst
    cdef floating alpha
    cdef bint shared = False     # whether the last output is whole (all threads synced)
    for layer in range(P.n_layers):
        T = _row(P, layer)
        F = _hyper(P, layer)
        n_in = T[_plan.N_IN]
        n_out = T[_plan.N_OUT]
        alpha = <floating> F[_plan.ALPHA]
        Y = _col(work, rows, T[_plan.Y_COL])
        gamma = params + T[_plan.PARAM] if T[_plan.N_PARAM] else NULL
        if T[_plan.KIND] == DENSE:
            # Y = f(X·W + b)
            W = params + T[_plan.PARAM]
            if layer == 0 and X_sparse != NULL:
                # sparse × dense by rows: a column split would have every thread scan every row
                csr_forward_rows(X_sparse, W, W + n_in * n_out, Y, r0, r1, n_out, <int> T[_plan.ACT],
                                 alpha, _col(work, rows, T[_plan.Z_COL]))
                shared = False
            elif _split_columns(bs, n_out, nt):
                if not shared:
                    _sync(nt)
                dense_forward_block(inp, W, W + n_in * n_out, Y, 0, bs, _col_split(n_out, t, nt),
                                    _col_split(n_out, t + 1, nt), n_in, n_out, <int> T[_plan.ACT], alpha,
                                    _col(work, rows, T[_plan.Z_COL]))
                _sync(nt)
                shared = True
            else:
                dense_forward_block(inp, W, W + n_in * n_out, Y, r0, r1, 0, n_out, n_in, n_out,
                                    <int> T[_plan.ACT], alpha, _col(work, rows, T[_plan.Z_COL]),
                                    product_finite if layer == 0 else NULL)
                shared = False
        elif T[_plan.KIND] == DROPOUT:
            # Y = X ⊙ M / (1 - p) in training, X in evaluation
            if training and F[_plan.DROP_P] > 0:
                dropout_rows(inp, Y, r0, r1, n_out, F[_plan.DROP_P], seed, row_base, layer)
            elif r1 > r0:
                memcpy(Y + r0 * n_out, inp + r0 * n_out, (r1 - r0) * n_out * sizeof(floating))
            shared = False
        elif T[_plan.KIND] == LAYERNORM:
            layernorm_forward_rows(inp, Y, _col(work, rows, T[_plan.XHAT_COL]), _col(work, rows, T[_plan.Z_COL]),
                                   _col(work, rows, T[_plan.STAT_COL]), gamma,
                                   gamma + n_out if gamma != NULL else NULL, r0, r1, n_out, F[_plan.EPS],
                                   <int> T[_plan.ACT], alpha)
            shared = False
        else:  # BATCHNORM
            bst = _bstats(P, work, rows, T)      # mean, rstd, Σdx̂, Σdx̂⊙x̂
            if training:
                # every row of the input, each thread its slice of the features
                if not shared:
                    _sync(nt)
                c0 = n_out * t // nt
                c1 = n_out * (t + 1) // nt
                batchnorm_stats_cols(inp, bst, bst + n_out, buffers + T[_plan.BUFFER],
                                     buffers + T[_plan.BUFFER] + n_out, bs, n_out, c0, c1,
                                     F[_plan.EPS], F[_plan.MOMENTUM])
                _sync(nt)
            batchnorm_forward_rows(inp, Y, _col(work, rows, T[_plan.XHAT_COL]), _col(work, rows, T[_plan.Z_COL]),
                                   bst, bst + n_out, gamma, gamma + n_out if gamma != NULL else NULL,
                                   r0, r1, n_out, <int> T[_plan.ACT], alpha)
            shared = False
        inp = Y


cdef void backward_pass(const Plan* P, floating* params, floating* work, Py_ssize_t rows,
                        Py_ssize_t bs, int t, int nt, bint training, unsigned long long seed,
                        long long row_base) noexcept nogil:
    """δ of every layer for this thread's rows, last layer first, from δ_last (already in the
    last layer's G): G_{l-1} = ∂L/∂Y_{l-1} from δ_l, then δ_{l-1} = G_{l-1} ⊙ f'_{l-1} in place.
    Ends with a barrier: every row of every δ is complete."""
    cdef Py_ssize_t layer, i, n_in, n_out, r0 = bs * t // nt, r1 = bs * (t + 1) // nt
    cdef const long long* T
    cdef const long long* Tp
    cdef const double* F
    cdef floating* G
    cdef floating* Gp
    cdef floating* Yp
    cdef floating* Zp
    cdef floating* gamma
    cdef floating* bst
    cdef floating* xhat
    cdef floating alpha_p
    cdef int act_p
    cdef bint shared = False
    for layer in range(P.n_layers - 1, 0, -1):
        T = _row(P, layer)
        F = _hyper(P, layer)
        Tp = _row(P, layer - 1)
        n_in = T[_plan.N_IN]
        n_out = T[_plan.N_OUT]
        G = _col(work, rows, T[_plan.G_COL])
        Gp = _col(work, rows, Tp[_plan.G_COL])
        Yp = _col(work, rows, Tp[_plan.Y_COL])
        Zp = _col(work, rows, Tp[_plan.Z_COL])
        act_p = <int> Tp[_plan.ACT]
        alpha_p = <floating> _hyper(P, layer - 1)[_plan.ALPHA]
        gamma = params + T[_plan.PARAM] if T[_plan.N_PARAM] else NULL
        xhat = _col(work, rows, T[_plan.XHAT_COL])
        if T[_plan.KIND] == DENSE:
            # G_{l-1} = δ_l·Wᵀ, fused with f'_{l-1}
            if _split_columns(bs, n_in, nt):
                if not shared:
                    _sync(nt)
                dense_input_grad_block(G, params + T[_plan.PARAM], Gp, Yp, act_p, 0, bs,
                                       _col_split(n_in, t, nt), _col_split(n_in, t + 1, nt),
                                       n_in, n_out, alpha_p, Zp)
                _sync(nt)
                shared = True
            else:
                dense_input_grad_block(G, params + T[_plan.PARAM], Gp, Yp, act_p, r0, r1, 0, n_in,
                                       n_in, n_out, alpha_p, Zp)
                shared = False
            continue
        if T[_plan.KIND] == DROPOUT:
            if training and F[_plan.DROP_P] > 0:
                dropout_rows(G, Gp, r0, r1, n_out, F[_plan.DROP_P], seed, row_base, layer)
            elif r1 > r0:
                memcpy(Gp + r0 * n_out, G + r0 * n_out, (r1 - r0) * n_out * sizeof(floating))
        elif T[_plan.KIND] == LAYERNORM:
            layernorm_backward_rows(G, xhat, _col(work, rows, T[_plan.STAT_COL]), gamma, Gp, r0, r1, n_out)
        else:  # BATCHNORM
            bst = _bstats(P, work, rows, T)
            if training:
                if not shared:
                    _sync(nt)
                batchnorm_grad_sums_cols(G, xhat, gamma, bst + 2 * n_out, bst + 3 * n_out, bs, n_out,
                                         n_out * t // nt, n_out * (t + 1) // nt)
                _sync(nt)
                batchnorm_backward_rows(G, xhat, bst + n_out, gamma, bst + 2 * n_out, bst + 3 * n_out,
                                        Gp, bs, r0, r1, n_out)
            else:
                # evaluation: an affine map per feature, dx = δ·γ·rstd
                for i in range(r0 * n_out, r1 * n_out):
                    Gp[i] = G[i] * bst[n_out + i % n_out] * (gamma[i % n_out] if gamma != NULL else 1)
        for i in range(r0, r1):
            _activation_grad(Gp + i * n_in, Yp + i * n_in, Gp + i * n_in, n_in, act_p, alpha_p,
                             NULL if Zp == NULL else Zp + i * n_in)
        shared = False
    if not shared:
        _sync(nt)


cdef Py_ssize_t param_pass(const Plan* P, const Optim* opt, floating* params, floating* grads,
                           floating* state_a, floating* state_b, floating* work, Py_ssize_t rows,
                           const floating* X_in, const CSRBatch* X_sparse, Py_ssize_t bs,
                           double batch_weight, int t, int nt) noexcept nogil:
    """Thread t's slice of every layer's parameter gradients over the whole batch
    (dW = inpᵀ·δ, db = Σδ; dγ = Σδ⊙x̂, dβ = Σδ), then, when opt is not NULL, the optimizer
    step on exactly that slice while it is in this core's cache (batch_weight: the batch's
    size, or summed sample weights, for decay per sample). Returns the count of updates
    refused as non-finite. With X_sparse, the first layer's dW = Xᵀ·δ is the sparse product,
    thread t owning the same rows of dW (features) it steps."""
    cdef Py_ssize_t layer, off, n_in, n_out, c0, c1, rejected = 0
    cdef const long long* T
    cdef const floating* inp
    cdef floating* delta
    for layer in range(P.n_layers - 1, -1, -1):
        T = _row(P, layer)
        if T[_plan.N_PARAM] == 0:
            continue
        off = T[_plan.PARAM]
        n_in = T[_plan.N_IN]
        n_out = T[_plan.N_OUT]
        delta = _col(work, rows, T[_plan.G_COL])
        c0 = n_out * t // nt
        c1 = n_out * (t + 1) // nt
        if T[_plan.KIND] == DENSE:
            if layer == 0 and X_sparse != NULL:
                csr_weight_grad_features(X_sparse, delta, grads + off, bs, n_out, n_in * t // nt,
                                         n_in * (t + 1) // nt)
                # db alone: an empty block of dW's rows
                dense_param_grads_part(<floating*> NULL, delta, grads + off, grads + off + n_in * n_out,
                                       bs, n_in, n_out, 0, 0, c0, c1)
            else:
                inp = X_in if layer == 0 else _col(work, rows, _row(P, layer - 1)[_plan.Y_COL])
                dense_param_grads_part(inp, delta, grads + off, grads + off + n_in * n_out, bs, n_in,
                                       n_out, n_in * t // nt, n_in * (t + 1) // nt, c0, c1)
            if opt != NULL:
                rejected += optim_range(opt, params, grads, state_a, state_b, off + (n_in * t // nt) * n_out,
                                        off + (n_in * (t + 1) // nt) * n_out, True, batch_weight)
                rejected += optim_range(opt, params, grads, state_a, state_b, off + n_in * n_out + c0,
                                        off + n_in * n_out + c1, opt.decay_bias, batch_weight)
        else:  # the affine parameters of a normalization layer: γ then β
            affine_param_grads_cols(delta, _col(work, rows, T[_plan.XHAT_COL]), grads + off,
                                    grads + off + n_out, bs, n_out, c0, c1)
            if opt != NULL:
                rejected += optim_range(opt, params, grads, state_a, state_b, off + c0, off + c1, True, batch_weight)
                rejected += optim_range(opt, params, grads, state_a, state_b, off + n_out + c0,
                                        off + n_out + c1, opt.decay_bias, batch_weight)
    return rejected


cdef void eval_stats(const Plan* P, floating* buffers, floating* work, Py_ssize_t rows) noexcept nogil:
    """Evaluation-mode mean and rstd of every BatchNorm, from its running estimates."""
    cdef Py_ssize_t layer
    cdef const long long* T
    for layer in range(P.n_layers):
        T = _row(P, layer)
        if T[_plan.KIND] == BATCHNORM:
            batchnorm_eval_stats(buffers + T[_plan.BUFFER], buffers + T[_plan.BUFFER] + T[_plan.N_OUT],
                                 _bstats(P, work, rows, T), _bstats(P, work, rows, T) + T[_plan.N_OUT],
                                 T[_plan.N_OUT], _hyper(P, layer)[_plan.EPS])


cdef double _pass_flops(const Plan* P, Py_ssize_t rows) noexcept nogil:
    cdef Py_ssize_t layer
    cdef double flops = 0, n_out
    for layer in range(P.n_layers):
        n_out = _row(P, layer)[_plan.N_OUT]
        flops += 2.0 * rows * _row(P, layer)[_plan.N_IN] * n_out + 8.0 * rows * n_out
    return flops


cdef inline void _output_delta(const Plan* P, floating* work, Py_ssize_t rows, Py_ssize_t r0,
                               Py_ssize_t r1) noexcept nogil:
    """Rows r0:r1 of δ_last = ∂L/∂Y_last ⊙ f'_last, in place in the last layer's G column
    (which holds ∂L/∂Y_last)."""
    cdef const long long* last = _row(P, P.n_layers - 1)
    cdef Py_ssize_t m = last[_plan.N_OUT]
    cdef floating* G = work + rows * last[_plan.G_COL] + r0 * m
    cdef floating* Z = NULL if last[_plan.Z_COL] < 0 else work + rows * last[_plan.Z_COL] + r0 * m
    _activation_grad(G, work + rows * last[_plan.Y_COL] + r0 * m, G, (r1 - r0) * m,
                     <int> last[_plan.ACT], <floating> _hyper(P, P.n_layers - 1)[_plan.ALPHA], Z)


cdef double _loss_and_delta(const Plan* P, const Fit* fit, floating* work, Py_ssize_t rows,
                            const floating* T_in, const Py_ssize_t* labels_in, const floating* w_in,
                            double batch_weight, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """A thread's rows r0:r1 of a batch after forward_pass: returns their part of the
    batch's mean loss (Σ w·l / batch_weight, times loss_scale) and leaves their δ_last in
    the last layer's G column. T_in/labels_in/w_in point at the batch's first row."""
    cdef const long long* last = _row(P, P.n_layers - 1)
    cdef Py_ssize_t m = last[_plan.N_OUT]
    cdef double part
    if r1 <= r0:
        return 0
    part = loss_and_grad(fit.loss_kind, work + rows * last[_plan.Y_COL] + r0 * m,
                         T_in + r0 * m if T_in != NULL else NULL,
                         labels_in + r0 if labels_in != NULL else NULL,
                         w_in + r0 if w_in != NULL else NULL,
                         work + rows * last[_plan.G_COL] + r0 * m, r1 - r0, m,
                         fit.loss_scale * (r1 - r0) / batch_weight)
    _output_delta(P, work, rows, r0, r1)
    return part


# -- forward and backward from Python ----------------------------------------------------

def forward_train(const long long[:, ::1] table, const double[:, ::1] hyper, Py_ssize_t row_width,
                  Py_ssize_t n_bstats, const floating[:, ::1] X, floating[::1] params,
                  floating[::1] buffers, floating[::1] work, bint training,
                  unsigned long long seed, int n_threads):
    """Every layer's output for X into `work` (laid out for X's rows), kept for backward:
    the training pass (training=True: dropout masks from `seed`, batch statistics, running
    statistics updated) or the evaluation one."""
    cdef Plan P = make_plan(table, hyper, row_width, n_bstats)
    cdef cprop_team_barrier barrier
    cdef Py_ssize_t n = X.shape[0]
    cdef int t, nt = threads_for(_pass_flops(&P, n), n, n_threads)
    cdef floating* buf = &buffers[0] if buffers.shape[0] else NULL
    cdef unsigned long long fp
    _check_arrays(&P, "forward_train", params.shape[0], -1, buffers.shape[0], work.shape[0],
                  n * row_width + n_bstats, X.shape[1])
    with nogil:
        if not training:
            eval_stats(&P, buf, &work[0], n)
        if nt == 1:
            fp = cprop_fp_enter()
            forward_pass(&P, &params[0], buf, &work[0], n, &X[0, 0], NULL, n, 0, 1, training, seed, 0)
            cprop_fp_leave(fp)
        else:
            cprop_barrier_init(&barrier)
            with parallel(num_threads=nt):
                fp = cprop_fp_enter()
                t = cprop_barrier_join(&barrier)    # nt may be more than OpenMP gave
                forward_pass(&P, &params[0], buf, &work[0], n, &X[0, 0], NULL, n, t, omp_get_num_threads(),
                             training, seed, 0)
                cprop_barrier_leave()
                cprop_fp_leave(fp)


def backward(const long long[:, ::1] table, const double[:, ::1] hyper, Py_ssize_t row_width,
             Py_ssize_t n_bstats, const floating[:, ::1] X, const floating[:, ::1] grad_out,
             floating[::1] params, floating[::1] grads, floating[::1] work, bint training,
             unsigned long long seed, int n_threads):
    """From ∂L/∂output of the forward_train call that filled `work`: every δ, then every
    parameter gradient into grads (the network's flat layout)."""
    cdef Plan P = make_plan(table, hyper, row_width, n_bstats)
    cdef cprop_team_barrier barrier
    cdef Py_ssize_t n = X.shape[0], m = grad_out.shape[1]
    cdef floating* G_last = &work[0] + n * _row(&P, P.n_layers - 1)[_plan.G_COL]
    cdef int t, nt = threads_for(2 * _pass_flops(&P, n), n, n_threads)
    cdef unsigned long long fp, fp_caller
    _check_arrays(&P, "backward", params.shape[0], grads.shape[0], -1, work.shape[0],
                  n * row_width + n_bstats, X.shape[1], m)
    if grad_out.shape[0] != n:
        raise ValueError(f"backward: grad_out has {grad_out.shape[0]} rows, X {n}")
    with nogil:
        memcpy(G_last, &grad_out[0, 0], n * m * sizeof(floating))
        fp_caller = cprop_fp_enter()
        _output_delta(&P, &work[0], n, 0, n)
        if nt == 1:
            backward_pass(&P, &params[0], &work[0], n, n, 0, 1, training, seed, 0)
            param_pass(&P, <Optim*> NULL, &params[0], &grads[0], <floating*> NULL, <floating*> NULL,
                       &work[0], n, &X[0, 0], NULL, n, n, 0, 1)
            cprop_fp_leave(fp_caller)
        else:
            # the caller's own mode before the team starts: threads OpenMP creates for it
            # inherit the creating thread's mode, and would keep flushing for good
            cprop_fp_leave(fp_caller)
            cprop_barrier_init(&barrier)
            with parallel(num_threads=nt):
                fp = cprop_fp_enter()
                t = cprop_barrier_join(&barrier)    # nt may be more than OpenMP gave
                backward_pass(&P, &params[0], &work[0], n, n, t, omp_get_num_threads(), training, seed, 0)
                param_pass(&P, <Optim*> NULL, &params[0], &grads[0], <floating*> NULL, <floating*> NULL,
                           &work[0], n, &X[0, 0], NULL, n, n, t, omp_get_num_threads())
                cprop_barrier_leave()
                cprop_fp_leave(fp)


# -- inference ---------------------------------------------------------------------------

def forward(const long long[:, ::1] table, const double[:, ::1] hyper, Py_ssize_t row_width,
            Py_ssize_t n_bstats, const floating[:, ::1] X, const floating[::1] params,
            const floating[::1] buffers, floating[::1] work, floating[:, ::1] out,
            Py_ssize_t chunk_rows, int n_threads, const floating[::1] csr_data=None,
            const Py_ssize_t[::1] csr_indices=None, const Py_ssize_t[::1] csr_indptr=None):
    """out = the network's raw output for X in evaluation mode: one call, no GIL, nothing kept.
    Returns whether every value of a dense X was finite (each thread checks its chunks as it
    reads them, sparing the caller a single-threaded pass over X; out is garbage when not).

    Each thread takes a contiguous share of the rows and carries it through every layer,
    chunk_rows rows at a time, in its own slice of `work` (n_threads slices, each laid out
    for chunk_rows rows, after one area of evaluation statistics): no thread waits for
    another, and each chunk's intermediate outputs stay in its core's cache.

    With csr_data/csr_indices/csr_indptr, X is that CSR matrix (validated), X a (n, 0)
    placeholder, and the first layer must be Dense: it reads the rows in place.
    """
    cdef Plan P = make_plan(table, hyper, row_width, n_bstats)
    cdef CSRBatch csr_store
    cdef const CSRBatch* X_csr = _csr(&csr_store, csr_data, csr_indices, csr_indptr)
    cdef const floating* X_ptr = &X[0, 0] if X.shape[1] else NULL
    cdef Py_ssize_t n = X.shape[0], per_thread = chunk_rows * row_width + n_bstats
    cdef int t, nt = threads_for(_pass_flops(&P, n), n, n_threads)
    cdef floating* buf = <floating*> &buffers[0] if buffers.shape[0] else NULL
    cdef bint* finite
    cdef bint all_ok = True
    _check_arrays(&P, "forward", params.shape[0], -1, buffers.shape[0], work.shape[0], nt * per_thread,
                  X.shape[1] if X_csr == NULL else -1, out.shape[1])
    if out.shape[0] != n or chunk_rows < 1:
        raise ValueError(f"forward: out has {out.shape[0]} rows for X's {n}, chunks of {chunk_rows} rows")
    if X_csr != NULL and _row(&P, 0)[_plan.KIND] != DENSE:
        raise ValueError("forward: a CSR X needs a Dense first layer (others read dense rows)")
    finite = <bint*> calloc(nt, sizeof(bint))    # one flag per thread, no shared writes
    if finite == NULL:
        raise MemoryError("cprop could not allocate the per-thread flags")
    with nogil:
        if nt == 1:
            finite[0] = _infer_rows(&P, <floating*> &params[0], buf, &work[0], chunk_rows, X_ptr, X_csr,
                                    &out[0, 0], 0, n)
        else:
            for t in prange(nt, num_threads=nt, schedule='static'):
                finite[t] = _infer_rows(&P, <floating*> &params[0], buf, &work[0] + t * per_thread,
                                        chunk_rows, X_ptr, X_csr, &out[0, 0], n * t // nt, n * (t + 1) // nt)
        for t in range(nt):
            all_ok = all_ok and finite[t]
    free(finite)
    return all_ok


cdef bint _infer_rows(const Plan* P, floating* params, floating* buffers, floating* work,
                      Py_ssize_t chunk_rows, const floating* X, const CSRBatch* X_csr, floating* out,
                      Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """out[r0:r1] for X[r0:r1] (or X_csr's rows r0:r1), chunk_rows rows at a time, on this
    thread alone. Returns whether the dense rows were all finite (a CSR X is validated)."""
    cdef bint finite = True
    cdef int product_finite
    cdef CSRBatch chunk
    cdef Py_ssize_t start = r0, rows, d = _row(P, 0)[_plan.N_IN]
    cdef const long long* last = _row(P, P.n_layers - 1)
    cdef Py_ssize_t m = last[_plan.N_OUT]
    cdef bint narrow = _row(P, 0)[_plan.N_OUT] < d
    cdef unsigned long long fp = cprop_fp_enter()
    eval_stats(P, buffers, work, chunk_rows)
    while start < r1:
        rows = chunk_rows if start + chunk_rows <= r1 else r1 - start
        # the workspace is laid out for chunk_rows rows; a shorter last chunk uses its top
        if X_csr != NULL:
            chunk = X_csr[0]
            chunk.first = start
            forward_pass(P, params, buffers, work, chunk_rows, NULL, &chunk, rows, 0, 1, False, 0, 0)
        else:
            # NaN/inf in X: found in the first layer's product X·W when that is the smaller
            # (see dense_forward_block), else in X just before the product reads it
            product_finite = -1     # stays -1 when the first layer is not Dense
            if not narrow:
                finite = all_finite(X + start * d, rows * d) and finite
            forward_pass(P, params, buffers, work, chunk_rows, X + start * d, NULL, rows, 0, 1, False,
                         0, 0, &product_finite if narrow else NULL)
            if narrow and product_finite != 1:
                # NaN or ±inf in X, or finite values whose product overflowed: X tells
                finite = all_finite(X + start * d, rows * d) and finite
        memcpy(out + start * m, work + chunk_rows * last[_plan.Y_COL], rows * m * sizeof(floating))
        start += rows
    cprop_fp_leave(fp)
    return finite


# -- the optimizer, from Python ------------------------------------------------------------

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
    opt.sklearn_style = config.get("sklearn_style", False)
    opt.decay_bias = config.get("decay_bias", True)
    opt.decay_per_sample = config.get("decay_per_sample", False)
    opt.step = config.get("step", 0)
    opt.clip_norm = config.get("clip_norm", 0.0)
    return opt


cdef Py_ssize_t _step_slice(const long long* table, Py_ssize_t n_layers, const Optim* opt,
                            floating* params, floating* grads, floating* state_a,
                            floating* state_b, double batch_weight, int t, int nt,
                            double g_factor=1) noexcept nogil:
    """Thread t of nt's slice of one optimizer step: the same share of every layer's weights
    (W, γ: decayed) and of its biases (b, β: decayed when decay_bias). Each value's update
    reads only its own gradient and state, so any split gives the same bits. g_factor ≠ 1
    (clipping) scales the slice's gradient in place first. Returns the count of updates
    refused as non-finite."""
    cdef Py_ssize_t rejected = 0, layer, off, n_w, n_b
    cdef const long long* T
    for layer in range(n_layers):
        T = table + layer * _plan.N_PLAN_INT
        if T[_plan.N_PARAM] == 0:
            continue
        off = T[_plan.PARAM]
        n_w = T[_plan.N_IN] * T[_plan.N_OUT] if T[_plan.KIND] == DENSE else T[_plan.N_OUT]
        n_b = T[_plan.N_PARAM] - n_w
        if g_factor != 1:
            scale_range(grads, off + n_w * t // nt, off + n_w * (t + 1) // nt, g_factor)
            scale_range(grads, off + n_w + n_b * t // nt, off + n_w + n_b * (t + 1) // nt, g_factor)
        rejected += optim_range(opt, params, grads, state_a, state_b, off + n_w * t // nt,
                                off + n_w * (t + 1) // nt, True, batch_weight)
        rejected += optim_range(opt, params, grads, state_a, state_b, off + n_w + n_b * t // nt,
                                off + n_w + n_b * (t + 1) // nt, opt.decay_bias, batch_weight)
    return rejected


def optimizer_step(dict config, const long long[:, ::1] table, floating[::1] params,
                   floating[::1] grads, floating[::1] state_a, floating[::1] state_b,
                   Py_ssize_t batch_rows, int n_threads):
    """One optimizer step over the flat parameters: each layer's weights (W, γ) decayed, its
    biases (b, β) when decay_bias; with config["clip_norm"] > 0 the gradient is clipped (in
    place) first. Returns (rejected values, Adam's new step count)."""
    cdef Optim opt = make_optim(config)
    cdef Py_ssize_t rejected = 0, n_blocks = clip_blocks(grads.shape[0])
    cdef int t, nt = n_threads
    cdef unsigned long long fp
    cdef double factor = 1
    cdef double* sums = NULL
    cdef Plan P     # the layout alone: _step_slice reads nothing else
    _check_layout(&P, table, 0, 0, False)
    _check_arrays(&P, "optimizer_step", params.shape[0], grads.shape[0], -1, 0, 0)
    _check_state(&opt, "optimizer_step", params.shape[0], state_a.shape[0], state_b.shape[0])
    if opt.clip_norm > 0:
        sums = <double*> calloc(max(n_blocks, 1), sizeof(double))
        if sums == NULL:
            raise MemoryError("cprop could not allocate the clipping norm's partial sums")
        with nogil:
            grad_sq_blocks(&grads[0], grads.shape[0], sums, 0, n_blocks)
            factor = clip_factor(sums, n_blocks, opt.clip_norm)
        free(sums)
    if params.shape[0] // MIN_PARAMS_PER_THREAD < nt:   # small steps are faster on one thread
        nt = <int> (params.shape[0] // MIN_PARAMS_PER_THREAD)
    if opt.kind == ADAM:
        opt.step += 1
    with nogil:
        if nt <= 1:
            fp = cprop_fp_enter()
            rejected = _step_slice(&table[0, 0], table.shape[0], &opt, &params[0], &grads[0],
                                   &state_a[0], &state_b[0], batch_rows, 0, 1, factor)
            cprop_fp_leave(fp)
        else:
            for t in prange(nt, num_threads=nt, schedule='static'):
                fp = cprop_fp_enter()
                rejected += _step_slice(&table[0, 0], table.shape[0], &opt, &params[0], &grads[0],
                                        &state_a[0], &state_b[0], batch_rows, t, nt, factor)
                cprop_fp_leave(fp)
    return rejected, opt.step


# -- the training epoch --------------------------------------------------------------------

cdef struct Fit:
    # a fit's settings, as one struct (cprop/trainer.py fills it from its snapshot)
    int loss_kind
    double loss_scale
    Py_ssize_t batch_size
    bint gather                 # shuffled: gather each minibatch's rows
    unsigned long long seed     # dropout masks: the trainer's seed mixed with the epoch
    int n_threads
    Py_ssize_t n_params         # the flat gradient's length (clipping's norm)


cdef inline bint _run_handlers(PyObject* guard, unsigned long long fp) noexcept nogil:
    """Take the GIL and run Python's signal handlers, then `guard` (or NULL): a callable
    that raises when a handler replaced the memory of the data the epoch reads. Called
    while no thread of the team reads that data.

    True means one of them raised (KeyboardInterrupt, the guard's RuntimeError): the
    exception stays set for the caller to propagate once it holds the GIL again.
    """
    cdef bint raised
    cdef PyObject* result
    cprop_fp_leave(fp)      # Python's handlers (and threads they start) run in the caller's mode
    with gil:
        raised = PyErr_CheckSignals() != 0
        if not raised and guard != NULL:
            result = PyObject_CallNoArgs(guard)
            raised = result == NULL
            Py_XDECREF(result)
    cprop_fp_enter()
    return raised


cdef inline bint _signal_check_due(timespec* last) noexcept nogil:
    """Whether SIGNAL_CHECK_SECONDS have passed since `last` (then `last` becomes now)."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    if (now.tv_sec - last.tv_sec) + 1e-9 * (now.tv_nsec - last.tv_nsec) < SIGNAL_CHECK_SECONDS:
        return False
    last[0] = now
    return True


cdef struct Shared:
    # what the epoch's threads share (anything assigned inside a parallel block is private)
    double* part_loss
    Py_ssize_t* part_rejected
    int* statuses
    int interrupted
    bint check_due              # thread 0 found a look at Python's signal handlers due
    PyObject* guard             # the data guard run after them (_run_handlers), or NULL
    double loss_sum
    Py_ssize_t n_seen
    double* clip_sums           # clipping: the gradient's Σg² by blocks (NULL without)


cdef bint _share(Shared* sh, int nt, const Optim* opt, Py_ssize_t n_params) noexcept nogil:
    """Zero totals and per-thread arrays for a team of nt (and the block sums of the
    clipping norm when opt clips a gradient of n_params); whether they could be allocated
    (free them with _unshare either way)."""
    sh.interrupted = 0
    sh.check_due = False
    sh.guard = NULL
    sh.loss_sum = 0
    sh.n_seen = 0
    sh.statuses = <int*> calloc(nt, sizeof(int))
    sh.part_loss = <double*> calloc(nt, sizeof(double))
    sh.part_rejected = <Py_ssize_t*> calloc(nt, sizeof(Py_ssize_t))
    sh.clip_sums = NULL
    if opt.clip_norm > 0:
        sh.clip_sums = <double*> calloc(clip_blocks(n_params) + 1, sizeof(double))
        if sh.clip_sums == NULL:
            return False
    return sh.statuses != NULL and sh.part_loss != NULL and sh.part_rejected != NULL


cdef void _unshare(Shared* sh) noexcept nogil:
    free(sh.statuses)
    free(sh.part_loss)
    free(sh.part_rejected)
    free(sh.clip_sums)


cdef double _team_clip_factor(const Optim* opt, const floating* grads, Py_ssize_t n_params,
                              Shared* sh, int t, int nt) noexcept nogil:
    """Thread t of nt's blocks of the clipping norm, a barrier, then the factor, which every
    thread computes alike from all blocks (see _optim.pxd). The gradient must be complete
    (a barrier before). 1 without clipping."""
    cdef Py_ssize_t n_blocks = clip_blocks(n_params)
    if opt.clip_norm <= 0:
        return 1
    grad_sq_blocks(grads, n_params, sh.clip_sums, n_blocks * t // nt, n_blocks * (t + 1) // nt)
    _sync(nt)
    return clip_factor(sh.clip_sums, n_blocks, opt.clip_norm)


cdef int _epoch_worker(const Plan* P, const Fit* fit, const floating[:, ::1] X,
                       const CSRBatch* X_csr, const floating[:, ::1] T, const Py_ssize_t[::1] labels,
                       const Py_ssize_t[::1] order, floating* params, floating* grads,
                       floating* state_a, floating* state_b, floating* buffers, floating* work,
                       Py_ssize_t* label_buf, const floating* weights, floating* weight_buf,
                       Optim* shared_opt, Shared* sh, int t, int nt) noexcept nogil:
    """Thread t of nt's share of one epoch; every thread runs this same loop.

    Per minibatch: thread t gathers its rows, carries them forward through every
    layer (forward_pass), takes their loss, carries their δ back (backward_pass,
    which ends synced), then computes its slice of every parameter gradient over
    the whole batch and steps it (param_pass); a barrier; the next batch. Every
    decision (non-finite loss or step, Ctrl-C) is taken by all threads alike from
    the shared per-thread partials, so they leave the loop together.

    With sample weights (`weights` not NULL) the batch's loss is the weighted mean
    Σ w·l / Σ w, decay per sample divides by Σ w, and a batch whose weights are all
    0 is skipped as if its rows were not there.

    With X_csr (X then only gives the row count), the minibatch is the CSR rows it names:
    read in place by a Dense first layer, else gathered densely into the workspace.
    """
    cdef Py_ssize_t n = X.shape[0], bsz = fit.batch_size, rows = fit.batch_size
    cdef const long long* last = _row(P, P.n_layers - 1)
    cdef Py_ssize_t d = _row(P, 0)[_plan.N_IN], m = last[_plan.N_OUT]
    cdef Py_ssize_t i, k, start, bs, r0, r1, rejected
    cdef Optim opt = shared_opt[0]   # a private copy: Adam's step count advances in each alike
    cdef bint sparse_first = _sparse_first(P, X_csr)
    cdef floating* Xb = work + rows * P.row_width + P.n_bstats
    cdef floating* Tb = Xb + (0 if sparse_first else rows * d)   # as workspace_size lays it out
    cdef const floating* X_in = NULL
    cdef CSRBatch batch
    cdef const CSRBatch* X_sparse = NULL
    cdef const floating* T_in = NULL
    cdef const Py_ssize_t* labels_in = NULL
    cdef const floating* w_in = NULL
    cdef double batch_loss, batch_weight
    cdef timespec last_check
    cdef int status = STATUS_OK
    cdef unsigned long long fp = cprop_fp_enter()

    clock_gettime(CLOCK_MONOTONIC, &last_check)
    start = 0
    while start < n:
        bs = bsz if start + bsz <= n else n - start
        r0 = bs * t // nt
        r1 = bs * (t + 1) // nt
        batch_weight = bs
        if weights != NULL:
            # the batch's summed weight, by every thread alike (bs additions, no barrier)
            batch_weight = 0
            for i in range(bs):
                batch_weight += weights[order[start + i]] if fit.gather else weights[start + i]
            if batch_weight == 0:
                start += bs
                continue
            if fit.gather:
                for i in range(r0, r1):
                    weight_buf[i] = weights[order[start + i]]
                w_in = weight_buf
            else:
                w_in = weights + start

        # this thread's rows of the minibatch: rows order[start+r0 : start+r1] of X
        # gathered into Xb (or, unshuffled, X's own rows in place)
        if X_csr != NULL:
            batch = X_csr[0]
            batch.rows = &order[start] if fit.gather else NULL
            batch.first = start
            if sparse_first:
                X_sparse = &batch
            else:
                csr_gather_dense(&batch, Xb, r0, r1, d)
                X_in = Xb
        elif fit.gather:
            gather_rows(&X[0, 0], &order[start], Xb, r0, r1, d)
            X_in = Xb
        else:
            X_in = &X[start, 0]
        if fit.loss_kind == CROSS_ENTROPY:  # integer labels
            if fit.gather:
                for i in range(r0, r1):
                    label_buf[i] = labels[order[start + i]]
                labels_in = label_buf
            else:
                labels_in = &labels[start]
        elif fit.gather:
            gather_rows(&T[0, 0], &order[start], Tb, r0, r1, m)
            T_in = Tb
        else:
            T_in = &T[start, 0]

        forward_pass(P, params, buffers, work, rows, X_in, X_sparse, bs, t, nt, True, fit.seed, start)

        # this thread's part of the batch's mean loss, and its rows of δ_last
        sh.part_loss[t] = _loss_and_delta(P, fit, work, rows, T_in, labels_in, w_in, batch_weight,
                                          r0, r1)

        backward_pass(P, params, work, rows, bs, t, nt, True, fit.seed, start)

        batch_loss = 0
        for k in range(nt):
            batch_loss += sh.part_loss[k]
        if not isfinite(batch_loss):
            status = STATUS_NONFINITE_LOSS   # before this step changed anything
            break

        if opt.kind == ADAM:
            opt.step += 1
        if opt.clip_norm > 0:
            # clipping needs the whole gradient's norm before any step: gradients, a barrier,
            # the norm, then each thread's slice of the step
            param_pass(P, <Optim*> NULL, params, grads, <floating*> NULL, <floating*> NULL, work, rows,
                       X_in, X_sparse, bs, batch_weight, t, nt)
            _sync(nt)
            sh.part_rejected[t] = _step_slice(P.t, P.n_layers, &opt, params, grads, state_a, state_b,
                                              batch_weight, t, nt,
                                              _team_clip_factor(&opt, grads, fit.n_params, sh, t, nt))
        else:
            sh.part_rejected[t] = param_pass(P, &opt, params, grads, state_a, state_b, work, rows,
                                             X_in, X_sparse, bs, batch_weight, t, nt)
        if t == 0:
            sh.check_due = _signal_check_due(&last_check)
        _sync(nt)
        if sh.check_due:
            # the handlers run once every thread is done with this batch: one may free the
            # data (ndarray.__setstate__), which the guard then reports before it is read again
            if t == 0:
                sh.interrupted = _run_handlers(sh.guard, fp)
            _sync(nt)

        rejected = 0
        for k in range(nt):
            rejected += sh.part_rejected[k]
        if rejected:
            status = STATUS_NONFINITE_STEP
            break
        if t == 0:
            sh.loss_sum += batch_loss * bs
            sh.n_seen += bs
        if sh.interrupted:
            status = STATUS_INTERRUPTED
            break
        start += bs
    if t == 0:
        shared_opt.step = opt.step
    cprop_fp_leave(fp)
    return status


cdef inline bint _sparse_first(const Plan* P, const CSRBatch* X_csr) noexcept nogil:
    """Whether the first layer reads a CSR input in place (it is Dense), so no dense
    minibatch is gathered."""
    return X_csr != NULL and _row(P, 0)[_plan.KIND] == DENSE


def workspace_size(Py_ssize_t row_width, Py_ssize_t n_bstats, Py_ssize_t n_in, Py_ssize_t n_out,
                   Py_ssize_t batch_size, bint sparse=False, int first_kind=DENSE):
    """Length of the flat workspace train_epoch needs for minibatches of batch_size rows:
    the per-row buffers and batch statistics of the plan, then the gathered X and targets
    (no gathered X for a sparse X read in place by a Dense first layer)."""
    if sparse and first_kind == DENSE:
        n_in = 0
    return batch_size * (row_width + n_in + n_out) + n_bstats


cdef const CSRBatch* _csr(CSRBatch* out, const floating[::1] data, const Py_ssize_t[::1] indices,
                          const Py_ssize_t[::1] indptr):
    """`out` describing the validated CSR matrix (data, indices, indptr), its rows in order;
    NULL when there is none (data None)."""
    if data is None:
        return NULL
    out.data = &data[0] if data.shape[0] else NULL
    out.indices = &indices[0] if indices.shape[0] else NULL
    out.indptr = &indptr[0]
    out.rows = NULL
    out.first = 0
    return out


cdef int _raise_pending() except -1:
    """Propagate the exception a signal handler left set inside the nogil epoch."""
    return -1


def train_epoch(const long long[:, ::1] table, const double[:, ::1] hyper, Py_ssize_t row_width,
                Py_ssize_t n_bstats, dict settings, dict optimizer,
                const floating[:, ::1] X, const floating[:, ::1] T, const Py_ssize_t[::1] labels,
                const Py_ssize_t[::1] order, floating[::1] params, floating[::1] grads,
                floating[::1] state_a, floating[::1] state_b, floating[::1] buffers,
                floating[::1] work, Py_ssize_t[::1] label_buf, const floating[::1] weights=None,
                floating[::1] weight_buf=None, const floating[::1] csr_data=None,
                const Py_ssize_t[::1] csr_indices=None, const Py_ssize_t[::1] csr_indptr=None,
                object guard=None):
    """One epoch of minibatch training, entirely without the GIL.

    settings: loss, loss_scale, batch_size, gather, seed, n_threads (the fit's, as one
    struct in C). weights: one non-negative weight per sample (or None), with weight_buf
    of batch_size values for a shuffled batch's. Returns (status, summed loss over completed steps, samples in completed
    steps, Adam's step count). On a non-finite loss the epoch stops before that step
    changes anything; on a non-finite update it stops after it, the parameters whose new
    value would not be finite keeping their old one; on Ctrl-C it stops after the step in
    progress and the KeyboardInterrupt propagates.

    csr_data, csr_indices, csr_indptr: a CSR X (validated: indices in [0, n_in), indptr
    from 0 to nnz, non-decreasing), X then being a (n_samples, 0) placeholder; `work`
    is then sized by workspace_size(..., sparse=True, first_kind=...).

    guard: a callable run after Python's signal handlers (which run between batches),
    while no thread reads the data; it raises if they replaced the data's memory.
    """
    cdef Plan P = make_plan(table, hyper, row_width, n_bstats)
    cdef CSRBatch csr_store
    cdef const CSRBatch* X_csr = _csr(&csr_store, csr_data, csr_indices, csr_indptr)
    cdef cprop_team_barrier barrier
    cdef Optim opt = make_optim(optimizer)
    cdef Fit fit
    cdef Shared sh
    cdef int t, nt, status = STATUS_OK
    cdef floating* buf = &buffers[0] if buffers.shape[0] else NULL
    cdef const floating* w = NULL if weights is None else &weights[0]
    cdef floating* w_buf = NULL if weight_buf is None else &weight_buf[0]
    cdef PyObject* guard_ptr = NULL if guard is None else <PyObject*> guard
    fit.loss_kind = settings["loss"]
    fit.loss_scale = settings["loss_scale"]
    fit.batch_size = settings["batch_size"]
    fit.gather = settings["gather"]
    fit.seed = settings["seed"]
    fit.n_threads = settings["n_threads"]
    fit.n_params = params.shape[0]
    _check_arrays(&P, "train_epoch", params.shape[0], grads.shape[0], buffers.shape[0], work.shape[0],
                  workspace_size(row_width, n_bstats, _row(&P, 0)[_plan.N_IN],
                                 _row(&P, P.n_layers - 1)[_plan.N_OUT], fit.batch_size,
                                 X_csr != NULL, <int> _row(&P, 0)[_plan.KIND]),
                  X.shape[1] if X_csr == NULL else -1, T.shape[1] if T.shape[0] else -1)
    _check_state(&opt, "train_epoch", params.shape[0], state_a.shape[0], state_b.shape[0])
    if fit.batch_size < 1 or label_buf.shape[0] < (fit.batch_size if labels.shape[0] else 0) or (
            weights is not None and (weight_buf is None or weight_buf.shape[0] < fit.batch_size
                                     or weights.shape[0] != X.shape[0])) or (
            order.shape[0] != X.shape[0]) or (T.shape[0] and T.shape[0] != X.shape[0]) or (
            labels.shape[0] and labels.shape[0] != X.shape[0]):
        raise ValueError("train_epoch: the batch size, order, targets, weights or their buffers "
                         "do not fit X's rows")
    if guard is not None:
        guard()             # the data's memory is still where it was checked (raises if not)
    with nogil:
        nt = threads_for(3 * _pass_flops(&P, fit.batch_size), fit.batch_size, fit.n_threads)
        if _share(&sh, nt, &opt, fit.n_params):
            sh.guard = guard_ptr
            if nt == 1:
                sh.statuses[0] = _epoch_worker(&P, &fit, X, X_csr, T, labels, order, &params[0], &grads[0],
                                               &state_a[0], &state_b[0], buf, &work[0], &label_buf[0],
                                               w, w_buf, &opt, &sh, 0, 1)
            else:
                cprop_barrier_init(&barrier)
                with parallel(num_threads=nt):
                    t = cprop_barrier_join(&barrier)    # nt may be more than OpenMP gave
                    sh.statuses[t] = _epoch_worker(&P, &fit, X, X_csr, T, labels, order, &params[0],
                                                   &grads[0], &state_a[0], &state_b[0], buf, &work[0],
                                                   &label_buf[0], w, w_buf, &opt, &sh, t,
                                                   omp_get_num_threads())
                    cprop_barrier_leave()
            status = sh.statuses[0]
        else:
            status = STATUS_NO_MEMORY
        _unshare(&sh)
    if status == STATUS_NO_MEMORY:
        raise MemoryError("cprop could not allocate the training loop's per-thread buffers")
    if status == STATUS_INTERRUPTED:
        optimizer["step"] = opt.step
        _raise_pending()
    return status, sh.loss_sum, sh.n_seen, opt.step


# -- one batch's gradient (L-BFGS's full batch, a rank's share of a global batch) -------------

cdef void _gradient_worker(const Plan* P, const Fit* fit, const floating* X_in, const CSRBatch* X_csr,
                           const floating* T_in,
                           const Py_ssize_t* labels_in, const floating* w_in, double batch_weight,
                           floating* params, floating* grads, floating* buffers, floating* work,
                           Py_ssize_t bs, long long row_base, double* part_loss, int t, int nt) noexcept nogil:
    """Thread t's share of one batch's training pass: forward, loss, backward, gradients.
    w_in: the rows' weights, summing to batch_weight (NULL: none, batch_weight = bs)."""
    cdef unsigned long long fp = cprop_fp_enter()
    forward_pass(P, params, buffers, work, bs, X_in, X_csr, bs, t, nt, True, fit.seed, row_base)
    part_loss[t] = _loss_and_delta(P, fit, work, bs, T_in, labels_in, w_in, batch_weight,
                                   bs * t // nt, bs * (t + 1) // nt)
    backward_pass(P, params, work, bs, bs, t, nt, True, fit.seed, row_base)
    param_pass(P, <Optim*> NULL, params, grads, <floating*> NULL, <floating*> NULL, work, bs, X_in, X_csr,
               bs, bs, t, nt)
    cprop_fp_leave(fp)


def batch_gradient(const long long[:, ::1] table, const double[:, ::1] hyper, Py_ssize_t row_width,
                   Py_ssize_t n_bstats, dict settings, const floating[:, ::1] X,
                   const floating[:, ::1] T, const Py_ssize_t[::1] labels, floating[::1] params,
                   floating[::1] grads, floating[::1] buffers, floating[::1] work, long long row_base=0,
                   const floating[::1] weights=None, const floating[::1] csr_data=None,
                   const Py_ssize_t[::1] csr_indices=None, const Py_ssize_t[::1] csr_indptr=None,
                   object guard=None):
    """The training pass over the batch (X, T or labels) in one call without the GIL:
    grads = ∂(loss_scale × mean loss)/∂params, the loss returned; with per-row weights
    (summing to more than 0) the mean is the weighted one, Σ w·l / Σ w. Dropout masks are those of
    rows row_base, row_base + 1, … of an epoch keyed by settings["seed"] (as train_epoch's),
    and BatchNorm's running statistics move as in a training step. `work` holds
    len(X) × row_width + n_bstats values. With csr_data/csr_indices/csr_indptr, X is a
    CSR matrix (validated) of X.shape[0] rows, X a (n, 0) placeholder: the first layer must
    be Dense. guard: a callable that raises if the data's memory moved since it was checked,
    called last before the GIL is released."""
    cdef Plan P = make_plan(table, hyper, row_width, n_bstats)
    cdef CSRBatch csr_store
    cdef const CSRBatch* X_csr = _csr(&csr_store, csr_data, csr_indices, csr_indptr)
    cdef const floating* X_ptr = &X[0, 0] if X.shape[1] else NULL
    cdef cprop_team_barrier barrier
    cdef Fit fit
    cdef Py_ssize_t n = X.shape[0], k
    cdef int t, nt
    cdef double* part_loss
    cdef double total = 0
    cdef floating* buf = &buffers[0] if buffers.shape[0] else NULL
    cdef const floating* T_ptr = &T[0, 0] if T.shape[0] else NULL
    cdef const Py_ssize_t* labels_ptr = &labels[0] if labels.shape[0] else NULL
    cdef const floating* w = NULL if weights is None else &weights[0]
    cdef double batch_weight = n
    fit.loss_kind = settings["loss"]
    fit.loss_scale = settings["loss_scale"]
    fit.seed = settings["seed"]
    fit.n_threads = settings["n_threads"]
    _check_arrays(&P, "batch_gradient", params.shape[0], grads.shape[0], buffers.shape[0], work.shape[0],
                  n * row_width + n_bstats, X.shape[1] if X_csr == NULL else -1,
                  T.shape[1] if T.shape[0] else -1)
    if (T.shape[0] and T.shape[0] != n) or (labels.shape[0] and labels.shape[0] != n) or (
            w != NULL and weights.shape[0] != n):
        raise ValueError("batch_gradient: the targets and weights must have X's rows")
    if X_csr != NULL and _row(&P, 0)[_plan.KIND] != DENSE:
        raise ValueError("batch_gradient: a CSR X needs a Dense first layer (others read dense rows)")
    nt = threads_for(3 * _pass_flops(&P, n), n, fit.n_threads)
    if guard is not None:
        guard()             # the data's memory is still where it was checked (raises if not)
    part_loss = <double*> calloc(nt, sizeof(double))
    if part_loss == NULL:
        raise MemoryError("cprop could not allocate the per-thread losses")
    with nogil:
        if w != NULL:
            batch_weight = 0
            for k in range(n):
                batch_weight += w[k]
        if nt == 1:
            _gradient_worker(&P, &fit, X_ptr, X_csr, T_ptr, labels_ptr, w, batch_weight, &params[0],
                             &grads[0], buf, &work[0], n, row_base, part_loss, 0, 1)
        else:
            cprop_barrier_init(&barrier)
            with parallel(num_threads=nt):
                t = cprop_barrier_join(&barrier)    # nt may be more than OpenMP gave
                _gradient_worker(&P, &fit, X_ptr, X_csr, T_ptr, labels_ptr, w, batch_weight, &params[0],
                                 &grads[0], buf, &work[0], n, row_base, part_loss, t, omp_get_num_threads())
                cprop_barrier_leave()
        for k in range(nt):
            total += part_loss[k]
    free(part_loss)
    return total


# -- a distributed epoch: every global batch's allreduce inside the compiled loop -------------

def _bind_mpi(str module):
    """Bind MPI_Allreduce from the MPI library mpi4py loaded (`module`: its MPI extension's
    file, already loaded; nothing is loaded anew); whether it was found. See _mpi.pxd."""
    import os
    return bool(cprop_bind_mpi(os.fsencode(module)))


cdef int _mpi_sum(MpiSum* s, tuple handles) except -1:
    """`s` from (comm, datatype, op, in_place): mpi4py's handles as integers."""
    if cprop_mpi_allreduce == NULL:
        raise RuntimeError("MPI_Allreduce is not bound (_bind_mpi)")
    s.comm, s.datatype, s.op, s.in_place = handles
    return 0


def mpi_allreduce(tuple handles, floating[::1] buf):
    """buf := its sum over the ranks, in place, through the bound MPI_Allreduce (a
    collective call: every rank of the communicator makes it). Returns MPI's error code."""
    cdef MpiSum s
    cdef int code
    _mpi_sum(&s, handles)
    with nogil:
        code = allreduce_sum(&s, &buf[0], <int> buf.shape[0])
    return code


# the values after the flat gradient (and running statistics) in the allreduced pack;
# cprop/distributed.py's _LOSS, _INTERRUPT, _FAILED, _REJECTED, _N_SLOTS (a test checks)
cdef enum:
    SLOT_LOSS = 0
    SLOT_INTERRUPT = 1
    SLOT_FAILED = 2
    SLOT_REJECTED = 3
    N_SLOTS = 4
    STATUS_MPI_ERROR = 5

PACK_SLOTS = (SLOT_LOSS, SLOT_INTERRUPT, SLOT_FAILED, SLOT_REJECTED, N_SLOTS)
MPI_ERROR = STATUS_MPI_ERROR


cdef struct Ranked:
    # a distributed epoch's steps and what its team shares
    const long long* steps      # per step: global rows bs, row_base, local rows [a, b)
    Py_ssize_t n_steps
    Py_ssize_t n_params, n_running
    PyObject* flag              # the fit's Ctrl-C flag (a list [bool]), read with the GIL
    PyObject* guard             # the data guard run after the signal handlers (_run_handlers)
    int pending                 # a signal handler raised: its exception is set
    int mpi_error
    Py_ssize_t last_bs


cdef inline bint _poll_interrupt(timespec* last, Ranked* r, bint now, unsigned long long fp) noexcept nogil:
    """Every SIGNAL_CHECK_SECONDS or `now`, _run_handlers (the fit's own SIGINT handler
    sets its flag rather than raising), then read the flag."""
    cdef bint stop
    if not _signal_check_due(last) and not now:
        return False
    if _run_handlers(r.guard, fp):
        r.pending = 1       # another handler, or the guard, raised: it propagates after the loop
        return True
    with gil:
        stop = bool((<object> r.flag)[0])
    return stop


cdef int _ranked_worker(const Plan* P, const Fit* fit, const MpiSum* mpi, Ranked* r,
                        const floating* X, const floating* T, const Py_ssize_t* labels,
                        const Py_ssize_t* order, Py_ssize_t d, Py_ssize_t m, floating* params,
                        floating* pack, floating* state_a, floating* state_b, floating* work,
                        floating* Xb, floating* Tb, Py_ssize_t* label_buf, Optim* shared_opt,
                        Shared* sh, int t, int nt) noexcept nogil:
    """Thread t of nt's share of a distributed epoch; every thread runs this same loop.

    Per global batch of bs rows: this rank's rows [a, b) of it (gathered through `order`
    when shuffled) through _gradient_worker, with the loss scaled by (b - a)/bs, into the
    pack's gradient; thread 0 (OpenMP's master, the thread that called: MPI allows it
    under MPI_THREAD_FUNNELED) fills the pack's slots and sums the pack over the ranks
    between two barriers; then every rank, holding the same sum, takes the same step, each
    thread its slice. Every decision is read from the summed pack, so all threads of all
    ranks leave the loop at the same step."""
    cdef Fit share = fit[0]
    cdef Optim opt = shared_opt[0]   # a private copy: Adam's step count advances in each alike
    cdef floating* grads = pack
    cdef floating* running = pack + r.n_params
    cdef floating* slots = pack + r.n_params + r.n_running
    cdef Py_ssize_t s, k, bs, a, b, rows, r0, r1, rejected
    cdef long long row_base
    cdef const floating* X_in
    cdef const floating* T_in
    cdef const Py_ssize_t* labels_in
    cdef double batch_loss
    cdef timespec last_check
    cdef int n_working, status = STATUS_OK
    cdef unsigned long long fp = cprop_fp_enter()
    clock_gettime(CLOCK_MONOTONIC, &last_check)
    for s in range(r.n_steps):
        bs = r.steps[4 * s]
        row_base = r.steps[4 * s + 1]
        a = r.steps[4 * s + 2]
        b = r.steps[4 * s + 3]
        rows = b - a
        # the threads batch_gradient would use for these rows (phase 1's, so that both phases
        # round alike): the whole team or, for a small share, thread 0 alone while the
        # others wait at the barrier below (a count in between takes the whole team)
        n_working = threads_for(3 * _pass_flops(P, rows), rows, fit.n_threads)
        n_working = nt if n_working > 1 else 1
        r0 = rows * t // n_working
        r1 = rows * (t + 1) // n_working
        sh.part_loss[t] = 0
        if rows and t < n_working:
            X_in = X + a * d
            T_in = T + a * m if T != NULL else NULL
            labels_in = labels + a if labels != NULL else NULL
            if order != NULL:
                gather_rows(X, order + a, Xb, r0, r1, d)
                X_in = Xb
                if T != NULL:
                    gather_rows(T, order + a, Tb, r0, r1, m)
                    T_in = Tb
                if labels != NULL:
                    for k in range(r0, r1):
                        label_buf[k] = labels[order[a + k]]
                    labels_in = label_buf
            # this rank's rows count as rows/bs of the global batch's mean loss
            share.loss_scale = fit.loss_scale * rows / bs
            _gradient_worker(P, &share, X_in, <CSRBatch*> NULL, T_in, labels_in, <floating*> NULL, rows,
                             params, grads, running, work, rows, row_base, sh.part_loss, t, n_working)
        elif not rows:
            # no rows of this batch here: this rank adds nothing to the sum
            for k in range(r.n_params * t // nt, r.n_params * (t + 1) // nt):
                grads[k] = 0
        _sync(nt)
        if t == 0:
            batch_loss = 0
            for k in range(nt):
                batch_loss += sh.part_loss[k]
            # the running statistics' sum over the ranks is their mean weighted by rows
            for k in range(r.n_running):
                running[k] = running[k] * rows / bs if rows else 0
            slots[SLOT_LOSS] = batch_loss
            # and at the last step: a signal since the last look stops this epoch, not the next
            slots[SLOT_INTERRUPT] = _poll_interrupt(&last_check, r, s == r.n_steps - 1, fp)
            slots[SLOT_FAILED] = 0
            slots[SLOT_REJECTED] = 0
            r.mpi_error = allreduce_sum(mpi, pack, <int> (r.n_params + r.n_running + N_SLOTS))
        _sync(nt)
        if r.mpi_error:
            status = STATUS_MPI_ERROR
            break
        batch_loss = slots[SLOT_LOSS]
        if not isfinite(batch_loss):
            status = STATUS_NONFINITE_LOSS   # before this step changed anything
            break
        if opt.kind == ADAM:
            opt.step += 1
        sh.part_rejected[t] = _step_slice(P.t, P.n_layers, &opt, params, grads, state_a, state_b,
                                          bs, t, nt, _team_clip_factor(&opt, grads, r.n_params, sh, t, nt))
        _sync(nt)
        rejected = 0
        for k in range(nt):
            rejected += sh.part_rejected[k]
        if t == 0:
            r.last_bs = bs
        if rejected:
            status = STATUS_NONFINITE_STEP
            break
        if t == 0:
            sh.loss_sum += batch_loss * bs
            sh.n_seen += bs
        if slots[SLOT_INTERRUPT]:
            status = STATUS_INTERRUPTED
            break
    if t == 0:
        shared_opt.step = opt.step
    cprop_fp_leave(fp)
    return status


def train_epoch_mpi(const long long[:, ::1] table, const double[:, ::1] hyper, Py_ssize_t row_width,
                    Py_ssize_t n_bstats, dict settings, dict optimizer, tuple handles,
                    const long long[:, ::1] steps, const floating[:, ::1] X, const floating[:, ::1] T,
                    const Py_ssize_t[::1] labels, const Py_ssize_t[::1] order, floating[::1] params,
                    floating[::1] pack, Py_ssize_t n_running, floating[::1] state_a,
                    floating[::1] state_b, floating[::1] work, floating[:, ::1] Xb,
                    floating[:, ::1] Tb, Py_ssize_t[::1] label_buf, list interrupted,
                    object guard=None):
    """One epoch of data-parallel training without the GIL, the allreduce of every global
    batch called from the compiled loop (through the MPI_Allreduce _bind_mpi bound; handles:
    mpi4py's (comm, datatype of the dtype, SUM, IN_PLACE) as integers).

    steps: one row (bs, row_base, a, b) per global batch, as _Fit._steps gives them; this
    rank's rows of it are rows a:b of X (of order[a:b], when order is not None). pack: the
    flat gradient, then n_running running statistics (this rank's, on entry: the network's),
    then the slots PACK_SLOTS names; it is summed over the ranks once per step. Xb, Tb,
    label_buf: gather buffers of the largest share (T, labels: one of them is empty). The
    semantics are those of the Python loop in _Fit.epoch (phase 1), which this replaces.

    Returns (status, summed loss over completed steps, samples in them, the last step's
    global rows, Adam's step count). Ctrl-C: the fit's handler sets interrupted[0]; the loop
    polls it and carries it in the pack, so every rank stops after the same step; when
    another handler raised instead, its exception propagates after the loop (all ranks
    stopped), optimizer["step"] updated first.
    """
    cdef Plan P = make_plan(table, hyper, row_width, n_bstats)
    cdef MpiSum mpi
    cdef Ranked r
    cdef cprop_team_barrier barrier
    cdef Optim opt = make_optim(optimizer)
    cdef Fit fit
    cdef Shared sh
    cdef Py_ssize_t s, most = 0, n = X.shape[0], d = X.shape[1], n_params = params.shape[0]
    cdef Py_ssize_t m = T.shape[1] if T.shape[0] else 0
    cdef int t, nt, status = STATUS_OK
    cdef const floating* X_ptr = &X[0, 0] if n and d else NULL
    cdef const floating* T_ptr = &T[0, 0] if T.shape[0] else NULL
    cdef const Py_ssize_t* labels_ptr = &labels[0] if labels.shape[0] else NULL
    cdef const Py_ssize_t* order_ptr = NULL if order is None else &order[0]
    cdef floating* Xb_ptr = &Xb[0, 0] if Xb.shape[0] else NULL
    cdef floating* Tb_ptr = &Tb[0, 0] if Tb.shape[0] and T_ptr != NULL else NULL
    cdef Py_ssize_t* label_buf_ptr = &label_buf[0] if label_buf.shape[0] else NULL
    _mpi_sum(&mpi, handles)
    _check_arrays(&P, "train_epoch_mpi", n_params, -1, -1, 0, 0, d if n else -1, m if m else -1)
    _check_state(&opt, "train_epoch_mpi", n_params, state_a.shape[0], state_b.shape[0])
    # the steps and buffers come from _Fit; checked once here, since the loop trusts them
    if steps.shape[1] != 4 or pack.shape[0] != n_params + n_running + N_SLOTS or n_running < 0:
        raise ValueError("train_epoch_mpi: steps must be (n_steps, 4) and pack hold the gradient, "
                         "the running statistics and the slots")
    if pack.shape[0] > 2**31 - 1:
        raise ValueError("train_epoch_mpi: the pack exceeds MPI's int count")
    if (T_ptr == NULL) == (labels_ptr == NULL) and n:
        raise ValueError("train_epoch_mpi: pass targets T or labels, the other empty")
    if (T_ptr != NULL and T.shape[0] != n) or (labels_ptr != NULL and labels.shape[0] != n) or (
            order is not None and order.shape[0] != n):
        raise ValueError("train_epoch_mpi: T, labels and order must have X's rows")
    for s in range(steps.shape[0]):
        if not (0 <= steps[s, 2] <= steps[s, 3] <= n and steps[s, 3] - steps[s, 2] <= steps[s, 0]
                and steps[s, 0] > 0):
            raise ValueError(f"train_epoch_mpi: step {s} {tuple(steps[s])} is outside X's {n} rows")
        most = max(most, steps[s, 3] - steps[s, 2])
    if work.shape[0] < max(most, 1) * row_width + n_bstats or (order is not None and (
            Xb.shape[0] < most or Xb.shape[1] != d
            or (T_ptr != NULL and (Tb.shape[0] < most or Tb.shape[1] != m))
            or (labels_ptr != NULL and label_buf.shape[0] < most))):
        raise ValueError("train_epoch_mpi: the workspace or gather buffers are too small for the shares")
    if order is not None:
        for s in range(n):
            if not 0 <= order[s] < n:
                raise ValueError("train_epoch_mpi: order must index X's rows")
    fit.loss_kind = settings["loss"]
    fit.loss_scale = settings["loss_scale"]
    fit.seed = settings["seed"]
    fit.n_threads = settings["n_threads"]
    r.steps = &steps[0, 0] if steps.shape[0] else NULL
    r.n_steps = steps.shape[0]
    r.n_params = n_params
    r.n_running = n_running
    r.flag = <PyObject*> interrupted
    r.guard = NULL if guard is None else <PyObject*> guard
    r.pending = 0
    r.mpi_error = 0
    r.last_bs = 0
    if guard is not None:
        guard()             # the data's memory is still where it was checked (raises if not)
    with nogil:
        nt = threads_for(3 * _pass_flops(&P, most), most, fit.n_threads)
        if _share(&sh, nt, &opt, n_params):
            if nt == 1:
                sh.statuses[0] = _ranked_worker(&P, &fit, &mpi, &r, X_ptr, T_ptr, labels_ptr, order_ptr,
                                                d, m, &params[0], &pack[0], &state_a[0], &state_b[0],
                                                &work[0], Xb_ptr, Tb_ptr, label_buf_ptr, &opt, &sh, 0, 1)
            else:
                cprop_barrier_init(&barrier)
                with parallel(num_threads=nt):
                    t = cprop_barrier_join(&barrier)    # nt may be more than OpenMP gave
                    sh.statuses[t] = _ranked_worker(&P, &fit, &mpi, &r, X_ptr, T_ptr, labels_ptr,
                                                    order_ptr, d, m, &params[0], &pack[0], &state_a[0],
                                                    &state_b[0], &work[0], Xb_ptr, Tb_ptr, label_buf_ptr,
                                                    &opt, &sh, t, omp_get_num_threads())
                    cprop_barrier_leave()
            status = sh.statuses[0]
        else:
            status = STATUS_NO_MEMORY
        _unshare(&sh)
    if status == STATUS_NO_MEMORY:
        # every rank allocates the same few bytes; one failing alone would leave the others
        # in their first allreduce, so the caller takes the job down (abort_on_error)
        raise MemoryError("cprop could not allocate the training loop's per-thread buffers")
    optimizer["step"] = opt.step
    if r.pending:
        _raise_pending()
    return status, sh.loss_sum, sh.n_seen, r.last_bs, opt.step
