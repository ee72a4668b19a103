"""``state/packing.py``: ``pack_strings`` gives the per-string UTF-8 encoding's blob and
offsets on every path (ASCII in one piece, others one by one), and ``unpack_strings`` inverts it."""

from __future__ import annotations

import numpy as np
import pytest

from state.packing import pack_strings, unpack_strings


def _by_definition(items: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = [s.encode("utf-8") for s in items]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in data])]).astype(np.int64)
    return np.frombuffer(b"".join(data), np.uint8), offsets


@pytest.mark.parametrize("items", [
    [], [""], ["1042", "7", "", "i_x-9"], [str(i) for i in range(3_000)],
    ["héllo", "a", "日本", "", "\U0001f600"], [np.str_("np"), "plain"],
])
def test_pack_strings_is_the_per_string_encoding(items: list[str]) -> None:
    blob, offsets = pack_strings(items)
    want_blob, want_offsets = _by_definition(items)
    assert blob.dtype == np.uint8 and offsets.dtype == np.int64
    assert blob.tobytes() == want_blob.tobytes() and offsets.tolist() == want_offsets.tolist()
    assert blob.flags.writeable and unpack_strings(blob, offsets) == list(items)


def test_pack_strings_refuses_what_it_always_refused() -> None:
    with pytest.raises(AttributeError):
        pack_strings(["a", 3])  # type: ignore[list-item]
    with pytest.raises(UnicodeEncodeError):
        pack_strings(["a", "\ud800"])
