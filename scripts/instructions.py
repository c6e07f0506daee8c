#!/usr/bin/env python3
"""Instructions executed per request by stacks of the `overhead` bench, counted by callgrind: a figure that does
not move from one process or build to the next, unlike the nanoseconds (see docs/PERFORMANCE.md).

    cargo bench --all-features --bench overhead --no-run          # prints the bench binary's path
    python3 scripts/instructions.py BINARY "tower Timeout" "ours Deadline (server, max 30 s)"

Needs valgrind. Each stack runs in criterion's profiling mode (`--profile-time`) under callgrind; a request is one
call of `http::request::Parts::new` (every stack's request is built once per iteration), and the whole process's
count is divided by that number, so criterion's own work is spread over hundreds of thousands of requests. The
`bare service_fn` stack is always measured, and the last column is each stack's count minus it.
"""
import os
import re
import subprocess
import sys
import tempfile

BARE = "bare service_fn"


def per_request(binary: str, stack: str, seconds: int) -> float:
    """Instructions per request of one stack of the single-task group."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        pattern = "single/(" + re.escape(stack) + ")$"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "--bench", pattern,
             "--profile-time", str(seconds)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = open(out).read()
    total = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
    names = {m.group(1): m.group(2) for m in re.finditer(r"c?fn=\((\d+)\) (.*)", text)}
    ids = {k for k, v in names.items() if v == "http::request::Parts::new"}
    requests = sum(int(m.group(2)) for m in re.finditer(r"cfn=\((\d+)\).*\ncalls=(\d+)", text)
                   if m.group(1) in ids)
    if requests == 0:
        sys.exit(f"no request counted for {stack!r}: is it a stack of the overhead bench?")
    return total / requests


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary, stacks = sys.argv[1], sys.argv[2:]
    seconds = int(os.environ.get("PROFILE_SECONDS", "2"))
    bare = per_request(binary, BARE, seconds)
    print("| stack | instructions / request | added |")
    print("|---|---|---|")
    print(f"| {BARE} | {bare:.0f} | 0 |")
    for stack in stacks:
        n = per_request(binary, stack, seconds)
        print(f"| {stack} | {n:.0f} | {n - bare:.0f} |")


if __name__ == "__main__":
    main()
