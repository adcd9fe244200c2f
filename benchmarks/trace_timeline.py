"""Draw one TawPipe step from the ranks' Chrome traces: where each rank computes, posts and waits.

    python -m benchmarks.trace_timeline benchmarks/results/trace-2x2-1gbit/tawpipe --out benchmarks/results/trace-2x2-1gbit

Reads ``PREFIX.rank<r>.json`` (or ``.json.gz``), written by ``benchmarks.worker --trace PREFIX`` (or ``speed.py
--trace``), which profile one timed step. The engine wraps each action in a ``TAWPIPE:<action>`` range: a
communication action's range is its posting plus any wait for a conflicting transfer, and ``TAWPIPE:wait-for:<c>``
is the wait before compute ``c``. On the main thread, every other moment of the step is the model's own work
(forward, backward, optimizer, Lightning). So the plot shows, per rank, how much communication is hidden (it ran
while the rank computed) and how much is exposed (the rank sat in a TAWPIPE range). Writes ``timeline.png`` and
``timeline.json`` (per-rank totals and every range) to ``--out``, and prints the totals.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter
from pathlib import Path

WAIT_FOR = "TAWPIPE:wait-for:"
PREFIX = "TAWPIPE:"


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def rank_files(prefix: str) -> dict[int, Path]:
    base = Path(prefix)
    files = {}
    for p in base.parent.glob(base.name + ".rank*.json*"):
        m = re.search(r"\.rank(\d+)\.json(\.gz)?$", p.name)
        if m:
            files[int(m.group(1))] = p
    if not files:
        raise SystemExit(f"no traces {prefix}.rank<r>.json[.gz]: run benchmarks.worker (or speed.py) with --trace")
    return dict(sorted(files.items()))


def summarize(events: list[dict]) -> dict:
    """The engine's ranges on the thread that ran most of them, and the step window that thread's events span.

    (WeiPipe mode runs micro-batches on threads of their own; this draws the busiest one.)
    """
    engine = [e for e in events if e.get("ph") == "X" and e.get("name", "").startswith(PREFIX)]
    if not engine:
        raise SystemExit("the trace has no TAWPIPE ranges: was it a TawPipe/WeiPipe run?")
    tid = Counter(e["tid"] for e in engine).most_common(1)[0][0]  # the thread that ran the program
    engine = sorted((e for e in engine if e["tid"] == tid), key=lambda e: e["ts"])
    main = [e for e in events if e.get("ph") == "X" and e.get("tid") == tid and "dur" in e]
    start = min(e["ts"] for e in main)
    end = max(e["ts"] + e["dur"] for e in main)
    ranges = [{"name": e["name"][len(PREFIX):], "start_ms": (e["ts"] - start) / 1e3, "ms": e["dur"] / 1e3,
               "wait_for_compute": e["name"].startswith(WAIT_FOR)} for e in engine]
    in_engine = _union_ms([(r["start_ms"], r["start_ms"] + r["ms"]) for r in ranges])
    step_ms = (end - start) / 1e3
    return {"step_ms": step_ms, "engine_ms": in_engine, "other_ms": step_ms - in_engine,
            "wait_for_compute_ms": sum(r["ms"] for r in ranges if r["wait_for_compute"]), "ranges": ranges,
            "t0_us": start}


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def _kind(name: str) -> str:
    if name.startswith("wait-for:"):
        return "wait before compute"
    op = re.match(r"[A-Z]+", name).group(0)
    return {"RW": "receive weights", "SW": "send weights", "BW": "broadcast weights", "CW": "copy own weights",
            "RG": "reduce gradients", "SG": "send gradients", "QG": "receive gradients", "AG": "accumulate",
            "X": "release"}.get(op, "other")


COLORS = {"wait before compute": "tab:red", "receive weights": "tab:orange", "broadcast weights": "gold",
          "reduce gradients": "tab:purple", "send gradients": "tab:pink", "receive gradients": "tab:brown",
          "accumulate": "tab:olive", "send weights": "tab:cyan", "copy own weights": "tab:gray",
          "release": "lightgray", "other": "black"}


def plot(per_rank: dict[int, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(s["t0_us"] for s in per_rank.values())
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.7 * len(per_rank)))
    seen = set()
    for row, (rank, s) in enumerate(per_rank.items()):
        shift = (s["t0_us"] - t0) / 1e3  # ranks share the machine's clock: align them
        ax.broken_barh([(shift, s["step_ms"])], (row - 0.4, 0.8), color="tab:blue", alpha=0.25,
                       label=None if "model" in seen else "model's own work (compute)")
        seen.add("model")
        for r in s["ranges"]:
            kind = _kind(r["name"])
            if r["ms"] < 0.5 and kind in ("wait before compute", "release"):
                continue  # a compute boundary with nothing to wait for: not worth a mark
            ax.broken_barh([(shift + r["start_ms"], max(r["ms"], 0.3))], (row - 0.4, 0.8), color=COLORS[kind],
                           label=None if kind in seen else kind)
            seen.add(kind)
    ax.set_yticks(range(len(per_rank)), [f"rank {r}" for r in per_rank])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first rank's step began")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.1 / len(per_rank)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="trace prefix: files PREFIX.rank<r>.json[.gz]")
    p.add_argument("--out", default=None, help="directory for timeline.png / timeline.json (default: the prefix's)")
    p.add_argument("--title", default=None)
    a = p.parse_args()
    per_rank = {rank: summarize(load_events(path)) for rank, path in rank_files(a.prefix).items()}
    out = Path(a.out) if a.out else Path(a.prefix).parent
    out.mkdir(parents=True, exist_ok=True)
    print("| rank | traced step ms | in engine ranges ms | of which waiting before compute | model's own work ms |")
    print("|---|---|---|---|---|")
    for rank, s in per_rank.items():
        print(f"| {rank} | {s['step_ms']:.0f} | {s['engine_ms']:.0f} | {s['wait_for_compute_ms']:.0f} | "
              f"{s['other_ms']:.0f} |")
    (out / "timeline.json").write_text(json.dumps({str(r): s for r, s in per_rank.items()}, indent=1))
    plot(per_rank, out / "timeline.png", a.title or f"one traced step: {Path(a.prefix).name}")


if __name__ == "__main__":
    main()
