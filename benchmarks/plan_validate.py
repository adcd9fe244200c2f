"""Check the planner against the speed benchmark: predicted vs measured step times on the emulated topologies.

    python -m benchmarks.plan_validate            # table on stdout; JSON, markdown, PNG in benchmarks/results/plan/

For every measured point (link rate x sequence length) of the result sets in ``RESULTS``:
the CPU compute model is calibrated on that point's compute-only run (same processes, same emulated nodes, so it
absorbs the machine's speed at the time), then every other strategy is predicted from the model shapes, the link
rate and the simulated schedules alone, and compared with the measured median step time. The goal is within 20%.

It also answers the reverse question: which emulated link rate on this testbed gives the benchmark model the
comm-to-compute ratio of a real cluster (H100 nodes over 10/25 GbE, the paper's model), so a benchmark point can be
read as a cluster prediction.

For every TawPipe point it also puts the measured and predicted tawpipe / compute-only ratio beside two floors: the
iteration-boundary round trip of chunk 0 (``lightning_tawpipe/plan/floor.py``) and the machine CPU the step used.
"""

from __future__ import annotations

from dataclasses import replace

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.speed import VARIANTS
from lightning_tawpipe.plan import analytic, weightpipe
from lightning_tawpipe.plan.cluster import cpu_testbed, h100_ethernet
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.floor import boundary_floor
from lightning_tawpipe.plan.testbed import calibrate_cpu, comm_compute_ratio, equivalent_rate
from lightning_tawpipe.plan.workload import ModelShape, Workload

HERE = Path(__file__).resolve().parent
RESULTS = ("2x2-rates", "2x2-seq", "3x2-500mbit", "2x2-rounds", "2x2-batch2", "2x2-gb3",
           # the GPU host's 16 CPUs, 4 pinned cores per emulated node: no CPU contention between ranks
           "spare-cores/none", "spare-cores/1gbit", "spare-cores/1gbit-relay", "spare-cores/2gbit-4gbit",
           # the 2-core box with sleeping blocks (--sleep_blocks): compute takes no core, as on a GPU
           "sleep-blocks/2x2-variants", "sleep-blocks/2x2-jitter15", "sleep-blocks/3x2",
           "sleep-blocks/3x2-gb3", "sleep-blocks/2x2-rep0", "sleep-blocks/3x2-rep0",
           "sleep-blocks/2x2-deferred", "sleep-blocks/2x2-relay", "sleep-blocks/2x2-relay-2gbit",
           "sleep-blocks/3x2-relay", "sleep-blocks/2x2-before-watch", "sleep-blocks/2x2-watch",
           "sleep-blocks/3x2-before-watch", "sleep-blocks/3x2-watch", "sleep-blocks/2x2-light0",
           "sleep-blocks/2x2-rep01", "sleep-blocks/2x2-rep01-2gbit", "sleep-blocks/3x2-rep01",
           "sleep-blocks/2x2-rep-combos", "sleep-blocks/2x2-pieces", "sleep-blocks/2x2-pieces-2gbit",
           "sleep-blocks/3x2-pieces", "sleep-blocks/3x2-2gbit-before-pieces", "sleep-blocks/3x2-2gbit-pieces",
           "sleep-blocks/3x2-searched", "sleep-blocks/rails-2x2", "sleep-blocks/rails-3x2",
           "sleep-blocks/stripe-1rail", "sleep-blocks/rails-3x2-best",
           # after the per-step checks were posted instead of blocking (and two free-running sets: no barriers)
           "sleep-blocks/rails-3x2-checks", "sleep-blocks/3x2-checks", "sleep-blocks/rails-3x2-free-running",
           "sleep-blocks/3x2-free-running", "sleep-blocks/3x2-deeper", "sleep-blocks/3x2-deeper-confirm",
           "sleep-blocks/rails-3x2-deeper", "sleep-blocks/3x2-slots",
           # 4 micro-batches of 1 sample per rank: sample-major, chunk-major and one micro-batch of 4, and FSDP
           "sleep-blocks/2x2-chunk-major", "sleep-blocks/2x2-chunk-major-confirm", "2x2-chunk-major-real",
           "2x2-chunk-major-real-500mbit",
           "2x2-real-mirrors")
