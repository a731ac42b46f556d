"""cprop's file format: a NumPy .npz archive, never pickled, written atomically.

An archive holds
  ``__cprop__``  a JSON document (UTF-8 bytes in a uint8 array): ``{"format": "cprop",
                 "version": 1, "kind": "network" | "trainer", "members": {...}, ...}`` with the
                 architecture (layer sizes, activations, dtype) and, for a trainer, the loss,
                 optimizer, epoch count, random state and history;
  ``params``     the flat parameter array, laid out W0 b0 W1 b1 … (row-major W);
  ``state_<i>``  for a trainer, the optimizer's state arrays (momentum, Adam moments).

``members`` lists every array with its dtype and shape, so that a member that went
missing (or whose name a flipped bit changed) is noticed. Files written before it was
added have no ``members``; they are still read, with every array checked against what
the architecture and the optimizer need, only without that cross-check.

Reading trusts nothing in the file:

* only a regular file is opened (a FIFO would block forever, ``/dev/zero`` never ends);
* the metadata is read first, and the kind checked, before any array;
* every array is read only after the zip directory's declared sizes and the .npy
  header's dtype and shape have been checked against what the caller needs, and no
  more bytes than that are ever decompressed. cprop writes its members uncompressed;
  a member that another tool compressed may expand at most ``MAX_EXPANSION`` times
  (floating-point weights compress far less), so a small file cannot make the
  loader allocate gigabytes;
* nothing is unpickled: only plain numeric .npy headers are accepted.

Anything wrong raises :class:`CpropFileError` naming the file and the fault.
"""
import json
import math
import os
import re
import secrets
import stat
import struct
import zipfile
import zlib

import numpy as np

_LZMA_ERRORS: tuple[type[Exception], ...]
try:
    import lzma
    _LZMA_ERRORS = (lzma.LZMAError,)
except ImportError:                     # a Python built without lzma cannot read such members anyway
    _LZMA_ERRORS = ()

FORMAT = "cprop"
VERSION = 2              # 2: a list of layers of any kind, running statistics (1: Dense widths)
READABLE_VERSIONS = (1, 2)
META_KEY = "__cprop__"

MAX_META_BYTES = 64 << 20     # the JSON: architecture, settings, history — megabytes at most
MAX_MEMBERS = 64              # params, the metadata and a few state arrays: far fewer in practice
MAX_JSON_DEPTH = 32           # cprop's own metadata nests 4 deep
MAX_INT_DIGITS = 40           # the random generator's 128-bit state is the largest integer saved
MAX_EXPANSION = 32            # compressed members: uncompressed size <= 1 MiB + 32 x compressed
_EXPANSION_SLACK = 1 << 20
_MAX_NPY_HEADER = 10000       # NumPy's own limit for untrusted headers
MAX_NPY_DIMS = 32             # NumPy allows 64; cprop's arrays have 1
_CHUNK = 1 << 22              # arrays are read in pieces of this size: no second full-size copy

# errors a damaged zip member raises while it is opened or decompressed
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError,
               ValueError, struct.error, OverflowError) + _LZMA_ERRORS

# a plain numeric .npy header as NumPy writes it: {'descr': '<f4', 'fortran_order': False, 'shape': (12,), }
_NPY_HEADER = re.compile(r"\{\s*'descr'\s*:\s*'(?P<descr>[<>|=][biuf][1248])'\s*,"
                         r"\s*'fortran_order'\s*:\s*(?P<fortran>True|False)\s*,"
                         r"\s*'shape'\s*:\s*\((?P<shape>[0-9,\s]*)\)\s*,?\s*\}\s*")


class CpropFileError(ValueError):
    """A file cprop cannot read: not a regular file, truncated, corrupted, foreign, too new,
    or describing more data than it holds."""


# -- writing ------------------------------------------------------------------------------

