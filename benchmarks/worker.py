"""One timed training job of the speed benchmark (one launcher per emulated node, like a real cluster job).

    python -m benchmarks.worker --strategy tawpipe --num_nodes 2 --devices 2 --seq_length 512 --out run.json

Measures, after ``--warmup`` steps: every rank's step time (a step's time is the slowest rank's; every step starts
after a barrier, unless ``--free_running``, where it is the slowest rank's mean interval between steps), tokens/s per
rank, peak RSS and model-state bytes per rank, TawPipe's own communication accounting, and the bytes that crossed
this node's link (read from the network namespace's interface counters around the timed window, so set-up
traffic is excluded). Local rank 0 of every node writes its node's link bytes; global rank 0 writes the JSON.
It also accounts CPU over the same window: each rank's own CPU time (its compute and gloo threads) and the whole
machine's busy CPU-seconds and busy fraction from /proc/stat, which include the kernel's work for the emulated links.
On a saturated machine, time spent moving bytes is taken from compute, whatever the overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from lightning_tawpipe.partition import parse_partition

LINK = "/sys/class/net/{iface}/statistics/{what}_bytes"
WAIT_KINDS = ("RW", "BW", "RG", "SG", "QG", "SW", "drain:SW", "drain:RW", "drain:BW", "drain:RG", "drain:SG",
              "drain:QG", "other")


def link_bytes(iface: str | None) -> tuple[int, int]:
    """(tx, rx) bytes of this namespace's inter-node interface, or (0, 0) when not emulating nodes."""
    if not iface or not os.path.exists(LINK.format(iface=iface, what="tx")):
        return 0, 0
    with open(LINK.format(iface=iface, what="tx")) as tx, open(LINK.format(iface=iface, what="rx")) as rx:
        return int(tx.read()), int(rx.read())


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU-seconds of the whole machine so far, from /proc/stat (every namespace shares it).

    Busy is everything but idle and iowait: user code, the kernel's TCP/veth work (system, softirq) and other tenants
    (steal), which is what the ranks compete with when the machine is saturated.
    """
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal: guest and guest_nice, after them, are already in user/nice
        fields = [int(x) for x in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / tick, sum(fields) / tick


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_query_groups", type=int, default=4)
    p.add_argument("--seq_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=1, help="per rank")
    p.add_argument("--n_microbatches", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--reuse", type=int, default=0, help="TawPipe chunks kept across a turn (0: its default, prefetch)")
    p.add_argument("--grad_buffers", type=int, default=0, help="TawPipe gradient buffers (>= 2; 0: by node count)")
    p.add_argument("--replicate_first_chunk", type=int, nargs="?", const=1, default=0,
                   help="TawPipe: mirror chunk 0 (or the first N chunks) on every node")
    p.add_argument("--stripe", action="store_true",
                   help="TawPipe: move remote weights and gradient sums in stripes over every rail")
    p.add_argument("--microbatch_order", default="sample", choices=["sample", "chunk"],
                   help="TawPipe: micro-batch order (chunk: every micro-batch through a chunk while it is resident)")
    p.add_argument("--partition", default="parameters", type=parse_partition,
                   help="TawPipe/WeiPipe chunks: parameters, uniform, or units per chunk (2,2,3,3)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--precision", default="32-true", help="Trainer precision (bf16-mixed: weights/gradients in bf16)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--activation_checkpointing", action="store_true", help="tawpipe/weipipe: recompute each unit")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads per rank (Lightning would otherwise give each rank cores/ranks-per-node)")
    p.add_argument("--sleep_blocks", default=None, metavar="FWD_MS,BWD_MS[,JITTER]",
                   help="every transformer block sleeps instead of computing (benchmarks/sleep_blocks.py)")
    p.add_argument("--trace", default=None, help="write a Chrome trace of the first timed step to TRACE.rank<r>.json")
    p.add_argument("--free_running", action="store_true",
                   help="no barrier between steps, as a Trainer runs: a rank may start its next step while others "
                        "finish theirs; the step time is then the slowest rank's mean over the timed steps")
    p.add_argument("--out", required=True)
    return p


def main() -> None:
    a = parser().parse_args()
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from benchmarks.baselines import make_module, make_strategy
    from lightning_tawpipe.data import EmbeddedTextDataModule
    from lightning_tawpipe.module import tiny_llama_config

    # multi-rail emulated nodes (netns-topology.sh --rails R): each local rank talks through its own rail's interface
    # and reports that rail's bytes; the ranks of local index < R together report the node's
    rails = int(os.environ.get("NETNS_RAILS", "1"))
    if rails > 1:
        os.environ["GLOO_SOCKET_IFNAME"] = f"tawp{int(os.environ.get('LOCAL_RANK', 0)) % rails}"
    iface = os.environ.get("GLOO_SOCKET_IFNAME")

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []
            self.comm: list[dict[str, float]] = []
            self.link_start = self.link_end = (0, 0)
            self.cpu_start = self.cpu_end = 0.0  # this process's CPU-seconds (all its threads: compute and gloo)
            self.machine_start = self.machine_end = (0.0, 0.0)
            self.wait_by_op: dict[str, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not a.free_running:
                trainer.strategy.barrier()
            if batch_idx == a.warmup:
                self.link_start = link_bytes(iface)
                self.cpu_start, self.machine_start = time.process_time(), machine_cpu()
                if a.trace:  # one step under the profiler: engine actions appear as TAWPIPE:<action> ranges
                    self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    self.profiler.__enter__()
            now = time.perf_counter()
            # free running: a step lasts from the previous step's end (the loop's work between steps included)
            self._t0 = self._last_end if a.free_running and self.times else now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._last_end = time.perf_counter()
            self.times.append(self._last_end - self._t0)
            if a.trace and batch_idx == a.warmup:
                self.profiler.__exit__(None, None, None)
                self.profiler.export_chrome_trace(f"{a.trace}.rank{trainer.global_rank}.json")
            self.losses.append(float(outputs["loss"]))
            self.comm.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("tawpipe/")})
            pipeline = getattr(trainer.strategy, "pipeline", None)
            if pipeline is not None and batch_idx >= a.warmup:
                for op, sec in pipeline.comm.stats.wait_by_op.items():
                    self.wait_by_op[op] = self.wait_by_op.get(op, 0.0) + sec
            if not a.free_running:
                trainer.strategy.barrier()
            if batch_idx == a.steps - 1:
                self.link_end = link_bytes(iface)
                self.cpu_end, self.machine_end = time.process_time(), machine_cpu()

    # Lightning's launcher sets cpu_count // local processes threads unless OMP_NUM_THREADS is set: on a many-core
    # host that oversubscribes pinned cores, and spinning OpenMP threads then starve the communication threads
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    if a.sleep_blocks:
        from benchmarks import sleep_blocks

        # a seed per rank (Lightning's launcher starts local ranks > 0 with LOCAL_RANK set)
        rank_seed = 1000 * int(os.environ.get("NODE_RANK", 0)) + int(os.environ.get("LOCAL_RANK", 0))
        sleep_blocks.install(*sleep_blocks.parse_sleep_blocks(a.sleep_blocks), seed=rank_seed)
    torch.set_num_threads(a.threads)
    L.seed_everything(1234, verbose=False)
    cfg = tiny_llama_config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, n_query_groups=a.n_query_groups,
                            block_size=a.seq_length)
    module = make_module(a.strategy, cfg, learning_rate=a.lr)
    strategy = make_strategy(a.strategy, topology=(a.num_nodes, a.devices), n_microbatches=a.n_microbatches,
                             prefetch=a.prefetch, activation_checkpointing=a.activation_checkpointing,
                             reuse=a.reuse or None, partition=a.partition, grad_buffers=a.grad_buffers or None,
                             replicate_first_chunk=a.replicate_first_chunk, stripe=a.stripe,
                             microbatch_order=a.microbatch_order)
    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, num_nodes=a.num_nodes, strategy=strategy,
                        precision=a.precision,
                        max_steps=a.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    data = EmbeddedTextDataModule(seq_length=a.seq_length, batch_size=a.batch_size)
    trainer.fit(module, data)

    s = trainer.strategy
    if hasattr(s, "model_state_bytes"):
        state_bytes = s.model_state_bytes()
    else:
        tensors = [p for p in s.model.parameters()] + [p.grad for p in s.model.parameters() if p.grad is not None]
        tensors += [t for opt in trainer.optimizers for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t)]
        local = [getattr(t, "_local_tensor", t) for t in tensors]  # FSDP2 DTensors: count this rank's shard only
        state_bytes = sum(t.numel() * t.element_size() for t in local)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    is_link_reporter = s.local_rank < rails
    link = [timer.link_end[0] - timer.link_start[0], timer.link_end[1] - timer.link_start[1]] if is_link_reporter \
        else [0, 0]
    timed = timer.comm[a.warmup:]
    engine = [sum(c.get("tawpipe/inter_node_bytes", 0.0) for c in timed),
              sum(c.get("tawpipe/comm_wait_s", 0.0) for c in timed)]
    machine = [timer.machine_end[0] - timer.machine_start[0], timer.machine_end[1] - timer.machine_start[1]]
    cpu = [timer.cpu_end - timer.cpu_start, *machine]
    row = torch.tensor([*timer.times, state_bytes, rss_mb, *link, *engine, *cpu], dtype=torch.float64)
    rows = s.all_gather(row).reshape(-1, row.numel()).tolist()
    waits = s.all_gather(torch.tensor([timer.wait_by_op.get(k, 0.0) for k in WAIT_KINDS], dtype=torch.float64))
    waits = waits.reshape(-1, len(WAIT_KINDS)).tolist()
    if trainer.global_rank == 0:
        write_result(a, timer, rows)
        path = a.out
        result = json.loads(open(path).read())
        timed = max(1, len(timer.times) - a.warmup)
        result["wait_by_op_s_per_step"] = {k: max(w[i] for w in waits) / timed for i, k in enumerate(WAIT_KINDS)}
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    torch.distributed.destroy_process_group()  # a clean exit: FSDP/gloo can abort in teardown otherwise


def write_result(a: argparse.Namespace, timer, rows: list[list[float]]) -> None:
    n = len(timer.times)
    step_times = [max(r[i] for r in rows) for i in range(n)][a.warmup:]
    timed_steps = max(1, n - a.warmup)
    # with barriers every step starts together, so a step is its slowest rank's; free running, ranks drift by up to a
    # step against each other, so a step is the slowest rank's mean over the timed window (its throughput)
    step_time = (max(sum(r[a.warmup:n]) for r in rows) / timed_steps if a.free_running
                 else sorted(step_times)[len(step_times) // 2])
    result = {
        "strategy": a.strategy,
        "config": vars(a),
        "world_size": len(rows),
        "step_times": step_times,
        "step_time_median": step_time,
        "losses": timer.losses,
        "model_state_bytes": [r[n] for r in rows],
        "peak_rss_mb": [r[n + 1] for r in rows],
        "link_tx_bytes_per_step": sum(r[n + 2] for r in rows) / timed_steps,
        "link_rx_bytes_per_step": sum(r[n + 3] for r in rows) / timed_steps,
        "engine_inter_node_bytes_per_step": sum(r[n + 4] for r in rows) / timed_steps,
        "comm_wait_s_per_step": max(r[n + 5] for r in rows) / timed_steps,
        # CPU accounting over the timed steps: the ranks' own CPU time, and the whole machine's (read by rank 0)
        "rank_cpu_s_per_step": sum(r[n + 6] for r in rows) / timed_steps,
        "machine_cpu_s_per_step": rows[0][n + 7] / timed_steps,
        "machine_busy_fraction": rows[0][n + 7] / rows[0][n + 8] if rows[0][n + 8] else None,
        "cores": os.cpu_count(),
    }
    result["tokens_per_s_per_rank"] = a.batch_size * a.seq_length / result["step_time_median"]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
