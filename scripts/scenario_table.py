#!/usr/bin/env python3
"""Prints the overload-scenario table of docs/PERFORMANCE.md from the overload example's JSON.

    cargo run --release --example overload -- --json > out.json
    python3 scripts/scenario_table.py out.json

Each cell: goodput as a share of capacity / p99 of good requests in ms / share of backend time wasted on
requests whose client had already given up (s9's outage row: backend requests as a share of offered).
"""
import json
import sys

STRATEGIES = ["unprotected", "static", "default", "breaker", "aimd", "vegas", "gradient2"]
ROWS = [
    ("s1-step", "2x"),
    ("s2-sustained", "2x"),
    ("s2-sustained", "10x"),
    ("s3-convergence", "hold"),
    ("s4-slowdown", "slow"),
    ("s4-slowdown", "recovered"),
    ("s5b-creep", "late"),
    ("s6-priority", "spike"),
    ("s7-deadline", "3x"),
    ("s8-bursts", "standing-2x"),
    ("s9-outage", "outage"),
    ("s9-outage", "healthy-after"),
]


def cell(row, outage):
    if row is None:
        return "n/a"
    if outage:
        return f"backend {row['backend_rps'] / row['offered_rps']:.2f} of offered"
    p99 = row["p99_ms"]
    p99 = "–" if p99 is None else f"{p99:.0f}"
    return f"{row['goodput_rps'] / row['capacity_rps']:.2f} / {p99} / {row['wasted_work']:.2f}"


def main(path):
    rows = json.load(open(path))["rows"]
    index = {(r["scenario"], r["strategy"], r["phase"]): r for r in rows if r["class"] == "all"}
    print("| scenario / phase | " + " | ".join(STRATEGIES) + " |")
    print("|---|" + "---|" * len(STRATEGIES))
    for scenario, phase in ROWS:
        cells = [cell(index.get((scenario, s, phase)), phase == "outage") for s in STRATEGIES]
        print(f"| {scenario} {phase} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out.json")
