"""Files built to hurt: special files, zip and gzip bombs, crafted members and metadata,
stripped optimizer state, saves through odd paths, and every byte of a saved file damaged."""
import contextlib
import gzip
import io
import json
import os
import re
import signal
import stat
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

import cprop
from cprop import io as cprop_io

pytestmark = pytest.mark.skipif(os.name != "posix", reason="FIFOs, devices, modes and symlinks are POSIX")


def mentions(*words):
    """A `match=` pattern that finds every one of `words` in the message, in any order."""
    return "(?is)^" + "".join(f"(?=.*{re.escape(w)})" for w in words)


def small_problem(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.integers(0, 2, n)


def fitted_trainer(optimizer, epochs=1):
    net = cprop.Sequential([cprop.Dense(3, 4, "tanh"), cprop.Dense(4, 2)], seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=optimizer, batch_size=8, seed=0)
    if epochs:
        trainer.fit(*small_problem(), epochs=epochs)
    return trainer


OPTIMIZERS = {"sgd": lambda: cprop.SGD(lr=0.1),
              "sgd-momentum": lambda: cprop.SGD(lr=0.1, momentum=0.9),
              "adam": lambda: cprop.Adam(lr=0.01),
              "adamw": lambda: cprop.AdamW(lr=0.01)}


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging: a blocking open() or read() is interrupted by the alarm."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def peak_memory():
    """Records the peak of Python's and NumPy's allocations (tracemalloc sees both) in `.peak`."""
    class Peak:
        peak = None
    tracemalloc.start()
    try:
        yield Peak
    finally:
        Peak.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


LOADERS = {"cprop.load": cprop.load, "Trainer.load": cprop.Trainer.load}


def npy(array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_header(descr, shape):
    """A format-1.0 .npy header, by hand: the shape may be anything."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def meta_npy(meta):
    return npy(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


def network_meta(sizes=(3, 2), dtype="float32", listed=True):
    n = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))
    meta = {"format": "cprop", "version": 1, "kind": "network",
            "architecture": {"sizes": list(sizes), "activations": ["identity"] * (len(sizes) - 1),
                             "dtype": dtype}}
    if listed:
        meta["members"] = {"params": {"dtype": dtype, "shape": [n]}}
    return meta, n


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    """An archive of raw members: {file name in the zip: bytes}."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def read_members(path):
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def saved_meta(path):
    return json.loads(np.load(io.BytesIO(read_members(path)["__cprop__.npy"])).tobytes())


def with_meta(path, meta, drop=()):
    """Rewrite the archive at `path` with `meta` and without the members named in `drop`."""
    members = {k: v for k, v in read_members(path).items() if k[:-4] not in drop}
    members["__cprop__.npy"] = meta_npy(meta)
    return write_zip(path, members)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.npz"
    os.mkfifo(path)
    return path


# -- only regular files are read ------------------------------------------------------------------

def test_load_refuses_a_fifo_without_waiting_for_a_writer(fifo):
    with deadline(20):
        for loader in LOADERS.values():
            with pytest.raises(cprop.CpropFileError, match=mentions("pipe.npz", "FIFO")):
                loader(fifo)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_load_refuses_dev_zero_without_reading_it():
    with deadline(20), peak_memory() as memory:
        for loader in LOADERS.values():
            with pytest.raises(cprop.CpropFileError, match=mentions("/dev/zero", "character device")):
                loader("/dev/zero")
    assert memory.peak < 1 << 20


def test_load_refuses_a_directory_and_a_symlink_to_a_fifo(fifo, tmp_path):
    link = tmp_path / "link.npz"
    link.symlink_to(fifo)
    with deadline(20):
        for loader in LOADERS.values():
            with pytest.raises(cprop.CpropFileError, match="directory"):
                loader(tmp_path)
            with pytest.raises(cprop.CpropFileError, match="FIFO"):
                loader(link)


def test_a_file_swapped_for_a_fifo_after_the_stat_is_still_refused(fifo, tmp_path, monkeypatch):
    # the race the check on the opened descriptor closes: stat sees a regular file, open gets a FIFO
    regular = tmp_path / "regular.npz"
    fitted_trainer(cprop.SGD(), epochs=0).net.save(regular)
    real_stat = os.stat
    monkeypatch.setattr(cprop_io.os, "stat", lambda p, *a, **k: real_stat(regular if p == str(fifo) else p))
    with deadline(20), pytest.raises(cprop.CpropFileError, match="FIFO"):
        cprop.load(fifo)


# -- bombs: nothing is decompressed or allocated beyond what the file can plausibly need -------------

def deflated_zeros_npy(n_floats):
    return npy_header("<f4", (n_floats,)) + bytes(4 * n_floats)


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "old-format"])
def test_zip_bomb_in_params_is_refused_before_decompressing(listed, tmp_path):
    # 64 MB of zeros deflate to 64 kB; the architecture asks for exactly that many parameters
    meta, n = network_meta((1, 8 * 2 ** 20), listed=listed)
    path = write_zip(tmp_path / "bomb.npz", {"__cprop__.npy": meta_npy(meta), "params.npy": deflated_zeros_npy(n)},
                     zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    with peak_memory() as memory:
        with pytest.raises(cprop.CpropFileError, match=mentions("bomb.npz", "params", "expansion")):
            cprop.load(path)
        with pytest.raises(cprop.CpropFileError, match=mentions("bomb.npz", "holds a 'network'")):
            cprop.Trainer.load(path)            # the kind is checked before any array is touched
        with pytest.raises(cprop.CpropFileError, match="expansion"):
            cprop_io.load_archive(path)
    assert memory.peak < 4 << 20


def test_zip_bomb_in_an_unexpected_member_is_never_opened(tmp_path):
    meta, n = network_meta(listed=False)
    path = write_zip(tmp_path / "bomb.npz", {"__cprop__.npy": meta_npy(meta),
                                             "params.npy": npy(np.zeros(n, np.float32)),
                                             "junk.npy": deflated_zeros_npy(16 * 2 ** 20)}, zipfile.ZIP_DEFLATED)
    with peak_memory() as memory:
        with pytest.raises(cprop.CpropFileError, match=mentions("bomb.npz", "junk")):
            cprop.load(path)
    assert memory.peak < 4 << 20


def test_zip_bomb_in_the_metadata_is_refused(tmp_path):
    padded = json.dumps(network_meta()[0]).encode() + b" " * (64 << 20)
    path = write_zip(tmp_path / "bomb.npz", {"__cprop__.npy": npy(np.frombuffer(padded, np.uint8))},
                     zipfile.ZIP_DEFLATED)
    with peak_memory() as memory:
        with pytest.raises(cprop.CpropFileError, match=mentions("bomb.npz", "__cprop__")):
            cprop.load(path)
    assert memory.peak < 4 << 20


@pytest.mark.parametrize("sizes", [(100_000, 100_000), (2 ** 31 - 1, 2 ** 31 - 1, 2 ** 31 - 1)], ids=str)
def test_an_architecture_bigger_than_the_file_is_refused_unallocated(sizes, tmp_path):
    meta, n = network_meta(sizes)
    path = write_zip(tmp_path / "huge.npz", {"__cprop__.npy": meta_npy(meta),
                                             "params.npy": npy(np.zeros(6, np.float32))})
    with peak_memory() as memory, pytest.raises(cprop.CpropFileError, match=mentions("huge.npz", str(n))):
        cprop.load(path)
    assert memory.peak < 1 << 20


@pytest.mark.parametrize("shape", [(2 ** 40,), (2 ** 62, 4), (0,)], ids=str)
def test_a_npy_header_declaring_another_shape_is_refused_unallocated(shape, tmp_path):
    meta, n = network_meta(listed=False)
    params = npy_header("<f4", shape) + bytes(4 * n)
    path = write_zip(tmp_path / "shape.npz", {"__cprop__.npy": meta_npy(meta), "params.npy": params})
    with peak_memory() as memory:
        with pytest.raises(cprop.CpropFileError, match=mentions("shape.npz", "params", str(shape))):
            cprop.load(path)
        # the generic reader, with no architecture to hold it to, checks the header against the member's size
        with pytest.raises(cprop.CpropFileError, match=mentions("shape.npz", "params")):
            cprop_io.load_archive(path)
    assert memory.peak < 1 << 20


def test_a_stored_member_declaring_more_than_the_file_holds_is_refused(tmp_path):
    meta, n = network_meta()
    path = write_zip(tmp_path / "liar.npz",
                     {"__cprop__.npy": meta_npy(meta), "params.npy": npy(np.zeros(n, np.float32))})
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")                 # the last member's directory entry: params.npy
    struct.pack_into("<II", data, central + 20, 2 ** 31, 2 ** 31)    # compressed and uncompressed sizes
    path.write_bytes(bytes(data))
    with peak_memory() as memory, pytest.raises(cprop.CpropFileError, match=mentions("liar.npz", "params")):
        cprop.load(path)
    assert memory.peak < 1 << 20


def test_read_idx_refuses_a_fifo_and_a_device(fifo):
    with deadline(20), peak_memory() as memory:
        with pytest.raises(cprop.CpropFileError, match=mentions("pipe.npz", "FIFO")):
            cprop.datasets.read_idx(fifo)
        if os.path.exists("/dev/zero"):
            with pytest.raises(cprop.CpropFileError, match=mentions("/dev/zero", "character device")):
                cprop.datasets.read_idx("/dev/zero")
        with pytest.raises(cprop.CpropFileError, match=mentions("train-images-idx3-ubyte", "FIFO")):
            cprop.datasets.load_mnist(_mnist_dir_with_a_fifo(fifo.parent))
    assert memory.peak < 1 << 20


def _mnist_dir_with_a_fifo(directory):
    os.mkfifo(directory / "train-images-idx3-ubyte")
    (directory / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 0]))
    return directory


