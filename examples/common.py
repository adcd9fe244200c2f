"""Shared pieces of ``examples/pretrain.py`` and ``examples/finetune.py`` (Trainer + LitGPT + ``strategy="tawpipe"``).

* :func:`build_config`: any LitGPT config name with field overrides, or the tiny default;
* :class:`EmbeddedPretrainData`: the offline default pretraining data (Python's reference docs, BPE-tokenized);
* :func:`instruction_examples` / :func:`write_instruction_set`: the offline default fine-tuning set, question/answer
  pairs built from the same docs, fed through LitGPT's own SFT pipeline (``litgpt.data.JSON``);
* :class:`LitGPTExample`: the LightningModule (full or LoRA; FSDP2 sharding when the strategy asks for it);
* :class:`TokenThroughput` and :class:`Report`: tokens/s, MFU, per-step lines, validation, ``metrics.json`` and the
  PNG loss curve;
* :func:`build_strategy`, :func:`export_checkpoint`: the strategy by name and the LitGPT checkpoint at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from litgpt import Config
from litgpt.data import DataModule
from litgpt.model import GPT
from litgpt.tokenizer import Tokenizer
from litgpt.utils import chunked_cross_entropy, estimate_flops
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.text import Perplexity

import lightning_tawpipe  # noqa: F401  registers strategy="tawpipe"
from lightning_tawpipe.module import LitGPTModule, fully_shard_blocks, tiny_llama_config
from lightning_tawpipe.tokenizer import corpus_documents

TINY_MODEL = "tawpipe-tiny"
"""Default ``--model_name``: LitGPT's ``tiny-llama-1.1b`` architecture (RMSNorm, SwiGLU, RoPE, GQA) shrunk to
4 layers x 128 wide, ~0.9M parameters: trains on a 2-core CPU in well under a minute."""
TINY_SIZES = dict(n_layer=4, n_embd=128, n_head=4, n_query_groups=2, intermediate_size=344)


def build_config(model_name: str, overrides: Mapping[str, Any], vocab_size: Optional[int] = None) -> Config:
    """A LitGPT ``Config`` for ``model_name`` (a LitGPT name, or :data:`TINY_MODEL`) with field overrides applied.

    ``vocab_size`` (the tokenizer's, when the model is trained from scratch) also resets ``padded_vocab_size`` so
    LitGPT pads it to its ``padding_multiple`` instead of keeping the named model's (e.g. 32000 or 128256).
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if vocab_size is not None:
        overrides.setdefault("vocab_size", vocab_size)
    if model_name == TINY_MODEL:
        return tiny_llama_config(**{**TINY_SIZES, **overrides})
    if "vocab_size" in overrides and "padded_vocab_size" not in overrides:
        overrides["padded_vocab_size"] = None
    return Config.from_name(model_name, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


class TokenWindows(Dataset):
    """Non-overlapping windows of ``length`` tokens (a LitGPT pretraining sample: inputs + one label token)."""

    def __init__(self, tokens: Tensor, length: int) -> None:
        self.tokens, self.length = tokens, length

    def __len__(self) -> int:
        return self.tokens.numel() // self.length

    def __getitem__(self, i: int) -> Tensor:
        return self.tokens[i * self.length : (i + 1) * self.length].clone()


@dataclass
class EmbeddedPretrainData(DataModule):
    """Python's reference documentation (``pydoc_data.topics``, shipped with every Python) as pretraining data.

    Each of the 79 topics is encoded with the connected tokenizer as ``<s> text </s>`` and the documents are
    concatenated; the last topics (``val_fraction`` of the tokens) are held out for validation. Batches are
    ``(batch_size, max_seq_length + 1)`` token tensors, the format of LitGPT's pretraining data modules
    (``TinyStories``, ``TextFiles``...), so the same training step serves both.
    """

    val_fraction: float = 0.05
    """Fraction of the tokens (from the end of the stream) kept for validation."""
    num_workers: int = 0
    """DataLoader workers (the data is in memory; 0 keeps a 2-core machine free for training)."""

    tokenizer: Optional[Tokenizer] = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int = field(default=128, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()

    def connect(self, tokenizer: Optional[Tokenizer] = None, batch_size: int = 1,
                max_seq_length: Optional[int] = None, **kwargs: Any) -> None:
        self.tokenizer, self.batch_size = tokenizer, batch_size
        if max_seq_length is not None and max_seq_length > 0:
            self.max_seq_length = max_seq_length

    def _tokens(self) -> Tensor:
        if self.tokenizer is None:
            raise RuntimeError("call connect(tokenizer, ...) first")
        docs = [self.tokenizer.encode(d, bos=True, eos=True).long() for d in corpus_documents()]
        return torch.cat(docs)

    def setup(self, stage: str = "") -> None:
        tokens = self._tokens()
        split = tokens.numel() - int(tokens.numel() * self.val_fraction)
        self.train_dataset = TokenWindows(tokens[:split], self.max_seq_length + 1)
        self.val_dataset = TokenWindows(tokens[split:], self.max_seq_length + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(42), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, drop_last=True,
                          num_workers=self.num_workers)


_UNDERLINES = set("*=-~^")


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """``(heading, body lines)`` for every reST-style underlined heading in a pydoc topic."""
    lines = text.split("\n")
    heads = [(lines[i].strip(), i) for i in range(len(lines) - 1)
             if lines[i].strip() and not lines[i].startswith(" ") and lines[i + 1]
             and len(set(lines[i + 1])) == 1 and lines[i + 1][0] in _UNDERLINES and len(lines[i + 1]) == len(lines[i])]
    out = []
    for j, (head, i) in enumerate(heads):
        end = heads[j + 1][1] if j + 1 < len(heads) else len(lines)
        out.append((head, lines[i + 2 : end]))
    return out


def _first_paragraph(body: list[str], max_chars: int) -> Optional[str]:
    """The first prose paragraph (not grammar, code or a version note), cut to whole sentences within max_chars."""
    for para in "\n".join(body).split("\n\n"):
        para = para.strip("\n")
        if not para.strip() or para.startswith(" "):
            continue
        if para.startswith(("New in version", "Changed in version", "Added in version", "Deprecated", "Note:")):
            continue
        text = " ".join(line.strip() for line in para.split("\n"))
        if len(text) < 40:
            continue
        if len(text) > max_chars:
            cut = text[:max_chars]
            end = max(cut.rfind(". "), cut.rfind(".\""), cut.rfind(":"))
            text = cut[: end + 1] if end > 40 else cut.rsplit(" ", 1)[0] + " ..."
        return text.rstrip(":").rstrip() + ("" if text.endswith((".", "...")) else ".")
    return None


def instruction_examples(max_answer_chars: int = 300) -> list[dict[str, str]]:
    """Alpaca-format ``{"instruction", "input", "output"}`` pairs from the Python reference documentation.

    One pair per documented section (about 200): the question names the section's heading, the answer is the
    section's first prose paragraph. Deterministic; nothing is downloaded.
    """
    examples = []
    for doc in corpus_documents():
        for head, body in _sections(doc):
            answer = _first_paragraph(body, max_answer_chars)
            if answer is None:
                continue
            subject = head[0].lower() + head[1:] if head[1:2].islower() else head
            examples.append({"instruction": f"What does the Python reference say about {subject}?",
                             "input": "", "output": answer})
    return examples


def write_instruction_set(directory: Path, val_every: int = 10) -> Path:
    """Write :func:`instruction_examples` as ``train.json`` / ``val.json`` (every ``val_every``-th pair is val).

    The directory layout is the one ``litgpt.data.JSON(json_path=directory)`` reads. Written atomically, so all
    ranks of a job may call this at once.
    """
    from lightning_tawpipe.tokenizer import _atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    examples = instruction_examples()
    splits = {"train": [e for i, e in enumerate(examples) if i % val_every],
              "val": [e for i, e in enumerate(examples) if not i % val_every]}
    for name, rows in splits.items():
        _atomic_write(directory / f"{name}.json", json.dumps(rows, indent=1) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------------------------
# the LightningModule
# ---------------------------------------------------------------------------------------------------------------


def inputs_and_targets(batch: Any) -> tuple[Tensor, Tensor]:
    """Model inputs and next-token targets from a LitGPT batch.

    Pretraining batches are ``(B, T + 1)`` token tensors; SFT batches are dicts whose ``labels`` line up with
    ``input_ids`` (prompt tokens set to -100 when masked). Either way position ``t`` predicts token ``t + 1``.
    """
    if isinstance(batch, Tensor):
        return batch[:, :-1], batch[:, 1:]
    return batch["input_ids"][:, :-1], batch["labels"][:, 1:]


class LitGPTExample(LitGPTModule):
    """Causal-LM training of a LitGPT ``GPT`` (or LoRA ``GPT``) with the examples' loss, metrics and FLOP count.

    Arguments beyond :class:`~lightning_tawpipe.module.LitGPTModule`'s:
        init_weights: a ``lit_model.pth`` to start from (loaded in ``configure_model``, before any sharding).
        lora: ``config`` is a ``litgpt.lora.Config``: build ``litgpt.lora.GPT`` and train only the LoRA matrices.
        max_seq_length: the longest input the model will see (sizes the RoPE cache and the FLOP estimate).
    """

    def __init__(self, config: Config, init_weights: Optional[Path] = None, lora: bool = False,
                 max_seq_length: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.init_weights, self.lora = init_weights, lora
        self.max_seq_length = max_seq_length or config.block_size
        self.val_ppl = Perplexity(ignore_index=-100)  # SFT labels mask prompt and padding tokens with -100
        self.flops_per_token = 0.0
        self.flops_per_batch = 0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.lora:
            from litgpt.lora import GPT as LoRAGPT
            from litgpt.lora import mark_only_lora_as_trainable

            model = LoRAGPT(self.config)
        else:
            model = GPT(self.config)
        if self.init_weights is not None and not getattr(self.trainer.strategy, "init_weights", None):
            # (TawPipe reads the file itself: each rank copies only the chunk it owns into a meta-built model)
            state = torch.load(self.init_weights, map_location="cpu", mmap=True, weights_only=True)
            state = state.get("model", state)
            # LoRA models have extra lora_A/lora_B entries (initialised, B = 0): everything else must match.
            missing, unexpected = model.load_state_dict(state, strict=not self.lora)
            if unexpected or any("lora_" not in k for k in missing):
                raise RuntimeError(f"{self.init_weights} does not fit the model: missing {missing}, "
                                   f"unexpected {unexpected}")
        if self.lora:
            mark_only_lora_as_trainable(model)
        model.max_seq_length = self.max_seq_length
        # FLOPs of one token through forward+backward (frozen weights: no weight gradient), for MFU.
        self.flops_per_token = estimate_flops(model, training=True) / self.max_seq_length
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            fully_shard_blocks(model, self.device_mesh["data_parallel"])
        self.model = model

    def param_groups(self) -> Any:
        return [p for p in self.parameters() if p.requires_grad]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # read by ThroughputMonitor after every batch: FLOPs this rank spent on this batch
        self.flops_per_batch = int(self.flops_per_token * inputs_and_targets(batch)[0].numel())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = inputs_and_targets(batch)
        loss = chunked_cross_entropy(self(inputs), targets)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=inputs.size(0))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = inputs_and_targets(batch)
        logits = self(inputs)
        loss = chunked_cross_entropy(logits, targets)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, on_step=False, on_epoch=True,
                 batch_size=inputs.size(0))
        self.val_ppl.update(logits.float(), targets)
        self.log("val_ppl", self.val_ppl, prog_bar=True, on_step=False, on_epoch=True, batch_size=inputs.size(0))
        return loss


# ---------------------------------------------------------------------------------------------------------------
# throughput, reporting, plotting
# ---------------------------------------------------------------------------------------------------------------


def measure_cpu_peak_flops(dtype: torch.dtype = torch.float32, size: int = 384, trials: int = 8,
                           seconds_per_trial: float = 0.04) -> float:
    """Achieved FLOP/s of a square ``dtype`` matmul with this process's threads: the MFU reference on a CPU.

    Lightning knows the peak FLOP/s of GPUs and TPUs but not of CPUs, so on a CPU the examples report MFU against
    this measured matmul rate (an achievable peak, not a datasheet number). The best of several short trials is
    kept, so a moment of contention from other processes does not deflate the reference.
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds_per_trial:
            a @ b
            n += 1
        best = max(best, 2 * size**3 * n / elapsed)
    return best


class TokenThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` counting tokens, with MFU on CPUs too and the latest values kept.

    The module's ``flops_per_batch`` is set per batch (:class:`LitGPTExample`). On a CPU, where Lightning has no
    peak FLOP/s, MFU is relative to :func:`measure_cpu_peak_flops`. Metrics go to the loggers as
    ``train/items_per_sec`` (tokens/s, all ranks), ``train/device/mfu`` etc.; :attr:`latest` keeps the last values.
    """

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_size_fn=lambda b: inputs_and_targets(b)[0].size(0),
                         length_fn=lambda b: inputs_and_targets(b)[0].numel(), window_size=window_size)
        self.latest: dict[str, dict[str, float]] = {}
        self.peak_source = "device spec"

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.available_flops is None and trainer.strategy.root_device.type == "cpu":
            # every rank measures at the same moment, so the reference is one process's share of a busy machine
            trainer.strategy.barrier()
            # fp32 whatever the precision: CPUs without native bf16/fp16 matmuls run those slower than the model's
            # autocast mix, which would put MFU above 100%
            self.available_flops = measure_cpu_peak_flops(torch.float32)
            self.peak_source = "measured CPU matmul"
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops

    def _compute(self, trainer, iter_num: Optional[int] = None) -> None:
        stage = trainer.state.stage
        if stage in self._throughputs:
            self.latest[stage.value] = {k: float(v) for k, v in self._throughputs[stage].compute().items()}
        super()._compute(trainer, iter_num)


class Report(Callback):
    """Per-step lines, validation results, ``metrics.json`` and ``loss_curve.png`` (global rank 0 only)."""

    def __init__(self, out_dir: Path, throughput: TokenThroughput, log_interval: int = 1, title: str = "") -> None:
        self.out_dir, self.throughput, self.log_interval, self.title = out_dir, throughput, log_interval, title
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val: list[dict[str, float]] = []
        self.tokens_per_sec: Optional[float] = None
        self.mfu: Optional[float] = None
        self.t0 = time.perf_counter()

    def _print(self, trainer, text: str) -> None:
        bar = trainer.progress_bar_callback
        (bar.print if bar is not None and hasattr(bar, "print") else print)(text)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        loss = float(outputs["loss"] if isinstance(outputs, Mapping) else outputs)
        step = trainer.global_step
        self.steps.append(step)
        self.losses.append(loss)
        train = self.throughput.latest.get("train", {})
        self.tokens_per_sec = train.get("items_per_sec", train.get("device/items_per_sec", self.tokens_per_sec))
        self.mfu = train.get("device/mfu", self.mfu)
        if step % self.log_interval == 0 or step == trainer.max_steps:
            tput = f" | {self.tokens_per_sec:,.0f} tok/s" if self.tokens_per_sec else ""
            mfu = f" | MFU {100 * self.mfu:.2f}%" if self.mfu is not None else ""
            self._print(trainer, f"step {step:>4}/{trainer.max_steps} | loss {loss:.4f}{tput}{mfu}")

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val_loss" in m:
            entry = {"step": trainer.global_step, "val_loss": float(m["val_loss"]), "val_ppl": float(m["val_ppl"])}
            self.val.append(entry)
            self._print(trainer, f"validation at step {entry['step']}: loss {entry['val_loss']:.4f}, "
                                 f"perplexity {entry['val_ppl']:.2f}")

    def finish(self, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Write ``metrics.json`` and ``loss_curve.png`` into ``out_dir``; returns the metrics."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        result = {"steps": self.steps, "train_loss": self.losses, "validation": self.val,
                  "tokens_per_sec": self.tokens_per_sec, "mfu": self.mfu, "mfu_reference": self.throughput.peak_source,
                  "wall_seconds": time.perf_counter() - self.t0, **(extra or {})}
        (self.out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_loss_curve(self.steps, self.losses, self.val, self.out_dir / "loss_curve.png", self.title)
        return result


def plot_loss_curve(steps: list[int], losses: list[float], val: list[dict[str, float]], path: Path,
                    title: str = "") -> Path:
    """PNG of the per-step training loss with the validation loss points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, label="train loss", lw=1.2)
    if val:
        ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# strategies and export
# ---------------------------------------------------------------------------------------------------------------


def build_strategy(name: str, devices: int, num_nodes: int, n_microbatches: int = 1,
                   group_size: Optional[int] = None, init_weights: Optional[Path] = None, lora: bool = False,
                   **replica_knobs: Any) -> Any:
    """``tawpipe`` (with its knobs), ``fsdp`` (FSDP2 via ``ModelParallelStrategy``: runs on CPU and GPU, as in
    ``litgpt finetune_lora``), or any other Lightning strategy name (``ddp``...) passed through.

    With ``init_weights`` (a LitGPT ``lit_model.pth``), TawPipe builds the model on the meta device and each rank
    copies only the chunk it owns out of the memory-mapped file: no rank holds the whole pretrained model.
    ``replica_knobs`` (``replicas``, ``outer``, ``sync_every``, ``density``, ``stripe``, ``microbatch_order``) go to
    TawPipe as they are."""
    if name == "tawpipe":
        from lightning_tawpipe import TawPipeStrategy

        return TawPipeStrategy(n_microbatches=n_microbatches, group_size=group_size,
                               meta_init=init_weights is not None,
                               init_weights=str(init_weights) if init_weights is not None else None,
                               init_weights_strict=not lora, **replica_knobs)
    if name == "fsdp":
        return ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
    return name


def full_gpt_state_dict(trainer: L.Trainer, module: LitGPTExample) -> dict[str, Tensor]:
    """The GPT's full weights on global rank 0 (``{}`` elsewhere); every rank must call this (it may gather)."""
    from lightning_tawpipe import TawPipeStrategy

    strategy = trainer.strategy
    if isinstance(strategy, TawPipeStrategy):
        state = strategy.full_state_dict()
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if trainer.is_global_zero else {}
    if not trainer.is_global_zero:
        return {}
    return {k: v.detach().cpu() for k, v in module.model.state_dict().items()}


def export_checkpoint(trainer: L.Trainer, module: LitGPTExample, out_dir: Path, tokenizer_dir: Path,
                      prompt_style: Any = None) -> Optional[Path]:
    """Gather the weights and write a LitGPT checkpoint directory (``out_dir/final``) on global rank 0."""
    from lightning_tawpipe.export import save_litgpt_checkpoint

    state = full_gpt_state_dict(trainer, module)
    path = None
    if trainer.is_global_zero:
        path = save_litgpt_checkpoint(state, module.config, out_dir / "final", tokenizer_dir=tokenizer_dir,
                                      prompt_style=prompt_style)
        if module.lora:  # the adapters alone too, as litgpt finetune_lora writes them
            torch.save({k: v.cpu() for k, v in state.items() if "lora_" in k}, path / "lit_model.pth.lora")
    trainer.strategy.barrier()
    return path


def sample(checkpoint_dir: Path, prompt: str, max_new_tokens: int = 40, temperature: float = 0.8,
           seed: int = 1234) -> str:
    """Generate from an exported LitGPT checkpoint with LitGPT's own ``generate`` (top-k 50, seeded; greedy if
    ``temperature == 0``).

    The prompt is wrapped in the checkpoint's ``prompt_style.yaml`` if it has one (as ``litgpt generate`` does).
    Returns only the generated text.
    """
    from litgpt.generate.base import generate
    from litgpt.prompts import has_prompt_style, load_prompt_style

    from lightning_tawpipe.export import load_litgpt_checkpoint

    model, config, tokenizer = load_litgpt_checkpoint(checkpoint_dir)
    if has_prompt_style(checkpoint_dir):
        prompt = load_prompt_style(checkpoint_dir).apply(prompt)
    encoded = tokenizer.encode(prompt)
    model.max_seq_length = min(config.block_size, encoded.numel() + max_new_tokens)
    model.set_kv_cache(batch_size=1)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = generate(model, encoded, model.max_seq_length, temperature=temperature,
                       top_k=1 if temperature == 0.0 else 50, eos_id=tokenizer.eos_id, include_prompt=False)
    return tokenizer.decode(out)


def finish_distributed(trainer: L.Trainer) -> None:
    """Tear the process group down cleanly (gloo can abort in C++ teardown when its threads outlive the script)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def set_cpu_threads() -> None:
    """One intra-op thread per process unless the user set ``OMP_NUM_THREADS``: ranks share the CPU cores."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


@dataclass
class TrainArgs:
    """Trainer settings shared by the examples (flat CLI flags in the scripts)."""

    strategy: str = "tawpipe"
    accelerator: str = "auto"
    devices: int = 2
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = 60
    batch_size: int = 4
    accumulate_grad_batches: int = 1
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_norm: Optional[float] = 1.0
    eval_interval: int = 20
    eval_iters: int = 8
    log_interval: int = 5
    n_microbatches: int = 1
    group_size: Optional[int] = None
    replicas: int = 1
    outer: Optional[str] = "sparseloco"
    sync_every: int = 15
    density: float = 0.03125
    stripe: bool = False
    microbatch_order: str = "sample"
    seed: int = 1337
    progress_bar: bool = True


def run_training(module: LitGPTExample, data: DataModule, args: TrainArgs, out_dir: Path, tokenizer_dir: Path,
                 title: str, prompt_style: Any = None, sample_prompt: Optional[str] = None,
                 sample_tokens: int = 0, extra_metrics: Optional[dict[str, Any]] = None) -> Optional[Path]:
    """Fit, validate, export ``out_dir/final`` (LitGPT checkpoint), write metrics/plot, optionally sample.

    Returns the checkpoint directory on global rank 0 (``None`` on the other ranks).
    """
    from lightning.pytorch.loggers import CSVLogger

    throughput = TokenThroughput(window_size=max(2, min(10, args.max_steps // 2)))
    report = Report(out_dir, throughput, log_interval=args.log_interval, title=title)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=build_strategy(args.strategy, args.devices, args.num_nodes, args.n_microbatches, args.group_size,
                                init_weights=module.init_weights, lora=module.lora,
                                **({"replicas": args.replicas, "outer": args.outer, "sync_every": args.sync_every,
                                    "density": args.density, "stripe": args.stripe,
                                    "microbatch_order": args.microbatch_order}
                                   if args.strategy == "tawpipe" else {})),
        precision=args.precision,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate_grad_batches,
        gradient_clip_val=args.max_norm,
        val_check_interval=args.eval_interval * args.accumulate_grad_batches,  # counted in batches, not steps
        check_val_every_n_epoch=None,
        limit_val_batches=args.eval_iters,
        num_sanity_val_steps=0,
        log_every_n_steps=args.log_interval,
        logger=CSVLogger(out_dir, name="logs"),
        callbacks=[throughput, report] + ([TQDMProgressBar()] if args.progress_bar else []),
        enable_checkpointing=False,
        enable_progress_bar=args.progress_bar,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    # the same decision on every rank (the Report callback only records on rank 0)
    if trainer.global_step % args.eval_interval != 0:
        trainer.validate(module, datamodule=data, verbose=False)
    checkpoint = export_checkpoint(trainer, module, out_dir, tokenizer_dir, prompt_style=prompt_style)
    if trainer.is_global_zero:
        n_params = sum(v.numel() for v in torch.load(checkpoint / "lit_model.pth", weights_only=True).values())
        report.finish({"strategy": args.strategy, "world_size": trainer.world_size, "model": module.config.name,
                       "parameters": n_params, "checkpoint_dir": str(checkpoint), **(extra_metrics or {})})
        print(f"LitGPT checkpoint: {checkpoint}  (metrics: {out_dir / 'metrics.json'}, "
              f"loss curve: {out_dir / 'loss_curve.png'})")
        if sample_prompt and sample_tokens > 0:
            text = sample(checkpoint, sample_prompt, sample_tokens)
            print(f"sample for {sample_prompt!r}:\n{text}")
    finish_distributed(trainer)
    return checkpoint


def cli(function: Any) -> Any:
    """``jsonargparse.CLI(function)`` with flat flags; a bare boolean flag (``--lora``) means ``--lora true``."""
    import inspect
    import typing

    from jsonargparse import CLI, set_parsing_settings

    hints = typing.get_type_hints(function)
    flags = {f"--{name}" for name in inspect.signature(function).parameters if hints.get(name) is bool}
    argv = sys.argv[1:]
    args = [f"{a}=true" if a in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else a
            for i, a in enumerate(argv)]
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return CLI(function, args=args, as_positional=False)