def save_archive(path, meta, arrays, check_meta=None):
    """Write meta and arrays to `path` atomically (see :func:`write_atomically`).

    The metadata is checked as :func:`open_archive` will read it (JSON nesting, integer
    sizes, total size), and by `check_meta` (the reader's own check of its fields, on
    the metadata as read back), so that nothing is written that cprop would refuse to load.

    Raises
    ------
    ValueError — `path` is empty, or the metadata is not what a reader would accept.
    IsADirectoryError — `path` names a directory.
    FileNotFoundError — the directory does not exist.
    """
    members = {name: np.ascontiguousarray(arr) for name, arr in arrays.items()}
    meta = dict(meta, format=FORMAT, version=VERSION,
                members={k: {"dtype": a.dtype.name, "shape": list(a.shape)} for k, a in members.items()})
    try:
        raw = json.dumps(meta).encode("utf-8")
        parsed = _parse_meta(raw)
        if check_meta is not None:
            check_meta(parsed)
    except (RecursionError, TypeError, ValueError, KeyError, OverflowError) as exc:
        raise ValueError(f"cannot save to {os.fspath(path)!r}: cprop could not load what it would write "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    payload = {META_KEY: np.frombuffer(raw, dtype=np.uint8), **members}
    write_atomically(path, lambda f: np.savez(f, **payload))


def write_atomically(path, write):
    """Call ``write(f)`` on a binary file that becomes `path` only once complete.

    The data go to a temporary file in the target's directory, are flushed to
    disk, and the file is renamed over the target, so a crash or a full disk
    midway leaves any previous file untouched and no temporary file behind.
    As with any file a program writes: a new file gets the mode the umask
    allows (0666 & ~umask), an existing file keeps its mode, and a symbolic
    link is written through (its target is replaced, the link stays).

    Raises
    ------
    ValueError — `path` is empty.
    IsADirectoryError — `path` names a directory.
    FileNotFoundError — the directory does not exist.
    """
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError("cannot save to an empty path; give a file name")
    if path.endswith((os.sep, os.altsep or os.sep)):
        raise IsADirectoryError(f"cannot save to {path!r}: it names a directory, give a file name")
    target = os.path.realpath(path)          # through any symbolic links, to the file they name
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        mode = None
    else:
        if stat.S_ISDIR(existing.st_mode):
            raise IsADirectoryError(f"cannot save to {path!r}: it is a directory, give a file name")
        if not stat.S_ISREG(existing.st_mode):
            raise CpropFileError(f"cannot save to {path!r}: {target!r} exists and is not a regular file")
        mode = stat.S_IMODE(existing.st_mode)

    try:
        fd, tmp = _create_temporary(directory)
    except OSError as exc:
        # the temporary file is cprop's detail: the error names the file asked for
        raise type(exc)(exc.errno, f"cannot create a file in {directory!r} ({exc.strerror or exc})",
                        path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            fd = None                        # the file object owns it now
            if mode is not None:             # an existing file keeps its mode
                _set_mode(f.fileno(), tmp, mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _set_mode(fd, path, mode):
    """On the descriptor where the OS allows: a path could be swapped for a symlink meanwhile."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:
        os.chmod(path, mode)


def _create_temporary(directory):
    """(fd, path) of a new, empty file in `directory`. Created with mode 0666, which
    the kernel narrows by the umask, as for any new file (mkstemp would give 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".cprop-{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory!r}")


def _fsync_directory(directory):
    """Make the rename itself durable; some file systems cannot, which costs only durability."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------------

def open_regular_file(path):
    """A binary file object for `path`, which must be a regular file.

    Checked before opening (opening a device can have effects) and again on the
    opened descriptor (the path may have been swapped in between). The open does
    not block, so a FIFO without a writer is refused rather than waited on.
    """
    path = os.fspath(path)
    _check_regular(path, os.stat(path).st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        # O_NONBLOCK only kept the open from waiting: reads of a regular file never block
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_regular(path, mode):
    if stat.S_ISREG(mode):
        return
    what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise CpropFileError(f"{path!r} is {what}; cprop reads only regular files")


class Archive:
    """An open cprop archive: checked metadata, and arrays read one at a time, on demand.

    Opening reads the zip directory and the metadata only. :meth:`read` then
    decompresses an array after checking its declared size and .npy header
    against the dtype and shape the caller expects. Use as a context manager.

    Attributes
    ----------
    path : the path as given
    meta : dict — the JSON metadata, format, version and kind checked
    names : frozenset — the arrays in the archive (zip members without the ``.npy``)
    listed : bool — whether the metadata lists the members (False in files from before
        the listing); when it does, `names` has been checked against it
    """

    def __init__(self, path, kinds=None):
        self.path = os.fspath(path)
        self._file = open_regular_file(self.path)
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            with self._reading("its zip directory"):
                try:
                    self._zip = zipfile.ZipFile(self._file)
                except zipfile.BadZipFile as exc:
                    raise self.error(f"not a cprop file: {exc}") from None
                infos = self._zip.infolist()
            self._infos = self._index(infos)
            self.names = frozenset(self._infos) - {META_KEY}
            self._listed = None
            self.meta = self._read_meta(kinds)
            self._listed = self._listing()
            self.listed = self._listed is not None
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        zf = getattr(self, "_zip", None)
        if zf is not None:
            zf.close()
        self._file.close()

    def error(self, message):
        """A CpropFileError about this file."""
        return CpropFileError(f"{self.path!r}: {message}")

    def _reading(self, what):
        return _Reading(self, what)

    def _index(self, infos):
        if len(infos) > MAX_MEMBERS:
            raise self.error(f"holds {len(infos)} members; a cprop file holds at most {MAX_MEMBERS}")
        index = {}
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise self.error(f"member {info.filename!r} is not a .npy array; not a cprop file")
            name = info.filename[:-len(".npy")]
            if name in index:
                raise self.error(f"member {info.filename!r} appears twice")
            index[name] = info
        if META_KEY not in index:
            raise self.error(f"not a cprop file (no {META_KEY!r} entry)")
        return index

    def _read_meta(self, kinds):
        raw = self.read(META_KEY, np.uint8, max_bytes=MAX_META_BYTES)
        try:
            meta = _parse_meta(raw.tobytes())
        except RecursionError:
            raise self.error(f"its {META_KEY!r} entry is nested too deeply to be cprop's metadata") from None
        except ValueError as exc:     # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self.error(f"its {META_KEY!r} entry is not valid metadata "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise self.error("not a cprop file (its metadata does not say format 'cprop')")
        version = meta.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise self.error(f"format version {version!r}; this cprop reads versions {READABLE_VERSIONS}")
        if kinds is not None and meta.get("kind") not in kinds:
            raise self.error(f"holds a {meta.get('kind')!r}, expected one of {tuple(kinds)}")
        return meta

    def _listing(self):
        """{name: (dtype name, shape)} from the metadata's ``members``, checked against the zip
        directory; None for a file written before ``members`` existed."""
        if "members" not in self.meta:
            return None
        listed = self.meta["members"]
        if not isinstance(listed, dict):
            raise self.error(f"'members' must be a mapping, got {type(listed).__name__}")
        out = {}
        for name, spec in listed.items():
            if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str)
                    and isinstance(spec.get("shape"), list)
                    and all(type(n) is int and n >= 0 for n in spec["shape"])):
                raise self.error(f"'members' entry {name!r} must be {{'dtype': str, 'shape': [int, ...]}}, "
                                 f"got {spec!r:.200}")
            out[name] = (spec["dtype"], tuple(spec["shape"]))
        missing, unlisted = sorted(set(out) - self.names), sorted(self.names - set(out))
        if missing or unlisted:
            raise self.error("its members do not match the list in its metadata: "
                             + "; ".join([f"{missing} listed but missing"] * bool(missing)
                                         + [f"{unlisted} present but not listed"] * bool(unlisted)))
        return out

    def read(self, name, dtype=None, shape=None, max_bytes=None):
        """The array `name`, after checking its dtype and shape.

        dtype, shape : what the caller needs (None: whatever the listing or, for an
            old file, the .npy header says); the array is refused unless it is exactly that.
        max_bytes : refuse a larger array.
        """
        info = self._infos.get(name)
        if info is None:
            raise self.error(f"member {name!r} is missing")
        want_dtype = None if dtype is None else np.dtype(dtype).name
        want_shape = None if shape is None else tuple(shape)
        if self._listed is not None and name in self._listed:
            listed_dtype, listed_shape = self._listed[name]
            if want_dtype not in (None, listed_dtype) or want_shape not in (None, listed_shape):
                raise self.error(f"member {name!r} is listed as {listed_dtype} {listed_shape}, "
                                 f"expected {_either(want_dtype, listed_dtype)} {_either(want_shape, listed_shape)}")
            want_dtype, want_shape = listed_dtype, listed_shape
        self._check_declared_sizes(name, info)
        with self._reading(f"member {name!r}"), self._zip.open(info) as f:
            header_dtype, header_shape, header_len = self._read_npy_header(name, f)
            native = header_dtype.newbyteorder("=")
            if want_dtype not in (None, native.name) or want_shape not in (None, header_shape):
                raise self.error(f"member {name!r} holds {native.name} {header_shape}, expected "
                                 f"{_either(want_dtype, native.name)} {_either(want_shape, header_shape)}")
            nbytes = math.prod(header_shape) * header_dtype.itemsize
            if max_bytes is not None and nbytes > max_bytes:
                raise self.error(f"member {name!r} holds {nbytes} bytes, more than the {max_bytes} allowed")
            if info.file_size != header_len + nbytes:
                raise self.error(f"member {name!r} declares {info.file_size} bytes, its header "
                                 f"({header_dtype.name} {header_shape}) needs {header_len + nbytes}")
            out = np.empty(header_shape, dtype=header_dtype)
            view = memoryview(out.reshape(-1).view(np.uint8))
            done = 0
            while done < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - done))
                if not chunk:
                    raise self.error(f"member {name!r} ends after {done} of {nbytes} bytes")
                view[done:done + len(chunk)] = chunk
                done += len(chunk)
            if f.read(1):      # also makes zipfile check the CRC, which it does at the member's end
                raise self.error(f"member {name!r} holds more data than its header describes")
        if not header_dtype.isnative:
            out = out.byteswap().view(native)
        return out

    def _check_declared_sizes(self, name, info):
        """From the zip directory alone, before decompressing anything."""
        if info.compress_size > self._size:
            raise self.error(f"member {name!r} declares {info.compress_size} compressed bytes, "
                             f"the file has {self._size}")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise self.error(f"member {name!r} is stored uncompressed, yet declares {info.file_size} "
                                 f"bytes in {info.compress_size}")
        elif info.file_size > _EXPANSION_SLACK + MAX_EXPANSION * info.compress_size:
            raise self.error(f"member {name!r} declares {info.file_size} bytes compressed into "
                             f"{info.compress_size}: more than {MAX_EXPANSION}x expansion, which no "
                             f"model's numbers reach (a zip bomb?)")

    def _read_npy_header(self, name, f):
        """(dtype, shape, header length) of a plain C-ordered numeric .npy array."""
        magic = f.read(8)
        if len(magic) != 8 or magic[:6] != b"\x93NUMPY" or magic[6:] not in (b"\x01\x00", b"\x02\x00"):
            raise self.error(f"member {name!r} is not a .npy array of format 1.0 or 2.0")
        size_format = "<H" if magic[6] == 1 else "<I"
        raw = f.read(struct.calcsize(size_format))
        if len(raw) != struct.calcsize(size_format):
            raise self.error(f"member {name!r} has a truncated .npy header")
        length = struct.unpack(size_format, raw)[0]
        if length > _MAX_NPY_HEADER:
            raise self.error(f"member {name!r} has a {length}-byte .npy header; at most {_MAX_NPY_HEADER} allowed")
        text = f.read(length)
        match = _NPY_HEADER.fullmatch(text.decode("latin1")) if len(text) == length else None
        if match is None:
            raise self.error(f"member {name!r} does not have a plain numeric .npy header "
                             f"(got {text[:120]!r}); nothing else is read, pickles least of all")
        if match["fortran"] == "True":
            raise self.error(f"member {name!r} is stored in Fortran order; cprop writes C order")
        dims = [d.strip() for d in match["shape"].split(",")]
        if dims and dims[-1] == "":
            dims.pop()
        if (len(dims) > MAX_NPY_DIMS or any(not d.isdigit() or len(d) > 19 for d in dims)
                or (len(dims) == 1 and "," not in match["shape"])):
            raise self.error(f"member {name!r} has a malformed or over-dimensioned shape in its .npy header: "
                             f"({match['shape']})")
        return np.dtype(match["descr"]), tuple(int(d) for d in dims), 8 + len(raw) + length


class _Reading:
    """Turns the errors a damaged zip member raises into a CpropFileError naming the member."""

    def __init__(self, archive, what):
        self.archive, self.what = archive, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, CpropFileError) or not isinstance(exc, _ZIP_ERRORS):
            return False
        raise self.archive.error(f"cannot read {self.what} ({type(exc).__name__}: {str(exc)[:200]})") from None


def _either(wanted, found):
    return found if wanted is None else wanted


def _bounded_int(text):
    """JSON integers of at most MAX_INT_DIGITS digits: a 10,000-digit one is no setting of cprop's."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key appears twice in {keys[:20]}")
    return dict(pairs)


def _parse_meta(raw):
    """The metadata from its JSON bytes, bounded as files are read (size, integers, nesting)."""
    if len(raw) > MAX_META_BYTES:
        raise ValueError(f"{len(raw)} bytes of metadata, more than {MAX_META_BYTES}")
    meta = json.loads(raw.decode("utf-8"), parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    _check_depth(meta)
    return meta


def _check_depth(obj):
    """ValueError if `obj` nests deeper than MAX_JSON_DEPTH (iteratively: no recursion)."""
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
                     if isinstance(child, (dict, list)))


def open_archive(path, kinds=None):
    """An :class:`Archive` for `path`; CpropFileError unless it is a cprop archive of one of `kinds`."""
    return Archive(path, kinds)


def load_archive(path, kind=None):
    """(meta, arrays) with every array in a cprop archive, each checked against its
    listing in the metadata (or, in an older file, its own header) and bounded as
    :meth:`Archive.read` is; CpropFileError unless it is a valid archive."""
    with Archive(path, kind) as archive:
        return archive.meta, {name: archive.read(name) for name in sorted(archive.names)}
