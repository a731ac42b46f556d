"""Other people's formats: PyTorch modules (Sequential.from_torch / to_torch) and MNIST's IDX files."""
import gzip
import re
import struct

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import cprop

from conftest import ACTIVATIONS

# -- PyTorch -------------------------------------------------------------------------------------

TORCH_TOLERANCE = {np.float32: 1e-6, np.float64: 1e-12}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def mentions(*words):
    """A `match=` pattern that finds every one of `words` in the message, in any order."""
    return "(?is)^" + "".join(f"(?=.*{re.escape(w)})" for w in words)


def torch_dtype(torch, dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


def torch_activation(torch, name):
    """The torch module for a cprop activation name (None for identity: no module)."""
    return {"relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(0.01), "sigmoid": torch.nn.Sigmoid(),
            "tanh": torch.nn.Tanh(), "identity": None}[name]


def torch_mlp(torch, activation, dtype, output=None, seed=0):
    """Linear(5, 8) activation Linear(8, 6) activation Linear(6, 3) [output], weights from `seed`."""
    torch.manual_seed(seed)
    modules = []
    for n_in, n_out, act in [(5, 8, activation), (8, 6, activation), (6, 3, output)]:
        modules.append(torch.nn.Linear(n_in, n_out, dtype=torch_dtype(torch, dtype)))
        module = torch_activation(torch, act) if act else None
        if module is not None:
            modules.append(module)
    return torch.nn.Sequential(*modules)


def torch_weights(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_from_torch_copies_weights_exactly_and_computes_the_same(activation, dtype, torch):
    module = torch_mlp(torch, activation, dtype, output="sigmoid")
    X = np.random.default_rng(0).normal(size=(11, 5)).astype(dtype)

    net = cprop.Sequential.from_torch(module)

    assert net.dtype == dtype
    assert [layer.activation for layer in net.layers] == [activation, activation, "sigmoid"]
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    for layer, linear in zip(net.layers, linears):
        assert_array_equal(layer.W, linear.weight.detach().numpy().T)
        assert_array_equal(layer.b, linear.bias.detach().numpy())
    with torch.no_grad():
        expected = module(torch.from_numpy(X)).numpy()
    tol = TORCH_TOLERANCE[dtype]
    assert_allclose(net.forward(X), expected, rtol=tol, atol=tol)
    assert_allclose(net.predict_raw(X), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_to_torch_round_trip_is_exact(activation, dtype, torch):
    net = cprop.Sequential([cprop.Dense(5, 8, activation), cprop.Dense(8, 6, activation),
                            cprop.Dense(6, 3, activation)], dtype=dtype, seed=1)
    net.params[...] += np.linspace(-0.1, 0.1, net.n_params, dtype=dtype)   # non-zero biases
    X = np.random.default_rng(1).normal(size=(9, 5)).astype(dtype)

    module = net.to_torch()
    back = cprop.Sequential.from_torch(module)

    assert all(p.dtype == torch_dtype(torch, dtype) for p in module.parameters())
    assert back.architecture() == net.architecture()
    assert back.params.dtype == dtype
    assert_array_equal(back.params, net.params)
    with torch.no_grad():
        out = module(torch.from_numpy(X)).numpy()
    tol = TORCH_TOLERANCE[dtype]
    assert_allclose(out, net.forward(X), rtol=tol, atol=tol)
    # and torch -> cprop -> torch gives the same state_dict, bit for bit
    again = back.to_torch()
    assert torch_weights(again).keys() == torch_weights(module).keys()
    for key, value in torch_weights(module).items():
        assert_array_equal(torch_weights(again)[key], value)


def test_converted_models_share_no_memory(torch):
    module = torch_mlp(torch, "relu", np.float32)
    net = cprop.Sequential.from_torch(module)
    before = net.params.copy()

    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    assert_array_equal(net.params, before)

    exported = net.to_torch()
    net.params[...] = 0
    assert all(bool((p != 0).any()) for p in exported.parameters())


def test_explicit_identity_modules_are_accepted(torch):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Identity(), torch.nn.Linear(3, 2),
                                 torch.nn.Tanh())

    net = cprop.Sequential.from_torch(module)

    assert [layer.activation for layer in net.layers] == ["identity", "tanh"]
    X = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    with torch.no_grad():
        assert_allclose(net.forward(X), module(torch.from_numpy(X)).numpy(), rtol=1e-6, atol=1e-6)


def test_a_model_trained_in_cprop_predicts_the_same_in_torch(torch):
    X, y = cprop.datasets.load_digits()
    net = cprop.Sequential([cprop.Dense(64, 32, "relu"), cprop.Dense(32, 10)], dtype="float64", seed=0)
    cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.05, momentum=0.9), seed=0).fit(X, y)

    with torch.no_grad():
        logits = net.to_torch()(torch.from_numpy(X.astype(np.float64))).numpy()

    assert_allclose(logits, net.predict_raw(X), rtol=1e-12, atol=1e-12)
    assert_array_equal(logits.argmax(axis=1), net.predict_raw(X).argmax(axis=1))


