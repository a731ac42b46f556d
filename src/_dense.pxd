# The dense layer, forward and backward, on raw row-major buffers.
#
#   forward:   Y  = f(X·W + b)                      X (n×n_in), W (n_in×n_out)
#   backward:  δ  = G ⊙ f'(Y)                        G = ∂L/∂Y
#              dW = Xᵀ·δ,   db = Σ_rows δ,   dX = δ·Wᵀ
#
# Products go to BLAS (one thread each); everything around them is fused into
# the pass that follows the product. The *_block functions compute one block
# of rows × columns and are the training epoch's building blocks (see
# _core._epoch_worker); the functions without the suffix split one product
# between cprop's own OpenMP threads (columns of Y and dX, rows of dW) for the
# standalone kernels and inference. Either way no thread ever reduces into
# another's output, so results do not depend on timing. Kernels trust their
# inputs: the Python layer validated them.
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


cdef inline bint all_finite(const floating* x, Py_ssize_t n) noexcept nogil:
    """Whether x[0:n] holds no NaN or ±inf: Σ x·0 is exactly 0 then and NaN otherwise (no
    overflow, unlike Σ x). Sixteen partial sums, so the loop vectorizes in program order."""
    cdef floating acc[16]
    cdef Py_ssize_t i, j, body = n - n % 16
    for j in range(16):
        acc[j] = 0
    for i in range(0, body, 16):
        for j in range(16):
            acc[j] += x[i + j] * 0
    for i in range(body, n):
        acc[0] += x[i] * 0
    for j in range(1, 16):
        acc[0] += acc[j]
    return acc[0] == 0


cdef inline void dense_forward_block(const floating* X, const floating* W, const floating* b,
                                     floating* Y, Py_ssize_t r0, Py_ssize_t r1,
                                     Py_ssize_t c0, Py_ssize_t c1,
                                     Py_ssize_t n_in, Py_ssize_t n_out, int activation,
                                     floating alpha, floating* Z=NULL, int* product_finite=NULL) noexcept nogil:
    """Y[r0:r1, c0:c1] = f(X[r0:r1]·W[:, c0:c1] + b[c0:c1]); with Z, the pre-activation
    z = X·W + b is kept there (same layout) for a derivative that needs it.

    With product_finite: whether X·W (the block, before bias and activation) was finite.
    A NaN or ±inf in a row of X makes every value of that row of X·W NaN or ±inf (NaN·w
    and ±inf·0 are NaN: OpenBLAS's kernels multiply every term, zeros too), so a finite
    product clears X without reading it again, from the output still in cache; a
    non-finite one may also be finite values that overflowed, which only X tells apart."""
    cdef Py_ssize_t i
    if r1 <= r0 or c1 <= c0:
        return
    cdef floating* out = Y if Z == NULL else Z
    gemm(False, False, <int> (r1 - r0), <int> (c1 - c0), <int> n_in,
         <floating> 1, X + r0 * n_in, <int> n_in, W + c0, <int> n_out,
         <floating> 0, out + r0 * n_out + c0, <int> n_out)
    if product_finite != NULL:
        product_finite[0] = 1
        if c0 == 0 and c1 == n_out:
            product_finite[0] = all_finite(out + r0 * n_out, (r1 - r0) * n_out)
        else:
            for i in range(r0, r1):
                if not all_finite(out + i * n_out + c0, c1 - c0):
                    product_finite[0] = 0
                    break
    bias_activation(out + r0 * n_out + c0, b + c0, r1 - r0, c1 - c0, n_out, activation, alpha,
                    NULL if Z == NULL else Y + r0 * n_out + c0)


cdef inline void gather_rows(const floating* source, const Py_ssize_t* rows, floating* X,
                             Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n_in) noexcept nogil:
    """X[r] = source[rows[r]] for r in [r0, r1): the shuffled minibatch."""
    cdef Py_ssize_t r, j
    cdef const floating* row
    if n_in >= 16:
        for r in range(r0, r1):
            memcpy(X + r * n_in, source + rows[r] * n_in, n_in * sizeof(floating))
        return
    # narrow rows (a few inputs, one target): copied in place rather than by a memcpy call
    # per row of a few bytes (most of the gather's time is the rows' cache misses either way)
    for r in range(r0, r1):
        row = source + rows[r] * n_in
        for j in range(n_in):
            X[r * n_in + j] = row[j]


