"""Fast single-process tests for the embedded data module and the LitGPT LightningModule."""

from __future__ import annotations

import lightning
import pytest
import torch
from litgpt.model import GPT

from lightning_tawpipe.data import (
    BYTE_VOCAB_SIZE,
    EmbeddedTextDataModule,
    decode_bytes,
    embedded_corpus,
    encode_bytes,
)
from lightning_tawpipe.module import LitGPTModule, tiny_llama_config

torch.set_num_threads(1)


def test_corpus_is_deterministic_and_large() -> None:
    from pydoc_data.topics import topics

    corpus = embedded_corpus()
    expected = "\n\n".join(topics[key] for key in sorted(topics))
    assert corpus == expected
    tokens = encode_bytes(corpus)
    assert tokens.dtype == torch.long
    assert tokens.numel() > 400_000
    assert int(tokens.min()) >= 0 and int(tokens.max()) < BYTE_VOCAB_SIZE
    assert torch.equal(tokens, encode_bytes(embedded_corpus()))


def test_byte_round_trip() -> None:
    text = "Pipelines — ünïcode too.\n"
    ids = encode_bytes(text)
    assert ids.numel() == len(text.encode("utf-8"))
    assert decode_bytes(ids) == text
    assert decode_bytes(ids.tolist()) == text
    assert encode_bytes("").numel() == 0


def test_windows_have_shifted_labels_and_right_shapes() -> None:
    dm = EmbeddedTextDataModule(seq_length=16, batch_size=3)
    dm.setup("fit")
    item = dm.train_dataset[5]
    assert item["input_ids"].shape == (16,) and item["labels"].shape == (16,)
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    # Windows are consecutive and non-overlapping: item 5 starts at 5 * (16 + 1).
    stream = encode_bytes(embedded_corpus())
    assert torch.equal(item["input_ids"], stream[5 * 17 : 5 * 17 + 16])

    batches = list(dm.train_dataloader())
    assert all(b["input_ids"].shape == (3, 16) for b in batches)
    assert all(b["labels"].dtype == torch.long for b in batches)
    assert len(batches) == len(dm.train_dataset) // 3
    # Same data, same order, every time: required to compare strategies.
    first_again = next(iter(dm.train_dataloader()))
    assert torch.equal(batches[0]["input_ids"], first_again["input_ids"])


def test_train_and_val_are_disjoint_by_position() -> None:
    val_fraction = 0.05
    dm = EmbeddedTextDataModule(seq_length=32, val_fraction=val_fraction)
    dm.setup("fit")
    n_tokens = encode_bytes(embedded_corpus()).numel()
    split = n_tokens - int(n_tokens * val_fraction)
    train_end = len(dm.train_dataset) * 33
    assert train_end <= split
    assert len(dm.val_dataset) == int(n_tokens * val_fraction) // 33 > 0
    stream = encode_bytes(embedded_corpus())
    assert torch.equal(dm.val_dataset[0]["input_ids"], stream[split : split + 32])


def test_connect_and_train_samples_cap() -> None:
    dm = EmbeddedTextDataModule(seq_length=128, batch_size=4, train_samples=10)
    dm.connect(batch_size=2, max_seq_length=24)
    assert dm.batch_size == 2 and dm.seq_length == 24
    dm.connect(batch_size=5, max_seq_length=-1)
    assert dm.batch_size == 5 and dm.seq_length == 24
    loader = dm.train_dataloader()
    assert len(dm.train_dataset) == 10
    assert len(loader) == 2
    assert next(iter(loader))["input_ids"].shape == (5, 24)
    with pytest.raises(ValueError):
        EmbeddedTextDataModule(val_fraction=1.0)


def test_tiny_config_is_llama_family_and_runs() -> None:
    config = tiny_llama_config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2)
    assert config.norm_class_name == "RMSNorm"
    assert config.mlp_class_name == "LLaMAMLP"
    assert config.padded_vocab_size == config.vocab_size == 256
    assert config.intermediate_size == 128
    model = GPT(config)
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256)


class _LossRecorder(lightning.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_training_reduces_loss_and_logs_validation_metrics() -> None:
    lightning.seed_everything(1234, verbose=False)
    config = tiny_llama_config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, block_size=64)
    module = LitGPTModule(config, learning_rate=3e-3, warmup_steps=3)
    # 30 steps * batch 4 = 120 windows: exactly one epoch, so validation runs at its end.
    dm = EmbeddedTextDataModule(seq_length=64, batch_size=4, train_samples=120)
    recorder = _LossRecorder()
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=10,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=dm)

    assert len(recorder.losses) == 30
    start = sum(recorder.losses[:3]) / 3
    end = sum(recorder.losses[-3:]) / 3
    assert end < start, recorder.losses
    assert recorder.losses[-1] < recorder.losses[0]

    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_ppl"} <= metrics.keys()
    # Perplexity is exp of the token-mean cross entropy; with equal-size batches the
    # mean of per-batch losses equals the token mean, so the two must agree.
    assert torch.isclose(metrics["val_ppl"], metrics["val_loss"].exp(), rtol=1e-4)


def test_prebuilt_model_is_kept_and_configure_model_is_idempotent() -> None:
    config = tiny_llama_config(n_layer=1, n_embd=32)
    model = GPT(config)
    module = LitGPTModule(config, model=model)
    module.configure_model()
    assert module.model is model

    lazy = LitGPTModule(config)
    assert lazy.model is None
    lazy.configure_model()
    built = lazy.model
    lazy.configure_model()
    assert lazy.model is built
