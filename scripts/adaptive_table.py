#!/usr/bin/env python3
"""Prints the side-by-side table of docs/adaptive.md, and writes a copy of the JSON in which the `adaptive`
strategy (the limiter alone) stands in for `default`, for check_scenarios.py.

    cargo run --release --example overload -- --json --scenario ... --strategy aimd,vegas,gradient2,adaptive > a.json
    python3 scripts/adaptive_table.py a.json a-as-default.json
    python3 ../shared/check_scenarios.py a-as-default.json

Each cell: goodput / capacity, p99 of good requests (ms), mean limit.
"""
import json
import sys

STRATEGIES = ["aimd", "vegas", "gradient2", "adaptive"]
PHASES = [
    ("s1-step", "calm"), ("s1-step", "2x"), ("s1-step", "after"),
    ("s2-sustained", "calm"), ("s2-sustained", "2x"), ("s2-sustained", "5x"), ("s2-sustained", "10x"),
    ("s2-sustained", "after"),
    ("s3-convergence", "hold"),
    ("s4-slowdown", "normal"), ("s4-slowdown", "slow"), ("s4-slowdown", "recovered"),
    ("s5a-hang", "late"),
    ("s5b-creep", "early"), ("s5b-creep", "late"),
]


def cell(row):
    if row is None:
        return "n/a"
    p99 = row["p99_ms"]
    p99 = "–" if p99 is None else f"{p99:.0f}"
    limit = row["mean_limit"]
    limit = "–" if limit is None else f"{limit:.1f}"
    return f"{row['goodput_rps'] / row['capacity_rps']:.2f} / {p99} / {limit}"


def main(path, out=None):
    data = json.load(open(path))
    rows = [r for r in data["rows"] if r["class"] == "all"]
    index = {(r["scenario"], r["strategy"], r["phase"]): r for r in rows}
    print("| scenario | phase | " + " | ".join(STRATEGIES) + " |")
    print("|---|---|" + "---|" * len(STRATEGIES))
    for scenario, phase in PHASES:
        cells = [cell(index.get((scenario, s, phase))) for s in STRATEGIES]
        print(f"| {scenario} | {phase} | " + " | ".join(cells) + " |")
    if out:
        stand_in = []
        for r in data["rows"]:
            if r["strategy"] == "default":
                continue
            if r["strategy"] == "adaptive":
                r = dict(r, strategy="default")
            stand_in.append(r)
        json.dump(dict(data, rows=stand_in), open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
