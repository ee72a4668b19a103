"""models/seeded.py: per-request generators in ``np.random.default_rng(seed)``'s state."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from models import seeded
from models.seeded import SeededGenerator
from state.hashing import stable_hash64


def _seeds() -> list[int]:
    rng = np.random.default_rng(4)
    return ([0, 1, 2**32 - 1, 2**32, 2**64 - 1, 2**64, 2**90 + 7]
            + [stable_hash64(f"category:r{n}") for n in range(200)]
            + rng.integers(0, 2**63, 200).tolist())


def test_each_seed_draws_default_rngs_numbers_call_after_call() -> None:
    """Category sampling's Beta rows and the team draft's coins: the same floats as a
    fresh ``default_rng(seed)``, seed after seed on one kept generator (a call's leftover
    state never leaks into the next)."""
    make = SeededGenerator()
    a, b = np.array([2.0, 3.5, 0.7]), np.array([30.0, 41.0, 9.0])
    for seed in _seeds():
        mine, ref = make(seed), np.random.default_rng(seed)
        assert np.array_equal(mine.beta(a, b, size=(17, 3)), ref.beta(a, b, size=(17, 3)))
        assert [mine.random() for _ in range(5)] == [ref.random() for _ in range(5)]
        assert mine.integers(0, 10**9) == ref.integers(0, 10**9)


def test_a_pickled_one_is_made_again() -> None:
    make = pickle.loads(pickle.dumps(SeededGenerator()))
    assert make(99).random() == np.random.default_rng(99).random()


def test_seeding_that_differs_from_numpys_falls_back_to_default_rng(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """If numpy seeded otherwise (here: a wrong hash constant), the self-check finds it
    and every call is ``default_rng(seed)`` itself."""
    monkeypatch.setattr(seeded, "_HASH", [h ^ 1 for h in seeded._HASH])
    make = SeededGenerator()
    assert not make._exact
    assert make(5).random() == np.random.default_rng(5).random()
