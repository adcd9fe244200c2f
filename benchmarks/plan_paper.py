"""The TawPipe paper's setting, on paper: predicted throughput of every strategy on H100 nodes over Ethernet.

    python -m benchmarks.plan_paper          # table on stdout; JSON, markdown, PNGs in benchmarks/results/plan/

3 nodes x 8 GPUs (H100 compute calibrated from ``benchmarks/results/gpu/gpu_single.json``: real LitGPT blocks of
H=1024 in bf16), one 10 or 25 GbE NIC per node, NVLink inside, the paper's model (LLaMA-style, H=1024, 16 heads,
48 layers, vocab 32000), micro-batch 1 and 2 micro-batches per GPU (the code's ``run_scale`` setting), bf16-mixed,
S = 4k/8k/16k. Plots: throughput vs sequence length (3 nodes) and vs node count (S=16k, 25 GbE).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightning_tawpipe.plan import plan
from lightning_tawpipe.plan.cluster import h100_ethernet
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.workload import ModelShape, Workload

HERE = Path(__file__).resolve().parent
GPU = HERE / "results" / "gpu" / "gpu_single.json"
SEQS = (4096, 8192, 16384)
RATES = ("10gbit", "25gbit")
NODES = (2, 3, 4, 6)  # 48 layers + embedding + head = 50 units: at most 6 nodes x 8 chunks
SHOWN = ("tawpipe", "weipipe", "fsdp", "hsdp", "1f1b")


def paper_model() -> ModelShape:
    return ModelShape.from_litgpt("tiny-llama-1.1b", n_layer=48, n_embd=1024, n_head=16, n_query_groups=16,
                                  intermediate_size=4096)


def point(nodes: int, rate: str, seq: int, n_microbatches: int = 2) -> dict:
    model = paper_model()
    w = Workload(model, seq, 1, n_microbatches, "bf16-mixed")
    compute = ComputeModel.from_gpu_single(str(GPU), model.n_embd, w.precision)
    p = plan(h100_ethernet(nodes, rate), w, compute, prefetch=(1, 2))
    row = {"nodes": nodes, "rate": rate, "seq": seq, "recommended": p.recommended, "warnings": p.warnings}
    for s in SHOWN:
        pred = p.get(s)
        row[s] = {"step_s": pred.step_time, "tokens_per_s": pred.tokens_per_s(p.tokens_per_step),
                  "inter_mb_per_node": pred.inter_node_bytes_per_node / 1e6, "bubble": pred.bubble,
                  "peak_gb": pred.memory.total / 1e9, "fits": pred.fits, "knobs": pred.knobs}
    return row


def markdown(rows: list[dict], scale: list[dict]) -> str:
    lines = ["# The TawPipe paper's setting, predicted by the planner", "",
             "3 nodes x 8 H100 (compute from measured H=1024 bf16 blocks), 1 Ethernet NIC per node, model H=1024, "
             "48 layers; micro-batch 1 x 2 per GPU, bf16-mixed. Tokens/s for the whole cluster; TawPipe at its best "
             "prefetch (1 or 2).", "",
             "| link | S | " + " | ".join(SHOWN) + " | recommended |", "|---|---|" + "---|" * len(SHOWN) + "---|"]
    for r in rows:
        cells = [f"{r[s]['tokens_per_s']:,.0f}" + ("" if r[s]["fits"] else " (OOM)") for s in SHOWN]
        lines.append(f"| {r['rate']} | {r['seq']} | " + " | ".join(cells) + f" | {r['recommended']} |")
    lines += ["", "Inter-node MB per node per step, bubble (schedule only), peak GB per GPU:", "",
              "| link | S | " + " | ".join(SHOWN) + " |", "|---|---|" + "---|" * len(SHOWN)]
    for r in rows:
        cells = [f"{r[s]['inter_mb_per_node']:,.0f} MB, {r[s]['bubble']:.0%}, {r[s]['peak_gb']:.1f} GB" for s in SHOWN]
        lines.append(f"| {r['rate']} | {r['seq']} | " + " | ".join(cells) + " |")
    lines += ["", "Warnings at 3 nodes, 10 GbE, S=16k:", ""]
    lines += [f"- {x}" for x in next(r for r in rows if r["rate"] == "10gbit" and r["seq"] == 16384)["warnings"]]
    lines += ["", "Scaling with nodes (S=16k, 25 GbE), tokens/s:", "",
              "| nodes | " + " | ".join(SHOWN) + " |", "|---|" + "---|" * len(SHOWN)]
    for r in scale:
        lines.append(f"| {r['nodes']} | " + " | ".join(f"{r[s]['tokens_per_s']:,.0f}" for s in SHOWN) + " |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], scale: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RATES), figsize=(11, 4), sharey=True)
    for ax, rate in zip(axes, RATES):
        pts = [r for r in rows if r["rate"] == rate]
        for i, s in enumerate(SHOWN):
            ax.plot([r["seq"] for r in pts], [r[s]["tokens_per_s"] for r in pts], "o-", color=f"C{i}", label=s)
        ax.set_xscale("log", base=2)
        ax.set_title(f"3 x 8 H100, {rate} Ethernet")
        ax.set_xlabel("sequence length")
    axes[0].set_ylabel("predicted tokens/s (cluster)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "paper_throughput_vs_seq.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(SHOWN):
        ax.plot([r["nodes"] for r in scale], [r[s]["tokens_per_s"] for r in scale], "o-", color=f"C{i}", label=s)
    ax.set_xlabel("nodes (8 H100 each, 25 GbE)")
    ax.set_ylabel("predicted tokens/s (cluster)")
    ax.set_title("S=16k, H=1024, 48 layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "paper_throughput_vs_nodes.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "plan"))
    a = p.parse_args(argv)
    rows = [point(3, rate, seq) for rate in RATES for seq in SEQS]
    scale = [point(n, "25gbit", 16384) for n in NODES]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.json").write_text(json.dumps({"rows": rows, "scale": scale}, indent=1))
    text = markdown(rows, scale)
    (out / "paper.md").write_text(text)
    plots(rows, scale, out)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
