"""PopularityCounter: the sampling arrays kept side by side equal a fresh build."""

from __future__ import annotations

import pickle
import random

import numpy as np

from state.popularity import PopularityCounter

T0 = 1_767_225_600_000


def _fresh(counter: PopularityCounter) -> tuple[list[str], np.ndarray]:
    """``arrays`` of a copy that never kept its arrays (built from the counts)."""
    copy = PopularityCounter(counter.capacity, counter.half_life_ms)
    copy._log_scores = dict(counter._log_scores)
    return copy.arrays()


def test_arrays_kept_by_add_equal_a_fresh_build_bit_for_bit() -> None:
    """After every add (new ids, repeats, out-of-order times, shrinks past the
    capacity, a pickle round trip) ``arrays`` returns the ids in count order and the
    probabilities of a build from the counts, bit for bit."""
    rng = random.Random(5)
    counter = PopularityCounter(capacity=40, half_life_ms=3_600_000)
    assert counter.arrays()[0] == [] and counter.arrays()[1].size == 0
    shrinks = 0
    for step in range(1_500):
        before = len(counter)
        counter.add(f"i{int(rng.expovariate(0.03))}", T0 + rng.randrange(-5_000, 60_000) * step,
                    rng.choice((1.0, 0.5, 2.0)))
        shrinks += len(counter) < before
        if step % 7 == 0:
            ids, probs = counter.arrays()
            want_ids, want = _fresh(counter)
            assert ids == want_ids == list(counter._log_scores)
            assert probs.tobytes() == want.tobytes()
        if step == 700:
            counter = pickle.loads(pickle.dumps(counter))
            assert counter._slots is None  # the arrays are not pickled: rebuilt when asked
    assert shrinks > 0
    ids, probs = counter.arrays()
    ids.append("caller's copy")  # the caller's list is its own
    assert counter.arrays()[0] == list(counter._log_scores)
