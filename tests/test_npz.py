"""``state/npz.py``: ``save_npz`` writes what ``np.savez`` writes (read back equal by
``np.load`` and ``load_npz``), and ``load_npz`` reads what ``np.load`` reads."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from state.npz import load_npz, save_npz


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    big = rng.random((700, 300))
    return {
        "scalar": np.asarray(7, np.int64),
        "flag": np.asarray(True),
        "shard": np.asarray("i001_1"),
        "empty": np.zeros(0, np.float64),
        "empty2": np.zeros((0, 4), np.int32),
        "ints": rng.integers(-5, 5, 1000).astype(np.int32),
        "floats": rng.random(333),
        "matrix": big,
        "fortran": np.asfortranarray(big[:50, :20]),
        "strided": big[::3, 1::7],
        "names": np.asarray(["a", "bb", "héllo", ""], dtype=np.str_),
        "bytes": np.asarray([b"x", b"yz"]),
        "bools": rng.random(17) > 0.5,
        "u8": np.arange(256, dtype=np.uint8),
        "f32": rng.random((3, 4, 5)).astype(np.float32),
    }


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert np.array_equal(got[k], v), k


def test_save_npz_reads_back_as_np_savez_does(tmp_path: Path) -> None:
    arrays = _arrays()
    save_npz(tmp_path / "fast", arrays)  # a path written as given (no ".npz" added)
    with open(tmp_path / "slow.npz", "wb") as f:
        np.savez(f, **arrays)
    with np.load(tmp_path / "fast", allow_pickle=False) as z, \
            np.load(tmp_path / "slow.npz", allow_pickle=False) as y:
        fast = {k: z[k] for k in z.files}
        _same(fast, {k: y[k] for k in y.files})
    _same(fast, arrays)
    _same(dict(load_npz(tmp_path / "fast")), arrays)
    assert zipfile.ZipFile(tmp_path / "fast").testzip() is None  # every member's CRC
    buffer = io.BytesIO()
    save_npz(buffer, arrays)  # a file object
    assert buffer.getvalue() == (tmp_path / "fast").read_bytes()  # equal arrays, equal bytes


def test_what_save_npz_does_not_write_itself_goes_to_np_savez(tmp_path: Path) -> None:
    when = np.asarray(["2026-12-06"], dtype="datetime64[D]")
    pairs = np.zeros(3, dtype=[("a", np.int32), ("b", np.float64)])
    save_npz(tmp_path / "x", {"n": np.arange(3), "when": when, "pairs": pairs})
    with np.load(tmp_path / "x", allow_pickle=False) as z:
        assert z["when"].tolist() == when.tolist() and z["pairs"].dtype == pairs.dtype
        assert z["n"].tolist() == [0, 1, 2]


def test_memoised_headers_are_the_ones_numpy_writes() -> None:
    """``_npy_header`` gives numpy's own format 1.0 header for each array, the first time
    (computed) and again (from the memo), also after the memo was emptied when full."""
    import state.npz as npz

    arrays = [np.ascontiguousarray(a) for a in _arrays().values()]
    arrays += [np.zeros((1, 5)), np.zeros((5, 1)), np.zeros(5, ">f8"), np.zeros(3, "<U12")]

    def numpy_header(arr: np.ndarray) -> bytes:
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
        return head.getvalue()

    npz._HEADERS.clear()
    for _ in range(2):
        assert [npz._npy_header(a) for a in arrays] == [numpy_header(a) for a in arrays]
    assert len(npz._HEADERS) == len({(a.dtype.str, a.shape) for a in arrays})
    old_max, npz.MAX_HEADERS = npz.MAX_HEADERS, 3
    npz._HEADERS.clear()
    try:
        assert [npz._npy_header(a) for a in arrays] == [numpy_header(a) for a in arrays]
        assert len(npz._HEADERS) <= 3
    finally:
        npz.MAX_HEADERS = old_max
