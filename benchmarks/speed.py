"""Speed benchmark: TawPipe against WeiPipe, FSDP (FULL/HYBRID, FSDP2), DDP and 1F1B across slow inter-node links.

    sudo python -m benchmarks.speed --nodes 2 --devices 2 --rates 50mbit,200mbit,none --seq 256,512

Every emulated node is a network namespace (``benchmarks/netns/netns-topology.sh``, from the team's shared
scripts) whose ranks talk to other nodes over one rate-limited veth link and to each other over the namespace's
loopback. Each (rate, sequence length) point runs every strategy in a rotating order (so slow drift of a shared
machine does not favour one strategy), including ``compute``: the compute-only reference, every rank's forward and
backward with no communication, in the same processes on the same emulated nodes (``benchmarks/baselines.py``).

Reported per run: median step time after warm-up, tokens/s per rank, ratio to FSDP FULL_SHARD, model-state bytes and
peak RSS per rank, inter-node bytes per step measured on the link and by TawPipe's accounting, TawPipe's
comm-wait, and "comm/compute" = (link bytes per node per step / link rate) / compute-only step time, which says
whether a point is communication-bound (the regime of the TawPipe paper). Writes ``results.json``, ``results.md``
and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NETNS = HERE / "netns" / "netns-topology.sh"
PREFIX = "tawbench"
LIGHTNING_STRATEGIES = ("compute", "tawpipe", "weipipe", "ddp", "fsdp", "hsdp", "fsdp2")
ALL = (*LIGHTNING_STRATEGIES, "1f1b")
# opt-in ablations: a TawPipe run with other knobs, side by side with the default. The knobs are the worker's flags
# (and TawPipeStrategy's arguments); benchmarks.plan_validate predicts every variant from the same dict.
VARIANTS = {
    "tawpipe-r1": {"reuse": 1},  # the paper's schedule: only the turnaround chunk kept
    "tawpipe-p3": {"prefetch": 3},  # one chunk deeper prefetch (and reuse 3): 4 weight buffers
    # a lighter chunk 0 (embedding + 1 block; the 8-layer benchmark model on 4 ranks): a shorter round trip at the
    # iteration boundary, which no schedule hides (plan/floor.py), for a 3-block largest chunk
    "tawpipe-light0": {"partition": [2, 2, 3, 3]},
    # a third gradient buffer: backward runs on while two gradient sends still drain over the slow link
    "tawpipe-gb3": {"grad_buffers": 3},
    # what the planner predicts best at 2-4 Gbit/s with the cores left to communication: all three together
    "tawpipe-gb3-light0-p1": {"grad_buffers": 3, "partition": [2, 2, 3, 3], "prefetch": 1},
    # chunk 0 mirrored on every node: its gradient is summed by one exchange, its weights never cross nodes
    "tawpipe-rep0": {"replicate_first_chunk": True},
    # the mirror with a third gradient buffer: on 2 nodes at 1-2 Gbit/s the planner finds backward stalling on a full
    # gradient buffer while chunk 3's gradient drains over the link, which the third buffer absorbs
    "tawpipe-rep0-gb3": {"replicate_first_chunk": True, "grad_buffers": 3},
    # chunks 0 and 1 mirrored: chunk 1's round trip, which binds at 1 Gbit/s once chunk 0's is gone, goes too, and
    # its exchange overlaps B0
    "tawpipe-rep01": {"replicate_first_chunk": 2},
    # the planner's best at 1 Gbit/s on 2 x 2 (a search over partitions x mirrored chunks x prefetch): a one-block
    # chunk 1, whose round trip hides behind B0 and F0 on its own, with chunk 0 mirrored; and rep01 one chunk deeper.
    # Both measured slower than rep01 (results/sleep-blocks/2x2-rep-combos: 1.28 and 1.22 against 1.17)
    "tawpipe-rep0-p2134": {"replicate_first_chunk": True, "partition": [2, 1, 3, 4]},
    "tawpipe-rep01-p3": {"replicate_first_chunk": 2, "prefetch": 3},
    # the planner's best on 3 x 2 at 1 Gbit/s over prefetch x gradient buffers x mirrored chunks (1.25 predicted,
    # against 1.34 for rep01) and over every partition of the 10 units as well (1.22)
    "tawpipe-rep0-p3-gb4": {"replicate_first_chunk": True, "prefetch": 3, "grad_buffers": 4},
    "tawpipe-rep01-p3-p321211": {"replicate_first_chunk": 2, "prefetch": 3, "partition": [3, 2, 1, 2, 1, 1]},
    # the same search with deeper prefetch (up to 6) and more mirrored chunks (up to 5): its best two, predicted 1.155
    # and 1.165 once the per-step checks stopped blocking. Mirroring 4 (or 3) of the 6 chunks moves the backward's
    # bytes into the forward, at the cost of local rank 0 holding 3 chunks' state
    "tawpipe-rep0123-p5-p211213": {"replicate_first_chunk": 4, "prefetch": 5, "partition": [2, 1, 1, 2, 1, 3]},
    "tawpipe-rep012-p6-p222112": {"replicate_first_chunk": 3, "prefetch": 6, "partition": [2, 2, 2, 1, 1, 2]},
    # the same mirrors with prefetch 3 (4 weight slots instead of 7): which of the two knobs buys the overlap
    "tawpipe-rep012-p3-p222112": {"replicate_first_chunk": 3, "prefetch": 3, "partition": [2, 2, 2, 1, 1, 2]},
    # every remote chunk and gradient sum in stripes over every rank's own rail (for --rails = --devices)
    "tawpipe-stripe": {"stripe": True},
    # striped, chunk 0 mirrored, one chunk deeper prefetch: the planner's best on 3 x 2 with 2 rails at 1 Gbit/s each
    "tawpipe-stripe-rep0-p3": {"stripe": True, "replicate_first_chunk": True, "prefetch": 3},
    # striped, with the knobs that met the overlap target on 3 x 2 with one link (fewer striped all-gathers at the
    # iteration's head, where the 2-core box runs out of CPU)
    "tawpipe-stripe-rep012-p6-p222112": {"stripe": True, "replicate_first_chunk": 3, "prefetch": 6,
                                         "partition": [2, 2, 2, 1, 1, 2]},
    # chunk-major micro-batch order: every micro-batch through a chunk while it is resident, one gradient per chunk
    # (with --n_microbatches > 1: the weight and gradient bytes of one micro-batch)
    "tawpipe-chunk": {"microbatch_order": "chunk"},
    # the whole per-rank batch as one micro-batch: the same bytes as chunk-major, one forward per block and batch
    "tawpipe-mb1": {"n_microbatches": 1},
}


def variant_flags(knobs: dict) -> list[str]:
    """Worker flags for a variant's knobs (a partition list as ``2,2,3,3``, a True switch as the bare flag)."""
    flags = []
    for knob, value in knobs.items():
        if value is True:
            flags.append(f"--{knob}")
            continue
        flags += [f"--{knob}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def rate_bits_per_s(rate: str) -> float | None:
    r = rate.lower()
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if r.endswith(unit):
            return float(r[: -len(unit)]) * scale
    return None  # "none": unlimited


def netns(*args: str) -> str:
    return subprocess.run(["bash", str(NETNS), *args], check=True, capture_output=True, text=True).stdout


def check_environment() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        raise SystemExit("The speed benchmark emulates nodes with network namespaces: run it as root with iproute2 "
                         "(ip, tc) installed.")


def worker_args(strategy: str, a: argparse.Namespace, seq: int, out: Path) -> list[str]:
    n_microbatches = 0 if strategy == "1f1b" else a.n_microbatches  # 1F1B: one micro-batch per stage (0 = world)
    variant_args = variant_flags(VARIANTS[strategy]) if strategy in VARIANTS else []
    strategy = "tawpipe" if strategy in VARIANTS else strategy
    return ["--strategy", strategy, "--n_layer", str(a.n_layer), "--n_embd", str(a.n_embd), "--n_head", str(a.n_head),
            "--n_query_groups", str(a.n_query_groups), "--seq_length", str(seq), "--batch_size", str(a.batch_size),
            "--n_microbatches", str(n_microbatches), "--prefetch", str(a.prefetch), "--reuse", str(a.reuse),
            "--steps", str(a.steps), "--threads", str(a.threads),
            "--warmup", str(a.warmup), "--out", str(out),
            *([] if strategy == "1f1b" or a.precision == "32-true" else ["--precision", a.precision]),
            *(["--sleep_blocks", a.sleep_blocks] if a.sleep_blocks else []),
            *(["--free_running"] if a.free_running else []),
            *variant_args]  # last, so they win over the shared knobs


def run_on_nodes(strategy: str, a: argparse.Namespace, seq: int, out: Path, port: int) -> dict:
    """One launcher per emulated node, each in its namespace, like ``srun`` would start them."""
    module = "benchmarks.onef1b" if strategy == "1f1b" else "benchmarks.worker"
    args = worker_args(strategy, a, seq, out)
    if a.trace and strategy != "1f1b":  # Chrome traces next to the run's JSON: <run>.rank<r>.json
        args += ["--trace", str(out.with_suffix(""))]
    procs = []
    for node in range(a.nodes):
        pin = [] if not a.cpus_per_node else \
            ["taskset", "-c", f"{node * a.cpus_per_node}-{(node + 1) * a.cpus_per_node - 1}"]
        cmd = ["bash", str(NETNS), "run", str(node), "--prefix", PREFIX, "--", "env", f"MASTER_PORT={port}",
               f"PYTHONPATH={HERE.parent}", *pin, sys.executable, "-m", module, "--num_nodes", str(a.nodes),
               "--devices", str(a.devices), *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent))
    return _collect(procs, out, strategy, a.timeout)


