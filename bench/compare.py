"""Two runs of ``bench_torch_cpu.py`` side by side: before and after a change.

    python bench/compare.py BEFORE.json AFTER.json [--title T] [--out OUT.md]

For every (case, mode, batch, seq_q, seq_k) in both runs: attncc's median time in each, its
ratio to the peer measured in the same run (SDPA, else Flex, else eager), and the change of that
ratio, which is the fairer figure across two runs. Rows whose ratio grew by more than
``--limit`` (default 3%) are marked ``slower``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = ("sdpa", "flex", "eager")


def rows(path: str) -> dict:
    """``{(case, mode, batch, seq_q, seq_k): (attncc seconds, attncc/peer)}`` of one run."""
    found = {}
    for r in json.loads(Path(path).read_text())["rows"]:
        peer = next((p for p in PEERS if p in r["times"]), None)
        ratio = r["ratios"].get(f"attncc/{peer}") if peer else None
        found[(r["case"], r["mode"], r.get("batch", 1), r["seq_q"], r["seq_k"])] = (
            r["times"]["attncc"], ratio)
    return found


def table(before: dict, after: dict, limit: float) -> list[str]:
    """Markdown rows for the keys both runs share, in the before run's order."""
    lines = ["| case | mode | B | seq_q | seq_k | attncc before (ms) | after (ms) | "
             "attncc/peer before | after | change of the ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, (t0, r0) in before.items():
        if key not in after:
            continue
        t1, r1 = after[key]
        change = "–" if r0 is None or r1 is None else f"{100 * (r1 / r0 - 1):+.1f}%"
        slow = " slower" if r0 and r1 and r1 / r0 - 1 > limit else ""
        ratios = " | ".join("–" if r is None else f"{r:.3f}" for r in (r0, r1))
        lines.append(f"| {' | '.join(map(str, key))} | {1e3 * t0:.2f} | {1e3 * t1:.2f} | "
                     f"{ratios} | {change}{slow} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--title", default="bench_torch_cpu.py before and after")
    parser.add_argument("--limit", type=float, default=0.03)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    machine = json.loads(Path(args.before).read_text())["machine"]
    text = "\n".join([f"# {args.title}", "", f"Machine (before run): {machine}", "",
                      *table(rows(args.before), rows(args.after), args.limit)]) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
