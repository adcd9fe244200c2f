"""What moving one TawPipe chunk costs gloo on this machine: wall time and CPU time per message, 2 local processes.

    python -m benchmarks.gloo_cost --mbytes 8 --reps 20 --out benchmarks/results/gloo_cost.json

On a CPU testbed every byte a strategy moves is also CPU taken from compute (gloo's threads, the kernel's TCP
copies), so this is the per-message price behind the speed benchmark's "machine CPU s/step" column. It times the
operations TawPipe posts (send/recv, broadcast, reduce) and DDP's all-reduce over loopback, one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OPS = ("send/recv", "broadcast", "reduce", "all_reduce")


def _post(op: str, tensor: torch.Tensor, rank: int):
    if op == "send/recv":
        return dist.isend(tensor, 1) if rank == 0 else dist.irecv(tensor, 0)
    if op == "broadcast":
        return dist.broadcast(tensor, 0, async_op=True)
    if op == "reduce":
        return dist.reduce(tensor, 0, async_op=True)
    return dist.all_reduce(tensor, async_op=True)


def _rank_main(rank: int, a: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tensor = torch.ones(int(a.mbytes * 1e6) // 4)
    rows = {}
    for op in OPS:
        _post(op, tensor, rank).wait()  # connect and warm up
        dist.barrier()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(a.reps):
            _post(op, tensor, rank).wait()
        dist.barrier()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        rows[op] = {"wall_ms_per_message": 1e3 * wall / a.reps, "cpu_ms_per_message": 1e3 * cpu / a.reps,
                    "mb_per_s": a.reps * tensor.numel() * 4 / 1e6 / wall}
    results[rank] = rows
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbytes", type=float, default=8.0, help="message size (the speed benchmark's chunk: 8 MB)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--port", type=int, default=29911)
    p.add_argument("--out", default=None, help="JSON file for the table's numbers")
    a = p.parse_args()
    if a.mbytes <= 0 or a.reps < 1:
        raise SystemExit("--mbytes must be > 0 and --reps >= 1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(a, a.port, results), nprocs=2)
        results = {rank: dict(rows) for rank, rows in results.items()}
    print(f"| op ({a.mbytes:g} MB, gloo, 2 local processes) | MB/s | CPU ms per message, rank 0 | rank 1 | both |")
    print("|---|---|---|---|---|")
    for op in OPS:
        r0, r1 = results[0][op], results[1][op]
        both = r0["cpu_ms_per_message"] + r1["cpu_ms_per_message"]
        print(f"| {op} | {r0['mb_per_s']:.0f} | {r0['cpu_ms_per_message']:.1f} | {r1['cpu_ms_per_message']:.1f} | "
              f"{both:.1f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "ranks": results}, f, indent=1)


if __name__ == "__main__":
    main()
