"""A fast reader and writer of the uncompressed ``.npz`` files the snapshot store holds.

``np.load`` on an ``.npz`` opens each member through ``zipfile`` and parses its ``.npy``
header with ``ast.literal_eval``: ~80 us a member, ~4 ms for an item table's ~50
members, paid by every new table version a process loads. ``load_npz`` reads the file
once, finds each stored member's data through its zip local header and parses the
header numpy writes (``{'descr': ..., 'fortran_order': ..., 'shape': (...), }``) with
one regular expression: the same arrays (dtype, shape, values; each a copy with its own
memory, writable). Anything else (a compressed member, another header form, an object
dtype, a truncated member) is read by ``np.load`` instead, so the answer never differs.

``save_npz`` writes what ``np.savez`` writes for the same arrays (an uncompressed zip of
``.npy`` members, format 1.0 headers, read back equal by ``np.load`` and ``load_npz``)
in one pass: each member's local header, ``.npy`` header and data (the array's own
memory, no copy), then the central directory. ``np.savez`` opens every member through
``zipfile`` (headers written, sought back and rewritten for zip64, the data copied into
bytes): ~9 ms for an item table's ~50 members (1.5 MB) vs ~4.5 ms here, paid by every
version of every kind. Members carry a fixed time (1980-01-01), so equal arrays give
equal files.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from state.bounded import memo_put

_DOS_TIME = (0, (1980 - 1980) << 9 | 1 << 5 | 1)
"""Zip time and date fields of every member written: 00:00:00 on 1980-01-01."""
_ZIP_MAX = 0xFFFF_FFFF
_PLAIN_KINDS = frozenset("biufcSU")
"""dtype kinds written directly (numbers, bools, fixed-size strings); others go to
``np.savez`` (its pickling rules, its headers)."""

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


def save_npz(file: str | os.PathLike | BinaryIO, arrays: Mapping[str, Any]) -> None:
    """``np.savez(file, **arrays)`` (uncompressed), faster; anything it would write
    differently (an object or other dtype, a non-ASCII name, a zip64-sized archive, a
    header past format 1.0) is left to ``np.savez`` itself."""
    parts: list[Any] = []
    central: list[bytes] = []
    offset = 0
    for name, value in arrays.items():
        arr = np.asanyarray(value)
        fname = f"{name}.npy"
        if arr.dtype.kind not in _PLAIN_KINDS or not fname.isascii() or arr.dtype.hasobject:
            return _savez(file, arrays)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # np.savez writes the same values in C order
        header = _npy_header(arr)
        if header is None:  # a header too large for format 1.0
            return _savez(file, arrays)
        data = arr.reshape(-1).view(np.uint8).data if arr.size else b""
        size = len(header) + arr.nbytes
        crc = zlib.crc32(data, zlib.crc32(header))
        encoded = fname.encode("ascii")
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, *_DOS_TIME, crc, size, size,
                            len(encoded), 0) + encoded
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, *_DOS_TIME,
                                   crc, size, size, len(encoded), 0, 0, 0, 0, 0o600 << 16,
                                   offset) + encoded)
        parts += (local, header, data)
        offset += len(local) + size
        if offset > _ZIP_MAX:
            return _savez(file, arrays)
    directory = b"".join(central)
    if len(central) > 0xFFFF or offset + len(directory) > _ZIP_MAX:
        return _savez(file, arrays)
    parts += (directory, struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central),
                                     len(central), len(directory), offset, 0))
    if hasattr(file, "write"):
        file.writelines(parts)  # type: ignore[union-attr]
        return None
    with open(file, "wb") as f:
        f.writelines(parts)
    return None


_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
"""``.npy`` format 1.0 headers written, by (dtype string, shape) of a C-ordered array
without fields or metadata (what the header holds): most members of a kind's versions
(scalars, configs) keep their shape. Emptied when it holds ``MAX_HEADERS``."""
MAX_HEADERS = 4_096


def _npy_header(arr: np.ndarray) -> bytes | None:
    """The ``.npy`` format 1.0 header numpy writes for ``arr`` (C-contiguous, a plain
    kind), None when it does not fit format 1.0; memoised in ``_HEADERS``."""
    plain = arr.dtype.names is None and arr.dtype.metadata is None
    key = (arr.dtype.str, arr.shape)
    if plain and (header := _HEADERS.get(key)) is not None:
        return header
    head = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    except ValueError:
        return None
    header = head.getvalue()
    if plain:
        memo_put(_HEADERS, key, header, MAX_HEADERS)
    return header


def _savez(file: str | os.PathLike | BinaryIO, arrays: Mapping[str, Any]) -> None:
    """``np.savez`` into ``file`` (a path as given: ``np.savez`` would add ``.npz``)."""
    if hasattr(file, "write"):
        np.savez(file, **arrays)
        return
    with open(file, "wb") as f:
        np.savez(f, **arrays)