def gzip_idx(header_shape, n_data_bytes, code=0x08):
    header = bytes([0, 0, code, len(header_shape)]) + struct.pack(f">{len(header_shape)}I", *header_shape)
    return gzip.compress(header + bytes(n_data_bytes), compresslevel=1)


def test_gzip_bomb_idx_reads_only_what_its_header_declares(tmp_path):
    path = tmp_path / "bomb-idx.gz"
    path.write_bytes(gzip_idx((10,), 64 << 20))              # 10 bytes declared, 64 MB of zeros behind them
    assert path.stat().st_size < 1 << 20
    with peak_memory() as memory, pytest.raises(cprop.CpropFileError, match=mentions("bomb-idx.gz", "10")):
        cprop.datasets.read_idx(path)
    assert memory.peak < 4 << 20


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_declaring_more_than_max_bytes_is_refused_before_reading(gz, tmp_path):
    path = tmp_path / "big.idx"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 60000, 28, 28)
    path.write_bytes(gzip.compress(header) if gz else header)
    with peak_memory() as memory:
        with pytest.raises(cprop.CpropFileError, match=mentions("big.idx", "47040000", "max_bytes")):
            cprop.datasets.read_idx(path, max_bytes=1 << 20)
        with pytest.raises(cprop.CpropFileError, match=mentions("big.idx", "(65535, 65535, 65535)", "max_bytes")):
            path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 65535, 65535, 65535))
            cprop.datasets.read_idx(path)
    assert memory.peak < 1 << 20


