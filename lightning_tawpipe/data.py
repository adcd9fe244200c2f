"""Embedded default training data: Python's own documentation prose, byte-tokenized.

Why this exists: tests, examples and benchmarks need *real* text (so the loss curve
means something) without network access or a tokenizer download. Every CPython
install ships ``pydoc_data.topics.topics`` (~465k characters of English prose), and
a byte-level tokenizer (vocab 256) needs no files at all. Everything here is fully
deterministic so that two different distributed strategies fed by this module see
bit-identical batches and their losses can be compared step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

BYTE_VOCAB_SIZE = 256
"""Size of the byte-level vocabulary: one token per possible UTF-8 byte value."""


@lru_cache(maxsize=1)
def embedded_corpus() -> str:
    """Return the Python documentation topics joined in sorted-key order.

    Sorting the keys makes the corpus independent of dict insertion order, so the
    token stream is identical across processes and interpreter runs.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def encode_bytes(text: str) -> Tensor:
    """Encode ``text`` as a 1-D ``LongTensor`` of its UTF-8 bytes (values 0..255)."""
    raw = bytearray(text.encode("utf-8"))
    if not raw:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(raw, dtype=torch.uint8).long()


def decode_bytes(ids: Tensor | list[int]) -> str:
    """Decode byte token ids back into text.

    Invalid UTF-8 sequences (which a model can sample, or a window boundary can cut
    through a multi-byte character) are replaced instead of raising, because decoding
    is used for inspection, not for round-trip guarantees.
    """
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return bytes(values).decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def _corpus_tokens() -> Tensor:
    """Tokenized corpus, cached because every rank and every datamodule reuses it."""
    return encode_bytes(embedded_corpus())


class ByteWindowDataset(Dataset):
    """Non-overlapping windows of ``seq_length + 1`` tokens over a token stream.

    Each item is ``{"input_ids": w[:-1], "labels": w[1:]}``: the extra token lets the
    labels be the inputs shifted by one without crossing into the next window, so no
    two items share a single token. A trailing remainder shorter than a full window is
    dropped rather than padded, keeping every batch a dense, mask-free block.
    """

    def __init__(self, tokens: Tensor, seq_length: int) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.tokens = tokens
        self.seq_length = seq_length
        self.window = seq_length + 1

    def __len__(self) -> int:
        return self.tokens.numel() // self.window

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        start = index * self.window
        window = self.tokens[start : start + self.window]
        return {"input_ids": window[:-1].clone(), "labels": window[1:].clone()}


@dataclass
class EmbeddedTextDataModule(DataModule):
    """LitGPT-compatible data module over the embedded, byte-tokenized corpus.

    The last ``val_fraction`` of the byte stream is validation, the rest is training;
    the split is by position, so it is the same everywhere and the two sets share no
    token. Both loaders are built with ``shuffle=False`` and drop the last partial batch. Under a distributed
    strategy Lightning replaces the training sampler with a ``DistributedSampler`` that shuffles with the global
    seed (the same for every strategy), so strategies seeded alike still see identical, equally shaped batches.
    """

    seq_length: int = 128
    """Tokens per model input; each stored window holds one more token for the labels."""
    batch_size: int = 4
    """Samples per batch, per process."""
    val_fraction: float = 0.05
    """Fraction of the byte stream (taken from its end) reserved for validation."""
    num_workers: int = 0
    """DataLoader workers; 0 by default since the data is already in memory."""
    train_samples: int | None = None
    """Optional cap on the number of training windows (the first ones are kept)."""

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    """Kept only for LitGPT API compatibility; tokens are always raw UTF-8 bytes."""

    def __post_init__(self) -> None:
        # The dataclass-generated __init__ does not chain to the base class, so the
        # LightningDataModule state has to be initialised here (as litgpt's own
        # dataclass data modules do).
        super().__init__()
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.train_samples is not None and self.train_samples < 0:
            raise ValueError(f"train_samples must be >= 0 or None, got {self.train_samples}")
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    @property
    def vocab_size(self) -> int:
        """Vocabulary size a model needs to consume these tokens."""
        return BYTE_VOCAB_SIZE

    def connect(
        self,
        tokenizer: Tokenizer | None = None,
        batch_size: int = 1,
        max_seq_length: int | None = -1,
        **kwargs: object,
    ) -> None:
        """Accept the settings LitGPT's training scripts pass after construction.

        ``max_seq_length`` replaces ``seq_length`` only when positive, since LitGPT
        uses ``-1``/``None`` to mean "no preference". Datasets built earlier are
        discarded so the next loader reflects the new window length.
        """
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if max_seq_length is not None and max_seq_length > 0:
            self.seq_length = max_seq_length
        self.train_dataset = None
        self.val_dataset = None

    def setup(self, stage: str = "") -> None:
        """Build the train/val window datasets (cheap: slicing an in-memory tensor)."""
        tokens = _corpus_tokens()
        n_val = int(tokens.numel() * self.val_fraction)
        split = tokens.numel() - n_val
        train: Dataset = ByteWindowDataset(tokens[:split], self.seq_length)
        if self.train_samples is not None:
            train = torch.utils.data.Subset(train, range(min(self.train_samples, len(train))))
        self.train_dataset = train
        self.val_dataset = ByteWindowDataset(tokens[split:], self.seq_length)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup()
        return self._make_loader(self.train_dataset, resumable=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup()
        return self._make_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """The held-out windows (the same split as validation: the corpus has no third part)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _make_loader(self, dataset: Dataset, resumable: bool = False) -> DataLoader:
        """In-order loader: no shuffling and no ragged last batch, for reproducibility."""
        kwargs = dict(batch_size=self.batch_size, shuffle=False, drop_last=True, num_workers=self.num_workers)
        if resumable:
            return ResumableDataLoader(dataset, progress=self.batches_done_in_epoch, **kwargs)
        return DataLoader(dataset, **kwargs)

    def batches_done_in_epoch(self) -> int:
        """Training batches of the current epoch already consumed by optimizer steps (0 without a Trainer)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not math.isfinite(trainer.num_training_batches) or trainer.num_training_batches < 1:
            return 0
        return (trainer.global_step * trainer.accumulate_grad_batches) % int(trainer.num_training_batches)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can checkpoint mid-epoch, so a resumed run sees exactly the batches an
    uninterrupted one would have seen.

    It implements Lightning's stateful-loader protocol (``state_dict``/``load_state_dict``, saved with the fit
    loop). The position comes from ``progress()`` - the Trainer's own count of batches consumed by optimizer steps -
    rather than from the iterator, because Lightning's data fetcher reads one batch ahead of training. On resume the
    first epoch's iterator skips that many batches of the same (seeded, per-epoch) sampler order. Checkpoints taken
    at optimizer-step boundaries (``ModelCheckpoint``, ``trainer.save_checkpoint`` after fit) resume exactly.
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_done_in_epoch": int(self.progress()) if self.progress is not None else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_done_in_epoch", 0))

    def __iter__(self):
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(iterator)
        return iterator
