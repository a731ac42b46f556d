# A sparse (CSR) input to the first layer, on raw buffers.
#
#   forward:   Y  = f(X·W + b)        X (n×n_in) CSR, W (n_in×n_out) dense
#   backward:  dW = Xᵀ·δ,   db = Σ_rows δ        (no dX: nothing lies below the input)
#
# A minibatch is never copied out of X: CSRBatch names its rows (X's rows
# rows[0], rows[1], … when shuffled, else first, first + 1, …) and the kernels
# read each row's nonzeros where they are. The forward pass splits the batch's
# rows between threads (each writes only its own rows of Y); dW splits W's rows,
# i.e. the features: every thread scans all of the batch's nonzeros and keeps
# those of its own features, so no two threads write one row of dW and none
# needs an atomic. Kernels trust their inputs: cprop/_validation.py checked
# every index against n_in and indptr against nnz, on copies the user cannot
# change behind the kernels' back.
from cython cimport floating
from libc.string cimport memset
from _activations cimport bias_activation


cdef struct CSRBatch:
    const void* data            # the nonzeros' values, in the network's dtype (floating)
    const Py_ssize_t* indices   # their columns, each in [0, n_in)
    const Py_ssize_t* indptr    # row i's nonzeros are data[indptr[i]:indptr[i+1]]
    const Py_ssize_t* rows      # batch row r is X's row rows[r]; NULL: row first + r
    Py_ssize_t first


cdef inline Py_ssize_t csr_source_row(const CSRBatch* X, Py_ssize_t r) noexcept nogil:
    """X's row that is row r of the batch."""
    return X.rows[r] if X.rows != NULL else X.first + r


cdef inline void csr_forward_rows(const CSRBatch* X, const floating* W, const floating* b,
                                  floating* Y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n_out,
                                  int activation, floating alpha, floating* Z=NULL) noexcept nogil:
    """Y[r0:r1] = f(X[r0:r1]·W + b): each nonzero x[r, f] adds x·W[f] to row r; with Z, the
    pre-activation is kept there (same layout) for a derivative that needs it."""
    cdef const floating* data = <const floating*> X.data
    cdef floating* out = Y if Z == NULL else Z
    cdef floating* o
    cdef const floating* w
    cdef floating v
    cdef Py_ssize_t r, k, j, src
    if r1 <= r0:
        return
    for r in range(r0, r1):
        src = csr_source_row(X, r)
        o = out + r * n_out
        memset(o, 0, n_out * sizeof(floating))
        for k in range(X.indptr[src], X.indptr[src + 1]):
            v = data[k]
            w = W + X.indices[k] * n_out
            for j in range(n_out):
                o[j] += v * w[j]
    bias_activation(out + r0 * n_out, b, r1 - r0, n_out, n_out, activation, alpha,
                    NULL if Z == NULL else Y + r0 * n_out)


cdef inline void csr_weight_grad_features(const CSRBatch* X, const floating* delta, floating* dW,
                                          Py_ssize_t bs, Py_ssize_t n_out, Py_ssize_t f0,
                                          Py_ssize_t f1) noexcept nogil:
    """dW[f0:f1] = (Xᵀ·δ)[f0:f1] over the batch's bs rows: each nonzero x[r, f] with f in
    [f0, f1) adds x·δ[r] to dW[f]; duplicates of one (r, f) add up, as scipy sums them."""
    cdef const floating* data = <const floating*> X.data
    cdef const floating* d
    cdef floating* g
    cdef floating v
    cdef Py_ssize_t r, k, j, f, src
    if f1 <= f0:
        return
    memset(dW + f0 * n_out, 0, (f1 - f0) * n_out * sizeof(floating))
    for r in range(bs):
        src = csr_source_row(X, r)
        d = delta + r * n_out
        for k in range(X.indptr[src], X.indptr[src + 1]):
            f = X.indices[k]
            if f < f0 or f >= f1:
                continue
            v = data[k]
            g = dW + f * n_out
            for j in range(n_out):
                g[j] += v * d[j]


cdef inline void csr_gather_dense(const CSRBatch* X, floating* out, Py_ssize_t r0, Py_ssize_t r1,
                                  Py_ssize_t n_in) noexcept nogil:
    """out[r] = X[r] as a dense row, for r in [r0, r1): the batch of a first layer that is
    not Dense (Dropout, a normalization), which then runs on the dense block."""
    cdef const floating* data = <const floating*> X.data
    cdef floating* o
    cdef Py_ssize_t r, k, src
    if r1 <= r0:
        return
    memset(out + r0 * n_in, 0, (r1 - r0) * n_in * sizeof(floating))
    for r in range(r0, r1):
        src = csr_source_row(X, r)
        o = out + r * n_in
        for k in range(X.indptr[src], X.indptr[src + 1]):
            o[X.indices[k]] += data[k]