def test_idx_within_max_bytes_still_reads(tmp_path):
    path = tmp_path / "ok.idx.gz"
    path.write_bytes(gzip_idx((4, 5), 20))
    assert cprop.datasets.read_idx(path, max_bytes=20).shape == (4, 5)
    with pytest.raises(cprop.CpropFileError, match="max_bytes"):
        cprop.datasets.read_idx(path, max_bytes=19)


def test_idx_big_endian_values_come_back_native(tmp_path):
    values = np.array([[1.5, -2.25], [1e30, -0.0]], dtype=">f4")
    path = tmp_path / "f.idx"
    path.write_bytes(bytes([0, 0, 0x0D, 2]) + struct.pack(">2I", 2, 2) + values.tobytes())
    out = cprop.datasets.read_idx(path)
    assert out.dtype == np.float32 and out.dtype.isnative and out.flags.writeable
    assert_array_equal(out, values)


# -- crafted members and metadata: always a CpropFileError ----------------------------------------

@pytest.mark.parametrize("listed", [True, False], ids=["listed", "old-format"])
def test_big_endian_parameters_load_as_native(listed, tmp_path):
    # what NumPy writes on a big-endian machine
    meta, n = network_meta(listed=listed)
    values = np.linspace(-1, 1, n).astype(">f4")
    path = write_zip(tmp_path / "be.npz", {"__cprop__.npy": meta_npy(meta), "params.npy": npy(values)})
    assert b"'>f4'" in path.read_bytes()
    net = cprop.load(path)
    assert net.params.dtype == np.float32 and net.params.dtype.isnative
    assert_array_equal(net.params, values)