def _collect(procs: list, out: Path, name: str, timeout: float) -> dict:
    logs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"strategy": name, "error": f"timed out after {timeout}s"}
    if not out.exists():
        return {"strategy": name, "error": "\n".join(log[-3000:] for log in logs)}
    result = json.loads(out.read_text())
    result["strategy"] = name  # a variant's worker ran its base strategy
    if any(p.returncode for p in procs):  # measured, then a process died in teardown: keep it, say so
        result["exit_warning"] = [p.returncode for p in procs]
    return result


def measure(a: argparse.Namespace) -> list[dict]:
    check_environment()
    if a.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {a.repeats}")
    if a.cpus_per_node and (a.cpus_per_node * a.nodes > (os.cpu_count() or 1) or shutil.which("taskset") is None):
        raise SystemExit(f"--cpus_per_node {a.cpus_per_node} x {a.nodes} nodes needs that many cores "
                         f"(this machine has {os.cpu_count()}) and taskset (util-linux)")
    out_dir = Path(a.out)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    port = 29600
    strategies = [s for s in a.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in ALL and s not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join((*ALL, *VARIANTS))}")
    if a.free_running and "1f1b" in strategies:
        raise SystemExit("--free_running times Lightning strategies only (1F1B's worker times its own schedule), so "
                         "leave 1f1b out of --strategies")
    if a.sleep_blocks and "1f1b" in strategies:
        raise SystemExit("--sleep_blocks patches LitGPT blocks inside the Lightning workers; benchmarks.onef1b has "
                         "its own stages, so leave 1f1b out of --strategies")
    point = 0
    for rate in a.rates.split(","):
        subprocess.run(["bash", str(NETNS), "destroy", "--prefix", PREFIX], capture_output=True)
        netns("create", "--nodes", str(a.nodes), "--rate", rate, "--prefix", PREFIX, "--rails", str(a.rails))
        try:
            for seq in (int(s) for s in a.seq.split(",")):
                rounds = []
                for repeat in range(a.repeats):
                    order = strategies[point % len(strategies):] + strategies[: point % len(strategies)]
                    point += 1
                    runs = {}
                    for strategy in order:
                        port += 50
                        suffix = f"-r{repeat}" if a.repeats > 1 else ""
                        out = out_dir / "runs" / f"{strategy}-{rate}-{seq}{suffix}.json"
                        out.unlink(missing_ok=True)
                        runs[strategy] = run_on_nodes(strategy, a, seq, out, port)
                        print(_one_line(rate, seq, runs[strategy]), flush=True)
                    rounds.append(annotate(runs, rate, seq, a))
                results += merge_rounds(rounds)
        finally:
            subprocess.run(["bash", str(NETNS), "destroy", "--prefix", PREFIX], capture_output=True)
    return results


