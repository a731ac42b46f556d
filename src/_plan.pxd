# The compiled description of a network, built once by cprop.Sequential and read
# by every kernel: per layer its kind, activation, widths, and the offsets of its
# parameters (in params, grads and the optimizer's state alike), of its running
# statistics, and of its buffers in the workspace. Nothing recomputes the layout.
#
# The workspace of a pass over `rows` rows is one flat array:
#   [per-row buffers: rows × row_width][batch statistics: n_bstats][gathered X, T]
# and layer l's output is the (rows × n_out) matrix at work + rows·t[Y_COL].

cdef enum:              # layer kinds (cprop/layers.py: one class each)
    DENSE = 0
    DROPOUT = 1
    BATCHNORM = 2
    LAYERNORM = 3
    N_KINDS = 4

cdef enum:              # columns of the integer table, one row per layer
    KIND = 0
    ACT = 1             # activation code (src/_activations.pxd)
    N_IN = 2
    N_OUT = 3
    PARAM = 4           # offset of the layer's parameters in params / grads / optimizer state
    N_PARAM = 5         # how many (0: none)
    BUFFER = 6          # offset of its running statistics in buffers (BatchNorm: mean, var), or -1
    Y_COL = 7           # its output Y
    Z_COL = 8           # its pre-activation z, kept when f'(z) needs it, or -1
    XHAT_COL = 9        # x̂ of a normalization layer, or -1
    STAT_COL = 10       # one float per row (LayerNorm's rstd), or -1
    G_COL = 11          # ∂L/∂Y, turned into δ = ∂L/∂z in place
    BSTAT = 12          # offset of its batch statistics (BatchNorm: mean, rstd, Σdx̂, Σdx̂x̂), or -1
    N_PLAN_INT = 13

cdef enum:              # columns of the float table
    ALPHA = 0           # the activation's parameter (leaky_relu's slope)
    DROP_P = 1          # Dropout's p
    EPS = 2             # normalization's ε
    MOMENTUM = 3        # BatchNorm's running-statistics momentum
    N_PLAN_FLOAT = 4


cdef struct Plan:
    const long long* t      # n_layers × N_PLAN_INT
    const double* f         # n_layers × N_PLAN_FLOAT
    Py_ssize_t n_layers
    Py_ssize_t row_width    # floats per row of the per-row buffers
    Py_ssize_t n_bstats     # floats of batch statistics
    Py_ssize_t n_params     # parameters (and gradients) the rows lay out, as checked
    Py_ssize_t n_buffers    # running statistics they lay out
