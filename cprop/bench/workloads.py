"""The benchmark workloads and the training recipe every framework follows.

Every framework trains the same network on the same random data with the same
recipe: one epoch of shuffled minibatches (the last one partial when the batch
size does not divide the epoch), relu hidden layers, identity last layer, SGD
with lr 0.01 and momentum 0.9 (``v = μ·v + g; p -= lr·v``, as torch), mean
cross-entropy (softmax fused in) or mean squared error over all elements.
"""
from dataclasses import dataclass

import numpy as np

LEARNING_RATE = 0.01
MOMENTUM = 0.9
SEED = 0


@dataclass(frozen=True)
class Workload:
    """A benchmark network: layer widths, minibatch size, loss and default epoch length."""

    name: str
    sizes: tuple
    batch_size: int
    loss: str
    n_samples: int

    @property
    def layers(self):
        """``"784-128-10"``: the widths as one string."""
        return "-".join(str(s) for s in self.sizes)

    @property
    def shapes(self):
        """(n_in, n_out) of every Dense layer, input to output."""
        return list(zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def flops_per_sample(self):
        """Training FLOPs per sample: forward 2, dW 2 and dX 2 per weight, no dX for the first layer."""
        return sum(6 * n_in * n_out for n_in, n_out in self.shapes) - 2 * self.sizes[0] * self.sizes[1]

    @property
    def forward_flops_per_sample(self):
        """Inference FLOPs per sample: 2 per weight."""
        return sum(2 * n_in * n_out for n_in, n_out in self.shapes)

    def epoch_samples(self, scale=1.0):
        """Samples in one benchmark epoch: the default times `scale`, at least two batches."""
        return max(2 * self.batch_size, int(round(self.n_samples * scale)))

    def network(self, dtype="float32", seed=SEED):
        """The workload's network in cprop: relu hidden layers, identity last layer, initialised from `seed`."""
        from .. import Dense, Sequential
        n_layers = len(self.shapes)
        return Sequential([Dense(n_in, n_out, "relu" if i < n_layers - 1 else None)
                           for i, (n_in, n_out) in enumerate(self.shapes)], dtype=dtype, seed=seed)

    def trainer(self, comm=None, n_threads=None, dtype="float32", seed=SEED, average_every=None):
        """A Trainer of the workload's network with the recipe (SGD lr 0.01 momentum 0.9, its
        batch size and loss), over `comm` when given (local SGD every `average_every` steps)."""
        from .. import SGD, Trainer
        return Trainer(self.network(dtype, seed), loss=self.loss,
                       optimizer=SGD(lr=LEARNING_RATE, momentum=MOMENTUM), batch_size=self.batch_size,
                       seed=seed, n_threads=n_threads, comm=comm,
                       average_every=average_every if comm is not None else None)

    def initial_parameters(self, dtype="float32", seed=SEED):
        """[(W, b)] per layer, W of shape (n_in, n_out): cprop's initialisation for `seed`.

        He-normal W for the relu layers, Glorot-uniform for the identity last
        layer, b = 0. Every framework but scikit-learn (which initialises
        inside its first ``partial_fit``) starts from these, so all train the
        same network from the same start.
        """
        return [(layer.W.copy(), layer.b.copy()) for layer in self.network(dtype, seed).layers]

    def make_data(self, n_samples, dtype="float32", seed=SEED):
        """Random inputs and targets: (X, y), y integer labels for cross_entropy, (n, 1) floats for mse."""
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((n_samples, self.sizes[0]), dtype=np.dtype(dtype).type)
        if self.loss == "cross_entropy":
            y = rng.integers(0, self.sizes[-1], n_samples).astype(np.intp)
        else:
            y = rng.standard_normal((n_samples, self.sizes[-1])).astype(dtype)
        return X, y


# n_samples: one cprop epoch takes roughly 0.1-0.5 s on a small (2-core) machine
WORKLOADS = {w.name: w for w in [
    Workload("tiny", (2, 32, 32, 1), 32, "mse", 400_000),
    Workload("mnist", (784, 128, 10), 64, "cross_entropy", 40_000),
    Workload("deep", (784, 256, 256, 256, 10), 128, "cross_entropy", 15_000),
    Workload("wide", (784, 1024, 1024, 10), 256, "cross_entropy", 4_000),
]}
