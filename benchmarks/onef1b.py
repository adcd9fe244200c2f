"""Activation-passing 1F1B pipeline baseline (``torch.distributed.pipelining``) over the same LitGPT GPT.

TawPipe moves weights between ranks; classic pipeline parallelism moves activations. This script is the
activation-passing reference: one pipeline stage per rank, the library's ``PipelineStage`` and ``Schedule1F1B``
(not a hand-written schedule), trained on the same data, initial weights, loss and optimizer as the Lightning
baselines so its losses can be checked against ``ddp`` before it is timed.

Launch, one launcher per node (the same environment contract as Lightning's ``ddp`` launcher)::

    NODE_RANK=n MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \\
        python -m benchmarks.onef1b --num_nodes N --devices G --out result.json [model/run options]

Each launcher spawns ``G`` local processes (global rank ``NODE_RANK * G + local``); ``GLOO_SOCKET_IFNAME`` is
honoured by gloo if set. Single node: ``MASTER_PORT`` may be omitted (a free port is picked).

Equivalence with the data-parallel baselines (``W`` ranks, per-rank batch ``B``):

* weights: every rank seeds ``torch`` with ``--seed`` and builds the full ``GPT`` exactly as ``LitGPTModule``
  does after Lightning's re-seed, then keeps only its stage's modules (same RNG stream, identical weights);
* data: step ``t`` trains on the ``W*B`` windows Lightning's ``DistributedSampler`` hands the ``W`` ranks at step
  ``t`` (it *shuffles*, seeded with ``--seed``: see :class:`DDPBatchOrder`), ordered rank by rank, so with
  ``n_microbatches == W`` micro-batch ``r`` *is* DDP rank ``r``'s batch;
* loss: ``chunked_cross_entropy`` per micro-batch; ``Schedule1F1B(scale_grads=True)`` divides gradients by the
  micro-batch count, so gradients are those of the global-batch mean, as DDP's averaged gradients are;
* optimizer: ``AdamW(lr, betas=(0.9, 0.95), weight_decay=0, foreach=False)``, ``LitGPTModule``'s defaults.

Output (global rank 0, ``--out``), the benchmark worker's keys: ``strategy`` ("1f1b"), ``step_times`` (seconds per
step after ``--warmup``; each step is bracketed by barriers and the max over ranks is kept, as the worker does),
``step_time_median``, ``tokens_per_s_per_rank``, ``losses`` (global-batch mean loss of every step, warm-up
included), ``model_state_bytes`` and ``peak_rss_mb`` (per rank), plus per-rank and per-micro-batch detail.
``peak_rss_mb`` includes the one transient full-``GPT`` build per rank (the Lightning FSDP baselines build it
too); compare model memory with ``model_state_bytes``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmarks.worker import link_bytes

STRATEGY_NAME = "1f1b"


class StageModule(nn.Module):
    """One pipeline stage: ``[wte] -> blocks[lo:hi] -> [ln_f -> lm_head]`` of a LitGPT ``GPT``.

    RoPE's ``cos``/``sin`` are needed by every block but are not parameters, and ``GPT`` only computes them in
    its own ``forward``; the stage keeps the GPT's (non-persistent) cache as its own buffers and slices it to the
    sequence length itself, exactly as ``GPT.forward`` does on its training path (no KV cache, causal mask).
    """

    def __init__(self, gpt: nn.Module, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.config = gpt.config
        self.block_ids = list(range(lo, hi))
        self.wte = gpt.transformer.wte if first else None
        self.blocks = nn.ModuleList(gpt.transformer.h[i] for i in self.block_ids)
        self.ln_f = gpt.transformer.ln_f if last else None
        self.lm_head = gpt.lm_head if last else None
        self.register_buffer("cos", gpt.cos.detach().clone(), persistent=False)
        self.register_buffer("sin", gpt.sin.detach().clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.size(1)
        cos, sin = self.cos[:T].unsqueeze(0), self.sin[:T].unsqueeze(0)
        if self.wte is not None:
            x = self.wte(x)
            if self.config.scale_embeddings:
                x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        rope_indices = self.config.rope_indices
        for i, block in zip(self.block_ids, self.blocks):
            c, s = (cos, sin) if rope_indices is None else (cos[..., rope_indices[i]], sin[..., rope_indices[i]])
            x = block(x, c, s, None, None, None)
        if self.lm_head is not None:
            x = self.lm_head(self.ln_f(x))
        return x


def stage_bounds(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """Split ``n_layer`` blocks into ``n_stages`` contiguous ranges, the first ``n_layer % n_stages`` one longer."""
    if n_layer < n_stages:
        raise ValueError(f"1F1B needs at least one block per stage: n_layer={n_layer} < {n_stages} stages")
    base, extra = divmod(n_layer, n_stages)
    bounds, lo = [], 0
    for s in range(n_stages):
        hi = lo + base + (1 if s < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class DDPBatchOrder:
    """The windows Lightning's data-parallel strategies train on at each step, all ranks together, rank-major.

    Lightning replaces a training loader's sampler with ``DistributedSampler(dataset, num_replicas=W, rank=r,
    shuffle=True, seed=PL_GLOBAL_SEED)`` whatever the loader's own ``shuffle`` says (``_process_dataloader``
    forces ``shuffle=True`` for the training stage) and calls ``set_epoch(epoch)`` before every epoch; each rank's
    ``DataLoader`` (``drop_last=True``) then cuts its share into batches. This class instantiates the very same
    samplers (no process group needed: ``num_replicas``/``rank`` are explicit), so the order matches bit for bit
    when ``seed`` is the value given to ``seed_everything``.
    """

    def __init__(self, dataset_len: int, world: int, batch_size: int, seed: int) -> None:
        self.dataset_len, self.world, self.batch_size, self.seed = dataset_len, world, batch_size, seed
        self.batches_per_epoch = -(-dataset_len // world) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{dataset_len} windows give no full batch of {batch_size} on {world} ranks")
        self._epoch = -1
        self._per_rank: list[list[int]] = []

    def indices(self, step: int) -> list[int]:
        """Dataset indices of global step ``step``: rank 0's ``batch_size`` windows, then rank 1's, ..."""
        from torch.utils.data.distributed import DistributedSampler

        epoch, t = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._per_rank = []
            for r in range(self.world):
                sampler = DistributedSampler(range(self.dataset_len), num_replicas=self.world, rank=r, shuffle=True,
                                             seed=self.seed)
                sampler.set_epoch(epoch)
                self._per_rank.append(list(sampler))
            self._epoch = epoch
        lo = t * self.batch_size
        return [i for share in self._per_rank for i in share[lo : lo + self.batch_size]]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onef1b", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default=STRATEGY_NAME, help="accepted for CLI parity with the worker; must be 1f1b")
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--devices", type=int, default=2, help="processes per node (one pipeline stage each)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_query_groups", type=int, default=2)
    p.add_argument("--seq_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2, help="per rank, as for the data-parallel baselines")
    p.add_argument("--n_microbatches", type=int, default=0, help="micro-batches per step, >= world; 0: the world size")
    p.add_argument("--prefetch", type=int, default=None, help="accepted for CLI parity with the worker; ignored")
    p.add_argument("--reuse", type=int, default=None, help="accepted for CLI parity with the worker; ignored")
    p.add_argument("--threads", type=int, default=1, help="compute threads per rank")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=0, help="first steps left out of step_times (losses keep them)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234, help="init and data-order seed (seed_everything's)")
    p.add_argument("--timeout_s", type=float, default=1800.0, help="process-group timeout")
    p.add_argument("--out", default=None, help="JSON result file written by global rank 0")
    return p


def _build_stage(a: argparse.Namespace, rank: int, world: int) -> StageModule:
    """Build the full GPT from the seed (identical to every other baseline) and keep this rank's stage."""
    from litgpt.model import GPT

    from lightning_tawpipe.module import tiny_llama_config

    cfg = tiny_llama_config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, n_query_groups=a.n_query_groups,
                            block_size=a.seq_length)
    torch.manual_seed(a.seed)
    gpt = GPT(cfg)
    lo, hi = stage_bounds(cfg.n_layer, world)[rank]
    return StageModule(gpt, lo, hi, first=rank == 0, last=rank == world - 1)


