"""Pretrain a LitGPT model with the Lightning Trainer and ``strategy="tawpipe"``; get a LitGPT checkpoint back.

    python examples/pretrain.py                                   # offline: tiny LLaMA, 2 CPU processes, ~1 min
    python examples/pretrain.py --strategy ddp                    # same run under ddp (or fsdp) to compare
    python examples/pretrain.py --model_name tiny-llama-1.1b --n_layer 4 --n_embd 256 --n_head 8 --max_steps 200
    python examples/pretrain.py --help

Default data: Python's reference documentation (``pydoc_data.topics``, shipped with Python) tokenized with a BPE
tokenizer trained on it at start-up (``lightning_tawpipe.tokenizer``). With ``--data TinyStories`` /
``--data TextFiles --data.train_data_path DIR`` (LitGPT data modules; they need ``litdata``) and
``--tokenizer_dir`` (or ``--checkpoint_dir`` of a downloaded LitGPT model) it trains on your data.

Output (``--out_dir``, default ``out/pretrain``): ``final/`` is a LitGPT checkpoint directory (``lit_model.pth``,
``model_config.yaml``, tokenizer files) for ``litgpt generate out/pretrain/final`` and ``examples/finetune.py``;
``metrics.json``, ``loss_curve.png`` and CSV logs (``logs/``) sit next to it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
from litgpt import Config  # noqa: E402
from litgpt.data import DataModule  # noqa: E402
from litgpt.tokenizer import Tokenizer  # noqa: E402

from common import (  # noqa: E402
    TINY_MODEL,
    EmbeddedPretrainData,
    LitGPTExample,
    TrainArgs,
    build_config,
    cli,
    run_training,
    set_cpu_threads,
)


def setup(
    model_name: str = TINY_MODEL,
    n_layer: Optional[int] = None,
    n_embd: Optional[int] = None,
    n_head: Optional[int] = None,
    n_query_groups: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    block_size: Optional[int] = None,
    model_overrides: Optional[dict[str, Any]] = None,
    checkpoint_dir: Optional[Path] = None,
    tokenizer_dir: Optional[Path] = None,
    vocab_size: int = 1024,
    data: Optional[DataModule] = None,
    out_dir: Path = Path("out/pretrain"),
    strategy: str = "tawpipe",
    accelerator: str = "auto",
    devices: int = 2,
    num_nodes: int = 1,
    precision: str = "32-true",
    max_steps: int = 100,
    batch_size: int = 4,
    max_seq_length: int = 256,
    accumulate_grad_batches: int = 1,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 10,
    max_norm: Optional[float] = 1.0,
    eval_interval: int = 25,
    eval_iters: int = 8,
    log_interval: int = 10,
    n_microbatches: int = 1,
    group_size: Optional[int] = None,
    replicas: int = 1,
    outer: Optional[str] = "sparseloco",
    sync_every: int = 15,
    density: float = 0.03125,
    stripe: bool = False,
    microbatch_order: str = "sample",
    seed: int = 1337,
    progress_bar: bool = True,
    sample_tokens: int = 30,
) -> Optional[Path]:
    """Pretrain a LitGPT model with the Lightning Trainer.

    Args:
        model_name: A LitGPT config name (``litgpt.Config.from_name``: ``tiny-llama-1.1b``, ``Llama-3.2-1B``,
            ``micro-llama-300M``...) or ``tawpipe-tiny`` (tiny-llama-1.1b's architecture at 4 layers x 128).
        n_layer: Override of the config's number of layers.
        n_embd: Override of the embedding width.
        n_head: Override of the number of attention heads.
        n_query_groups: Override of the number of key/value groups (GQA).
        intermediate_size: Override of the MLP width.
        block_size: Override of the context length (default: ``max_seq_length``).
        model_overrides: Any other ``litgpt.Config`` fields, e.g. ``'{"rope_base": 500000}'``.
        checkpoint_dir: A LitGPT checkpoint to continue pretraining from (its config, weights and tokenizer;
            the model flags are then ignored).
        tokenizer_dir: A directory with a LitGPT-loadable tokenizer. Default: train a BPE tokenizer on the
            embedded text (written to ``out_dir/tokenizer``).
        vocab_size: Vocabulary size of the tokenizer trained on the embedded text.
        data: A LitGPT data module (``TinyStories``, ``TextFiles``, ``LitData``...). Default: the embedded text.
        out_dir: Output directory; ``out_dir/final`` is the LitGPT checkpoint.
        strategy: ``tawpipe``, ``ddp``, ``fsdp`` (FSDP2), or any other Lightning strategy name.
        accelerator: ``cpu``, ``gpu`` or ``auto``.
        devices: Processes per node.
        num_nodes: Number of nodes (set ``NODE_RANK`` per node, or let SLURM/torchrun set the ranks).
        precision: Lightning precision flag (``32-true``, ``bf16-mixed``...; whatever the strategy supports).
        max_steps: Optimizer steps.
        batch_size: Samples per process per step.
        max_seq_length: Tokens per sample.
        accumulate_grad_batches: Batches per optimizer step.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear learning-rate warm-up steps.
        max_norm: Gradient clipping by global norm (``null`` to disable).
        eval_interval: Validate every this many steps (and at the end).
        eval_iters: Validation batches per process.
        log_interval: Print a progress line (and log) every this many steps.
        n_microbatches: TawPipe: micro-batches each batch is split into.
        group_size: TawPipe: ranks per group (``null``: processes per node).
        replicas: TawPipe: equal replicas (TawPipe groups of consecutive ranks, e.g. one per site) that train apart
            and combine their progress every ``sync_every`` steps (see the README's "Replicas").
        outer: TawPipe with replicas: ``sparseloco``, ``diloco`` or ``null`` (average gradients every step).
        sync_every: TawPipe with replicas: inner steps between outer steps.
        density: TawPipe with SparseLoCo: Top-k fraction per 64x64 tile.
        stripe: TawPipe: move remote weights and gradients in stripes over every rank's own NIC (nodes with one NIC
            per device).
        microbatch_order: TawPipe: ``sample`` (each micro-batch forward and backward in turn) or ``chunk`` (every
            micro-batch through a chunk while it is resident: the weight traffic of one micro-batch).
        seed: Random seed (same on every rank).
        progress_bar: Show the progress bar.
        sample_tokens: Tokens sampled from the final checkpoint as a smoke test (0 to skip).
    """
    set_cpu_threads()
    L.seed_everything(seed, verbose=False)
    if checkpoint_dir is not None:
        config = Config.from_file(checkpoint_dir / "model_config.yaml")
        tokenizer_dir, init_weights = checkpoint_dir, checkpoint_dir / "lit_model.pth"
    else:
        init_weights = None
        if tokenizer_dir is None:
            from lightning_tawpipe.tokenizer import save_tokenizer

            tokenizer_dir = save_tokenizer(out_dir / "tokenizer", vocab_size=vocab_size, model_max_length=max_seq_length)
        overrides = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_query_groups=n_query_groups,
                         intermediate_size=intermediate_size, block_size=block_size or max_seq_length,
                         **(model_overrides or {}))
        config = build_config(model_name, overrides, vocab_size=Tokenizer(tokenizer_dir).vocab_size)
    tokenizer = Tokenizer(tokenizer_dir)
    if data is None:
        data = EmbeddedPretrainData()
    data.connect(tokenizer=tokenizer, batch_size=batch_size, max_seq_length=max_seq_length)
    module = LitGPTExample(config, init_weights=init_weights, max_seq_length=max_seq_length,
                           learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
    args = TrainArgs(strategy=strategy, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                     precision=precision, max_steps=max_steps, batch_size=batch_size,
                     accumulate_grad_batches=accumulate_grad_batches, learning_rate=learning_rate,
                     weight_decay=weight_decay, warmup_steps=warmup_steps, max_norm=max_norm,
                     eval_interval=eval_interval, eval_iters=eval_iters, log_interval=log_interval,
                     n_microbatches=n_microbatches, group_size=group_size, seed=seed, progress_bar=progress_bar,
                     replicas=replicas, outer=outer, sync_every=sync_every, density=density, stripe=stripe,
                     microbatch_order=microbatch_order)
    title = f"pretrain {config.name} ({strategy}, {devices * num_nodes} processes)"
    return run_training(module, data, args, out_dir, tokenizer_dir, title,
                        sample_prompt='The "with" statement', sample_tokens=sample_tokens)


if __name__ == "__main__":
    cli(setup)
