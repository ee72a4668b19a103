"""Labelled training examples from the simulator, without Bytewax (tests and benchmarks).

Simulator events go through the real parser (``events.model.EventParser``) and the
real joiner (``state.join_state.Joiner``, one shard), with a feature hook that attaches
the user's and item's attributes to ``features`` the way the flow does at impression
time (``u:<attr>``, ``i:<attr>``; only attributes from events already processed, so
point-in-time correct). ``simulated_stream`` also records when each example left the
joiner (``emitted_ms``), which ``models.metrics.delayed_prequential`` needs to replay
the stream with late labels.

Defaults are chosen so that a short stream is a useful training stream: a positive is
a click (or a rating >= 4) within 60 s, so negatives are emitted ~65 s of event time
after their impression, and the simulator runs at 5 requests per event-time second
(~50 impressions/s), so the negatives' lag is a few thousand examples, not millions
(the flow's longer join wait, ``JoinConfig().wait_ms()``, would hold most negatives of a
short stream back to its end).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from events.model import EventParser
from events.simulator import SimConfig, Simulator
from state.join_state import HistoryContext, JoinConfig, Joiner
from state.sampling import NegativeSampler

Example = dict[str, Any]
_BATCH = 200  # simulator events per parse/advance step (~3.5 s of event time by default)

SYNTH_SIM = SimConfig(requests_per_s=5.0)
"""Simulator defaults for synthetic examples (5 requests per event-time second)."""

SYNTH_JOIN = JoinConfig(
    window_ms={"click": 60_000},
    default_window_ms=60_000,
    wait_ms_override=0,
    allowed_lateness_ms=5_000,
    positive={"click": 0.0, "rating": 4.0},
)
"""Joiner defaults for synthetic examples: click or rating >= 4 within 60 s is positive."""


class AttributeHook(HistoryContext):
    """The joiner's context: features ``{"u:<attr>": .., "i:<attr>": ..}`` from the latest
    attributes of every user and item seen so far (``observe``), and the users' history
    (the caller adds each feedback after joining it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.users: dict[str, dict[str, Any]] = {}
        self.items: dict[str, dict[str, Any]] = {}

    def observe(self, event: Any) -> None:
        """Record the attributes of a ``user`` or ``item`` event (others are ignored)."""
        if event.type == "user":
            self.users[event.user_id] = {f"u:{k}": v for k, v in event.attrs.items()}
        elif event.type == "item":
            self.items[event.item_id] = {f"i:{k}": v for k, v in event.attrs.items()}

    def example_features(self, user_id: str, item_id: str, ts_ms: int) -> dict[str, Any]:
        out = dict(self.users.get(user_id, ()))
        out.update(self.items.get(item_id, ()))
        return out


@dataclass
class SyntheticStream:
    """Examples in the order the joiner emitted them, with the event time of emission.

    ``emitted_ms[i]`` (epoch ms, non-decreasing) is the joiner's clock when
    ``examples[i]`` came out: the positive's feedback time, or the watermark that
    closed the negative's window. A trainer can learn an example from then on; a
    server scores it at its impression time ``examples[i]["ts"]``.
    """

    examples: list[Example]
    emitted_ms: list[int]


def simulated_stream(
    n_events: int,
    seed: int = 0,
    negative_rate: float = 1.0,
    sim_config: SimConfig | None = None,
    join_config: JoinConfig | None = None,
    **sim_overrides: Any,
) -> SyntheticStream:
    """The examples of the first ``n_events`` simulator events, with emission times.

    Args:
        n_events: simulator events to generate (examples are ~0.85 per event at r = 1).
        seed: simulator seed (the stream is deterministic in it).
        negative_rate: negative keep rate r; kept negatives carry weight 1/r.
        sim_config: simulator world (``SYNTH_SIM`` when None); ``sim_overrides`` are
            applied on top (e.g. ``drift_at=...``).
        join_config: joiner rules (``SYNTH_JOIN`` when None).
    """
    cfg = replace(sim_config or SYNTH_SIM, **sim_overrides)
    sim = Simulator(cfg, seed=seed, max_events=n_events)
    hook = AttributeHook()
    joiner = Joiner(join_config or SYNTH_JOIN, NegativeSampler(negative_rate), hook)
    parser = EventParser(max_future_skew_ms=365 * 86_400_000)
    examples: list[Example] = []
    emitted: list[int] = []

    def drain() -> None:
        out = joiner.drain()[0]
        if out:
            examples.extend(out)
            emitted.extend([joiner.max_ts_ms or 0] * len(out))

    while batch := sim.next_batch(_BATCH):
        events, _dead = parser.parse_batch(batch)
        for event in events:
            kind = event.type
            if kind == "impression":
                joiner.on_impression(event)
            elif kind == "feedback":
                joiner.on_feedback(event)
                hook.history.add(event.user_id, event.item_id, event.ts)
                drain()  # a positive leaves at its feedback's time
            else:
                hook.observe(event)
                joiner.observe(event.ts)
        joiner.advance()
        drain()
    joiner.flush()
    drain()
    return SyntheticStream(examples, emitted)


def simulated_examples(
    n_events: int,
    seed: int = 0,
    negative_rate: float = 1.0,
    sim_config: SimConfig | None = None,
    join_config: JoinConfig | None = None,
    order: Literal["emitted", "ts"] = "emitted",
    **sim_overrides: Any,
) -> list[Example]:
    """Just the examples of :func:`simulated_stream`, in emission order (``"emitted"``)
    or sorted by impression time (``"ts"``, stable)."""
    out = simulated_stream(n_events, seed, negative_rate, sim_config, join_config,
                           **sim_overrides).examples
    if order == "ts":
        out.sort(key=lambda e: e["ts"])
    return out