def _state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Model-state bytes on this rank: weights, their gradients and AdamW's moments (tensor bytes, not RSS)."""
    tensors = [p for p in module.parameters()] + [p.grad for p in module.parameters() if p.grad is not None]
    tensors += [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _train(a: argparse.Namespace, rank: int, world: int) -> dict:
    """Run ``a.steps`` 1F1B iterations on this rank; return its losses, step times, state bytes and peak RSS.

    Steps are timed like the Lightning benchmark worker times its strategies: a barrier before and after each
    step, so a step's time on every rank spans the same interval and the reported step time (max over ranks)
    is the pipeline's, fill and drain included.
    """
    from litgpt.utils import chunked_cross_entropy
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from lightning_tawpipe.data import EmbeddedTextDataModule

    n_mb = a.n_microbatches or world
    module = _build_stage(a, rank, world)
    stage = PipelineStage(module, stage_index=rank, num_stages=world, device=torch.device("cpu"))
    schedule = Schedule1F1B(stage, n_microbatches=n_mb, loss_fn=chunked_cross_entropy, scale_grads=True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=a.lr, weight_decay=0.0, betas=(0.9, 0.95), foreach=False)
    data = EmbeddedTextDataModule(seq_length=a.seq_length, batch_size=a.batch_size)
    data.setup()
    dataset = data.train_dataset
    order = DDPBatchOrder(len(dataset), world, a.batch_size, a.seed)

    losses: list[list[float]] = []
    step_times: list[float] = []
    state_bytes = 0
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    link_start = link_end = (0, 0)
    for step in range(a.steps):
        items = [dataset[i] for i in order.indices(step)]
        mb_losses: list[Tensor] = []
        dist.barrier()
        if step == a.warmup:
            link_start = link_bytes(iface)
        start = time.perf_counter()
        if rank == 0:
            schedule.step(torch.stack([it["input_ids"] for it in items]))
        elif rank == world - 1:
            schedule.step(target=torch.stack([it["labels"] for it in items]), losses=mb_losses, return_outputs=False)
        else:
            schedule.step()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
        dist.barrier()
        if step == a.steps - 1:
            link_end = link_bytes(iface)  # gradients and optimizer state both exist now, as at the end of a Lightning fit
            state_bytes = _state_bytes(module, optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append([x.detach().item() for x in mb_losses])
    # the processes of local index < rails read their rail's counters (one rail: one process per node)
    is_node_reporter = rank % a.devices < int(os.environ.get("NETNS_RAILS", "1"))
    link = [e - b for e, b in zip(link_end, link_start)] if is_node_reporter else [0, 0]
    return {"losses": losses, "step_times": step_times, "state_bytes": state_bytes, "link": link,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux reports KiB
            "params": sum(p.numel() for p in module.parameters()), "blocks": module.block_ids}


def _report(a: argparse.Namespace, gathered: list[dict]) -> dict:
    """Global rank 0's JSON: the benchmark worker's keys, plus per-rank and per-micro-batch detail."""
    world = len(gathered)
    step_times = [max(r["step_times"][i] for r in gathered) for i in range(a.steps)][a.warmup :]
    median = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
    mb_losses = gathered[-1]["losses"]  # only the last stage computes the loss
    return {
        "strategy": STRATEGY_NAME,
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "world_size": world,
        "n_microbatches": a.n_microbatches or world,
        "step_times": step_times,
        "step_time_median": median,
        "tokens_per_s_per_rank": a.batch_size * a.seq_length / median,
        "losses": [sum(m) / len(m) for m in mb_losses],
        "microbatch_losses": mb_losses,
        "link_tx_bytes_per_step": sum(r["link"][0] for r in gathered) / max(1, a.steps - a.warmup),
        "link_rx_bytes_per_step": sum(r["link"][1] for r in gathered) / max(1, a.steps - a.warmup),
        "model_state_bytes": [r["state_bytes"] for r in gathered],
        "peak_rss_mb": [r["peak_rss_mb"] for r in gathered],
        "step_times_per_rank": [r["step_times"][a.warmup :] for r in gathered],
        "params_per_rank": [r["params"] for r in gathered],
        "blocks_per_rank": [r["blocks"] for r in gathered],
    }


def _rank_main(local_rank: int, a: argparse.Namespace, node_rank: int, addr: str, port: int) -> None:
    """Entry point of one spawned process: join the gloo group, train, gather results onto global rank 0."""
    torch.set_num_threads(a.threads)
    world = a.num_nodes * a.devices
    rank = node_rank * a.devices + local_rank
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(local_rank), NODE_RANK=str(node_rank))
    rails = int(os.environ.get("NETNS_RAILS", "1"))
    if rails > 1:  # multi-rail emulated nodes: each local rank on its own rail (benchmarks/worker.py does the same)
        os.environ["GLOO_SOCKET_IFNAME"] = f"tawp{local_rank % rails}"
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=a.timeout_s))
    try:
        result = _train(a, rank, world)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0 and a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(_report(a, gathered), f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Per-node launcher: read ``NODE_RANK``/``MASTER_ADDR``/``MASTER_PORT`` like Lightning, spawn ``--devices``."""
    import torch.multiprocessing as mp

    a = _parser().parse_args(argv)
    if a.num_nodes < 1 or a.devices < 1:
        raise SystemExit("--num_nodes and --devices must be >= 1")
    if a.num_nodes * a.devices < 2:
        raise SystemExit("a pipeline needs at least 2 stages (num_nodes * devices >= 2)")
    if a.strategy != STRATEGY_NAME:
        raise SystemExit(f"this script runs the {STRATEGY_NAME!r} pipeline, not {a.strategy!r}")
    world = a.num_nodes * a.devices
    n_mb = a.n_microbatches or world
    if n_mb < world:
        raise SystemExit(f"1F1B needs n_microbatches >= stages: got {n_mb} for {world} stages (0 = world size)")
    if (world * a.batch_size) % n_mb:
        raise SystemExit(f"n_microbatches={n_mb} must divide the global batch {world} x {a.batch_size}")
    if not 0 <= a.warmup < a.steps:
        raise SystemExit(f"--warmup must be in [0, --steps); got {a.warmup} with --steps {a.steps}")
    node_rank = int(os.environ.get("NODE_RANK", "0"))
    if not 0 <= node_rank < a.num_nodes:
        raise SystemExit(f"NODE_RANK={node_rank} is outside 0..{a.num_nodes - 1}")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT")
    if port is None:
        if a.num_nodes > 1:
            raise SystemExit("set MASTER_PORT (the same on every node) for a multi-node run")
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        port = str(find_free_network_port())
    mp.start_processes(_rank_main, args=(a, node_rank, addr, int(port)), nprocs=a.devices, join=True,
                       start_method="spawn")


if __name__ == "__main__":
    main()
