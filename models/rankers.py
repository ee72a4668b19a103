"""The online ranker: one wrapper over River LR, River FM and EmbeddingFM.

``Ranker`` takes the joiner's examples, turns them into features with the shared
``models.features`` function, trains the model on the *thinned* stream (weights from
``models.calibration.train_weight``) and serves calibrated probabilities (the He et
al. correction with the negative keep rate ``r``, given or inferred from the kept
negatives' weight ``1/r``).

Kinds (``make_ranker(kind, **params)``):

* ``"lr"`` (default): River ``LogisticRegression`` with Adagrad (``lr`` 0.1; numeric
  features may get their own rate ``numeric_lr``: ``GroupAdaGrad``), the cheapest; no
  feature interactions.
* ``"fm"``: River ``FMClassifier`` with River's defaults (``n_factors`` 10, SGD ``lr``
  0.01: the best of 0.005 .. 0.1 on the simulator), pure-Python FM.
* ``"efm"``: ``EmbeddingFM`` (``k`` 8, Adagrad ``lr`` 0.1), parameters in an ``EmbeddingTable``,
  trained in mini-batches of ``batch_size`` (256) by ``learn_many``.

**Delayed negatives.** The joiner emits a positive at its feedback but a negative only
when the impression's window closes (``JoinConfig.wait_ms()`` plus the allowed
lateness later), so a model learning examples as they arrive has always seen the
last window's positives but not its negatives, and over-predicts (measured on the
simulator: up to +10% with a 65 s wait, x17 with a 1 h wait). ``hold_positives_ms``
holds each positive until the ranker's clock (the latest example ``ts`` seen) passes
its ``ts + hold``, so both labels of an impression time are learned together
(``positive_hold_ms(join_config)`` gives the matching hold; the example below reads it
for the flow's join defaults). It costs freshness: positives count ``hold`` later.

>>> from state.join_state import JoinConfig
>>> positive_hold_ms(JoinConfig())
630000

A ranker pickles (Bytewax recovery state) and ``copy()`` gives an independent serving
copy that refuses to learn; snapshots are written as data, not pickles
(``models.ranker_io``).
"""

from __future__ import annotations

import heapq
import math
import pickle
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from river import base, facto, linear_model, optim
from river.utils import VectorDict

from models.calibration import (
    correct_downsampled,
    correct_downsampled_many,
    rate_from_example,
    train_weight,
)
from models.embedding_fm import EmbeddingFM
from models.features import Features, example_features

if TYPE_CHECKING:
    from state.join_state import JoinConfig

RankerKind = Literal["lr", "fm", "efm"]
Example = Mapping[str, Any]
KINDS: tuple[str, ...] = ("lr", "fm", "efm")
DEFAULT_NUMERIC_LR: float | None = None
"""lr kind: AdaGrad rate of numeric features; None = ``lr`` (River's AdaGrad exactly).
0.03 ranks the loop's candidates better offline but did not win the closed loop on
three seeds (docs/evaluation.md, "Rates for the LR"), so it is not the default."""


