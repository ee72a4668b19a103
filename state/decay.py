"""Exponential time decay that cannot overflow, for any two event times the parser accepts.

Decayed counts are multiplied by ``2 ** (-(now - then) / half_life)``. Going back in
time (``now`` before ``then``: an old event meets a newer table) the exponent grows:
1970 against 2100 with a 6-hour half-life is ~190,000 half-lives, and Python's
``2.0 ** x`` / ``math.exp2`` raise ``OverflowError`` past x ~ 1024. These helpers cap
the exponent at ``MAX_EXP2`` (a finite factor, ~1.2e77, that leaves room to multiply
counts and a second factor without reaching inf) and let the other side underflow to
0.0, so decay is total: every input gives a finite, non-negative factor. Within
``MAX_EXP2`` half-lives of each other, results are exactly the plain formula's.
"""

from __future__ import annotations

import math

MAX_EXP2 = 256.0
"""Largest exponent used: factors are at most 2**256."""

_LN2 = math.log(2.0)


def exp2(x: float) -> float:
    """``2 ** x`` with ``x`` capped at ``MAX_EXP2`` (very negative ``x`` gives 0.0)."""
    return math.exp2(x if x < MAX_EXP2 else MAX_EXP2)


def exp(x: float) -> float:
    """``e ** x`` with ``x`` capped at ``MAX_EXP2 * ln 2`` (the same bound as :func:`exp2`)."""
    cap = MAX_EXP2 * _LN2
    return math.exp(x if x < cap else cap)


def decay_factor(elapsed_ms: float, half_life_ms: float) -> float:
    """Multiplier of a count after ``elapsed_ms`` of event time: ``2 ** (-elapsed / half_life)``,
    in [0, 2**MAX_EXP2] (negative ``elapsed_ms`` grows it, capped)."""
    return exp2(-elapsed_ms / half_life_ms)
