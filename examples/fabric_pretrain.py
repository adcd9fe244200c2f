"""Pretrain a LitGPT model with a plain ``lightning.fabric`` loop (the shape of ``litgpt/pretrain.py``) and TawPipe.

    python examples/fabric_pretrain.py                                    # tiny LLaMA, 2 CPU processes, offline
    python examples/fabric_pretrain.py --strategy ddp                     # the same loop under ddp, to compare
    python examples/fabric_pretrain.py --devices 4 --group_size 2         # 2 emulated nodes x 2 ranks
    python examples/fabric_pretrain.py --n_microbatches 2                 # 2 pipelined micro-batches per iteration
    python examples/fabric_pretrain.py --save_interval 10                 # sharded checkpoints out/fabric/step-*.ckpt
    python examples/fabric_pretrain.py --resume out/fabric-pretrain/step-000010.ckpt
    python examples/fabric_pretrain.py --help

The only TawPipe-specific line is the strategy (``Fabric(strategy="tawpipe")`` works after ``import
lightning_tawpipe``); the loop is Fabric's: ``fabric.setup``, ``fabric.backward``, ``fabric.no_backward_sync`` for
gradient accumulation, ``fabric.clip_gradients``, ``optimizer.step()``, ``fabric.save``/``fabric.load``. Data: Python's
own documentation, byte-tokenized (``lightning_tawpipe.data.EmbeddedTextDataModule``), so it runs offline.

Output (``--out_dir``): checkpoints ``step-XXXXXX.ckpt`` (TawPipe: a sharded directory, each rank writing what it
owns) and ``final/`` (``lit_model.pth`` + ``model_config.yaml``, a LitGPT checkpoint directory).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from litgpt.model import GPT
from litgpt.utils import chunked_cross_entropy, save_config

import lightning_tawpipe  # noqa: F401  registers strategy="tawpipe" with the Trainer and with Fabric
from lightning_tawpipe.data import EmbeddedTextDataModule
from lightning_tawpipe.fabric import TawPipeFabricStrategy
from lightning_tawpipe.module import tiny_llama_config


def setup(
    strategy: str = "tawpipe",
    accelerator: str = "cpu",
    devices: int = 2,
    num_nodes: int = 1,
    group_size: Optional[int] = None,
    precision: str = "32-true",
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_query_groups: int = 2,
    seq_length: int = 64,
    micro_batch_size: int = 4,
    gradient_accumulation_iters: int = 1,
    n_microbatches: int = 1,
    max_steps: int = 30,
    learning_rate: float = 3e-3,
    min_lr: float = 3e-4,
    warmup_steps: int = 5,
    weight_decay: float = 0.0,
    max_norm: Optional[float] = 1.0,
    eval_interval: int = 10,
    eval_iters: int = 4,
    log_interval: int = 5,
    save_interval: Optional[int] = None,
    state_dict_type: str = "sharded",
    resume: Optional[Path] = None,
    out_dir: Path = Path("out/fabric-pretrain"),
    seed: int = 1337,
    results: Optional[Path] = None,
    replicate_first_chunk: Union[bool, int] = False,
    stripe: bool = False,
    microbatch_order: str = "sample",
) -> None:
    """Pretrain a tiny LitGPT LLaMA with Fabric.

    Args:
        strategy: ``tawpipe`` (or ``weipipe``), or any Fabric strategy name (``ddp``) to compare.
        accelerator: ``cpu`` or ``cuda``.
        devices: processes per node.
        num_nodes: nodes.
        group_size: TawPipe ranks per group (emulated node); default: the processes per node.
        precision: ``32-true``, ``bf16-mixed``, ``bf16-true``, ...
        n_layer: transformer blocks of the tiny LLaMA.
        n_embd: its width.
        n_head: attention heads.
        n_query_groups: key/value heads (GQA).
        seq_length: tokens per sample.
        micro_batch_size: samples per process per iteration.
        gradient_accumulation_iters: iterations (forward+backward) per optimizer step.
        n_microbatches: TawPipe only: pipelined micro-batches per iteration (``fabric.strategy.train_step``);
            the gradients equal those of the whole micro_batch_size batch.
        max_steps: optimizer steps.
        learning_rate: peak learning rate (linear warmup, then cosine decay to ``min_lr``).
        min_lr: final learning rate.
        warmup_steps: warmup optimizer steps.
        weight_decay: AdamW weight decay.
        max_norm: clip gradients to this global norm (``None``: no clipping).
        eval_interval: validate every this many optimizer steps (0: never).
        eval_iters: validation batches per process.
        log_interval: print every this many optimizer steps.
        save_interval: checkpoint every this many optimizer steps (``out_dir/step-XXXXXX.ckpt``).
        state_dict_type: TawPipe checkpoints: ``sharded`` (a directory, each rank writes its part) or ``full``.
        resume: a checkpoint to resume from (model, optimizer and the loop position).
        out_dir: where checkpoints and the final LitGPT checkpoint go.
        seed: random seed (same on every rank).
        results: rank 0 writes per-iteration losses, gradient norms, validation losses and the final weights
            here (``torch.save``), for comparisons and tests.
        replicate_first_chunk: TawPipe on several nodes: mirror chunk 0 (``true``) or the first N chunks (``N``) on
            every node (see ``TawPipeStrategy``).
        stripe: TawPipe: move remote weights and gradients in stripes over every rank's own NIC (see
            ``TawPipeStrategy``).
        microbatch_order: TawPipe: ``sample`` or ``chunk`` (every micro-batch of ``train_step`` through a chunk while
            it is resident; see ``TawPipeStrategy``).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # ranks share the CPU cores
    if strategy in ("tawpipe", "weipipe"):
        strategy = TawPipeFabricStrategy(schedule=strategy, group_size=group_size, n_microbatches=n_microbatches,
                                         state_dict_type=state_dict_type,
                                         replicate_first_chunk=replicate_first_chunk, stripe=stripe,
                                         microbatch_order=microbatch_order)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                      precision=precision)
    fabric.launch()
    config = tiny_llama_config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_query_groups=n_query_groups,
                               block_size=seq_length)
    main(fabric, config, seed=seed, seq_length=seq_length, micro_batch_size=micro_batch_size,
         accumulate=gradient_accumulation_iters, n_microbatches=n_microbatches, max_steps=max_steps,
         learning_rate=learning_rate, min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
         max_norm=max_norm, eval_interval=eval_interval, eval_iters=eval_iters, log_interval=log_interval,
         save_interval=save_interval, resume=resume, out_dir=Path(out_dir), results=results)