cdef inline Py_ssize_t _col_split(Py_ssize_t n_cols, int t, int nt) noexcept nogil:
    """Start of thread t's columns: multiples of 16, so threads never share a cache line."""
    if t >= nt:
        return n_cols
    return (n_cols * t // nt) & ~(<Py_ssize_t> 15)


cdef inline void dense_forward(const floating* X, const floating* W, const floating* b,
                               floating* Y, Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                               int activation, floating alpha, int n_threads,
                               const floating* source=NULL, const Py_ssize_t* rows=NULL) noexcept nogil:
    """Y = f(X·W + b).

    Each thread packs the whole of one operand and its share of the other, so
    threads split whichever is larger: the columns of Y (W's) when there are
    fewer rows than columns, as in minibatch training; else the rows (X's).
    With `rows`, X is first gathered from source (X[r] = source[rows[r]]), the
    threads splitting the copying.
    """
    # the output pass (bias, activation, the GEMM's stores) weighs as much as the
    # products when n_in is small
    cdef int t, nt = threads_for(2.0 * n * n_in * n_out + 16.0 * n * n_out, n, n_threads)
    if rows != NULL:
        if nt == 1:
            gather_rows(source, rows, <floating*> X, 0, n, n_in)
        else:
            for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
                gather_rows(source, rows, <floating*> X, n * t // nt, n * (t + 1) // nt, n_in)
    if nt == 1:
        dense_forward_block(X, W, b, Y, 0, n, 0, n_out, n_in, n_out, activation, alpha)
    elif n < n_out and n_out >= 32 * nt:
        for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
            dense_forward_block(X, W, b, Y, 0, n, _col_split(n_out, t, nt), _col_split(n_out, t + 1, nt),
                                n_in, n_out, activation, alpha)
    else:
        for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
            dense_forward_block(X, W, b, Y, n * t // nt, n * (t + 1) // nt, 0, n_out,
                                n_in, n_out, activation, alpha)


cdef inline void bias_grad_cols(const floating* delta, floating* db, Py_ssize_t n, Py_ssize_t n_out,
                                Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """db[c0:c1] = Σ_i δ[i, c0:c1]."""
    cdef Py_ssize_t i, j
    cdef const floating* row
    for j in range(c0, c1):
        db[j] = 0
    for i in range(n):
        row = delta + i * n_out
        for j in range(c0, c1):
            db[j] += row[j]


cdef inline void dense_param_grads_part(const floating* X, const floating* delta,
                                        floating* dW, floating* db,
                                        Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                                        Py_ssize_t r0, Py_ssize_t r1,
                                        Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """dW[r0:r1] = X[:, r0:r1]ᵀ·δ  and  db[c0:c1] = Σ_i δ[i, c0:c1]."""
    if r1 > r0:
        gemm(True, False, <int> (r1 - r0), <int> n_out, <int> n,
             <floating> 1, X + r0, <int> n_in, delta, <int> n_out,
             <floating> 0, dW + r0 * n_out, <int> n_out)
    bias_grad_cols(delta, db, n, n_out, c0, c1)


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


cdef inline void dense_input_grad_block(const floating* delta, const floating* W, floating* dX,
                                        const floating* Y_prev, int activation_prev,
                                        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                                        Py_ssize_t n_in, Py_ssize_t n_out, floating alpha_prev=0,
                                        const floating* Z_prev=NULL) noexcept nogil:
    """dX[r0:r1, c0:c1] = δ[r0:r1]·W[c0:c1]ᵀ; then, when Y_prev is given,
    δ_prev = dX ⊙ f'_prev(z_prev) on the same block, in place (through Z_prev when given)."""
    cdef Py_ssize_t i
    if r1 <= r0 or c1 <= c0:
        return
    if n_out == 1:
        # a single output's W (n_in × 1) is laid out as Wᵀ (1 × n_in): the outer product
        # δ·Wᵀ as a plain NN product, which OpenBLAS runs in 0.15 µs against its TN
        # kernel's 0.34 µs at 32 × 32 (Zen 4, OpenBLAS 0.3.30; benchmarks/README.md)
        gemm(False, False, <int> (r1 - r0), <int> (c1 - c0), 1,
             <floating> 1, delta + r0, 1, W + c0, <int> n_in,
             <floating> 0, dX + r0 * n_in + c0, <int> n_in)
    else:
        gemm(False, True, <int> (r1 - r0), <int> (c1 - c0), <int> n_out,
             <floating> 1, delta + r0 * n_out, <int> n_out, W + c0 * n_out, <int> n_out,
             <floating> 0, dX + r0 * n_in + c0, <int> n_in)
    if Y_prev != NULL and c0 == 0 and c1 == n_in:
        # whole rows: one contiguous block, one call
        activation_grad(dX + r0 * n_in, Y_prev + r0 * n_in, dX + r0 * n_in, (r1 - r0) * n_in,
                        activation_prev, alpha_prev, NULL if Z_prev == NULL else Z_prev + r0 * n_in)
    elif Y_prev != NULL:
        for i in range(r0, r1):
            activation_grad(dX + i * n_in + c0, Y_prev + i * n_in + c0, dX + i * n_in + c0,
                            c1 - c0, activation_prev, alpha_prev,
                            NULL if Z_prev == NULL else Z_prev + i * n_in + c0)


cdef inline void dense_input_grad(const floating* delta, const floating* W, floating* dX,
                                  const floating* Y_prev, int activation_prev,
                                  Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                                  int n_threads) noexcept nogil:
    """dX = δ·Wᵀ (fused with the previous layer's f' when Y_prev is given); threads split
    the columns of dX (W's rows) when there are fewer rows than columns, else the rows."""
    cdef int t, nt = threads_for(2.0 * n * n_in * n_out, n, n_threads)
    if nt == 1:
        dense_input_grad_block(delta, W, dX, Y_prev, activation_prev, 0, n, 0, n_in, n_in, n_out)
    elif n < n_in and n_in >= 32 * nt:
        for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
            dense_input_grad_block(delta, W, dX, Y_prev, activation_prev, 0, n,
                                   _col_split(n_in, t, nt), _col_split(n_in, t + 1, nt), n_in, n_out)
    else:
        for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
            dense_input_grad_block(delta, W, dX, Y_prev, activation_prev,
                                   n * t // nt, n * (t + 1) // nt, 0, n_in, n_in, n_out)
