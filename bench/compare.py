"""Two runs of ``bench_torch_cpu.py`` side by side: before and after a change.

    python bench/compare.py BEFORE.json AFTER.json [--title T] [--out OUT.md]

For every (case, mode, batch, seq_q, seq_k) both runs timed: attncc's median time in each, and
for attncc with its defaults and with the shipped tuning records the ratio to the peer measured
in the same run (the first of SDPA, Flex, eager that both runs timed) and the change of that
ratio, which is the fairer figure across two runs. Changes past ``--limit`` (default 3%) are
marked ``slower``; keys only one run timed are listed after the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = ("sdpa", "flex", "eager")


def rows(path: str) -> dict:
    """``{(case, mode, batch, seq_q, seq_k): times}`` of one run (seconds by implementation)."""
    return {(r["case"], r["mode"], r.get("batch", 1), r["seq_q"], r["seq_k"]): r["times"]
            for r in json.loads(Path(path).read_text())["rows"]}


def _change(t0: dict, t1: dict, impl: str, peer: str | None, limit: float) -> str:
    """``impl``'s ratio to ``peer`` in each run and the change: ``"r0 | r1 | +x.x%"``, the
    change marked ``slower`` past ``limit``; dashes where a run lacks either."""
    if peer is None or impl not in t0 or impl not in t1:
        return "– | – | –"
    r0, r1 = t0[impl] / t0[peer], t1[impl] / t1[peer]
    slow = " slower" if r1 / r0 - 1 > limit else ""
    return f"{r0:.3f} | {r1:.3f} | {100 * (r1 / r0 - 1):+.1f}%{slow}"


def table(before: dict, after: dict, limit: float) -> list[str]:
    """Markdown rows for the keys both runs timed attncc on, in the before run's order: attncc
    with its defaults and with the shipped tuning records (``attncc_records``), each ratio
    taken against the first peer of ``PEERS`` that both runs timed; then the keys only one
    run has."""
    lines = ["| case | mode | B | seq_q | seq_k | peer | attncc before (ms) | after (ms) | "
             "attncc/peer before | after | change | records/peer before | after | change |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, t0 in before.items():
        t1 = after.get(key)
        if t1 is None or "attncc" not in t0 or "attncc" not in t1:
            continue
        peer = next((p for p in PEERS if p in t0 and p in t1), None)
        lines.append(f"| {' | '.join(map(str, key))} | {peer or '–'} | "
                     f"{1e3 * t0['attncc']:.2f} | {1e3 * t1['attncc']:.2f} | "
                     f"{_change(t0, t1, 'attncc', peer, limit)} | "
                     f"{_change(t0, t1, 'attncc_records', peer, limit)} |")
    for label, one, other in (("before", before, after), ("after", after, before)):
        alone = [key for key, t in one.items()
                 if "attncc" in t and "attncc" not in other.get(key, {})]
        if alone:
            lines += ["", f"Timed with attncc only in the {label} run: "
                      + "; ".join(" ".join(map(str, key)) for key in alone)]
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