def main(fabric: L.Fabric, config, *, seed: int, seq_length: int, micro_batch_size: int, accumulate: int,
         n_microbatches: int, max_steps: int, learning_rate: float, min_lr: float, warmup_steps: int,
         weight_decay: float, max_norm: Optional[float], eval_interval: int, eval_iters: int, log_interval: int,
         save_interval: Optional[int], resume: Optional[Path], out_dir: Path, results: Optional[Path]) -> None:
    fabric.seed_everything(seed)  # same seed everywhere: every rank builds the same initial model
    with fabric.init_module(empty_init=False):
        model = GPT(config)
    fabric.print(f"Total parameters: {sum(p.numel() for p in model.parameters()):,}")
    model = fabric.setup(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)

    data = EmbeddedTextDataModule(seq_length=seq_length, batch_size=micro_batch_size)
    data.setup()
    train_dataloader, val_dataloader = fabric.setup_dataloaders(data.train_dataloader(), data.val_dataloader())

    state = {"model": model, "optimizer": optimizer, "iter_num": 0, "step_count": 0}
    if resume:
        fabric.print(f"Resuming training from {resume}")
        fabric.load(resume, state)

    record = fit(fabric, state, train_dataloader, val_dataloader, config, accumulate=accumulate,
                 n_microbatches=n_microbatches, max_steps=max_steps, learning_rate=learning_rate, min_lr=min_lr,
                 warmup_steps=warmup_steps, max_norm=max_norm, eval_interval=eval_interval, eval_iters=eval_iters,
                 log_interval=log_interval, save_interval=save_interval, out_dir=out_dir)

    # the full weights, gathered on rank 0 (TawPipe: from their owners), as a LitGPT checkpoint directory
    strategy = fabric.strategy
    full = strategy.full_state_dict() if isinstance(strategy, TawPipeFabricStrategy) else model.state_dict()
    if fabric.global_rank == 0:
        final = out_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        torch.save(full, final / "lit_model.pth")
        save_config(config, final)
        fabric.print(f"LitGPT checkpoint: {final}")
        if results:
            Path(results).parent.mkdir(parents=True, exist_ok=True)
            torch.save({**record, "state_dict": {k: v.detach().cpu().clone() for k, v in full.items()}}, results)
    fabric.barrier()
    if torch.distributed.is_initialized():  # exit cleanly (gloo threads alive at exit can abort the process)
        torch.distributed.destroy_process_group()


