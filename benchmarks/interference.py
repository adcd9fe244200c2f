"""How much a CPU rank's compute slows while the host moves bytes over an emulated link (run as root).

    sudo python -m benchmarks.interference --rate 4gbit --out benchmarks/results/interference/4gbit.json

Why: on the CPU testbed compute and communication share one host. Even when every rank has cores of its own and
the communication threads run on others, both use the same memory system, and the kernel's TCP, veth and shaping
work runs wherever the scheduler puts it. A GPU computes beside its host, so this cost belongs to the testbed, not to
a schedule. The benchmark's ``--sleep_blocks`` runs remove it (blocks sleep instead of computing); this script
measures its size, so the two sets of results can be read together.

Three phases of ``--seconds`` each, in one run: a compute loop (forward and backward of the speed benchmark's
model, one thread, pinned to core 0) alone; then while two gloo processes in two network namespaces exchange
``--mbytes`` messages both ways over a ``--rate`` link, first pinned to the other cores ("spare cores"), then free to
run on core 0 too ("shared"). Reported: the compute step's median time in each phase, its slowdown against the
phase alone, and the traffic's rate.
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
PREFIX = "tawint"


def compute_loop(a: argparse.Namespace) -> None:
    """Child: train steps of the benchmark model for ``--seconds``; print the step times as JSON."""
    import torch
    from litgpt.model import GPT

    from lightning_tawpipe.module import tiny_llama_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=8, n_query_groups=4,
                                  block_size=a.seq_length))
    idx = torch.randint(0, 256, (1, a.seq_length))
    times, end = [], time.perf_counter() + a.seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        model(idx).float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - start)
    print(json.dumps(times[1:]))


def traffic(a: argparse.Namespace) -> None:
    """Child (one per namespace): exchange messages with the other node both ways until ``--stop_file`` exists."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["NODE_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://{os.environ['MASTER_ADDR']}:29640")
    send, recv = torch.ones(int(a.mbytes * 1e6) // 4), torch.empty(int(a.mbytes * 1e6) // 4)
    moved, start = 0, time.perf_counter()
    while True:
        stop = torch.tensor([float(os.path.exists(a.stop_file))])
        dist.broadcast(stop, 0)  # both sides agree when to stop
        if stop.item():
            break
        works = [dist.isend(send, 1 - rank), dist.irecv(recv, 1 - rank)]
        for w in works:
            w.wait()
        moved += send.numel() * 4
    if rank == 0:
        print(json.dumps({"mb_per_s_each_way": moved / 1e6 / (time.perf_counter() - start)}))
    dist.destroy_process_group()


def _child(role: str, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "benchmarks.interference", "--role", role, "--seconds", str(a.seconds),
            "--stop_file", a.stop_file,
            "--mbytes", str(a.mbytes), "--n_layer", str(a.n_layer), "--n_embd", str(a.n_embd),
            "--seq_length", str(a.seq_length)]


def phase(a: argparse.Namespace, traffic_cores: str | None) -> dict:
    """Run the compute loop on core 0, with traffic on ``traffic_cores`` ("" = anywhere, None = no traffic)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    Path(a.stop_file).unlink(missing_ok=True)
    movers = []
    if traffic_cores is not None:
        pin = ["taskset", "-c", traffic_cores] if traffic_cores else []
        for node in (0, 1):
            movers.append(subprocess.Popen(["bash", str(NETNS), "run", str(node), "--prefix", PREFIX, "--", *pin,
                                            *_child("traffic", a)], stdout=subprocess.PIPE, text=True, env=env,
                                           cwd=HERE.parent))
        time.sleep(a.settle)  # let the movers start and connect before compute is timed
    compute = subprocess.run(["taskset", "-c", "0", *_child("compute", a)], capture_output=True, text=True,
                             env=env, cwd=HERE.parent, check=True)
    Path(a.stop_file).touch()
    out = [m.communicate(timeout=120)[0] for m in movers]
    times = json.loads(compute.stdout.strip().splitlines()[-1])
    row = {"traffic": {None: "none", "": "shared"}.get(traffic_cores, "spare cores"),
           "compute_step_ms_median": 1e3 * statistics.median(times), "compute_steps": len(times)}
    if movers:
        row["traffic_mb_per_s_each_way"] = json.loads(out[0].strip().splitlines()[-1])["mb_per_s_each_way"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="4gbit", help="emulated link rate (none: unshaped)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    p.add_argument("--settle", type=float, default=6.0, help="seconds the movers get to start before compute")
    p.add_argument("--mbytes", type=float, default=8.0, help="message size (the benchmark's chunk: 8 MB)")
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--seq_length", type=int, default=512)
    p.add_argument("--out", default=None, help="JSON file")
    p.add_argument("--role", choices=("compute", "traffic"), help=argparse.SUPPRESS)
    p.add_argument("--stop_file", default=f"/tmp/tawpipe-interference-{os.getpid()}.stop", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "compute":
        return compute_loop(a)
    if a.role == "traffic":
        return traffic(a)
    cores = os.cpu_count() or 1
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("taskset") is None or cores < 2:
        raise SystemExit("benchmarks.interference needs root, iproute2 (ip, tc), taskset and >= 2 cores.")
    subprocess.run(["bash", str(NETNS), "destroy", "--prefix", PREFIX], capture_output=True)
    subprocess.run(["bash", str(NETNS), "create", "--nodes", "2", "--rate", a.rate, "--prefix", PREFIX], check=True,
                   capture_output=True)
    try:
        rows = [phase(a, None), phase(a, f"1-{cores - 1}"), phase(a, "")]
    finally:
        Path(a.stop_file).unlink(missing_ok=True)
        subprocess.run(["bash", str(NETNS), "destroy", "--prefix", PREFIX], capture_output=True)
    alone = rows[0]["compute_step_ms_median"]
    print(f"| traffic ({a.rate}, {a.mbytes:g} MB messages both ways) | compute step ms (median) | slowdown | "
          "traffic MB/s each way |")
    print("|---|---|---|---|")
    for r in rows:
        r["slowdown"] = r["compute_step_ms_median"] / alone
        rate = f"{r['traffic_mb_per_s_each_way']:.0f}" if "traffic_mb_per_s_each_way" in r else "-"
        print(f"| {r['traffic']} | {r['compute_step_ms_median']:.1f} | {r['slowdown']:.3f} | {rate} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"args": vars(a), "cores": cores, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