def test_a_member_that_is_not_a_npy_array_is_refused(tmp_path):
    meta, n = network_meta(listed=False)
    path = write_zip(tmp_path / "odd.npz", {"__cprop__.npy": meta_npy(meta), "params.npy": npy(np.zeros(n, np.float32)),
                                            "notes.txt": b"hello"})
    for loader in LOADERS.values():
        with pytest.raises(cprop.CpropFileError, match=mentions("odd.npz", "notes.txt", ".npy")):
            loader(path)
    path = write_zip(tmp_path / "odd.npz", {"__cprop__": meta_npy(meta), "params.npy": npy(np.zeros(n, np.float32))})
    with pytest.raises(cprop.CpropFileError, match=mentions("odd.npz", "'__cprop__'")):
        cprop.load(path)


@pytest.mark.parametrize("header", [
    b"\x93NUMPY\x03\x00" + struct.pack("<I", 10) + b"{}        ",           # format 3.0: not written by NumPy for these
    npy_header("|O", (6,)),                                                 # objects: a pickle
    npy_header("<f4", (6,)).replace(b"False", b"True "),                    # Fortran order
    npy_header("<c8", (6,)),                                                # complex
    b"\x93NUMPY\x01\x00" + struct.pack("<H", 50000) + b" " * 100,           # a 50 kB header, cut short
    b"\x93NUMPY\x01\x00" + struct.pack("<H", 64) + b"[" * 63 + b"\n",       # deeply nested
    b"\x93NUMPY\x01\x00" + struct.pack("<H", 9000) + (b"{'descr': '<f4', 'fortran_order': False, 'shape': ("
                                                      + b"1," * 4460 + b"), }").ljust(9000),
], ids=["v3", "object", "fortran", "complex", "long header", "nested", "4460 dims"])
def test_an_unusual_npy_header_is_refused(header, tmp_path):
    meta, n = network_meta(listed=False)
    path = write_zip(tmp_path / "head.npz", {"__cprop__.npy": meta_npy(meta), "params.npy": header + bytes(4 * n)})
    with pytest.raises(cprop.CpropFileError, match=mentions("head.npz", "params")):
        cprop.load(path)


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
                         ids=["deflate", "bzip2", "lzma"])
@pytest.mark.parametrize("member", ["__cprop__.npy", "params.npy"])
def test_corrupt_compressed_data_is_a_cprop_file_error(compression, member, tmp_path):
    meta, n = network_meta()
    members = {"__cprop__.npy": meta_npy(meta), "params.npy": npy(np.arange(n, dtype=np.float32))}
    path = write_zip(tmp_path / "c.npz", members, compression)
    assert_array_equal(cprop.load(path).params, np.arange(n))        # the control: intact, it loads
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(member) + len(info.extra)
    for i in range(start, start + info.compress_size):                 # garbage where the stream was
        data[i] = (i * 97 + 13) % 256
    path.write_bytes(bytes(data))
    with pytest.raises(cprop.CpropFileError, match=mentions("c.npz", member[:-4])):
        cprop.load(path)


def saved(kind, tmp_path, optimizer="adam"):
    path = tmp_path / f"{kind}.npz"
    trainer = fitted_trainer(OPTIMIZERS[optimizer]())
    (trainer.net if kind == "network" else trainer).save(path)
    return path


def edited(meta, dotted, value):
    """A copy of meta with the field at `dotted` ("optimizer.config.lr") set to value."""
    meta = json.loads(json.dumps(meta))
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    node[last] = value
    return meta


