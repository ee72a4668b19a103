"""Negative downsampling: deterministic keep decisions and the weights that undo them.

A negative is kept when a stable hash of its ``example_id`` (salted by ``seed``) falls
below ``rate``, so a replay of the same log keeps the same negatives. Every kept
negative carries weight ``1 / rate``; positives are never dropped (weight 1).
"""

from __future__ import annotations

from state.hashing import stable_hash64, stable_hashes64

_TWO64 = float(1 << 64)


class NegativeSampler:
    """Keeps a fraction ``rate`` (0 < rate <= 1) of negatives, deterministically by id."""

    def __init__(self, rate: float = 1.0, seed: int = 0) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"negative rate must be in (0, 1], got {rate}")
        self.rate = rate
        self.seed = seed
        self.weight = 1.0 / rate

    def keep(self, example_id: str) -> bool:
        """True when the negative with this id is kept (always true at rate 1)."""
        if self.rate >= 1.0:
            return True
        return stable_hash64(f"{self.seed}:{example_id}") / _TWO64 < self.rate

    def keep_impression(self, impression_id: str) -> bool:
        """``keep`` of an impression's example id (``f"imp:{impression_id}"``)."""
        return self.keep(f"imp:{impression_id}")

    def keep_impressions(self, impression_ids: list[str]) -> list[bool]:
        """``keep_impression`` of each id, hashed in one pass (``stable_hashes64``)."""
        if self.rate >= 1.0:
            return [True] * len(impression_ids)
        prefix, rate = f"{self.seed}:imp:", self.rate
        return [h / _TWO64 < rate for h in stable_hashes64(impression_ids, prefix)]
