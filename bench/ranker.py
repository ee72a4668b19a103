"""Online ranker benchmark: River LR vs River FM vs EmbeddingFM, and online vs frozen.

All models see the same examples: simulator events joined by the real joiner with
negatives downsampled at r (default 0.1), replayed with delayed labels
(``models.metrics.delayed_prequential``: each example is scored at its impression
time by the model as it then is, and learned once the joiner emitted it, in
mini-batches of ``--batch`` for EmbeddingFM; River models learn per example).

* learn / predict: CPU microseconds per example in the ranker's ``learn_many`` /
  ``predict_many`` (features computed once beforehand and excluded; CPU time because
  the machine is shared: ratios hold, absolute times drift);
* serve: CPU microseconds to score one request of 200 candidates (``predict_many``);
* AUC: weighted progressive AUC over the whole stream, and after a warm-up (the first
  20% of the stream's event time);
* calibration: weighted mean prediction / true positive rate after the warm-up;
* positives are held for the joiner's wait (``positive_hold_ms``) as the trainer
  should; one more line shows LR and EmbeddingFM learning every example on arrival;
* drift: a second stream where every user's taste shifts abruptly at mid-stream
  (``SimConfig.drift_at``); the online model keeps learning, the frozen copy stops at
  the shift; both are scored on the examples after it.

Usage: ``python bench/ranker.py [--events N] [--rate R] [--batch B] [--seed S]``.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from events.simulator import DEFAULT_START_TS_MS, SimConfig  # noqa: E402
from models.features import example_features, serving_features  # noqa: E402
from models.metrics import PrequentialResult, delayed_prequential  # noqa: E402
from models.rankers import Ranker, make_ranker, positive_hold_ms  # noqa: E402
from models.synthetic import SYNTH_JOIN, SYNTH_SIM, SyntheticStream, simulated_stream  # noqa: E402

KINDS = ("lr", "fm", "efm")
NAMES = {"lr": "River LogisticRegression", "fm": "River FMClassifier", "efm": "EmbeddingFM"}
WARMUP = 0.2  # share of the stream's event time excluded from the "warm" figures
HOLD_MS = positive_hold_ms(SYNTH_JOIN)  # 65 s: the synthetic joiner's wait + lateness


def ts_quantile(stream: SyntheticStream, q: float) -> int:
    ts = sorted(e["ts"] for e in stream.examples)
    return ts[int(q * (len(ts) - 1))]


def serve_us(ranker: Ranker, stream: SyntheticStream, n_requests: int = 50,
             candidates: int = 200) -> float:
    """CPU microseconds per request to score ``candidates`` items for one user."""
    examples = stream.examples
    items = list(dict.fromkeys(e["item_id"] for e in examples))[:candidates]
    attrs = {e["item_id"]: e["features"] for e in examples}
    rng = np.random.default_rng(0)
    requests = []
    for j in rng.integers(0, len(examples), n_requests):
        ex = examples[int(j)]
        user_attrs = {k: v for k, v in ex["features"].items() if k.startswith("u:")}
        requests.append([serving_features(ex["user_id"], item, ex["ts"], ex["context"],
                                          {**user_attrs, **attrs[item]}) for item in items])
    start = time.process_time()
    for feats in requests:
        ranker.predict_many(feats)
    return 1e6 * (time.process_time() - start) / n_requests


def run_stationary(stream: SyntheticStream, batch: int) -> dict[str, dict]:
    feats = [example_features(e) for e in stream.examples]
    warm = ts_quantile(stream, WARMUP)
    out: dict[str, dict] = {}
    for kind in ("lr", "efm"):
        ranker = make_ranker(kind, batch_size=batch)
        res = delayed_prequential(ranker, stream.examples, stream.emitted_ms, batch_size=batch,
                                  after_ts=warm, features=feats)
        out[f"{kind}_on_arrival"] = {"auc_warm": res.after.auc,
                                     "calibration": res.after.calibration}
    for kind in KINDS:
        ranker = make_ranker(kind, batch_size=batch, hold_positives_ms=HOLD_MS)
        res: PrequentialResult = delayed_prequential(
            ranker, stream.examples, stream.emitted_ms, batch_size=batch, after_ts=warm,
            features=feats)
        out[kind] = {
            "learn_us": 1e6 * res.learn_s / max(res.learned, 1),
            "predict_us": 1e6 * res.predict_s / max(res.scored, 1),
            "auc": res.metrics.auc,
            "auc_warm": res.after.auc,
            "logloss_warm": res.after.logloss,
            "calibration": res.after.calibration,
            "calibration_all": res.metrics.calibration,
            "serve200_us": serve_us(ranker, stream),
            "reliability": res.after.reliability(5),
        }
        r = out[kind]
        print(f"{NAMES[kind]:>25}: learn {r['learn_us']:8.1f} us/ex  predict {r['predict_us']:7.1f}"
              f" us/ex  serve 200 cands {r['serve200_us'] / 1000:6.2f} ms  AUC {r['auc']:.4f}"
              f" (warm {r['auc_warm']:.4f})  logloss {r['logloss_warm']:.4f}"
              f"  calibration {r['calibration']:.3f} (all {r['calibration_all']:.3f})", flush=True)
    print("without the hold (every example learned on arrival): " + ", ".join(
        f"{NAMES[k]} AUC (warm) {out[k + '_on_arrival']['auc_warm']:.4f} calibration "
        f"{out[k + '_on_arrival']['calibration']:.3f}" for k in ("lr", "efm")))
    return out


def run_drift(stream: SyntheticStream, drift_at: int, batch: int, kind: str) -> tuple[float, float]:
    """(online AUC, frozen AUC) on the examples with ts >= drift_at."""
    feats = [example_features(e) for e in stream.examples]
    online = make_ranker(kind, batch_size=batch, hold_positives_ms=HOLD_MS)
    res = delayed_prequential(online, stream.examples, stream.emitted_ms, batch_size=batch,
                              after_ts=drift_at, features=feats)
    n_pre = sum(1 for t in stream.emitted_ms if t <= drift_at)  # learned before the shift
    pre = make_ranker(kind, batch_size=batch, hold_positives_ms=HOLD_MS)
    delayed_prequential(pre, stream.examples[:n_pre], stream.emitted_ms[:n_pre],
                        batch_size=batch, features=feats[:n_pre])
    frozen = pre.copy()
    post = [i for i, e in enumerate(stream.examples) if e["ts"] >= drift_at]
    fr = delayed_prequential(frozen, [stream.examples[i] for i in post],
                             [stream.emitted_ms[i] for i in post], batch_size=batch,
                             learn=False, features=[feats[i] for i in post])
    return res.after.auc, fr.metrics.auc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000, help="simulator events per stream")
    ap.add_argument("--rate", type=float, default=0.1, help="negative keep rate r")
    ap.add_argument("--batch", type=int, default=256, help="EmbeddingFM mini-batch size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    wall = time.perf_counter()

    stream = simulated_stream(args.events, seed=args.seed, negative_rate=args.rate)
    ex = stream.examples
    pos = sum(e["label"] for e in ex)
    span_s = (max(e["ts"] for e in ex) - min(e["ts"] for e in ex)) / 1000
    print(f"stream: {args.events:,} simulator events -> {len(ex):,} examples ({pos:,} positive), "
          f"r = {args.rate}, {span_s / 60:.0f} min of event time; EmbeddingFM batch {args.batch}; "
          f"positives held {HOLD_MS / 1000:.0f} s; times are CPU us")
    res = run_stationary(stream, args.batch)
    speedup = res["fm"]["learn_us"] / res["efm"]["learn_us"]
    print(f"EmbeddingFM vs River FM: learns {speedup:.1f}x faster, predicts "
          f"{res['fm']['predict_us'] / res['efm']['predict_us']:.1f}x faster, "
          f"AUC {res['efm']['auc'] - res['fm']['auc']:+.4f}")
    print(f"EmbeddingFM vs River LR: learns {res['lr']['learn_us'] / res['efm']['learn_us']:.1f}x "
          f"faster, AUC {res['efm']['auc'] - res['lr']['auc']:+.4f}")
    print("reliability (lr, warm; p_mean -> y_rate): " + ", ".join(
        f"{b['p_mean']:.4f}->{b['y_rate']:.4f}" for b in res["lr"]["reliability"]))

    # Abrupt taste shift at mid-stream (every user draws a new favourite category).
    span_ms = max(e["ts"] for e in ex) - DEFAULT_START_TS_MS
    drift_at = DEFAULT_START_TS_MS + span_ms // 2
    cfg = SimConfig(**{**SYNTH_SIM.__dict__, "drift_at": drift_at, "drift_fraction": 1.0})
    dstream = simulated_stream(args.events, seed=args.seed + 1, negative_rate=args.rate,
                               sim_config=cfg)
    drift = {kind: run_drift(dstream, drift_at, args.batch, kind) for kind in ("efm", "lr")}
    for kind, (on, fr) in drift.items():
        print(f"drift at {(drift_at - DEFAULT_START_TS_MS) / 60_000:.0f} min, {NAMES[kind]}: "
              f"AUC after the shift online {on:.4f} vs frozen {fr:.4f} ({on - fr:+.4f})")

    def r4(v: float) -> float:
        return round(float(v), 4)

    figures = {
        "events": args.events,
        "examples": len(ex),
        "negative_rate": args.rate,
        "efm_batch": args.batch,
        **{f"{k}_learn_us": round(res[k]["learn_us"], 2) for k in KINDS},
        **{f"{k}_predict_us": round(res[k]["predict_us"], 2) for k in KINDS},
        **{f"{k}_serve200_us": round(res[k]["serve200_us"], 1) for k in KINDS},
        **{f"{k}_auc": r4(res[k]["auc"]) for k in KINDS},
        **{f"{k}_auc_warm": r4(res[k]["auc_warm"]) for k in KINDS},
        **{f"{k}_calibration": r4(res[k]["calibration"]) for k in KINDS},
        "calibration": r4(res["lr"]["calibration"]),
        "lr_calibration_on_arrival": r4(res["lr_on_arrival"]["calibration"]),
        "efm_calibration_on_arrival": r4(res["efm_on_arrival"]["calibration"]),
        "hold_positives_ms": HOLD_MS,
        "efm_vs_fm_learn_speedup": round(speedup, 1),
        "online_auc_drift": r4(drift["efm"][0]),
        "frozen_auc_drift": r4(drift["efm"][1]),
        "lr_online_auc_drift": r4(drift["lr"][0]),
        "lr_frozen_auc_drift": r4(drift["lr"][1]),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