SGD_FIELDS = ("optimizer.config.nesterov", "optimizer.config.momentum")
BAD_TRAINER_FIELDS = [
    ("optimizer.config.decay_bias", "false"),
    ("optimizer.config.decay_bias", 0),
    ("optimizer.config.decay_per_sample", "true"),
    ("optimizer.config.nesterov", "false"),
    ("optimizer.config.sklearn_style", "true"),
    ("shuffle", "false"),
    ("shuffle", 1),
    ("epochs_done", 10 ** 30),
    ("epochs_done", 2.0),
    ("optimizer.step_count", 2 ** 100),
    ("optimizer.step_count", True),
    ("optimizer.config.lr", "0.1"),
    ("optimizer.config.beta1", 1.0),
    ("optimizer.config.momentum", 1.0),
    ("optimizer.name", ["adam"]),
    ("optimizer.config", []),
    ("rng_state.state.state", 2 ** 200),
    ("rng_state.state.state", 1.5),
    ("rng_state.state.inc", -1),
    ("rng_state.state", None),
    ("rng_state.bit_generator", "MT19937"),
    ("rng_state.has_uint32", True),
    ("history.loss", ["1.5"]),
    ("history.loss", [True]),
    ("history.val_loss", {"a": 1}),
    ("loss", ["mse"]),
    ("loss_scale", True),
    ("batch_size", 10 ** 39),
    ("extra", "notes"),
    ("architecture.layers", [{"kind": "dense", "n_in": 3, "n_out": 10 ** 39}]),
    ("architecture.layers", "tanh"),
    ("architecture.layers", [{"kind": "conv2d"}]),
    ("architecture.layers", [{"kind": "dense", "n_in": 3, "n_out": 4, "activation": ["tanh"]}]),
    ("architecture.layers", [{"kind": "dropout", "p": 1.5}]),
    ("architecture.layers", [{"kind": "batchnorm", "n": 4, "affine": "yes"}]),
    ("architecture.layers", [{"kind": "dense", "n_in": 3, "n_out": 4}, {"kind": "dense", "n_in": 5, "n_out": 2}]),
    ("architecture.dtype", ["float32"]),
    ("architecture.dtype", {"names": ["a"], "formats": ["<f4"]}),
    ("members", []),
    ("members.params", {"dtype": "float32", "shape": "16"}),
    ("members.params", {"dtype": "float64", "shape": [26]}),
    ("members.params", {"dtype": "float32", "shape": [2 ** 40]}),
    ("version", True),
    ("version", 1.0),
]


@pytest.mark.parametrize("field, value", BAD_TRAINER_FIELDS, ids=lambda v: repr(v)[:40])
def test_invalid_trainer_field_is_a_cprop_file_error(field, value, tmp_path):
    path = saved("trainer", tmp_path, "sgd-momentum" if field in SGD_FIELDS else "adam")
    with_meta(path, edited(saved_meta(path), field, value))
    with pytest.raises(cprop.CpropFileError, match="trainer.npz"):
        cprop.Trainer.load(path)


def test_decay_bias_false_loads_as_false(tmp_path):
    trainer = fitted_trainer(cprop.SGD(lr=0.1, weight_decay=0.01))
    trainer.optimizer.decay_bias = False
    trainer.save(tmp_path / "t.npz")
    assert cprop.Trainer.load(tmp_path / "t.npz").optimizer.decay_bias is False


@pytest.mark.parametrize("text, words", [
    (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    (b'{"format": "cprop", "version": 1, "kind": "network", "x": ' + b'{"a": ' * 40 + b"1" + b"}" * 41,
     ["nested"]),
    (b'{"format": "cprop", "version": ' + b"9" * 5000 + b"}", ["digits"]),
    (b'{"format": "cprop", "format": "cprop", "version": 1, "kind": "network"}', ["twice"]),
    (b'{"format": "cprop", "version": 1, "kind": "network"', ["JSON"]),
    (b"\xff\xfe{}", ["UnicodeDecodeError"]),
], ids=["nested lists", "nested objects", "huge integer", "duplicate key", "cut short", "not UTF-8"])
def test_malformed_json_metadata_is_a_cprop_file_error(text, words, tmp_path):
    path = write_zip(tmp_path / "meta.npz", {"__cprop__.npy": npy(np.frombuffer(text, np.uint8))})
    for loader in LOADERS.values():
        with pytest.raises(cprop.CpropFileError, match=mentions("meta.npz", "__cprop__", *words)):
            loader(path)


def meta_values():
    """JSON values, odd ones included: huge numbers, NaN, deep nesting, wrong types."""
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 130, 2 ** 130), st.floats(allow_nan=True),
                       st.text(max_size=8), st.sampled_from(["float32", "float64", "sgd", "adam", "relu", "mse"]))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=12)


