# The dense layer, forward and backward, on raw row-major buffers.
#
#   forward:   Y  = f(X·W + b)                      X (n×n_in), W (n_in×n_out)
#   backward:  δ  = G ⊙ f'(Y)                        G = ∂L/∂Y
#              dW = Xᵀ·δ,   db = Σ_rows δ,   dX = δ·Wᵀ
#
# Products go to BLAS (one thread each); everything around them is fused into
# the pass that follows the product. Large products are split between cprop's
# own OpenMP threads (rows of Y, dX and dW), so that no
# thread ever reduces into another's output and results do not depend on
# timing. Kernels trust their inputs: the Python layer validated them.
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy
from _blas cimport gemm
from _activations cimport bias_activation, activation_grad

# Starting an OpenMP region costs a few microseconds; a product smaller than
# this many floating-point operations per thread is faster on one thread.
cdef enum:
    MIN_FLOPS_PER_THREAD = 1 << 20


cdef inline int threads_for(double flops, Py_ssize_t n_chunks, int n_threads) noexcept nogil:
    """How many of n_threads are worth using for a product of `flops` split in up to n_chunks."""
    cdef double by_work = flops / MIN_FLOPS_PER_THREAD
    cdef int nt = n_threads
    if by_work < nt:
        nt = <int> by_work
    if n_chunks < nt:
        nt = <int> n_chunks
    return nt if nt > 1 else 1


cdef inline void dense_forward_rows(const floating* X, const floating* W, const floating* b,
                                    floating* Y, Py_ssize_t r0, Py_ssize_t r1,
                                    Py_ssize_t n_in, Py_ssize_t n_out, int activation) noexcept nogil:
    """Y[r0:r1] = f(X[r0:r1]·W + b)."""
    if r1 <= r0:
        return
    gemm(False, False, <int> (r1 - r0), <int> n_out, <int> n_in,
         <floating> 1, X + r0 * n_in, <int> n_in, W, <int> n_out,
         <floating> 0, Y + r0 * n_out, <int> n_out)
    bias_activation(Y + r0 * n_out, b, r1 - r0, n_out, activation)


cdef inline void gather_dense_forward_rows(const floating* source, const Py_ssize_t* rows,
                                           floating* X, const floating* W, const floating* b,
                                           floating* Y, Py_ssize_t r0, Py_ssize_t r1,
                                           Py_ssize_t n_in, Py_ssize_t n_out,
                                           int activation) noexcept nogil:
    """X[r] = source[rows[r]] for r in [r0, r1) (when rows is given), then Y[r0:r1] = f(X[r0:r1]·W + b)."""
    cdef Py_ssize_t r
    if rows != NULL:
        for r in range(r0, r1):
            memcpy(X + r * n_in, source + rows[r] * n_in, n_in * sizeof(floating))
    dense_forward_rows(X, W, b, Y, r0, r1, n_in, n_out, activation)


cdef inline void dense_forward(const floating* X, const floating* W, const floating* b,
                               floating* Y, Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                               int activation, int n_threads,
                               const floating* source=NULL, const Py_ssize_t* rows=NULL) noexcept nogil:
    """Y = f(X·W + b), rows split across threads.

    With `rows`, X is first gathered from source (X[r] = source[rows[r]]) by the
    same threads, each copying the rows it is about to multiply.
    """
    cdef int t, nt = threads_for(2.0 * n * n_in * n_out, n, n_threads)
    if nt == 1:
        gather_dense_forward_rows(source, rows, <floating*> X, W, b, Y, 0, n, n_in, n_out, activation)
        return
    for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
        gather_dense_forward_rows(source, rows, <floating*> X, W, b, Y, n * t // nt, n * (t + 1) // nt,
                                  n_in, n_out, activation)


cdef inline void dense_param_grads_part(const floating* X, const floating* delta,
                                        floating* dW, floating* db,
                                        Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                                        Py_ssize_t r0, Py_ssize_t r1,
                                        Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """dW[r0:r1] = X[:, r0:r1]ᵀ·δ  and  db[c0:c1] = Σ_i δ[i, c0:c1]."""
    cdef Py_ssize_t i, j
    cdef const floating* row
    if r1 > r0:
        gemm(True, False, <int> (r1 - r0), <int> n_out, <int> n,
             <floating> 1, X + r0, <int> n_in, delta, <int> n_out,
             <floating> 0, dW + r0 * n_out, <int> n_out)
    for j in range(c0, c1):
        db[j] = 0
    for i in range(n):
        row = delta + i * n_out
        for j in range(c0, c1):
            db[j] += row[j]


cdef inline void dense_param_grads(const floating* X, const floating* delta,
                                   floating* dW, floating* db,
                                   Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                                   int n_threads) noexcept nogil:
    """dW = Xᵀ·δ and db = Σ_rows δ; threads split the rows of dW (and the entries of db)."""
    cdef int t, nt = threads_for(2.0 * n * n_in * n_out, n_in, n_threads)
    if nt == 1:
        dense_param_grads_part(X, delta, dW, db, n, n_in, n_out, 0, n_in, 0, n_out)
        return
    for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
        dense_param_grads_part(X, delta, dW, db, n, n_in, n_out,
                               n_in * t // nt, n_in * (t + 1) // nt,
                               n_out * t // nt, n_out * (t + 1) // nt)


cdef inline void dense_input_grad_rows(const floating* delta, const floating* W, floating* dX,
                                       const floating* Y_prev, int activation_prev,
                                       Py_ssize_t r0, Py_ssize_t r1,
                                       Py_ssize_t n_in, Py_ssize_t n_out) noexcept nogil:
    """dX[r0:r1] = δ[r0:r1]·Wᵀ; then, when Y_prev is given, δ_prev = dX ⊙ f'_prev(Y_prev) in place."""
    if r1 <= r0:
        return
    gemm(False, True, <int> (r1 - r0), <int> n_in, <int> n_out,
         <floating> 1, delta + r0 * n_out, <int> n_out, W, <int> n_out,
         <floating> 0, dX + r0 * n_in, <int> n_in)
    if Y_prev != NULL:
        activation_grad(dX + r0 * n_in, Y_prev + r0 * n_in, dX + r0 * n_in,
                        (r1 - r0) * n_in, activation_prev)


cdef inline void dense_input_grad(const floating* delta, const floating* W, floating* dX,
                                  const floating* Y_prev, int activation_prev,
                                  Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                                  int n_threads) noexcept nogil:
    """dX = δ·Wᵀ (fused with the previous layer's f' when Y_prev is given), rows split across threads."""
    cdef int t, nt = threads_for(2.0 * n * n_in * n_out, n, n_threads)
    if nt == 1:
        dense_input_grad_rows(delta, W, dX, Y_prev, activation_prev, 0, n, n_in, n_out)
        return
    for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
        dense_input_grad_rows(delta, W, dX, Y_prev, activation_prev,
                              n * t // nt, n * (t + 1) // nt, n_in, n_out)