def fit(fabric: L.Fabric, state: dict, train_dataloader, val_dataloader, config, *, accumulate: int,
        n_microbatches: int, max_steps: int, learning_rate: float, min_lr: float, warmup_steps: int,
        max_norm: Optional[float], eval_interval: int, eval_iters: int, log_interval: int,
        save_interval: Optional[int], out_dir: Path) -> dict:
    model, optimizer = state["model"], state["optimizer"]
    pipelined = isinstance(fabric.strategy, TawPipeFabricStrategy)
    record: dict = {"losses": [], "grad_norms": [], "val_losses": []}
    train_iterator = _batches(train_dataloader, skip=state["iter_num"])
    running, t0 = [], time.perf_counter()

    def loss_fn(m, batch):  # one (micro-)batch: next-token cross-entropy
        return chunked_cross_entropy(m(batch["input_ids"]), batch["labels"])

    for batch in train_iterator:
        if state["step_count"] >= max_steps:
            break
        lr = _lr(state["step_count"], learning_rate, min_lr, warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        state["iter_num"] += 1
        is_accumulating = state["iter_num"] % accumulate != 0
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            if pipelined and n_microbatches > 1:  # micro-batches pipelined in one iteration
                loss = fabric.strategy.train_step(model, batch, lambda m, b: loss_fn(m, b) / accumulate) * accumulate
            else:
                loss = loss_fn(model, batch)
                fabric.backward(loss / accumulate)
        loss = fabric.all_reduce(loss.detach(), reduce_op="mean")  # the global batch's loss
        record["losses"].append(loss.item())
        running.append(loss.item())
        if is_accumulating:
            continue
        if max_norm is not None:
            record["grad_norms"].append(fabric.clip_gradients(model, optimizer, max_norm=max_norm).item())
        optimizer.step()
        optimizer.zero_grad()
        state["step_count"] += 1
        step = state["step_count"]
        if step % log_interval == 0:
            elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
            tokens = log_interval * accumulate * train_dataloader.batch_size * config.block_size * fabric.world_size
            fabric.print(f"iter {state['iter_num']} step {step} | loss {sum(running) / len(running):.4f} | "
                         f"lr {lr:.2e} | {elapsed / log_interval * 1000:.0f} ms/step | {tokens / elapsed:,.0f} tok/s")
            running = []
        if eval_interval and step % eval_interval == 0:
            val_loss = validate(fabric, model, val_dataloader, eval_iters)
            record["val_losses"].append(val_loss)
            fabric.print(f"step {step}: val loss {val_loss:.4f}, val ppl {math.exp(val_loss):.2f}")
        if save_interval and step % save_interval == 0:
            path = out_dir / f"step-{step:06d}.ckpt"
            fabric.save(path, state)
            fabric.print(f"Saved {path}")
    return record


@torch.no_grad()
def validate(fabric: L.Fabric, model, val_dataloader, max_iters: int) -> float:
    """Mean validation loss over every rank (TawPipe runs these forwards on its forward-only schedule)."""
    model.eval()
    losses = []
    for k, batch in enumerate(val_dataloader):
        if k >= max_iters:
            break
        losses.append(chunked_cross_entropy(model(batch["input_ids"]), batch["labels"]))
    model.train()
    return fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item()


def _batches(dataloader, skip: int = 0):
    """Endless iteration over epochs, skipping the ``skip`` batches a resumed run already trained on."""
    while True:
        for batch in dataloader:
            if skip:
                skip -= 1
                continue
            yield batch


def _lr(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to ``floor`` (as ``litgpt/pretrain.py``'s ``get_lr``)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(setup, as_positional=False)