def annotate(runs: dict, rate: str, seq: int, a: argparse.Namespace) -> list[dict]:
    """Add the point, ratios and the communication/compute ratio to every run of one (rate, seq) point."""
    fsdp = runs.get("fsdp", {}).get("step_time_median")
    bits = rate_bits_per_s(rate)
    rows = []
    for name, r in runs.items():
        row = {"rate": rate, "seq_length": seq, "nodes": a.nodes, "devices": a.devices, **r}
        if "error" not in r:
            compute = runs.get("compute", {})
            row["vs_fsdp"] = r["step_time_median"] / fsdp if fsdp else None
            row["vs_compute_only"] = r["step_time_median"] / compute["step_time_median"] \
                if "step_time_median" in compute else None
            per_node = r.get("link_tx_bytes_per_step", 0) / a.nodes
            # a node's bandwidth: all of its rails (each at the rate)
            row["comm_over_compute"] = (per_node * 8 / (bits * a.rails)) / compute["step_time_median"] \
                if bits and "step_time_median" in compute else None
        rows.append(row)
    return rows


# per-run figures that a point with several rounds reports as their median (ratios paired within a round)
MEDIAN_OVER_ROUNDS = ("step_time_median", "tokens_per_s_per_rank", "vs_fsdp", "vs_compute_only", "comm_over_compute",
                      "link_tx_bytes_per_step", "link_rx_bytes_per_step", "engine_inter_node_bytes_per_step",
                      "comm_wait_s_per_step", "rank_cpu_s_per_step", "machine_cpu_s_per_step",
                      "machine_busy_fraction")


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per strategy from ``--repeats`` rounds of a point: the median of each round's figure.

    Ratios are taken within a round first (each strategy against the compute-only / FSDP run next to it), then the
    median over rounds, so slow drift of a shared machine cancels. The per-round values are kept as ``*_rounds``.
    """
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for name in dict.fromkeys(r["strategy"] for rows in rounds for r in rows):
        ok = [r for rows in rounds for r in rows if r["strategy"] == name and "error" not in r]
        if not ok:
            merged.append(next(r for rows in rounds for r in rows if r["strategy"] == name))
            continue
        row = dict(ok[0], rounds=len(ok), step_times=[t for r in ok for t in r["step_times"]])
        for key in MEDIAN_OVER_ROUNDS:
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
                row[f"{key}_rounds"] = values
        merged.append(row)
    return merged


def _one_line(rate: str, seq: int, r: dict) -> str:
    if "error" in r:
        return f"{rate:>8} S={seq:<5} {r['strategy']:<16} FAILED: {r['error'][-300:]}"
    return (f"{rate:>8} S={seq:<5} {r['strategy']:<16} {r['step_time_median'] * 1e3:9.1f} ms/step  "
            f"link {r.get('link_tx_bytes_per_step', 0) / 1e6:8.2f} MB/step")


def markdown(results: list[dict]) -> str:
    head = ("| rate | S | strategy | step ms | tok/s/rank | vs FSDP | vs compute-only | comm/compute | "
            "link MB/step | engine MB/step | comm-wait ms | machine CPU s/step | busy | state MB/rank (max) | "
            "peak RSS MB (max) |")
    lines = [head, "|" + "---|" * 15]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['rate']} | {r['seq_length']} | {r['strategy']} | failed | | | | | | | | | | | |")
            continue
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        lines.append(
            f"| {r['rate']} | {r['seq_length']} | {r['strategy']} | {r['step_time_median'] * 1e3:.0f} | "
            f"{r['tokens_per_s_per_rank']:.0f} | {f(r.get('vs_fsdp'), '.2f')} | {f(r.get('vs_compute_only'), '.2f')} | "
            f"{f(r.get('comm_over_compute'), '.2f')} | {r.get('link_tx_bytes_per_step', 0) / 1e6:.2f} | "
            f"{r.get('engine_inter_node_bytes_per_step', 0) / 1e6:.2f} | {r.get('comm_wait_s_per_step', 0) * 1e3:.0f} | "
            f"{f(r.get('machine_cpu_s_per_step'), '.2f')} | {f(r.get('machine_busy_fraction'), '.0%')} | "
            f"{max(r.get('model_state_bytes') or [0]) / 1e6:.1f} | {max(r.get('peak_rss_mb') or [0]):.0f} |"
        )
    return "\n".join(lines)


COLORS = {"compute": "black", "tawpipe": "tab:red", "weipipe": "tab:orange", "ddp": "tab:green",
          "fsdp": "tab:blue", "hsdp": "tab:cyan", "fsdp2": "tab:purple", "1f1b": "tab:brown", "tawpipe-r1": "salmon",
          "tawpipe-p3": "darkred", "tawpipe-light0": "magenta", "tawpipe-gb3": "olive",
          "tawpipe-gb3-light0-p1": "teal"}


def plot(results: list[dict], out_dir: Path) -> None:
    """throughput_vs_rate.png, throughput_vs_seq.png, link_bytes.png, memory.png (whichever the sweep supports)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    # every strategy that ran, in COLORS' order first (a name without a colour is drawn grey, not dropped)
    names = list(dict.fromkeys([n for n in COLORS if any(r["strategy"] == n for r in ok)]
                               + [r["strategy"] for r in ok]))
    rates = list(dict.fromkeys(r["rate"] for r in ok))
    seqs = sorted({r["seq_length"] for r in ok})

    def lines(ax, x_of, keep, title, xlabel):
        for name in names:
            pts = sorted((x_of(r), r["tokens_per_s_per_rank"]) for r in ok if r["strategy"] == name and keep(r))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color=COLORS.get(name, "grey"),
                        linestyle="--" if name == "compute" else "-")
        ax.set(title=title, xlabel=xlabel, ylabel="tokens/s per rank")
        ax.legend(fontsize=8)

    if len(rates) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines(ax, lambda r: rates.index(r["rate"]), lambda r: r["seq_length"] == seqs[-1],
              f"throughput vs inter-node rate (S={seqs[-1]})", "inter-node link rate")
        ax.set_xticks(range(len(rates)), rates)
        fig.tight_layout(), fig.savefig(out_dir / "throughput_vs_rate.png", dpi=110), plt.close(fig)
    if len(seqs) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        lines(axes[0], lambda r: r["seq_length"], lambda r: r["rate"] == rates[0],
              f"throughput vs sequence length ({rates[0]})", "sequence length")
        for name in names:
            pts = sorted((r["seq_length"], r.get("link_tx_bytes_per_step", 0) / 1e6) for r in ok
                         if r["strategy"] == name and r["rate"] == rates[0] and name != "compute")
            if pts:
                axes[1].plot(*zip(*pts), marker="o", label=name, color=COLORS.get(name, "grey"))
        axes[1].set(title=f"inter-node MB per step on the link ({rates[0]})", xlabel="sequence length", ylabel="MB")
        axes[1].legend(fontsize=8)
        fig.tight_layout(), fig.savefig(out_dir / "throughput_vs_seq.png", dpi=110), plt.close(fig)
    point = [r for r in ok if r["rate"] == rates[0] and r["seq_length"] == seqs[-1]]
    for key, scale, title, fname in (
        ("link_tx_bytes_per_step", 1e6, f"inter-node MB per step on the link ({rates[0]}, S={seqs[-1]})",
         "link_bytes.png"),
        ("model_state_bytes", 1e6, "model-state MB per rank (largest rank)", "memory.png"),
    ):
        rows = [r for r in point if r["strategy"] != "compute" or key == "model_state_bytes"]
        values = [(max(r[key]) if isinstance(r.get(key), list) else r.get(key, 0)) / scale for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([r["strategy"] for r in rows], values, color=[COLORS.get(r["strategy"], "grey") for r in rows])
        ax.set(title=title, ylabel="MB")
        fig.tight_layout(), fig.savefig(out_dir / fname, dpi=110), plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--devices", type=int, default=2, help="ranks per node")
    p.add_argument("--rates", default="50mbit,200mbit,none")
    p.add_argument("--rails", type=int, default=1,
                   help="links per emulated node, each at the rate: one per local rank (multi-rail, a NIC per GPU) "
                        "when equal to --devices")
    p.add_argument("--seq", default="512")
    p.add_argument("--strategies", default=",".join(ALL))
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_query_groups", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--n_microbatches", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--reuse", type=int, default=0, help="TawPipe chunks kept across a turn (0: its default, prefetch)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--precision", default="32-true", help="Trainer precision of every Lightning strategy (1F1B: fp32)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds per point, each in a new rotated order; the table reports the median over rounds")
    p.add_argument("--threads", type=int, default=1, help="compute threads per rank")
    p.add_argument("--trace", action="store_true",
                   help="profile the first timed step of every run (Chrome traces in OUT/runs; the profiled step "
                        "is timed too, so leave it off for timing runs); draw them with benchmarks.trace_timeline")
    p.add_argument("--cpus_per_node", type=int, default=0,
                   help="pin node n's processes to cores [n*K, (n+1)*K) with taskset (0: no pinning)")
    p.add_argument("--sleep_blocks", default=None, metavar="FWD_MS,BWD_MS[,JITTER]",
                   help="every transformer block sleeps FWD_MS/BWD_MS (each within +-JITTER of it) instead of "
                        "computing, leaving the cores to communication as on a GPU cluster (a diagnostic: "
                        "benchmarks/sleep_blocks.py; not for 1f1b)")
    p.add_argument("--free_running", action="store_true",
                   help="no barrier between steps (as a Trainer runs: a rank that finishes early starts its next step, "
                        "so work crosses the step boundary); a step is then the slowest rank's mean interval between "
                        "steps. Default: every step starts after a barrier and is timed to its slowest rank's end")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--replot", action="store_true", help="only redraw the table and plots from OUT/results.json")
    a = p.parse_args()
    out = Path(a.out)
    if a.replot:
        results = json.loads((out / "results.json").read_text())["results"]
        (out / "results.md").write_text(markdown(results) + "\n")
        plot(results, out)
        return
    results = measure(a)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot(results, out)


if __name__ == "__main__":
    main()
