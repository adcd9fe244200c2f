"""Check that every speed-benchmark baseline trains exactly like DDP before anyone times it.

    python -m benchmarks.check_baselines            # ddp, fsdp, hsdp, fsdp2, 1f1b on 4 gloo processes
    python -m benchmarks.check_baselines --strategies ddp hsdp tawpipe

A fast baseline that silently trains something else (FSDP's ``HYBRID_SHARD`` degrading to ``NO_SHARD`` on CPU is
the case that motivated this) would make every speed comparison meaningless. This script trains a tiny LitGPT
LLaMA (4 blocks, n_embd 64, seq 64, batch 2 per rank, 5 steps) under each strategy with the same seed and the same
global batch, and compares the per-step **global-batch mean** loss with DDP's (within ``--rtol``, default 1e-4
relative). It also reports what fraction of the parameters each rank's optimizer updates, which shows the sharding
is real.

Topology: all Lightning jobs use ``devices=4, num_nodes=1``; ``hsdp`` (and ``tawpipe``/``weipipe``) are given
``topology=(2, 2)``, i.e. two emulated nodes of two ranks, so hybrid sharding shards over 2 and replicates over 2
(with ``--devices D``: ``(2, D/2)`` when ``D >= 4`` is even, else one node).
``1f1b`` runs :mod:`benchmarks.onef1b` with 4 stages and 4 micro-batches (micro-batch ``r`` = DDP rank ``r``'s
batch). Each job is its own process tree; Lightning's popen launcher re-executes this module in ``--worker`` mode.
Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STRATEGIES = ("ddp", "fsdp", "hsdp", "fsdp2", "1f1b")
# Strategies that are given two emulated nodes of devices/2 ranks (the rest see one node of all processes).
TWO_NODE_STRATEGIES = ("hsdp", "tawpipe", "weipipe")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.check_baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                   help="ddp is always run first as the reference; also accepts tawpipe, weipipe")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_query_groups", type=int, default=2)
    p.add_argument("--seq_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2, help="per rank")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per job")
    p.add_argument("--worker", default=None, metavar="STRATEGY", help="internal: train one Lightning job")
    p.add_argument("--topology", type=int, nargs=2, default=None, help="internal: (num_nodes, devices) for worker")
    p.add_argument("--out", default=None, help="internal: worker result JSON")
    return p


def _local_numel(optimizer: torch.optim.Optimizer) -> int:
    """Parameter elements this rank's optimizer updates: the part of the model whose master copy lives here.

    Counting the optimizer's parameters (rather than the module's) is uniform across strategies: full tensors
    for DDP, flat shards for FSDP1, DTensor local shards for FSDP2, and the owned chunk for TawPipe (whose
    module parameters hold no storage between compute steps).
    """
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)


def run_worker(a: argparse.Namespace) -> None:
    """One Lightning job under ``make_strategy(a.worker)``; global rank 0 writes losses and shard fractions."""
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback
    from litgpt.model import GPT

    from benchmarks.baselines import make_module, make_strategy
    from lightning_tawpipe.data import EmbeddedTextDataModule
    from lightning_tawpipe.module import tiny_llama_config

    class GlobalLoss(Callback):
        """Per-step mean of the ranks' losses = the global-batch mean loss (equal per-rank batch sizes)."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"].detach().clone().float()
            dist.all_reduce(loss)
            self.losses.append(loss.item() / dist.get_world_size())

    torch.set_num_threads(1)
    L.seed_everything(a.seed, verbose=False)
    cfg = tiny_llama_config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, n_query_groups=a.n_query_groups,
                            block_size=a.seq_length)
    module = make_module(a.worker, cfg, learning_rate=a.lr)
    strategy = make_strategy(a.worker, topology=tuple(a.topology), n_microbatches=1, prefetch=1)
    record = GlobalLoss()
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, num_nodes=1, strategy=strategy, max_steps=a.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, EmbeddedTextDataModule(seq_length=a.seq_length, batch_size=a.batch_size))
    with torch.device("meta"):
        total = sum(p.numel() for p in GPT(cfg).parameters())
    local = torch.tensor([_local_numel(trainer.optimizers[0])], dtype=torch.long)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    if trainer.global_rank == 0:
        with open(a.out, "w") as f:
            json.dump({"strategy": a.worker, "losses": record.losses, "total_params": total,
                       "local_params": [int(t.item()) for t in gathered]}, f)