UNSUPPORTED = {
    # name: (module builder, exception, words in the message)
    "Conv1d": (lambda t: t.nn.Sequential(t.nn.Conv1d(1, 2, 3), t.nn.Linear(2, 2)), ValueError,
               ["module[0]", "Conv1d", "Linear"]),
    "Linear without bias": (lambda t: t.nn.Sequential(t.nn.Linear(4, 3), t.nn.ReLU(),
                                                      t.nn.Linear(3, 2, bias=False)),
                            ValueError, ["module[2]", "bias"]),
    "ELU(0.5)": (lambda t: t.nn.Sequential(t.nn.Linear(4, 3), t.nn.ELU(0.5)), ValueError,
                 ["module[1]", "alpha 1", "0.5"]),
    "LayerNorm over two dims": (lambda t: t.nn.Sequential(t.nn.Linear(4, 6), t.nn.LayerNorm((2, 3))),
                                ValueError, ["module[1]", "one dimension"]),
    "activation first": (lambda t: t.nn.Sequential(t.nn.ReLU(), t.nn.Linear(4, 3)), ValueError,
                         ["module[0]", "ReLU", "Linear"]),
    "two activations": (lambda t: t.nn.Sequential(t.nn.Linear(4, 3), t.nn.ReLU(), t.nn.Tanh()), ValueError,
                        ["module[2]", "Tanh"]),
    "activation after Dropout": (lambda t: t.nn.Sequential(t.nn.Linear(4, 3), t.nn.Dropout(0.5), t.nn.ReLU()),
                                 ValueError, ["module[2]", "ReLU"]),
    "Softmax": (lambda t: t.nn.Sequential(t.nn.Linear(4, 3), t.nn.Softmax(dim=1)), ValueError,
                ["module[1]", "Softmax"]),
    "empty": (lambda t: t.nn.Sequential(), ValueError, ["no Linear"]),
    "float16": (lambda t: t.nn.Sequential(t.nn.Linear(4, 3, dtype=t.float16)), ValueError,
                ["float32", "float64", "float16"]),
    "a bare Linear": (lambda t: t.nn.Linear(4, 3), TypeError, ["torch.nn.Sequential", "Linear"]),
    "a list": (lambda t: [t.nn.Linear(4, 3)], TypeError, ["torch.nn.Sequential", "list"]),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_from_torch_refuses_what_it_cannot_convert(case, torch):
    build, error, words = UNSUPPORTED[case]
    with pytest.raises(error, match=mentions(*words)):
        cprop.Sequential.from_torch(build(torch))


# -- MNIST's IDX files ---------------------------------------------------------------------------

def idx_bytes(array):
    """`array` (uint8) in IDX format: 0, 0, type 0x08, ndim, each dimension as big-endian uint32."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path, array, gz):
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)


def write_mnist(directory, prefix, n, gz, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[0, 0, :2] = [0, 255]                  # both ends of the pixel range
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_load_mnist_reads_train_and_t10k_files(gz, tmp_path):
    train_images, train_labels = write_mnist(tmp_path, "train", 7, gz, seed=0)
    test_images, test_labels = write_mnist(tmp_path, "t10k", 3, gz, seed=1)

    X, y = cprop.datasets.load_mnist(str(tmp_path))
    X_test, y_test = cprop.datasets.load_mnist(tmp_path, kind="test")

    assert X.shape == (7, 784) and X_test.shape == (3, 784)
    assert X.dtype == X_test.dtype == np.float32
    assert y.dtype == y_test.dtype == np.int64
    assert 0 <= X.min() and X.max() <= 1
    assert X[0, 0] == 0 and X[0, 1] == 1
    assert_allclose(X, train_images.reshape(7, 784) / 255, rtol=1e-6)
    assert_allclose(X_test, test_images.reshape(3, 784) / 255, rtol=1e-6)
    assert_array_equal(y, train_labels)
    assert_array_equal(y_test, test_labels)
    assert_array_equal(cprop.datasets.load_mnist(tmp_path, kind="t10k")[1], test_labels)


def test_load_mnist_takes_plain_and_gz_files_side_by_side(tmp_path):
    images, labels = write_mnist(tmp_path, "train", 4, gz=False)
    gz_images = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(gz_images, images, gz=True)
    (tmp_path / "train-images-idx3-ubyte").unlink()          # images gzipped, labels plain

    X, y = cprop.datasets.load_mnist(tmp_path)

    assert_allclose(X, images.reshape(4, 784) / 255, rtol=1e-6)
    assert_array_equal(y, labels)


def test_read_idx_refuses_bad_magic(tmp_path):
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    for name, data in [("png.idx", b"\x89PNG\r\n\x1a\n" + good), ("type.idx", good[:2] + b"\x07" + good[3:]),
                       ("short.idx", b"\x00\x00")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=mentions(name, "magic")):
            cprop.datasets.read_idx(tmp_path / name)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_read_idx_refuses_truncated_data(gz, tmp_path):
    path = tmp_path / "cut.idx"
    data = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))[:-2]
    path.write_bytes(gzip.compress(data) if gz else data)

    with pytest.raises(ValueError, match=mentions("cut.idx", "12", "10")):
        cprop.datasets.read_idx(path)


def test_load_mnist_refuses_mismatched_image_and_label_counts(tmp_path):
    images, _ = write_mnist(tmp_path, "train", 5, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(6, np.uint8), gz=False)

    with pytest.raises(ValueError, match=mentions("(5, 28, 28)", "(6,)")):
        cprop.datasets.load_mnist(tmp_path)


def test_load_mnist_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        cprop.datasets.load_mnist(tmp_path, kind="test")
    write_mnist(tmp_path, "t10k", 2, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        cprop.datasets.load_mnist(tmp_path, kind="test")
    with pytest.raises(FileNotFoundError):
        cprop.datasets.read_idx(tmp_path / "nothing.idx")
