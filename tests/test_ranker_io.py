"""Rankers saved as data (``models.ranker_io``): exact round trips, nothing unpickled."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from models.features import example_features
from models.ranker_io import load_ranker_file, save_ranker
from models.rankers import make_ranker
from operators.linear_scorer import LinearScorer

T0 = 1_767_225_600_000


def _examples(seed: int, n: int, start: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"example_id": f"e{i}", "ts": T0 + i * 1000, "user_id": f"u{rng.randrange(60)}",
             "item_id": f"i{rng.randrange(90)}", "label": int(rng.random() < 0.3),
             "weight": rng.choice([1.0, 2.0]), "position": rng.randrange(10),
             "context": {"device": rng.choice(["mobile", "web"])},
             "features": {"user.clicks.1h": rng.randrange(5), "i:price": rng.random() * 20}}
            for i in range(start, start + n)]


@pytest.mark.parametrize("kind", ["lr", "fm", "efm"])
@pytest.mark.parametrize("params", [{}, {"l2": 0.001}])
def test_round_trip_is_exact_also_for_further_learning(tmp_path: Path, kind: str,
                                                       params: dict) -> None:
    """Saved and loaded, a ranker scores bitwise like the original (unseen features
    too: River FM draws their latents from its saved random state) and keeps learning
    exactly like it (optimizer state, clocks, the efm table)."""
    ranker = make_ranker(kind, negative_rate=0.5, max_features=500, **params)
    ranker.learn_many(_examples(1, 1500))
    save_ranker(ranker, tmp_path / "r.npz")
    loaded = load_ranker_file(tmp_path / "r.npz")
    assert (loaded.kind, loaded.rate, loaded.n_learned, loaded.last_ts_ms, loaded.pruned,
            loaded.frozen, loaded.params) == (ranker.kind, ranker.rate, ranker.n_learned,
                                              ranker.last_ts_ms, ranker.pruned, False, params)
    probe = [example_features(e) for e in _examples(2, 300, start=10_000)]
    assert np.array_equal(loaded.predict_many(probe), ranker.predict_many(probe))
    more = _examples(3, 700, start=2_000)
    ranker.learn_many(more)
    loaded.learn_many(more)
    assert np.array_equal(loaded.predict_many(probe), ranker.predict_many(probe))


def test_frozen_save_loads_as_a_serving_copy_with_its_fast_path(tmp_path: Path) -> None:
    ranker = make_ranker("lr", negative_rate=0.1)
    ranker.learn_many(_examples(4, 800))
    save_ranker(ranker, tmp_path / "r.npz", frozen=True)
    served = load_ranker_file(tmp_path / "r.npz")
    assert served.frozen and not ranker.frozen
    with pytest.raises(RuntimeError):
        served.learn(_examples(5, 1)[0])
    assert LinearScorer.supports(served) and LinearScorer(served).agrees_with(served)


def test_the_file_holds_no_pickled_object(tmp_path: Path) -> None:
    for kind in ("lr", "fm", "efm"):
        ranker = make_ranker(kind)
        ranker.learn_many(_examples(6, 200))
        save_ranker(ranker, tmp_path / f"{kind}.npz")
        with np.load(tmp_path / f"{kind}.npz", allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)


def test_anything_but_a_ranker_file_is_a_value_error(tmp_path: Path) -> None:
    ranker = make_ranker("lr")
    (tmp_path / "pickled").write_bytes(pickle.dumps(ranker))
    (tmp_path / "empty").write_bytes(b"")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    save_ranker(ranker, tmp_path / "good.npz")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:300])
    for name in ("pickled", "empty", "other.npz", "cut.npz"):
        with pytest.raises(ValueError):
            load_ranker_file(tmp_path / name)
