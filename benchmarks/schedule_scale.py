"""How long the pure schedule tools take at scale: build, validate (and the planner's simulation) in one process.

    python -m benchmarks.schedule_scale                                   # 32 x 8 and 128 x 8 ranks, M = 1, 2
    python -m benchmarks.schedule_scale --nodes 128 --ranks 8 --microbatches 1,2 --out benchmarks/results/plan

Why: programs grow as P^2 x M actions (8.2 M at 1024 ranks, M = 1), and the strategy builds and validates its
schedule at start-up on every rank, so this must stay at seconds for the largest clusters TawPipe targets; the
planner builds and simulates the same programs. "with user barriers" is the second check the strategy runs at
start-up (``validate(with_user_barriers(s))``, TawPipe only). Each row runs in a fresh child process (one process per schedule,
as on a rank), so its peak RSS is its own. WeiPipe, the topology-unaware ablation, is run at a smaller size
(``--weipipe-nodes``): it has about twice TawPipe's actions and a slower builder. The planner's event simulation,
which shares bandwidth between concurrent flows, is timed only up to ``--simulate-max-ranks``.

Prints a markdown table and writes ``schedule_scale.json`` in ``--out``. Seconds are wall-clock; CPU seconds are
kept in the JSON (they differ from wall-clock when the machine is shared: the load average is recorded too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def measure(schedule: str, nodes: int, ranks: int, microbatches: int, simulate_max_ranks: int) -> dict:
    """Build, validate and (if small enough) simulate one schedule in this process; seconds, counts, peak RSS."""
    from lightning_tawpipe.schedule import build_tawpipe, validate, with_user_barriers
    from lightning_tawpipe.schedule.weipipe import build_weipipe
    from lightning_tawpipe.topology import Topology

    builder = {"tawpipe": build_tawpipe, "weipipe": build_weipipe}[schedule]
    row: dict = {"schedule": schedule, "nodes": nodes, "ranks_per_node": ranks, "world": nodes * ranks,
                 "microbatches": microbatches, "rss_imports_gb": _peak_rss_gb()}  # the package imports Lightning
    t0 = _clock()
    s = builder(Topology(nodes, ranks), microbatches)
    t1 = _clock()
    row["build_s"], row["build_cpu_s"] = t1[0] - t0[0], t1[1] - t0[1]
    row["rss_after_build_gb"] = _peak_rss_gb()
    validate(s)
    t2 = _clock()
    row["validate_s"], row["validate_cpu_s"] = t2[0] - t1[0], t2[1] - t1[1]
    if schedule == "tawpipe":  # the strategy also checks, at start-up, that user collectives cannot deadlock it
        validate(with_user_barriers(s))
    t3 = _clock()
    row["barriers_s"] = t3[0] - t2[0] if schedule == "tawpipe" else None
    row["simulate_s"] = None
    if nodes * ranks <= simulate_max_ranks:
        from lightning_tawpipe.plan import ChunkCosts, Cluster, simulate

        P = nodes * ranks
        simulate(s, Cluster(nodes, ranks, intra_bw=150e9, inter_bw=3e9),
                 ChunkCosts((1e-3,) * P, (2e-3,) * P, (5e7,) * P, (1e8,) * P))
        row["simulate_s"] = time.perf_counter() - t3[0]
    row["peak_rss_gb"] = _peak_rss_gb()
    row["actions"] = sum(map(len, s.programs))
    row["distinct_action_objects"] = len({id(a) for p in s.programs for a in p})  # ranks share identical actions
    return row


def _run_child(args: argparse.Namespace, schedule: str, nodes: int, mb: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.schedule_scale", "--one", schedule, str(nodes), str(args.ranks),
           str(mb), str(args.simulate_max_ranks)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    head = ("| schedule | ranks | M | actions | build s | validate s | actions/s (build+validate) "
            "| with user barriers s | simulate s | peak RSS GB (imports) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        rate = r["actions"] / (r["build_s"] + r["validate_s"])
        sim = f"{r['simulate_s']:.1f}" if r["simulate_s"] is not None else "-"
        barriers = f"{r['barriers_s']:.1f}" if r["barriers_s"] is not None else "-"
        lines.append(f"| {r['schedule']} | {r['nodes']} x {r['ranks_per_node']} | {r['microbatches']} "
                     f"| {r['actions'] / 1e6:.2f} M | {r['build_s']:.1f} | {r['validate_s']:.1f} | {rate / 1e6:.2f} M "
                     f"| {barriers} | {sim} | {r['peak_rss_gb']:.2f} ({r['rss_imports_gb']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="32,128", help="TawPipe node counts, comma-separated")
    p.add_argument("--ranks", type=int, default=8, help="ranks per node")
    p.add_argument("--microbatches", default="1,2")
    p.add_argument("--weipipe-nodes", default="32", help="WeiPipe node counts ('' for none)")
    p.add_argument("--simulate-max-ranks", type=int, default=256, help="time the planner's simulation up to here")
    p.add_argument("--out", default="benchmarks/results/plan")
    p.add_argument("--one", nargs=5, metavar=("SCHEDULE", "NODES", "RANKS", "M", "SIMULATE_MAX"),
                   help=argparse.SUPPRESS)  # a child process: measure one row, print it as JSON
    args = p.parse_args(argv)
    if args.one:
        schedule, *numbers = args.one
        print(json.dumps(measure(schedule, *map(int, numbers))))
        return 0

    mbs = [int(m) for m in args.microbatches.split(",")]
    runs = [("tawpipe", int(n)) for n in args.nodes.split(",") if n]
    runs += [("weipipe", int(n)) for n in args.weipipe_nodes.split(",") if n]
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
               "load_average_before": os.getloadavg()}
    rows = []
    for schedule, nodes in runs:
        for mb in mbs:
            rows.append(_run_child(args, schedule, nodes, mb))
            r = rows[-1]
            print(f"{schedule} {nodes}x{args.ranks} M={mb}: {r['actions']} actions, build {r['build_s']:.2f} s, "
                  f"validate {r['validate_s']:.2f} s, peak RSS {r['peak_rss_gb']:.2f} GB", file=sys.stderr)
    machine["load_average_after"] = os.getloadavg()
    print(_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "schedule_scale.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out / 'schedule_scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