def field_paths(meta, prefix=()):
    for key, value in meta.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from field_paths(value, prefix + (key,))


FUZZ_SOURCES = {}


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_metadata_value_gives_a_model_or_a_cprop_file_error(data, tmp_path_factory):
    # every field of a saved trainer's metadata replaced by any JSON value, the zip kept valid
    if not FUZZ_SOURCES:
        tmp = tmp_path_factory.mktemp("fuzz")
        FUZZ_SOURCES["path"] = tmp / "t.npz"
        FUZZ_SOURCES["data"] = saved("trainer", tmp).read_bytes()
    path = FUZZ_SOURCES["path"]
    path.write_bytes(FUZZ_SOURCES["data"])
    meta = saved_meta(path)
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from(sorted(field_paths(meta))))
        meta = edited(meta, ".".join(field), data.draw(meta_values()))
    with_meta(path, meta)
    for loader in LOADERS.values():
        try:
            loaded = loader(path)
        except cprop.CpropFileError:
            continue
        net = getattr(loaded, "net", loaded)
        assert np.isfinite(net.params).all()
        if loader is cprop.Trainer.load:
            loaded.fit(*small_problem(), epochs=1)       # a loaded trainer is fit to train


# -- optimizer state: a trainer that has it must carry it --------------------------------------------

def straight_and_resumed(optimizer, path, edit=None):
    """(4 epochs straight, 2 + save + edit + load + 2) for `optimizer`."""
    X, y = small_problem()
    straight = fitted_trainer(OPTIMIZERS[optimizer](), epochs=4)
    fitted_trainer(OPTIMIZERS[optimizer](), epochs=2).save(path)
    if edit is not None:
        edit(path)
    resumed = cprop.Trainer.load(path)
    resumed.fit(X, y, epochs=2)
    return straight, resumed


def state_members(path):
    return sorted(k for k in saved_meta(path)["members"] if k.startswith("state_"))


def drop_state(path, keep_listing=False, old_format=False):
    """Remove the optimizer's state members, and (unless keep_listing) their listing, or
    (old_format) the whole listing, as in files from before it."""
    meta, states = saved_meta(path), state_members(path)
    assert states                                       # it was saved with its state
    if not keep_listing:
        for state in states:
            del meta["members"][state]
    if old_format:
        del meta["members"]
    with_meta(path, meta, drop=states)
    return states


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam", "adamw"])
def test_a_trainer_file_missing_listed_state_members_is_refused(optimizer, tmp_path):
    path = saved("trainer", tmp_path, optimizer)
    states = drop_state(path, keep_listing=True)
    for loader in LOADERS.values():
        with pytest.raises(cprop.CpropFileError, match=mentions("trainer.npz", "listed but missing", *states)):
            loader(path)


