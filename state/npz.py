"""A fast reader of the uncompressed ``.npz`` files the snapshot store holds.

``np.load`` on an ``.npz`` opens each member through ``zipfile`` and parses its ``.npy``
header with ``ast.literal_eval``: ~80 us a member, ~4 ms for an item table's ~50
members, paid by every new table version a process loads. ``load_npz`` reads the file
once, finds each stored member's data through its zip local header and parses the
header numpy writes (``{'descr': ..., 'fortran_order': ..., 'shape': (...), }``) with
one regular expression: the same arrays (dtype, shape, values; each a copy with its own
memory, writable). Anything else (a compressed member, another header form, an object
dtype, a truncated member) is read by ``np.load`` instead, so the answer never differs.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zipfile
from collections.abc import Container
from pathlib import Path

import numpy as np

_HEADER = re.compile(r"\{'descr': '([^']+)', 'fortran_order': (False|True), "
                     r"'shape': \(([0-9, ]*)\), \}\s*\Z")
_MAGIC = b"\x93NUMPY"
_LOCAL = b"PK\x03\x04"


class _Unsupported(Exception):
    """A member this reader leaves to ``np.load``."""


class NpzArrays(dict[str, np.ndarray]):
    """The arrays of one ``.npz`` file by name; ``files`` lists the names, as on
    ``np.load``'s ``NpzFile``."""

    @property
    def files(self) -> list[str]:
        return list(self)


def load_npz(path: str | os.PathLike, names: Container[str] | None = None) -> NpzArrays:
    """Every array of the ``.npz`` file at ``path`` by name, as ``np.load(path)[name]``
    gives it (``allow_pickle=False``); only those in ``names`` when given (the others are
    not decoded)."""
    data = Path(path).read_bytes()
    try:
        return _members(data, names)
    except (_Unsupported, zipfile.BadZipFile, struct.error, ValueError, UnicodeDecodeError):
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return NpzArrays((name, z[name]) for name in z.files
                             if names is None or name in names)


def _members(data: bytes, names: Container[str] | None) -> NpzArrays:
    out = NpzArrays()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise _Unsupported(info.filename)
            if names is not None and info.filename[:-4] not in names:
                continue
            at = info.header_offset
            if data[at:at + 4] != _LOCAL:
                raise _Unsupported(info.filename)
            name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
            start = at + 30 + name_len + extra_len
            out[info.filename[:-4]] = _array(data, start, start + info.file_size)
    return out


def _array(data: bytes, start: int, end: int) -> np.ndarray:
    """The ``.npy`` array stored in ``data[start:end]``."""
    if data[start:start + 6] != _MAGIC:
        raise _Unsupported("not an .npy member")
    major = data[start + 6]
    if major == 1:
        (size,), begin = struct.unpack_from("<H", data, start + 8), start + 10
    elif major in (2, 3):
        (size,), begin = struct.unpack_from("<I", data, start + 8), start + 12
    else:
        raise _Unsupported(f"npy format {major}")
    header = data[begin:begin + size].decode("latin1" if major < 3 else "utf8")
    match = _HEADER.match(header)
    if match is None:
        raise _Unsupported(header)
    dtype = np.dtype(match[1])
    if dtype.hasobject:
        raise _Unsupported("object dtype")
    shape = tuple(int(x) for x in match[3].split(",") if x.strip())
    count = math.prod(shape)
    body = begin + size
    if body + count * dtype.itemsize > end:
        raise _Unsupported("truncated member")
    flat = np.frombuffer(data, dtype, count, body).copy()
    if match[2] == "True":
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)
