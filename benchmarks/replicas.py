"""Replicas over a slow link: loss against bytes sent between replicas, for the outer-loop methods side by side.

    sudo python -m benchmarks.replicas --rate 100mbit --out benchmarks/results/replicas
    python -m benchmarks.replicas --local --out /tmp/replicas      # no namespaces: loopback, bytes still counted
    python -m benchmarks.replicas --replot --out benchmarks/results/replicas

Every replica is one emulated site (a network namespace, ``netns/netns-topology.sh``) running a TawPipe group of
``--devices`` ranks; the sites are joined by one rate-limited link, so every byte between replicas crosses it and
nothing else does (inside a site TawPipe's traffic uses loopback). Methods, all on the same model, data and seed:

* ``ddp``: ``outer=None``, gradients averaged across replicas every step (data parallel across replicas);
* ``diloco``: dense pseudo-gradients every ``--sync_every`` steps, Nesterov outer momentum;
* ``sparseloco-<d>``: Top-k density ``d`` per tile, 2-bit values, error feedback, every ``--sync_every`` steps.

Reported per method: final loss (mean of the last 5 steps over all ranks), bytes sent between replicas by
TawPipe's accounting (total and per outer step, all ranks) and measured on the link (interface counters, all
steps), the ratio to ``ddp``'s bytes, and the extra wall time of an exchanging step over a plain one. Outputs in
``--out``: ``results.json``, ``results.md``, ``loss_vs_bytes.png``, ``loss_vs_step.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.speed import NETNS, check_environment, netns

HERE = Path(__file__).resolve().parent
PREFIX = "tawrep"


def methods(a: argparse.Namespace) -> dict[str, list[str]]:
    out = {"ddp": ["--outer", "none"], "diloco": ["--outer", "diloco"]}
    for d in a.densities.split(","):
        out[f"sparseloco-{float(d):.4g}"] = ["--outer", "sparseloco", "--density", d, "--quant_bits", "2"]
    return out


def worker_args(a: argparse.Namespace, extra: list[str], out: Path) -> list[str]:
    return ["--worker", "--strategy", "tawpipe", "--replicas", str(a.replicas), "--devices", str(a.devices),
            "--num_nodes", str(a.replicas), "--group_size", "0", "--n_microbatches", "1", "--n_layer", str(a.n_layer),
            "--n_embd", str(a.n_embd), "--n_head", "4", "--n_query_groups", "2", "--seq_length", str(a.seq),
            "--batch_size", str(a.batch_size), "--lr", str(a.lr), "--steps", str(a.steps),
            "--sync_every", str(a.sync_every), "--out", str(out), *extra]


def run(a: argparse.Namespace, name: str, extra: list[str], out: Path, port: int) -> dict:
    """One launcher per replica (site), each in its own namespace unless ``--local``."""
    procs = []
    for site in range(a.replicas):
        env = ["env", f"MASTER_PORT={port}", f"NODE_RANK={site}", f"PYTHONPATH={HERE.parent}"]
        if a.local:
            env += ["MASTER_ADDR=127.0.0.1"]
            cmd = env + [sys.executable, "-m", "lightning_tawpipe.demo", *worker_args(a, extra, out)]
        else:
            cmd = ["bash", str(NETNS), "run", str(site), "--prefix", PREFIX, "--", *env, sys.executable, "-m",
                   "lightning_tawpipe.demo", *worker_args(a, extra, out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=HERE.parent))
    logs = [p.communicate(timeout=a.timeout)[0] for p in procs]
    if any(p.returncode for p in procs) or not (out / "result.json").exists():
        return {"method": name, "error": "\n".join(log[-3000:] for log in logs)}
    return summarize(name, json.loads((out / "result.json").read_text()), a)


def summarize(name: str, r: dict, a: argparse.Namespace) -> dict:
    per_rank = r["losses_per_rank"]
    steps = len(per_rank[0])
    mean_loss = [sum(rank[s] for rank in per_rank) / len(per_rank) for s in range(steps)]
    exchanges = max(r["outer_exchanges"], 1)
    per_exchange = sum(r["outer_bytes_per_rank"]) / exchanges
    exchanged_at = [s + 1 for s in range(steps) if name == "ddp" or (s + 1) % a.sync_every == 0]
    cumulative = [per_exchange * sum(1 for e in exchanged_at if e <= s + 1) for s in range(steps)]
    # step times: the slowest rank's end-to-end time per step (ends are wall-clock per rank)
    ends = r["step_end_s_per_rank"]
    durations = [max(rank[s] - rank[s - 1] for rank in ends) for s in range(1, steps)]
    sync = [d for s, d in enumerate(durations, start=2) if s in exchanged_at]
    plain = [d for s, d in enumerate(durations, start=2) if s not in exchanged_at]
    link = r["link_tx_per_rank"]
    local_roots = [i * a.devices for i in range(a.replicas)]  # one link per site: read by its first rank
    link_total = sum(link[i][-1] - link[i][0] for i in local_roots) if link and link[0][-1] else None
    return {
        "method": name, "losses": mean_loss, "cumulative_bytes": cumulative,
        "final_loss": statistics.fmean(mean_loss[-5:]), "bytes_total": cumulative[-1],
        "bytes_per_exchange": per_exchange, "exchanges": r["outer_exchanges"],
        "link_bytes_after_first_step": link_total,
        "accounted_bytes_after_first_step": cumulative[-1] - cumulative[0],
        "exchange_step_s": statistics.median(sync) if sync else None,
        "plain_step_s": statistics.median(plain) if plain else None,
        "n_params": r["n_params"],
    }


def markdown(results: list[dict], a: argparse.Namespace) -> str:
    ddp = next((r for r in results if r["method"] == "ddp" and "error" not in r), None)
    lines = [f"{a.replicas} replicas x {a.devices} ranks, link {a.rate if not a.local else 'loopback'}, "
             f"{a.steps} steps, sync_every={a.sync_every}, model {results[0].get('n_params', 0) / 1e6:.2f}M params",
             "", "| method | final loss | bytes between replicas | per exchange | vs ddp | on the link | "
                 "exchange step s | plain step s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | error | | | | | | |")
            continue
        ratio = f"{r['bytes_total'] / ddp['bytes_total']:.4f}" if ddp else "-"
        link = f"{r['link_bytes_after_first_step'] / 1e6:.2f} MB" if r["link_bytes_after_first_step"] else "-"
        f = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        lines.append(f"| {r['method']} | {r['final_loss']:.3f} | {r['bytes_total'] / 1e6:.2f} MB | "
                     f"{r['bytes_per_exchange'] / 1e6:.3f} MB | {ratio} | {link} | {f(r['exchange_step_s'])} | "
                     f"{f(r['plain_step_s'])} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path, sync_every: int) -> None:
    """loss_vs_bytes.png: the loss (mean over the last ``sync_every`` steps) at every ``sync_every``-th step against
    the bytes sent between replicas so far; loss_vs_step.png: the raw per-step loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        ends = range(sync_every, len(r["losses"]) + 1, sync_every)
        x = [r["cumulative_bytes"][e - 1] / 1e6 for e in ends]
        y = [sum(r["losses"][e - sync_every:e]) / sync_every for e in ends]
        ax.plot(x, y, label=r["method"], marker=".")
    ax.set_xscale("log")
    ax.set_xlabel("MB sent between replicas so far (all ranks)")
    ax.set_ylabel(f"training loss (mean of the last {sync_every} steps, all ranks)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_bytes.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["method"], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_step.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="100mbit", help="link between replicas (tc rate)")
    p.add_argument("--local", action="store_true", help="no namespaces: all replicas on loopback")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--devices", type=int, default=2, help="ranks per replica (one emulated node each)")
    p.add_argument("--densities", default="0.005,0.0156,0.03")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sync_every", type=int, default=5)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="benchmarks/results/replicas")
    p.add_argument("--replot", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.replot:
        saved = json.loads((out / "results.json").read_text())
        a = argparse.Namespace(**{**vars(a), **saved["args"], "out": a.out})
        results = saved["results"]
    else:
        results = measure(a)
        (out / "results.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    table = markdown(results, a)
    (out / "results.md").write_text(table)
    plot(results, out, a.sync_every)
    print(table)


def measure(a: argparse.Namespace) -> list[dict]:
    if not a.local:
        check_environment()
        subprocess.run(["bash", str(NETNS), "destroy", "--prefix", PREFIX], capture_output=True)
        netns("create", "--nodes", str(a.replicas), "--rate", a.rate, "--prefix", PREFIX)
    results, port = [], 29900
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, extra in methods(a).items():
                port += 37
                results.append(run(a, name, extra, Path(tmp) / name, port))
                r = results[-1]
                print(f"{name:>18}: " + (r["error"][-2000:] if "error" in r else
                      f"final loss {r['final_loss']:.3f}, {r['bytes_total'] / 1e6:.2f} MB between replicas"),
                      flush=True)
    finally:
        if not a.local:
            subprocess.run(["bash", str(NETNS), "destroy", "--prefix", PREFIX], capture_output=True)
    return results


if __name__ == "__main__":
    main()
