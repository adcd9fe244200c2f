"""An offline BPE tokenizer that ``litgpt.Tokenizer`` loads, trained on text every Python install ships.

LitGPT checkpoints carry a Hugging Face ``tokenizer.json`` (or a SentencePiece ``tokenizer.model``) plus a
``tokenizer_config.json``; no installed package ships one, and the examples must run without downloads. So the
examples train a small byte-level BPE (the GPT-2 / Llama-3 family of tokenizers) with the installed ``tokenizers``
library on the Python reference documentation in ``pydoc_data.topics``: ~465k characters of English prose and
grammar, in about 0.2 s. Byte-level means every string round-trips (unknown characters fall back to bytes).

Training is deterministic (same corpus, same settings -> byte-identical ``tokenizer.json``), which the examples rely
on: every rank of a job builds or reads the same files, and a fine-tuning run reproduces the pretraining tokenizer.

    from lightning_tawpipe.tokenizer import save_tokenizer
    save_tokenizer("out/tok")                      # tokenizer.json, tokenizer_config.json, generation_config.json
    from litgpt import Tokenizer
    tok = Tokenizer("out/tok"); tok.decode(tok.encode("The with statement"))
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

BOS_TOKEN = "<s>"
"""Beginning-of-sequence token (id 0): LitGPT's SFT pipeline prepends it when ``add_bos_token`` is set."""
EOS_TOKEN = "</s>"
"""End-of-sequence token (id 1): ends every document and every fine-tuning response; generation stops on it."""
DEFAULT_VOCAB_SIZE = 1024
"""Small on purpose: the example models are tiny, and the embedding and head grow with the vocabulary."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
"""Files :func:`save_tokenizer` writes (and that make a LitGPT checkpoint directory's tokenizer)."""


def corpus_documents() -> list[str]:
    """The embedded corpus as separate documents: one per ``pydoc_data`` topic, in sorted-key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


@lru_cache(maxsize=4)
def _trained_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus_documents(), trainer=trainer)
    return tok.to_str()


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on :func:`corpus_documents` (deterministic).

    ``vocab_size`` counts the two special tokens and the 256 byte symbols, so it must be at least 258.
    """
    from tokenizers import Tokenizer

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 byte symbols + <s> + </s>), got {vocab_size}")
    return Tokenizer.from_str(_trained_json(vocab_size))


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so ranks writing the same file concurrently never see half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tokenizer(out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, model_max_length: int = 2048) -> Path:
    """Train (or reuse the cached) tokenizer and write the files ``litgpt.Tokenizer(out_dir)`` loads.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (bos/eos tokens, ``add_bos_token``; the class name is the
    generic ``PreTrainedTokenizerFast`` so LitGPT applies no Llama-2 decoding fix) and ``generation_config.json``
    (bos/eos ids). Safe to call from every rank at once: each file is written atomically with identical content.
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    generation = {"bos_token_id": tok.token_to_id(BOS_TOKEN), "eos_token_id": tok.token_to_id(EOS_TOKEN)}
    _atomic_write(out / "tokenizer.json", tok.to_str())
    _atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    _atomic_write(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return out


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer LitGPT can load (``tokenizer.json`` or ``.model`` + the config)."""
    d = Path(directory)
    return ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()) and (
        d / "tokenizer_config.json"
    ).is_file()
