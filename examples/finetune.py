"""Fine-tune a LitGPT checkpoint (full or LoRA) with the Lightning Trainer and ``strategy="tawpipe"``.

    python examples/pretrain.py && python examples/finetune.py          # offline: pretrain, then instruction-tune
    python examples/finetune.py --lora                                   # LoRA (litgpt.lora), merged on export
    python examples/finetune.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B --data Alpaca2k --devices 8
    litgpt generate out/finetune/final --prompt 'What does the Python reference say about the "with" statement?'

Default data: about 200 instruction/answer pairs the script builds from Python's reference documentation (the
question names a documented section, the answer is the section's first paragraph), written to
``out_dir/data/{train,val}.json`` and fed through LitGPT's own SFT pipeline (``litgpt.data.JSON``, Alpaca prompt
style). Any LitGPT SFT data module works instead: ``--data Alpaca``, ``--data JSON --data.json_path my.json``...

Default model: ``examples/pretrain.py``'s output, ``out/pretrain/final``. Any LitGPT checkpoint directory works
(``litgpt download`` output). Output (``--out_dir``, default ``out/finetune`` or ``out/finetune-lora``): ``final/``
is a LitGPT checkpoint (LoRA merged into the weights, as ``litgpt merge_lora`` does, plus ``lit_model.pth.lora`` with
the LoRA weights alone) with ``prompt_style.yaml``, so ``litgpt generate``/``chat`` apply the training prompt style.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
from litgpt import Config  # noqa: E402
from litgpt.data import JSON, DataModule  # noqa: E402
from litgpt.tokenizer import Tokenizer  # noqa: E402

from common import (  # noqa: E402
    TINY_MODEL,
    LitGPTExample,
    TrainArgs,
    build_config,
    cli,
    instruction_examples,
    run_training,
    set_cpu_threads,
    write_instruction_set,
)

DEFAULT_CHECKPOINT = Path("out/pretrain/final")


def setup(
    checkpoint_dir: Optional[Path] = DEFAULT_CHECKPOINT,
    model_name: str = TINY_MODEL,
    n_layer: Optional[int] = None,
    n_embd: Optional[int] = None,
    n_head: Optional[int] = None,
    n_query_groups: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    block_size: Optional[int] = None,
    model_overrides: Optional[dict[str, Any]] = None,
    lora: bool = False,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    data: Optional[DataModule] = None,
    prompt_style: str = "alpaca",
    out_dir: Optional[Path] = None,
    strategy: str = "tawpipe",
    accelerator: str = "auto",
    devices: int = 2,
    num_nodes: int = 1,
    precision: str = "32-true",
    max_steps: int = 60,
    batch_size: int = 4,
    max_seq_length: Optional[int] = None,
    accumulate_grad_batches: int = 1,
    learning_rate: Optional[float] = None,
    weight_decay: float = 0.0,
    warmup_steps: int = 5,
    max_norm: Optional[float] = 1.0,
    eval_interval: int = 20,
    eval_iters: int = 8,
    log_interval: int = 10,
    n_microbatches: int = 1,
    group_size: Optional[int] = None,
    stripe: bool = False,
    microbatch_order: str = "sample",
    seed: int = 1337,
    progress_bar: bool = True,
    sample_tokens: int = 40,
) -> Optional[Path]:
    """Fine-tune a LitGPT model with the Lightning Trainer (full fine-tuning, or LoRA with ``--lora``).

    Args:
        checkpoint_dir: The LitGPT checkpoint to start from (``lit_model.pth``, ``model_config.yaml``, tokenizer).
            Default: ``examples/pretrain.py``'s output. ``null``: a fresh ``--model_name`` model with the embedded
            tokenizer (a pipeline smoke test).
        model_name: With ``--checkpoint_dir null``: a LitGPT config name or ``tawpipe-tiny``.
        n_layer: Config override (with ``--checkpoint_dir null``).
        n_embd: Config override (with ``--checkpoint_dir null``).
        n_head: Config override (with ``--checkpoint_dir null``).
        n_query_groups: Config override (with ``--checkpoint_dir null``).
        intermediate_size: Config override (with ``--checkpoint_dir null``).
        block_size: Config override (also with a checkpoint: the context length).
        model_overrides: Other ``litgpt.Config`` fields to override.
        lora: Train LoRA adapters (``litgpt.lora``) instead of all weights.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_query: LoRA on the attention queries.
        lora_key: LoRA on the attention keys.
        lora_value: LoRA on the attention values.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on the MLP.
        lora_head: LoRA on the output head.
        data: A LitGPT SFT data module (``Alpaca``, ``Alpaca2k``, ``JSON``...). Default: the built-in Python
            documentation Q&A set.
        prompt_style: LitGPT prompt style of the default data (saved with the checkpoint).
        out_dir: Output directory (default ``out/finetune`` or ``out/finetune-lora``); ``final/`` is the checkpoint.
        strategy: ``tawpipe``, ``ddp``, ``fsdp`` (FSDP2), or any other Lightning strategy name.
        accelerator: ``cpu``, ``gpu`` or ``auto``.
        devices: Processes per node.
        num_nodes: Number of nodes.
        precision: Lightning precision flag (``32-true``, ``bf16-mixed``...; whatever the strategy supports).
        max_steps: Optimizer steps.
        batch_size: Samples per process per step.
        max_seq_length: Longest tokenized sample (longer ones are truncated). Default: the model's block size.
        accumulate_grad_batches: Batches per optimizer step.
        learning_rate: AdamW peak learning rate (default 1e-3 full, 1e-2 LoRA).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear learning-rate warm-up steps.
        max_norm: Gradient clipping by global norm (``null`` to disable).
        eval_interval: Validate every this many steps (and at the end).
        eval_iters: Validation batches per process.
        log_interval: Print a progress line (and log) every this many steps.
        n_microbatches: TawPipe: micro-batches each batch is split into.
        group_size: TawPipe: ranks per group (``null``: processes per node).
        stripe: TawPipe: move remote weights and gradients in stripes over every rank's own NIC (nodes with one NIC
            per device).
        microbatch_order: TawPipe: ``sample`` (each micro-batch forward and backward in turn) or ``chunk`` (every
            micro-batch through a chunk while it is resident: the weight traffic of one micro-batch).
        seed: Random seed (same on every rank).
        progress_bar: Show the progress bar.
        sample_tokens: Tokens generated for one validation question from the final checkpoint (0 to skip).
    """
    set_cpu_threads()
    L.seed_everything(seed, verbose=False)
    out_dir = out_dir or Path("out/finetune-lora" if lora else "out/finetune")
    overrides = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_query_groups=n_query_groups,
                     intermediate_size=intermediate_size, block_size=block_size, **(model_overrides or {}))
    if checkpoint_dir is not None:
        if not (checkpoint_dir / "lit_model.pth").is_file():
            hint = " Run `python examples/pretrain.py` first." if checkpoint_dir == DEFAULT_CHECKPOINT else ""
            raise SystemExit(f"{checkpoint_dir} is not a LitGPT checkpoint directory (no lit_model.pth).{hint}")
        config = Config.from_file(checkpoint_dir / "model_config.yaml",
                                  **{k: v for k, v in overrides.items() if v is not None})
        tokenizer_dir, init_weights = checkpoint_dir, checkpoint_dir / "lit_model.pth"
    else:
        from lightning_tawpipe.tokenizer import save_tokenizer

        tokenizer_dir, init_weights = save_tokenizer(out_dir / "tokenizer"), None
        overrides["block_size"] = overrides["block_size"] or 256
        config = build_config(model_name, overrides, vocab_size=Tokenizer(tokenizer_dir).vocab_size)
    if lora:
        from litgpt.lora import Config as LoRAConfig

        config = LoRAConfig(**asdict(config), lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            lora_query=lora_query, lora_key=lora_key, lora_value=lora_value,
                            lora_projection=lora_projection, lora_mlp=lora_mlp, lora_head=lora_head)
    max_seq_length = min(max_seq_length or config.block_size, config.block_size)
    tokenizer = Tokenizer(tokenizer_dir)
    question = None
    if data is None:
        write_instruction_set(out_dir / "data")
        data = JSON(json_path=out_dir / "data", prompt_style=prompt_style, mask_prompt=False, num_workers=0)
        question = instruction_examples()[0]["instruction"]  # a validation question (every 10th pair, from 0)
    data.connect(tokenizer=tokenizer, batch_size=batch_size, max_seq_length=max_seq_length)
    learning_rate = learning_rate if learning_rate is not None else (1e-2 if lora else 1e-3)
    module = LitGPTExample(config, init_weights=init_weights, lora=lora, max_seq_length=max_seq_length,
                           learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
    args = TrainArgs(strategy=strategy, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                     precision=precision, max_steps=max_steps, batch_size=batch_size,
                     accumulate_grad_batches=accumulate_grad_batches, learning_rate=learning_rate,
                     weight_decay=weight_decay, warmup_steps=warmup_steps, max_norm=max_norm,
                     eval_interval=eval_interval, eval_iters=eval_iters, log_interval=log_interval,
                     n_microbatches=n_microbatches, group_size=group_size, seed=seed, progress_bar=progress_bar,
                     stripe=stripe, microbatch_order=microbatch_order)
    kind = "LoRA" if lora else "full"
    title = f"{kind} fine-tune {config.name} ({strategy}, {devices * num_nodes} processes)"
    style = getattr(data, "prompt_style", prompt_style)
    return run_training(module, data, args, out_dir, tokenizer_dir, title, prompt_style=style,
                        sample_prompt=question, sample_tokens=sample_tokens,
                        extra_metrics={"finetune": kind, "base_checkpoint": str(checkpoint_dir)})


if __name__ == "__main__":
    cli(setup)
