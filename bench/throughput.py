"""Throughput of the main flow on 1M simulated events, beside a trivial passthrough flow.

Both flows read the same pre-generated JSONL log with the same replay source in this
process (single worker). The main flow parses, validates, shards, joins, samples and
writes every output to JSONL files; the passthrough flow only turns each line into a
Bytewax item and drops it. Usage: ``python bench/throughput.py [-n EVENTS]``.
"""

from __future__ import annotations

import argparse

import orjson

from common import count_lines, flow_events_per_s, passthrough_events_per_s, simulated_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000)
    args = parser.parse_args()
    log = simulated_log(args.n)
    n = count_lines(log)
    passthrough = passthrough_events_per_s(log)
    main_rate, summary = flow_events_per_s(log)
    mix = summary["events_by_type"]
    print(f"log: {n:,} simulated events, mix {mix}")
    print(f"outputs: {summary['outputs']}")
    print(f"passthrough flow: {passthrough:,.0f} events/s")
    print(f"main flow:        {main_rate:,.0f} events/s  ({main_rate / passthrough:.2f}x passthrough)")
    print(orjson.dumps({
        "events": n,
        "events_per_s": round(main_rate, 1),
        "passthrough_events_per_s": round(passthrough, 1),
        "ratio": round(main_rate / passthrough, 3),
    }).decode())


if __name__ == "__main__":
    main()