def _launch(cmd: list[str], timeout: float) -> str:
    """Run one job tree from the repo root on a fresh local port; return its log or raise with its tail."""
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_network_port()), NODE_RANK="0")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"job failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-6000:]}")
    return proc.stdout


def run_job(name: str, a: argparse.Namespace, tmp: str) -> dict:
    """Train baseline ``name`` in its own process tree and return its result dict (plus ``wall_s`` and ``log``)."""
    out = os.path.join(tmp, f"{name}.json")
    model = ["--n_layer", str(a.n_layer), "--n_embd", str(a.n_embd), "--n_head", str(a.n_head),
             "--n_query_groups", str(a.n_query_groups), "--seq_length", str(a.seq_length),
             "--batch_size", str(a.batch_size), "--steps", str(a.steps), "--lr", str(a.lr), "--seed", str(a.seed)]
    if name == "1f1b":
        cmd = [sys.executable, "-m", "benchmarks.onef1b", "--num_nodes", "1", "--devices", str(a.devices), *model,
               "--out", out]
    else:
        two_nodes = name in TWO_NODE_STRATEGIES and a.devices >= 4 and a.devices % 2 == 0
        nodes, per_node = (2, a.devices // 2) if two_nodes else (1, a.devices)
        cmd = [sys.executable, "-m", "benchmarks.check_baselines", "--worker", name, "--devices", str(a.devices),
               "--topology", str(nodes), str(per_node), *model, "--out", out]
    start = time.perf_counter()
    log = _launch(cmd, a.timeout)
    with open(out) as f:
        result = json.load(f)
    result.update(wall_s=time.perf_counter() - start, log=log)
    if name == "1f1b":
        result["total_params"] = sum(result["params_per_rank"])
        result["local_params"] = result["params_per_rank"]
    return result


def compare(results: dict[str, dict], rtol: float) -> bool:
    """Print the per-step table and the per-strategy summary; return True when every baseline matches ddp."""
    names = list(results)
    ref = results["ddp"]["losses"]
    print("\nglobal-batch mean loss per step (rel = |x - ddp| / ddp)")
    print(f"{'step':>4}  {'ddp':>10}" + "".join(f"  {n:>10}  {'rel':>8}" for n in names if n != "ddp"))
    for i, y in enumerate(ref):
        row = f"{i:>4}  {y:>10.6f}"
        for n in names:
            if n != "ddp":
                x = results[n]["losses"][i] if i < len(results[n]["losses"]) else float("nan")
                row += f"  {x:>10.6f}  {abs(x - y) / abs(y):>8.1e}"
        print(row)
    print(f"\n{'strategy':>8}  {'max rel':>8}  {'params/rank (fraction of total)':>34}  {'wall s':>6}  result")
    ok = True
    for n in names:
        r = results[n]
        losses = r["losses"]
        worst = max((abs(x - y) / abs(y) for x, y in zip(losses, ref)), default=float("inf"))
        passed = len(losses) == len(ref) and worst <= rtol
        ok &= passed
        fractions = ", ".join(f"{p / r['total_params']:.3f}" for p in r["local_params"])
        print(f"{n:>8}  {worst:>8.1e}  {fractions:>34}  {r['wall_s']:>6.1f}  {'ok' if passed else 'MISMATCH'}")
    return ok


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    if a.worker:
        run_worker(a)
        return
    names = ["ddp"] + [n for n in a.strategies if n != "ddp"]
    print(f"{a.n_layer}-block LitGPT LLaMA, n_embd {a.n_embd}, seq {a.seq_length}, batch {a.batch_size} x "
          f"{a.devices} ranks, {a.steps} steps, lr {a.lr}, seed {a.seed}: {', '.join(names)}", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = run_job(name, a, tmp)
            print(f"  {name}: {results[name]['wall_s']:.1f} s", flush=True)
    if not compare(results, a.rtol):
        print(f"\nFAIL: some baseline differs from ddp by more than {a.rtol:g} relative")
        sys.exit(1)
    print(f"\nOK: every baseline matches ddp within {a.rtol:g} relative")


if __name__ == "__main__":
    main()