GOAL = 0.20
PREDICTED = ("tawpipe", "weipipe", "fsdp", "hsdp", "ddp", "1f1b")
# speed.py's opt-in TawPipe variants (tawpipe-<name>): predicted at every TawPipe point from the same knobs the
# benchmark runs them with, so a measurement of a variant can be read against its prediction
VARIANT_KNOBS = {name.removeprefix("tawpipe-"): knobs for name, knobs in VARIANTS.items()}


def bench_shape(args: dict) -> ModelShape:
    """The benchmark's ``tiny_llama_config`` (lightning_tawpipe/module.py): byte vocabulary, 4x MLP."""
    h = args["n_embd"]
    return ModelShape(name=f"bench-{args['n_layer']}x{h}", n_layer=args["n_layer"], n_embd=h, n_head=args["n_head"],
                      n_query_groups=args["n_query_groups"], head_size=h // args["n_head"],
                      intermediate_size=-(-4 * h // 8) * 8, vocab_size=256)


def regrouped(w: Workload, n_microbatches: int) -> Workload:
    """The same per-rank samples cut into ``n_microbatches`` micro-batches."""
    return replace(w, micro_batch=w.micro_batch * w.n_microbatches // n_microbatches, n_microbatches=n_microbatches)


def predict(strategy: str, cluster, w: Workload, compute: ComputeModel, prefetch: int, run: dict):
    if strategy == "tawpipe":  # with the gradient buffers the run had (before the default by node count: 2)
        grad_buffers = run.get("config", {}).get("grad_buffers", 2) or None
        return weightpipe.predict(strategy, cluster, w, compute, prefetch=prefetch, grad_buffers=grad_buffers)
    if strategy == "weipipe":
        return weightpipe.predict(strategy, cluster, w, compute, prefetch=prefetch)
    w = regrouped(w, 1)  # the Lightning baselines run the per-rank batch as one micro-batch (TawPipe's knob)
    if strategy in ("fsdp", "hsdp"):
        return analytic.fsdp(cluster, w, compute, hybrid=strategy == "hsdp")
    if strategy == "ddp":
        return analytic.ddp(cluster, w, compute)
    return analytic.onef1b(cluster, w, compute)


def validate_dir(name: str) -> list[dict]:
    data = json.loads((HERE / "results" / name / "results.json").read_text())
    args, rows = data["args"], []
    shape = bench_shape(args)
    points = sorted({(r["rate"], r["seq_length"]) for r in data["results"]})
    for rate, seq in points:
        runs = {r["strategy"]: r for r in data["results"] if (r["rate"], r["seq_length"]) == (rate, seq)}
        if "compute" not in runs:
            continue
        # the cores the ranks compute on: the pinned ones, else the machine's (runs before CPU accounting: 2);
        # with sleeping blocks (benchmarks/sleep_blocks.py) compute takes no core: devices are separate, as on GPUs
        cores = args["cpus_per_node"] * args["nodes"] if args.get("cpus_per_node") else runs["compute"].get("cores", 2)
        sleeping = bool(args.get("sleep_blocks"))
        cluster = cpu_testbed(args["nodes"], args["devices"], None if rate == "none" else rate,
                              host_cores=None if sleeping else cores)
        if args.get("rails", 1) > 1:  # multi-rail emulated nodes: a link per rail, each at the rate
            cluster = replace(cluster, nics_per_node=args["rails"])
        # the worker's batch_size is per rank, split into n_microbatches
        w = Workload(shape, seq, args["batch_size"] // args["n_microbatches"], args["n_microbatches"], "32-true")
        compute = calibrate_cpu(cluster, w, runs["compute"]["step_time_median"])
        point = {"set": name, "rate": rate, "seq": seq}
        variant_preds = variant_predictions(runs, cluster, w, compute, args["prefetch"])
        for strategy in PREDICTED:
            if strategy not in runs:
                continue
            pred = predict(strategy, cluster, w, compute, args["prefetch"], runs[strategy])
            rows.append(_row(point, strategy, runs[strategy], pred))
            if strategy == "tawpipe":
                rows[-1]["floors"] = floors(runs, pred.step_time, cluster, w, compute, cores, sleeping)
                rows[-1]["variants"] = variants(runs, variant_preds)
        ran = [n for n in VARIANT_KNOBS if f"tawpipe-{n}" in runs]
        for n in ran:  # a variant run is a prediction to check too
            rows.append(_row(point, f"tawpipe-{n}", runs[f"tawpipe-{n}"], variant_preds[n]))
        if ran and "tawpipe" not in runs:  # the variants table shows the point without its default
            rows[-1]["variants"] = variants(runs, variant_preds)
            rows[-1]["floors"] = {"cores": _cores(cluster, cores, sleeping), "predicted": None, "measured": None}
    return rows


def _row(point: dict, strategy: str, run: dict, pred) -> dict:
    """One measured step time against its prediction."""
    measured = run["step_time_median"]
    return {**point, "strategy": strategy, "measured_s": measured, "predicted_s": pred.step_time,
            "error": pred.step_time / measured - 1.0, "measured_link_mb": run.get("link_tx_bytes_per_step", 0.0) / 1e6,
            "predicted_link_mb": pred.inter_node_bytes / 1e6, "method": pred.method}


def _cores(cluster, cores: int, sleeping: bool) -> str:
    """How the ranks computed: slept (no core), on shared cores, or on cores of their own."""
    return "sleep" if sleeping else "shared" if cluster.world_size > cores else "own"


def floors(runs: dict, predicted_s: float, cluster, w: Workload, compute: ComputeModel, cores: int,
           sleeping: bool = False) -> dict:
    """TawPipe / compute-only at one point: measured, predicted, and the two floors under it.

    * boundary: chunk 0's round trip between iterations (``plan/floor.py``), which no schedule hides. It holds where
      every rank has its own cores; with shared cores a waiting rank lends its cores to the others.
    * CPU: the machine CPU-seconds TawPipe's step used (compute plus moving its bytes through gloo and the kernel),
      over the cores the ranks run on. It binds where the ranks share the cores (not with sleeping blocks, whose
      compute takes no core).
    """
    co, taw = runs["compute"]["step_time_median"], runs["tawpipe"]
    f = boundary_floor(cluster, w, compute)
    cpu = taw.get("machine_cpu_s_per_step")
    return {"measured": taw.get("vs_compute_only") or taw["step_time_median"] / co,
            "predicted": predicted_s / co,
            "boundary": 1.0 + f.exposed / co, "cpu": cpu / (cores * co) if cpu and not sleeping else None,
            "cores": _cores(cluster, cores, sleeping),
            "comm_over_compute": taw.get("comm_over_compute")}


def variant_predictions(runs: dict, cluster, w: Workload, compute: ComputeModel, prefetch: int) -> dict:
    """Each ``VARIANT_KNOBS`` variant's prediction at a point (None where its partition does not fit)."""
    out = {}
    for name, knobs in VARIANT_KNOBS.items():
        run = runs.get(f"tawpipe-{name}")
        # a knob the variant does not set is the point's own; a measured run's gradient buffers are its own
        grad_buffers = (run.get("config", {}).get("grad_buffers", 2) or None) if run else None
        knobs = dict(knobs)
        # a variant that regroups the per-rank batch into other micro-batches predicts the same samples so cut
        variant_w = regrouped(w, knobs.pop("n_microbatches", w.n_microbatches))
        try:
            out[name] = weightpipe.predict("tawpipe", cluster, variant_w, compute,
                                           **{"prefetch": prefetch, "grad_buffers": grad_buffers, **knobs})
        except ValueError:  # e.g. four chunks' units on six ranks
            out[name] = None
    return out


def variants(runs: dict, predictions: dict) -> dict:
    """Each variant's tawpipe / compute-only: predicted and, where the point ran it (speed.py ``tawpipe-<name>``),
    measured."""
    co = runs["compute"]["step_time_median"]
    out = {}
    for name, pred in predictions.items():
        run = runs.get(f"tawpipe-{name}")
        measured = run["step_time_median"] / co if run and "step_time_median" in run else None
        out[name] = {"predicted": pred.step_time / co if pred is not None else None, "measured": measured}
    return out


def equivalent_rates() -> list[dict]:
    """Testbed link rates matching real clusters' comm-to-compute ratio (benchmark model 2x2, S=512)."""
    gpu = HERE / "results" / "gpu" / "gpu_single.json"
    data = json.loads((HERE / "results" / "2x2-rates" / "results.json").read_text())
    bench_w = Workload(bench_shape(data["args"]), 512, 1, 1, "32-true")
    measured = [r["step_time_median"] for r in data["results"] if r["strategy"] == "compute"]
    testbed = cpu_testbed(2, 2, None)
    tb_compute = calibrate_cpu(testbed, bench_w, sorted(measured)[len(measured) // 2])
    paper = ModelShape.from_litgpt("tiny-llama-1.1b", n_layer=48, n_embd=1024, n_head=16, n_query_groups=16,
                                   intermediate_size=4096)
    out = []
    for nodes in (2, 3):
        for rate in ("10gbit", "25gbit", "100gbit"):
            for seq in (4096, 16384):
                real = h100_ethernet(nodes, rate)
                real_w = Workload(paper, seq, 1, 2, "bf16-mixed")
                real_compute = ComputeModel.from_gpu_single(str(gpu), paper.n_embd, "bf16-mixed")
                tb = cpu_testbed(nodes, 2, None)
                ratio = comm_compute_ratio(real, real_w, real_compute)
                bps = equivalent_rate(real, real_w, real_compute, tb, bench_w, tb_compute)
                out.append({"nodes": nodes, "rate": rate, "seq": seq, "comm_over_compute": ratio,
                            "testbed_mbit": bps * 8 / 1e6})
    return out


def markdown(rows: list[dict], rates: list[dict]) -> str:
    within = sum(abs(r["error"]) <= GOAL for r in rows)
    lines = ["# Planner vs measured step times (speed benchmark, CPU testbed)", "",
             f"{within}/{len(rows)} predictions within {GOAL:.0%}; mean |error| "
             f"{sum(abs(r['error']) for r in rows) / len(rows):.1%}, worst {max(abs(r['error']) for r in rows):.1%}.",
             "Compute is calibrated per point on that point's compute-only run; everything else is predicted.", "",
             "| set | rate | S | strategy | measured ms | predicted ms | error | link MB measured | predicted | method |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['rate']} | {r['seq']} | {r['strategy']} | {r['measured_s'] * 1e3:.0f} | "
                     f"{r['predicted_s'] * 1e3:.0f} | {r['error']:+.1%} | {r['measured_link_mb']:.1f} | "
                     f"{r['predicted_link_mb']:.1f} | {r['method']} |")
    lines += ["", "## TawPipe / compute-only: measured, predicted, and the floors under it", "",
              "The speed target is tawpipe <= 1.15x compute-only. *Boundary floor*: chunk 0's gradient must reach its "
              "owner and its new weights come back between one iteration's last backward and the next forward, with "
              "no compute left to hide it (`lightning_tawpipe/plan/floor.py`); it holds where each rank has its own "
              "cores. *CPU floor*: the machine CPU-seconds of TawPipe's measured step over the cores the ranks run on; "
              "it binds where ranks share cores (marked *shared*). Where the boundary floor of a point with its own "
              "cores exceeds 1.15, no weight pipeline meets the target there; where the CPU floor of a shared-core "
              "point does, TawPipe cannot, as long as moving its bytes costs the CPU it was measured to cost.", "",
              "| set | rate | S | cores | comm/compute | measured | predicted | boundary floor | CPU floor |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r.get("floors")
        if not f or f["measured"] is None:
            continue
        cpu = f"{f['cpu']:.2f}" if f["cpu"] is not None else "n/a"
        ratio = f"{f['comm_over_compute']:.2f}" if f["comm_over_compute"] else "-"
        lines.append(f"| {r['set']} | {r['rate']} | {r['seq']} | {f['cores']} | "
                     f"{ratio} | {f['measured']:.2f} | {f['predicted']:.2f} | {f['boundary']:.2f} | {cpu} |")
    names = list(VARIANT_KNOBS)
    lines += ["", "## TawPipe variants (speed.py `tawpipe-<name>`), tawpipe / compute-only: predicted (measured)", "",
              "Schedule knobs, predicted at every measured point so a run of the variant can be read against them, "
              "with the measurement where the set ran the variant: `r1` reuse 1 (the paper's schedule), `p3` "
              "prefetch 3, `light0` the partition [2, 2, 3, 3] (a lighter chunk 0, 4 ranks only), `gb3` a third "
              "gradient buffer, `gb3-light0-p1` both with prefetch 1, `rep0` chunk 0 mirrored on every node "
              "(`replicate_first_chunk`), `rep0-gb3` with a third gradient buffer, `rep01` chunks 0 and 1 mirrored "
              "(`replicate_first_chunk=2`), `rep0-p2134` chunk 0 mirrored with the partition [2, 1, 3, 4], "
              "`rep01-p3` rep01 with prefetch 3 (`benchmarks/speed.py` `VARIANTS`); default *n/a*: the set did not "
              "run it. "
              "Cores *sleep*: the blocks slept instead of computing (`--sleep_blocks`), so compute took no core.", "",
              "| set | rate | S | cores | default | " + " | ".join(names) + " |",
              "|---|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        if "variants" not in r:
            continue
        f, v = r["floors"], r["variants"]
        cells = " | ".join(_pred_meas(v[n]["predicted"], v[n]["measured"]) for n in names)
        lines.append(f"| {r['set']} | {r['rate']} | {r['seq']} | {f['cores']} | "
                     f"{_pred_meas(f['predicted'], f['measured'])} | {cells} |")
    lines += ["", "## Testbed link rate equivalent to a real cluster", "",
              "Benchmark model (8 x 256, S=512, 2 ranks per emulated node) at the link rate whose TawPipe "
              "comm-to-compute ratio equals that of H100 nodes (8 GPUs, one NIC) training the paper's model "
              "(H=1024, 48 layers, micro-batch 1, 2 micro-batches, bf16):", "",
              "| nodes | cluster link | S | comm/compute on the cluster | testbed rate (Mbit/s) |", "|---|---|---|---|---|"]
    for r in rates:
        lines.append(f"| {r['nodes']} | {r['rate']} | {r['seq']} | {r['comm_over_compute']:.3f} | "
                     f"{r['testbed_mbit']:.0f} |")
    return "\n".join(lines) + "\n"


def _pred_meas(predicted: float | None, measured: float | None) -> str:
    cell = "n/a" if predicted is None else f"{predicted:.2f}"
    return cell if measured is None else f"{cell} ({measured:.2f})"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    colors = {s: f"C{i}" for i, s in enumerate(PREDICTED)}
    for s in PREDICTED:
        pts = [r for r in rows if r["strategy"] == s]
        if pts:
            ax.scatter([r["measured_s"] for r in pts], [r["predicted_s"] for r in pts], label=s, color=colors[s])
    hi = max(max(r["measured_s"], r["predicted_s"]) for r in rows) * 1.1
    ax.plot([0, hi], [0, hi], "k-", lw=0.8)
    ax.plot([0, hi], [0, hi * (1 + GOAL)], "k:", lw=0.8)
    ax.plot([0, hi], [0, hi * (1 - GOAL)], "k:", lw=0.8, label=f"±{GOAL:.0%}")
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title("Planner vs speed benchmark (CPU testbed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "plan"))
    a = p.parse_args(argv)
    rows = [row for name in RESULTS for row in validate_dir(name)]
    rates = equivalent_rates()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate.json").write_text(json.dumps({"goal": GOAL, "rows": rows, "equivalent_rates": rates}, indent=1))
    text = markdown(rows, rates)
    (out / "validate.md").write_text(text)
    plot(rows, out / "validate.png")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
