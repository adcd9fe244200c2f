"""LightningModule wrapper around a LitGPT ``GPT`` for next-token language modelling.

The module is deliberately plain (one forward, one loss) so that the same module can
be trained under different strategies and their losses compared: any difference then
comes from the strategy, not from the training step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from litgpt import Config
from litgpt.config import name_to_config
from litgpt.model import GPT
from litgpt.utils import chunked_cross_entropy
from torch import Tensor
from torchmetrics.text import Perplexity


def tiny_llama_config(
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_query_groups: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    block_size: int = 256,
    **overrides: Any,
) -> Config:
    """Build a small LLaMA-family config (RMSNorm, LLaMAMLP, RoPE, GQA, no biases).

    Starting from LitGPT's ``tiny-llama-1.1b`` entry keeps every architectural switch
    of the real family and only shrinks the sizes, so code paths exercised in tests are
    the ones a real checkpoint would use. ``padded_vocab_size`` is pinned to
    ``vocab_size`` because LitGPT would otherwise pad 256 up to the family's padding
    multiple, wasting output logits the byte tokenizer can never produce.
    """
    if intermediate_size is None:
        # LLaMAMLP requires an explicit size; 4 * n_embd rounded to a multiple of 8
        # keeps matmul shapes friendly for any n_embd.
        intermediate_size = -(-4 * n_embd // 8) * 8
    settings: dict[str, Any] = dict(
        name="tawpipe-tiny-llama",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_query_groups=n_query_groups,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        padded_vocab_size=vocab_size,
        block_size=block_size,
    )
    settings.update(overrides)
    # ``Config.from_name`` cannot take a ``name`` override (it is its positional
    # argument), so merge onto a copy of the registry entry directly. The HF pointer
    # is dropped: this shrunken model must never be paired with TinyLlama weights.
    base = dict(name_to_config["tiny-llama-1.1b"])
    base["hf_config"] = {}
    base.update(settings)
    return Config(**base)


def fully_shard_blocks(model: GPT, mesh: Any) -> GPT:
    """Apply FSDP2 the way LitGPT's own FSDP runs wrap: every ``Block`` its own unit, then the root for the rest.

    For the FSDP2 baselines (``ModelParallelStrategy``), which leave sharding to ``configure_model``: each block is
    all-gathered just before it runs and freed after; the root groups the embedding, final norm and LM head.
    """
    from litgpt.model import Block
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class LinearWarmup:
    """LR multiplier ramping linearly from ``1/warmup_steps`` to 1, then constant.

    A callable class rather than a lambda so the scheduler (and anything holding it)
    stays picklable for spawn-based launchers and checkpointing.
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps)


class LitGPTModule(pl.LightningModule):
    """Causal LM training around ``litgpt.model.GPT``.

    The GPT is normally built in :meth:`configure_model`, not in ``__init__``, so
    strategies can materialise it inside their own init context (meta device,
    sharding, per-stage construction). A pre-built ``model`` can be passed instead,
    e.g. to share identical initial weights between two runs.
    """

    def __init__(
        self,
        config: Config,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        model: GPT | None = None,
        optimizer: str = "adamw",
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
        self.config = config
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.optimizer_name, self.momentum = optimizer, momentum
        # Config is a plain object, not a hyperparameter; record only the scalars.
        self.save_hyperparameters(ignore=["config", "model"])
        self.model: GPT | None = model
        self.val_ppl = Perplexity()

    def configure_model(self) -> None:
        """Build the GPT once; Lightning may call this hook again for later stages."""
        if self.model is None:
            self.model = GPT(self.config)

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("model not built yet: call configure_model() or pass model=")
        return self.model(input_ids)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return chunked_cross_entropy(logits, labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"])
        loss = self._loss(logits, batch["labels"])
        # No sync_dist: a cross-rank reduction here would add a collective per step
        # and could deadlock strategies where only some ranks compute the loss.
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"])
        loss = self._loss(logits, batch["labels"])
        self.log("val_loss", loss, sync_dist=True, on_step=False, on_epoch=True)
        # Perplexity accumulates token-level sums, so the epoch value is exact rather
        # than an average of per-batch perplexities; it expects float logits.
        self.val_ppl.update(logits.float(), batch["labels"])
        self.log("val_ppl", self.val_ppl, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(self(batch["input_ids"]), batch["labels"])
        self.log("test_loss", loss, sync_dist=True, on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The most likely next token at every position."""
        return self(batch["input_ids"]).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":  # SGD's reductions are exact (e.g. local SGD with sync_every=1 equals ddp)
            optimizer = torch.optim.SGD(self.param_groups(), lr=self.learning_rate, momentum=self.momentum,
                                        weight_decay=self.weight_decay, foreach=False)
        else:
            optimizer = torch.optim.AdamW(
                self.param_groups(),
                lr=self.learning_rate,
                weight_decay=self.weight_decay,
                betas=self.betas,
                foreach=False,
            )
        if self.warmup_steps <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


    def param_groups(self) -> Any:
        """All parameters in one group (subclasses split them, e.g. no weight decay on norms)."""
        return self.parameters()


class DecayGroupsLitGPTModule(LitGPTModule):
    """LitGPT-style two param groups: weight decay on matrices only, none on norms and embeddings."""

    def param_groups(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and "wte" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.ndim >= 2 and "wte" not in n)]
        return [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ManualLitGPTModule(LitGPTModule):
    """The same model trained with manual optimization (``manual_backward``, ``optimizers()``, ``opt.step()``).

    Strategies must give it the same training as automatic optimization; TawPipe drains its pipeline when the
    optimizer steps inside ``training_step``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self._loss(self(batch["input_ids"]), batch["labels"])
        self.manual_backward(loss)
        optimizer.step()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss.detach()