@pytest.mark.parametrize("old_format", [False, True], ids=["listing-edited", "old-format"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_an_adam_file_without_state_is_refused_by_its_step_count(optimizer, old_format, tmp_path):
    path = saved("trainer", tmp_path, optimizer)
    drop_state(path, old_format=old_format)
    with pytest.raises(cprop.CpropFileError, match=mentions("trainer.npz", "3 step(s)", "state", "missing")):
        cprop.Trainer.load(path)


def test_an_old_format_sgd_file_without_momentum_loads_with_a_warning(tmp_path):
    # SGD counts no steps: a file from before member lists cannot tell a lost momentum from
    # none saved (the optimizer replaced after a fit), so it loads, saying what it does
    path = saved("trainer", tmp_path, "sgd-momentum")
    drop_state(path, old_format=True)
    with pytest.warns(UserWarning, match=mentions("trainer.npz", "momentum", "1 epoch")):
        loaded = cprop.Trainer.load(path)
    assert loaded.optimizer.state is None


def test_a_trainer_whose_optimizer_was_replaced_after_a_fit_round_trips(tmp_path, recwarn):
    trainer = fitted_trainer(cprop.SGD(lr=0.1))
    trainer.optimizer = cprop.SGD(lr=0.1, momentum=0.9)
    trainer.save(tmp_path / "t.npz")
    loaded = cprop.Trainer.load(tmp_path / "t.npz")
    assert loaded.optimizer.state is None and repr(loaded.optimizer) == repr(trainer.optimizer)
    assert not recwarn.list


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_a_bit_flipped_member_name_is_refused(optimizer, tmp_path):
    # "state_1.npy" -> "rtate_1.npy" in the zip directory and local header alike (the CRCs
    # cover data, not names): no longer an optimizer state, and not listed
    path = saved("trainer", tmp_path, optimizer)
    data = path.read_bytes()
    assert data.count(b"state_0.npy") == 2
    path.write_bytes(data.replace(b"state_0.npy", b"rtate_0.npy"))
    for loader in LOADERS.values():
        with pytest.raises(cprop.CpropFileError, match=mentions("trainer.npz", "'state_0'", "missing", "'rtate_0'")):
            loader(path)


def test_a_trainer_with_extra_state_members_is_refused(tmp_path):
    path = saved("trainer", tmp_path, "sgd-momentum")
    members = read_members(path)
    members["state_1.npy"] = members["state_0.npy"]
    meta = saved_meta(path)
    meta["members"]["state_1"] = meta["members"]["state_0"]
    members["__cprop__.npy"] = meta_npy(meta)
    write_zip(path, members)
    with pytest.raises(cprop.CpropFileError, match=mentions("state_1", "state_0")):
        cprop.Trainer.load(path)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_an_old_format_file_without_member_listing_resumes_exactly(optimizer, tmp_path):
    def strip_listing(path):
        meta = saved_meta(path)
        del meta["members"]
        with_meta(path, meta)
    straight, resumed = straight_and_resumed(optimizer, tmp_path / "old.npz", strip_listing)
    assert_array_equal(resumed.net.params, straight.net.params)
    assert resumed.optimizer.step_count == straight.optimizer.step_count


def test_plain_sgd_needs_no_state_to_resume_exactly(tmp_path):
    # its one placeholder array carries nothing: without it the resumed fit is the same
    def drop_placeholder(path):
        meta = saved_meta(path)
        del meta["members"]["state_0"]
        with_meta(path, meta, drop=["state_0"])
    straight, resumed = straight_and_resumed("sgd", tmp_path / "sgd.npz", drop_placeholder)
    assert_array_equal(resumed.net.params, straight.net.params)


def test_a_trainer_saved_before_any_step_loads_without_state(tmp_path):
    trainer = fitted_trainer(cprop.Adam(), epochs=0)
    trainer.save(tmp_path / "fresh.npz")
    assert "state_0" not in saved_meta(tmp_path / "fresh.npz")["members"]
    loaded = cprop.Trainer.load(tmp_path / "fresh.npz")
    assert loaded.optimizer.state is None and loaded.optimizer.step_count == 0


def test_saved_metadata_lists_every_member(tmp_path):
    path = saved("trainer", tmp_path, "adam")
    n = cprop.load(path).params.size
    assert saved_meta(path)["members"] == {name: {"dtype": "float32", "shape": [n]}
                                           for name in ("params", "state_0", "state_1")}


# -- saving: modes, symlinks, odd paths -------------------------------------------------------------

@contextlib.contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


SAVERS = {"network": lambda t: t.net.save, "trainer": lambda t: t.save}


@pytest.fixture(params=list(SAVERS))
def save(request):
    return SAVERS[request.param](fitted_trainer(cprop.SGD(lr=0.1, momentum=0.9)))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_a_new_file_gets_the_umasks_mode(mask, save, tmp_path):
    with umask(mask):
        save(tmp_path / "new.npz")
    assert mode_of(tmp_path / "new.npz") == 0o666 & ~mask


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664, 0o640])
def test_an_existing_file_keeps_its_mode(mode, save, tmp_path):
    path = tmp_path / "old.npz"
    path.write_bytes(b"previous")
    path.chmod(mode)
    with umask(0o077):
        save(path)
    assert mode_of(path) == mode
    assert cprop.load(path) is not None


def test_save_writes_through_a_symlink(save, tmp_path):
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "real.npz"
    target.write_bytes(b"previous")
    target.chmod(0o640)
    link = tmp_path / "link.npz"
    link.symlink_to(os.path.join("models", "real.npz"))          # relative, as users make them

    save(link)

    assert link.is_symlink() and os.readlink(link) == os.path.join("models", "real.npz")
    assert cprop.load(target) is not None and mode_of(target) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npz", "models"]       # no temporary files
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["real.npz"]


