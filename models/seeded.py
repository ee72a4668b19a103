"""Per-request generators in the state ``np.random.default_rng(seed)`` starts in, cheaper.

Serving seeds a generator from each request id (category sampling, the scorer duel's
team draft), so a replay draws the same numbers. ``default_rng(seed)`` costs ~20 us, of
which ~6 us are ``SeedSequence.generate_state`` (numpy scalar arithmetic under an
``errstate``) and the rest making two objects. ``SeededGenerator`` keeps one PCG64
generator and sets its state instead: the ``SeedSequence`` pool (numpy), its four
64-bit words (``generate_state``'s hash, here in Python ints) and PCG64's seeding step
(``pcg64_srandom_r``: 128-bit arithmetic). The numbers are ``default_rng(seed)``'s
(checked once per object against ``default_rng`` on probe seeds; if numpy seeds
otherwise, every call returns ``default_rng(seed)``).

Not thread-safe, and the generator returned is valid until the next call: one object
per owner (one user shard's serving), used within a call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
"""PCG64's 128-bit LCG multiplier (``PCG_DEFAULT_MULTIPLIER_128``)."""
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
"""``SeedSequence.generate_state``'s hash constants."""
_HASH = [_INIT_B]
for _ in range(8):
    _HASH.append((_HASH[-1] * _MULT_B) & _M32)
_PROBES = (0, 1, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1, 0x9E3779B97F4A7C15)


def _entropy(seed: int) -> int | np.ndarray:
    """``seed`` as ``SeedSequence`` reads it: a seed of two 32-bit words (a 64-bit hash
    almost always is) as the uint32 array of those words, low first, which
    ``SeedSequence`` takes as it is: the same pool as from the int, without numpy's
    Python-level split of an int into words (~9k fewer instructions); other seeds as
    they are."""
    if _M32 < seed <= _M64:
        return np.array((seed & _M32, seed >> 32), np.uint32)
    return seed


class SeededGenerator:
    """``__call__(seed)``: a generator in ``np.random.default_rng(seed)``'s state."""

    def __init__(self) -> None:
        self._bits = np.random.PCG64(0)
        self._gen = np.random.Generator(self._bits)
        self._exact = all(
            np.array_equal(self(seed).random(4), np.random.default_rng(seed).random(4))
            for seed in _PROBES)

    def __call__(self, seed: int) -> np.random.Generator:
        if not getattr(self, "_exact", True):
            return np.random.default_rng(seed)
        pool = np.random.SeedSequence(_entropy(seed)).pool.tolist()
        words = []
        for i in range(8):  # generate_state(4, np.uint64) as eight 32-bit words
            v = ((pool[i & 3] ^ _HASH[i]) * _HASH[i + 1]) & _M32
            words.append(v ^ (v >> 16))
        initstate = (words[1] << 96) | (words[0] << 64) | (words[3] << 32) | words[2]
        initseq = (words[5] << 96) | (words[4] << 64) | (words[7] << 32) | words[6]
        inc = ((initseq << 1) | 1) & _M128
        self._bits.state = {"bit_generator": "PCG64",
                            "state": {"state": ((inc + initstate) * _PCG_MULT + inc) & _M128,
                                      "inc": inc},
                            "has_uint32": 0, "uinteger": 0}
        return self._gen

    def __getstate__(self) -> dict[str, Any]:
        """Nothing to keep: a restored one makes (and checks) its generator again."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