class Ranker:
    """A calibrated, picklable online ranker around a River-API binary classifier.

    Args:
        kind: ``"lr"``, ``"fm"`` or ``"efm"`` (selects the fast paths).
        model: the classifier (``learn_one(x, y, w)``, ``predict_proba_one(x)``).
        negative_rate: negative keep rate r of the training stream, 0 < r <= 1; None:
            inferred from kept negatives (weight 1/r), 1 until one is seen.
        batch_size: mini-batch size of ``learn_many`` for ``efm`` (others learn per example).
        hold_positives_ms: hold positives until the clock passes ``ts + hold`` (ms);
            None learns every example on arrival (see the module docstring).
        max_features: lr/fm: most weights kept (one per distinct feature name, e.g. one
            per user and item ID); beyond it the smallest ``|weight|`` are dropped down
            to 90% of it (with their optimizer state). 0: no limit. efm is bounded by
            its table's ``max_rows``.

    >>> ranker = make_ranker("lr", negative_rate=0.5)  # negatives thinned to half: weight 2
    >>> liked = {"user_id": "u1", "item_id": "i1", "ts": 1_000, "label": True}
    >>> other = {"user_id": "u1", "item_id": "i2", "ts": 1_000, "label": False, "weight": 2.0}
    >>> ranker.learn_many([liked, other] * 50)
    >>> ranker.predict(liked) > 0.5 > ranker.predict(other)
    True
    >>> serving = ranker.copy()  # a frozen serving copy: it predicts alike, refuses to learn
    >>> serving.predict(liked) == ranker.predict(liked), serving.frozen
    (True, True)
    """

    def __init__(self, kind: RankerKind, model: base.Classifier,
                 negative_rate: float | None = None, batch_size: int = 256,
                 hold_positives_ms: int | None = None, max_features: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown ranker kind {kind!r}; expected one of {KINDS}")
        if negative_rate is not None and not 0.0 < negative_rate <= 1.0:
            raise ValueError(f"negative_rate must be in (0, 1], got {negative_rate}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if hold_positives_ms is not None and hold_positives_ms < 0:
            raise ValueError("hold_positives_ms must be >= 0 or None")
        if max_features < 0:
            raise ValueError("max_features must be >= 0 (0 = no limit)")
        self.kind = kind
        self.model = model
        self.negative_rate = negative_rate
        self.rate = 1.0 if negative_rate is None else negative_rate  # r used now
        self.batch_size = batch_size
        self.frozen = False
        self.n_learned = 0
        self.hold_positives_ms = hold_positives_ms
        self.last_ts_ms: int | None = None  # latest example ts seen (ms): the ranker's clock
        self._held: list[tuple[int, int, Example, Features | None]] = []  # heap by release ms
        self._held_seq = 0
        self.max_features = max_features
        self.pruned = 0  # weights dropped by the max_features bound
        self.params: dict[str, Any] = {}
        """The model parameters ``make_ranker`` built ``model`` from (``models.ranker_io``
        rebuilds a saved ranker from them)."""

    def __repr__(self) -> str:
        return (f"Ranker(kind={self.kind!r}, rate={self.rate:g}, n_learned={self.n_learned}, "
                f"frozen={self.frozen})")

    # --- learning -------------------------------------------------------------------------

    def _tick(self, example: Example) -> None:
        if self.frozen:
            raise RuntimeError("this ranker is a frozen serving copy; learn on the training copy")
        ts = example.get("ts")
        if ts is not None and (self.last_ts_ms is None or ts > self.last_ts_ms):
            self.last_ts_ms = int(ts)

    def _observe(self, example: Example) -> float:
        """Track r and the clock; return the example's training weight."""
        self._tick(example)
        if self.negative_rate is None:
            r = rate_from_example(example)
            if r is not None:
                self.rate = r
        return train_weight(example["label"], float(example.get("weight", 1.0)), self.rate)

    def _hold(self, examples: Sequence[Example], features: Sequence[Features] | None
              ) -> tuple[list[Example], list[Features | None]]:
        """Queue positives; return what is due, in clock order: each held positive goes
        in just before the first example whose ``ts`` moved the clock past its release
        (so per-example learners see the two labels interleaved, not in blocks)."""
        hold = self.hold_positives_ms
        held = self._held
        ready: list[Example] = []
        ready_f: list[Features | None] = []
        for i, ex in enumerate(examples):
            self._tick(ex)
            now = self.last_ts_ms
            while held and now is not None and held[0][0] <= now:
                _, _, due, due_f = heapq.heappop(held)
                ready.append(due)
                ready_f.append(due_f)
            f = None if features is None else features[i]
            if ex["label"]:
                heapq.heappush(held, (int(ex["ts"]) + hold, self._held_seq, ex, f))
                self._held_seq += 1
            else:
                ready.append(ex)
                ready_f.append(f)
        return ready, ready_f

    def release(self, now_ms: int | None = None) -> int:
        """Learn the held positives due by ``now_ms`` (all of them if None, e.g. at end of
        input); returns how many were learned."""
        out: list[Example] = []
        out_f: list[Features | None] = []
        held = self._held
        while held and (now_ms is None or held[0][0] <= now_ms):
            _, _, ex, f = heapq.heappop(held)
            out.append(ex)
            out_f.append(f)
        if out:
            self._learn_now(out, out_f)
        return len(out)

    @property
    def held(self) -> int:
        """Positives waiting in the hold."""
        return len(self._held)

    def learn(self, example: Example, features: Features | None = None) -> None:
        """Learn one joiner example (``features``: its precomputed ``example_features``)."""
        self.learn_many([example], None if features is None else [features])

    def learn_many(self, examples: Sequence[Example],
                   features: Sequence[Features] | None = None) -> None:
        """Learn examples in order: per example for River models, in mini-batches of
        ``batch_size`` for efm. ``features``: their precomputed feature dicts, aligned.
        With ``hold_positives_ms`` positives are queued and learned once due."""
        if features is not None and len(features) != len(examples):
            raise ValueError("features and examples differ in length")
        if self.hold_positives_ms is not None:
            examples, features = self._hold(examples, features)
        self._learn_now(examples, features)

    def _learn_now(self, examples: Sequence[Example],
                   features: Sequence[Features | None] | None) -> None:
        if self.kind != "efm":  # per example; the default LR by lr_learn_one
            model = self.model
            learn = (partial(lr_learn_one, model) if self.kind == "lr" and plain_lr(model)
                     else model.learn_one)
            for i, ex in enumerate(examples):
                w = self._observe(ex)
                x = None if features is None else features[i]
                learn(example_features(ex) if x is None else x, bool(ex["label"]), w)
                self.n_learned += 1
            if self.max_features:
                self._prune()
            return
        bs = self.batch_size
        for start in range(0, len(examples), bs):
            chunk = examples[start:start + bs]
            ws = [self._observe(ex) for ex in chunk]
            fs = [None] * len(chunk) if features is None else features[start:start + bs]
            xs = [example_features(ex) if f is None else f for ex, f in zip(chunk, fs, strict=True)]
            ys = [bool(ex["label"]) for ex in chunk]
            self.model.learn_many(xs, ys, ws, now_ms=self.last_ts_ms)
            self.n_learned += len(chunk)

    def _prune(self) -> None:
        """Keep the ``0.9 * max_features`` largest ``|weight|`` once there are more than
        ``max_features`` weights (lr: with their Adagrad sums; fm: with their latents)."""
        model = self.model
        weights = model._weights if self.kind == "lr" else model.weights
        if len(weights) <= self.max_features:
            return
        ranked = sorted(weights.items(), key=lambda kv: abs(kv[1]), reverse=True)
        state = (getattr(model.optimizer, "g2", {}) if self.kind == "lr" else model.latents)
        for name, _ in ranked[int(0.9 * self.max_features):]:
            weights.pop(name)
            state.pop(name, None)
            self.pruned += 1

    # --- serving --------------------------------------------------------------------------

    def predict(self, example_or_features: Mapping[str, Any], calibrated: bool = True) -> float:
        """P(positive) of a joiner example (has ``user_id`` and ``item_id``) or a feature
        dict; corrected for downsampling unless ``calibrated=False``."""
        x = example_or_features
        if "user_id" in x and "item_id" in x:
            x = example_features(x)
        p = float(self.model.predict_proba_one(x).get(True, 0.0))
        return correct_downsampled(p, self.rate) if calibrated else p

    def predict_many(self, features: Sequence[Features], calibrated: bool = True) -> np.ndarray:
        """P(positive) of each feature dict (e.g. the ~200 candidates of a request), float64."""
        if self.kind == "efm":
            p = self.model.predict_proba_many(features)
        else:
            model = self.model
            p = np.fromiter((model.predict_proba_one(x).get(True, 0.0) for x in features),
                            np.float64, len(features))
        return correct_downsampled_many(p, self.rate) if calibrated else p

    # --- lifecycle ------------------------------------------------------------------------

    def copy(self, frozen: bool = True) -> Ranker:
        """An independent deep copy (pickle round trip); frozen copies refuse to learn."""
        clone: Ranker = pickle.loads(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))
        clone.frozen = frozen
        if frozen:
            clone._held = []  # a serving copy never learns them
        return clone

    def expire(self, now_ms: int, ttl_ms: int) -> int:
        """Expire stale embedding rows (efm; ms event time); returns rows freed (0 otherwise)."""
        return self.model.expire(now_ms, ttl_ms) if self.kind == "efm" else 0

    def stats(self) -> dict[str, Any]:
        """kind, rate, n_learned, last_ts_ms, plus the table's stats for efm."""
        out: dict[str, Any] = {"kind": self.kind, "rate": self.rate, "n_learned": self.n_learned,
                               "held": self.held, "last_ts_ms": self.last_ts_ms}
        if self.kind != "efm":
            model = self.model
            out["weights"] = len(model._weights if self.kind == "lr" else model.weights)
            out["pruned"] = self.pruned
        if self.kind == "efm":
            out["table"] = self.model.stats()
        return out


class GroupAdaGrad(optim.AdaGrad):
    """AdaGrad with one rate for one-hot features (names with ``=``: ids, categories,
    positions) and another for numeric ones (profile aggregates, retrieval scores).

    Per-coordinate AdaGrad moves every weight by about its rate on its first steps. The
    numeric features (~100 profile counts and scores) are present in every example and
    strongly correlated, so at one shared rate they move the logit ~100 rates per example
    and pull against each other (item clicks up, item likes and ratings down), while an id
    weight moves only on its own examples. A lower numeric rate is, for AdaGrad, the same
    as scaling those features down (its steps are scale-free per coordinate).

    ``numeric_lr=None`` is River's ``AdaGrad(lr)`` to the last bit.

    >>> opt = GroupAdaGrad(lr=0.1, numeric_lr=0.01)
    >>> w = opt.step({"item=i1": 0.0, "item.clicks.1d": 0.0}, {"item=i1": 1.0, "item.clicks.1d": 1.0})
    >>> round(w["item=i1"], 6), round(w["item.clicks.1d"], 6)
    (-0.1, -0.01)
    """

    def __init__(self, lr: float = 0.1, numeric_lr: float | None = None,
                 eps: float = 1e-8) -> None:
        super().__init__(lr, eps)
        self.numeric_lr = numeric_lr

    def _step_with_dict(self, w: Any, g: Any) -> Any:
        """River's AdaGrad step (per coordinate ``g2 += g**2``, ``w -= rate / sqrt(g2 +
        eps) * g``, the same float operations in the same order) by ``steps``: the
        same bits as ``AdaGrad._step_with_dict``."""
        for i, step in self.steps(g, 1.0).items():
            w[i] -= step
        return w

    def steps(self, x: Mapping[str, float], scale: float) -> dict[str, float]:
        """The AdaGrad step of gradient ``g_i = x_i * scale`` per coordinate, in ``x``'s
        order (``g2[i] += g_i**2``; ``rate / (g2[i] + eps)**0.5 * g_i``, to subtract
        from the weight), the ``g2`` sums updated. The rate is read once per step, not
        per coordinate, and each sum kept instead of read back (the same values);
        ``scale`` 1.0 leaves ``x``'s values as they are."""
        g2, eps = self.g2, self.eps
        lr, numeric_lr = self.learning_rate, self.numeric_lr
        out: dict[str, float] = {}
        if numeric_lr is None:
            for i, xi in x.items():
                gi = xi * scale
                s = g2[i] + gi**2
                g2[i] = s
                out[i] = lr / (s + eps) ** 0.5 * gi
            return out
        for i, xi in x.items():
            gi = xi * scale
            s = g2[i] + gi**2
            g2[i] = s
            out[i] = (lr if "=" in i else numeric_lr) / (s + eps) ** 0.5 * gi
        return out


def plain_lr(model: Any) -> bool:
    """Whether ``lr_learn_one`` is River's ``learn_one`` for ``model``: a River
    ``LogisticRegression`` with ``GroupAdaGrad``, log loss, zero initial weights and no
    l1/l2 penalty (``make_ranker("lr")`` without ``l2``)."""
    return (type(model) is linear_model.LogisticRegression
            and type(model.optimizer) is GroupAdaGrad and type(model.loss) is optim.losses.Log
            and type(model.initializer) is optim.initializers.Zeros
            and not model.l1 and not model.l2)


def lr_learn_one(model: linear_model.LogisticRegression, x: Features, y: bool, w: float) -> None:
    """River's ``LogisticRegression.learn_one(x, y, w)`` for a ``plain_lr`` model, the
    same float operations in the same order without River's per-example wrappers (the
    masked weight view, the gradient ``VectorDict``, the optimizer's vector attempt):
    the logit ``weights.dot(x) + intercept``, the log loss gradient times ``w`` clipped
    to ``clip_gradient``, the intercept step, then ``GroupAdaGrad.steps`` of
    ``g_i = x_i * gradient`` in ``x``'s order, the weights moved by one
    ``VectorDict.isub_scaled`` of the steps (absent weights start at 0.0, added in
    ``x``'s order). The same weights, ``g2`` (values and key order), intercept and
    iteration count."""
    weights, opt, loss = model._weights, model.optimizer, model.loss
    z = weights.dot(x) + model.intercept
    if y:
        sign, scale = 1, loss.weight_pos
    else:
        sign, scale = -1, loss.weight_neg
    z = z * sign
    if z > 18.0:
        grad = scale * math.exp(-z) * -sign
    elif z < -18.0:
        grad = scale * -sign
    else:
        grad = scale * -sign / (math.exp(z) + 1.0)
    grad *= w
    clip = model.clip_gradient
    grad = float(max(min(grad, clip), -clip))
    model.intercept -= model.intercept_lr.get(opt.n_iterations) * grad
    # w_i - 1.0 * step_i is w_i - step_i exactly
    weights.isub_scaled(VectorDict(opt.steps(x, grad)), 1.0)
    opt.n_iterations += 1


def positive_hold_ms(join: JoinConfig) -> int:
    """The hold that matches a joiner: how long after its impression a negative leaves
    it (the longest positive window plus the allowed lateness), ms."""
    return join.wait_ms() + join.allowed_lateness_ms


def make_ranker(kind: RankerKind = "lr", *, negative_rate: float | None = None,
                batch_size: int = 256, hold_positives_ms: int | None = None,
                max_features: int = 0, **params: Any) -> Ranker:
    """Build a ``Ranker``; ``params`` go to the model.

    * lr: ``lr`` (Adagrad rate, 0.1), ``numeric_lr`` (rate of numeric features, None =
      ``lr``; ``GroupAdaGrad``), ``l2`` (0), ``intercept_lr`` (0.01);
    * fm: ``n_factors`` (10), ``lr`` (SGD rate for weights and latents, 0.01), ``l2`` (0),
      ``intercept_lr`` (0.01), ``seed`` (0);
    * efm: any ``EmbeddingFM`` argument (``k``, ``lr``, ``l2``, ``admit_threshold``,
      ``max_rows``, ``init_scale``, ``ttl_ms``, ...).

    >>> make_ranker("efm", negative_rate=0.1, k=4)
    Ranker(kind='efm', rate=0.1, n_learned=0, frozen=False)
    >>> make_ranker("efm", k=4).model.table.dim  # k latent floats + the linear weight
    5
    """
    model: base.Classifier
    if kind == "lr":
        p = {"lr": 0.1, "numeric_lr": DEFAULT_NUMERIC_LR, "l2": 0.0, "intercept_lr": 0.01,
             **params}
        model = linear_model.LogisticRegression(
            optimizer=GroupAdaGrad(p.pop("lr"), p.pop("numeric_lr")), l2=p.pop("l2"),
            intercept_lr=p.pop("intercept_lr"), **p)
    elif kind == "fm":
        p = {"n_factors": 10, "lr": 0.01, "l2": 0.0, "intercept_lr": 0.01, "seed": 0, **params}
        lr, l2 = p.pop("lr"), p.pop("l2")
        model = facto.FMClassifier(
            weight_optimizer=optim.SGD(lr), latent_optimizer=optim.SGD(lr),
            l2_weight=l2, l2_latent=l2, **p)
    elif kind == "efm":
        model = EmbeddingFM(**params)
    else:
        raise ValueError(f"unknown ranker kind {kind!r}; expected one of {KINDS}")
    ranker = Ranker(kind, model, negative_rate=negative_rate, batch_size=batch_size,
                    hold_positives_ms=hold_positives_ms, max_features=max_features)
    ranker.params = dict(params)
    return ranker


def ranker_param_names(kind: RankerKind) -> set[str]:
    """The ``params`` keys ``make_ranker(kind, **params)`` accepts (the model's own
    constructor arguments plus the names it translates), for validating configs."""
    import inspect

    def args(cls: type) -> set[str]:
        return {name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    if kind == "lr":
        return {"lr", "numeric_lr", "l2", "intercept_lr"} | args(linear_model.LogisticRegression) - {"optimizer"}
    if kind == "fm":
        return ({"lr", "l2", "n_factors", "intercept_lr", "seed"}
                | args(facto.FMClassifier)
                - {"weight_optimizer", "latent_optimizer", "l2_weight", "l2_latent"})
    if kind == "efm":
        return args(EmbeddingFM)
    raise ValueError(f"unknown ranker kind {kind!r}; expected one of {KINDS}")