def test_save_through_a_dangling_symlink_creates_its_target(save, tmp_path):
    link = tmp_path / "link.npz"
    link.symlink_to(tmp_path / "target.npz")
    save(link)
    assert link.is_symlink() and cprop.load(tmp_path / "target.npz") is not None


@pytest.mark.parametrize("name, error, words", [
    ("", ValueError, ["empty"]),
    (".", IsADirectoryError, ["directory"]),
    ("sub", IsADirectoryError, ["directory"]),
    ("sub/", IsADirectoryError, ["directory"]),
    ("nosuchdir/", IsADirectoryError, ["directory"]),
    ("nosuchdir/x.npz", FileNotFoundError, ["nosuchdir"]),
], ids=repr)
def test_save_refuses_a_directory_or_an_empty_path(name, error, words, save, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=mentions(*words)):
        save(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert list((tmp_path / "sub").iterdir()) == []
    assert not any(p.name.endswith(".tmp") for p in tmp_path.parent.iterdir())


def test_save_refuses_to_replace_a_fifo(fifo, save):
    with deadline(20), pytest.raises(cprop.CpropFileError, match=mentions("pipe.npz", "not a regular file")):
        save(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in fifo.parent.iterdir()) == ["pipe.npz"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError(28, "No space left on device")], ids=repr)
def test_an_interrupted_save_leaves_no_temporary_file(error, save, tmp_path, monkeypatch):
    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise error
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(type(error) if isinstance(error, BaseException) else error):
        save(tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == []


# -- every byte damaged, and every length cut: a CpropFileError or the identical model --------------

def trainer_state(trainer):
    opt = trainer.optimizer
    return (trainer.net.architecture(), trainer.net.params.tobytes(), [s.tobytes() for s in opt.state or []],
            repr(opt), opt.step_count, opt.decay_bias, opt.decay_per_sample, trainer.loss, trainer.batch_size,
            trainer.shuffle, trainer.loss_scale, trainer.epochs_done, json.dumps(trainer.rng.bit_generator.state),
            trainer.history.as_dict(), trainer.extra)


def check_damaged(path, expected, loaders):
    for name in loaders:
        try:
            loaded = LOADERS[name](path)
        except cprop.CpropFileError:
            continue
        if name == "Trainer.load":
            assert trainer_state(loaded) == expected["trainer"]
        else:
            assert (loaded.architecture(), loaded.params.tobytes()) == expected["network"]


@pytest.mark.parametrize("kind", ["network", "trainer"])
def test_every_byte_flipped_and_every_truncation(kind, tmp_path):
    trainer = cprop.Trainer(cprop.Sequential([cprop.Dense(2, 2, "relu"), cprop.Dense(2, 2)], seed=0),
                            loss="cross_entropy", optimizer=cprop.Adam(lr=0.01), batch_size=4, seed=0)
    X, y = small_problem(8)
    trainer.fit(X[:, :2], y, epochs=1)
    path = tmp_path / "damaged.npz"
    (trainer.net if kind == "network" else trainer).save(path)
    data = path.read_bytes()
    expected = {"network": (trainer.net.architecture(), trainer.net.params.tobytes())}
    if kind == "trainer":
        expected["trainer"] = trainer_state(cprop.Trainer.load(path))
    check_damaged(path, expected, list(LOADERS))             # the control: undamaged, it loads
    # through the loader of the file's kind: cprop.load reads a trainer file with the same code
    # as a network file, and Trainer.load refuses a network file by its kind
    loaders = ["cprop.load"] if kind == "network" else ["Trainer.load"]
    rng = np.random.default_rng(0)
    with open(path, "r+b", buffering=0) as f:                 # each byte changed in place, then put back
        for i in range(len(data)):
            f.seek(i)
            f.write(bytes([data[i] ^ int(rng.integers(1, 256))]))
            check_damaged(path, expected, loaders)
            f.seek(i)
            f.write(data[i:i + 1])
    assert path.read_bytes() == data
    for length in range(len(data) - 1, -1, -1):
        os.truncate(path, length)
        check_damaged(path, expected, loaders)
