"""Train the embedded-default LitGPT model under a given strategy; write per-step losses and final weights.

Run by the multi-process tests (Lightning re-launches this script for every local rank). Writes ``OUT/result.pt``
on global rank 0: {"losses": [...], "state_dict": {...}, "model_state_bytes": [...per rank], "comm": [...]}.
"""

import argparse
import json
import os

import torch
import lightning as L
from lightning.pytorch.callbacks import Callback

import lightning_tawpipe  # noqa: F401  registers "tawpipe"
from lightning_tawpipe import TawPipeStrategy
from lightning_tawpipe.data import EmbeddedTextDataModule
from lightning_tawpipe.module import LitGPTModule, tiny_llama_config


class Record(Callback):
    def __init__(self):
        self.losses, self.comm = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        stats = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("tawpipe/")}
        self.comm.append(stats)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="tawpipe")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--group_size", type=int, default=None)
    p.add_argument("--n_microbatches", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--schedule", default="tawpipe")
    p.add_argument("--n_layer", type=int, default=3)
    p.add_argument("--n_embd", type=int, default=32)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_query_groups", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_length", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(1234, verbose=False)
    cfg = tiny_llama_config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, n_query_groups=a.n_query_groups,
                            block_size=a.seq_length)
    module = LitGPTModule(cfg, learning_rate=1e-2)
    data = EmbeddedTextDataModule(seq_length=a.seq_length, batch_size=a.batch_size)
    if a.strategy == "tawpipe":
        strategy = TawPipeStrategy(n_microbatches=a.n_microbatches, prefetch=a.prefetch, schedule=a.schedule,
                                   group_size=a.group_size)
    else:
        strategy = a.strategy
    rec = Record()
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, num_nodes=a.num_nodes, strategy=strategy,
                        max_steps=a.steps, accumulate_grad_batches=a.accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rec])
    trainer.fit(module, data)
    if a.strategy == "tawpipe":
        state = trainer.strategy.full_state_dict()
        nbytes = trainer.strategy.model_state_bytes()
    else:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        nbytes = sum(t.nbytes for t in module.state_dict().values())
    all_bytes = trainer.strategy.all_gather(torch.tensor([nbytes])).flatten().tolist()
    if trainer.global_rank == 0:
        os.makedirs(a.out, exist_ok=True)
        torch.save({"losses": rec.losses, "state_dict": state, "model_state_bytes": all_bytes, "comm": rec.comm},
                   os.path.join(a.out, "result.pt"))


if __name__ == "__main__":
    main()
