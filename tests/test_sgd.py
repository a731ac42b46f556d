"""SGD steps worked out by hand on a 2-2-1 identity network with mse on two samples.

Every number below is a dyadic fraction, exact in float64, so the kernels must
reproduce the hand computation to the last bit.
"""
import numpy as np
from numpy.testing import assert_array_equal

import cprop

X = np.array([[1.0, 2.0],
              [0.0, 1.0]])
y = np.array([1.0, 0.0])


def tiny_net():
    net = cprop.Sequential([cprop.Dense(2, 2), cprop.Dense(2, 1)], dtype="float64")
    hidden, output = net.layers
    hidden.W[...] = [[0.5, -1.0],
                     [0.0, 1.0]]
    hidden.b[...] = [0.0, 0.5]
    output.W[...] = [[1.0],
                     [2.0]]
    output.b[...] = [0.0]
    return net


def sgd_step(net, optimizer):
    value, grad = cprop.losses.mse(net.forward(X), y)
    net.backward(grad)
    optimizer.step(net)
    return value


def test_first_step_by_hand():
    net = tiny_net()
    hidden, output = net.layers

    # forward:  H = X·W1 + b1 = [[0.5, 1.5], [0, 1.5]];  out = H·W2 + b2 = [3.5, 3]
    # loss:     mean((3.5 - 1)², (3 - 0)²) = (6.25 + 9) / 2 = 7.625
    # gradient: G = 2(out - y)/2 = [2.5, 3]
    # backward: dW2 = Hᵀ·G = [1.25, 8.25];  db2 = 5.5
    #           dH = G·W2ᵀ = [[2.5, 5], [3, 6]]
    #           dW1 = Xᵀ·dH = [[2.5, 5], [8, 16]];  db1 = [5.5, 11]
    # step:     p -= lr·g with lr = 1/8
    value = sgd_step(net, cprop.SGD(lr=0.125))

    assert value == 7.625
    assert_array_equal(hidden.dW, [[2.5, 5.0], [8.0, 16.0]])
    assert_array_equal(hidden.db, [5.5, 11.0])
    assert_array_equal(output.dW, [[1.25], [8.25]])
    assert_array_equal(output.db, [5.5])
    assert_array_equal(hidden.W, [[0.5 - 2.5 / 8, -1.0 - 5.0 / 8],
                                  [0.0 - 8.0 / 8, 1.0 - 16.0 / 8]])     # [[0.1875, -1.625], [-1, -1]]
    assert_array_equal(hidden.b, [0.0 - 5.5 / 8, 0.5 - 11.0 / 8])       # [-0.6875, -0.875]
    assert_array_equal(output.W, [[1.0 - 1.25 / 8], [2.0 - 8.25 / 8]])  # [[0.84375], [0.96875]]
    assert_array_equal(output.b, [-5.5 / 8])                            # [-0.6875]


def test_second_step_with_momentum_by_hand():
    net = tiny_net()
    hidden, output = net.layers
    optimizer = cprop.SGD(lr=0.125, momentum=0.5)

    # step 1: the velocity starts at zero, so v = g and the step is the plain one above
    sgd_step(net, optimizer)
    assert_array_equal(hidden.W, [[0.1875, -1.625], [-1.0, -1.0]])

    # step 2, from W1 = [[3/16, -13/8], [-1, -1]], b1 = [-11/16, -7/8], W2 = [27/32, 31/32], b2 = -11/16:
    #   H   = [[-5/2, -9/2], [-27/16, -15/8]]
    #   out = [-229/32, -2011/512];  G = out - y = [-261/32, -2011/512]
    #   dW1 = [[-7047/1024, -8091/1024], [-279801/16384, -321253/16384]]
    #   db1 = [-167049/16384, -191797/16384];  dW2 = [221337/8192, 180501/4096];  db2 = -6187/512
    # velocity v = 0.5·g₁ + g₂, then p -= v/8:
    #   v(W1) = [[5/4 - 7047/1024, 5/2 - 8091/1024], [4 - 279801/16384, 8 - 321253/16384]]
    #   v(b1) = [11/4 - 167049/16384, 11/2 - 191797/16384]
    #   v(W2) = [5/8 + 221337/8192, 33/8 + 180501/4096];  v(b2) = 11/4 - 6187/512
    value = sgd_step(net, optimizer)

    assert value == 21483097 / 524288                  # mean((-261/32)², (-2011/512)²)
    assert_array_equal(hidden.W, [[7303 / 8192, -7781 / 8192],
                                  [83193 / 131072, 59109 / 131072]])
    assert_array_equal(hidden.b, [31881 / 131072, -13003 / 131072])
    assert_array_equal(output.W, [[-171161 / 65536], [-165653 / 32768]])
    assert_array_equal(output.b, [1963 / 4096])
    # the velocity is the optimizer's state, flat like the parameters
    v_b2 = 11 / 4 - 6187 / 512
    assert optimizer.state[0][-1] == v_b2 and output.b[0] == -11 / 16 - v_b2 / 8
