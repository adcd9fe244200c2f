"""Write and check LitGPT checkpoint directories (``lit_model.pth`` + ``model_config.yaml`` + tokenizer files).

A directory written by :func:`save_litgpt_checkpoint` is what ``litgpt generate``, ``litgpt chat``,
``litgpt finetune_*``, ``litgpt convert_from_litgpt`` and ``litgpt.api.LLM.load`` expect:

* ``lit_model.pth``: a plain ``dict[str, Tensor]`` keyed exactly like ``litgpt.GPT(config).state_dict()``, saved
  with ``torch.save`` so that ``torch.load(path, weights_only=True)`` works;
* ``model_config.yaml``: the config as ``litgpt.utils.save_config`` writes it (``yaml.dump(asdict(config))``);
* the tokenizer files (``tokenizer.json``/``tokenizer.model``, ``tokenizer_config.json``, ``generation_config.json``)
  copied from ``tokenizer_dir`` when one is given, plus ``prompt_style.yaml`` when a prompt style is given.

Inputs may come straight from a Lightning run: keys of a LightningModule that holds the GPT as ``self.model`` carry a
``model.`` prefix, which :func:`to_litgpt_state_dict` strips; LoRA models (``litgpt.lora``) are merged into plain
weights by :func:`merge_lora_state_dict`, as ``litgpt merge_lora`` does.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from litgpt import Config
from torch import Tensor

CHECKPOINT_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"
COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json", "config.json")
"""Files copied from ``tokenizer_dir`` when present (the ones ``litgpt.utils.copy_config_files`` copies)."""


def plain_config(config: Config) -> Config:
    """``config`` as a plain ``litgpt.Config`` (drops subclass fields such as ``litgpt.lora.Config``'s ``lora_*``)."""
    if type(config) is Config:
        return config
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in asdict(config).items() if k in names})


def _reference_keys(config: Config) -> list[str]:
    """The state-dict keys of ``litgpt.GPT(config)``, from a parameter-free build on the meta device."""
    from litgpt.model import GPT

    with torch.device("meta"):
        model = GPT(plain_config(config))
    return list(model.state_dict())


def to_litgpt_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "model.") -> dict[str, Tensor]:
    """Keep the entries under ``prefix`` (the LightningModule attribute holding the GPT) with the prefix removed.

    A state dict that has no key under ``prefix`` is assumed to be a bare GPT state dict and is returned as is
    (as a new dict). Tensors are detached and moved to the CPU.
    """
    if prefix and any(k.startswith(prefix) for k in state_dict):
        items = [(k[len(prefix) :], v) for k, v in state_dict.items() if k.startswith(prefix)]
    else:
        items = list(state_dict.items())
    return {k: v.detach().cpu() for k, v in items}


def merge_lora_state_dict(state_dict: Mapping[str, Tensor], config: Config) -> dict[str, Tensor]:
    """Merge a ``litgpt.lora.GPT`` state dict into plain ``litgpt.GPT`` weights (``W + B @ A * alpha / r``).

    Loads the weights into a CPU ``litgpt.lora.GPT(config)``, merges with ``litgpt.lora.merge_lora_weights`` and
    returns the non-LoRA entries with the ``linear.`` wrapper prefix dropped, exactly as ``litgpt merge_lora`` does.
    ``state_dict`` is not modified.
    """
    from litgpt.lora import GPT as LoRAGPT
    from litgpt.lora import Config as LoRAConfig
    from litgpt.lora import merge_lora_weights

    if not isinstance(config, LoRAConfig):
        raise TypeError(f"merge_lora_state_dict needs a litgpt.lora.Config, got {type(config).__name__}")
    with torch.device("meta"):
        model = LoRAGPT(config)
    # copies: merging adds to the base weights in place, and the caller's tensors must stay untouched
    model.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, strict=True, assign=True)
    model.eval()  # no dropout; merge_lora_weights only merges, but keep the module in inference mode
    merge_lora_weights(model)
    return {k.replace("linear.", ""): v.detach().cpu() for k, v in model.state_dict().items() if "lora_" not in k}


def _owned_tensor(t: Tensor) -> Tensor:
    """A CPU tensor that owns exactly its bytes (so a view into a large flat buffer does not save the buffer)."""
    t = t.detach().cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes or t.storage_offset() != 0:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def save_litgpt_checkpoint(
    state_dict: Mapping[str, Tensor],
    config: Config,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    prompt_style: Any = None,
) -> Path:
    """Write a LitGPT checkpoint directory and return its path.

    Arguments:
        state_dict: the model weights: a ``litgpt.GPT`` state dict, or a LightningModule's (``model.`` prefix), or a
            ``litgpt.lora.GPT`` one when ``config`` is a ``litgpt.lora.Config`` (merged into plain weights).
        config: the model's ``litgpt.Config`` (or ``litgpt.lora.Config``); written as a plain ``Config``.
        out_dir: the directory to write (created if needed; existing files of the same names are replaced).
        tokenizer_dir: a directory with tokenizer files to copy (a LitGPT checkpoint or
            :func:`lightning_tawpipe.tokenizer.save_tokenizer` output), or ``None`` to write no tokenizer.
        prompt_style: a ``litgpt.prompts.PromptStyle`` or style name to record in ``prompt_style.yaml`` (what
            ``litgpt generate``/``chat`` wrap prompts with), or ``None``.

    Raises ``ValueError`` if the keys do not match ``litgpt.GPT(config)`` exactly (missing or unexpected keys).
    """
    from litgpt.lora import Config as LoRAConfig
    from litgpt.utils import save_config

    weights = to_litgpt_state_dict(state_dict)
    if isinstance(config, LoRAConfig):
        weights = merge_lora_state_dict(weights, config)
    config = plain_config(config)
    expected = _reference_keys(config)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in set(expected)]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match litgpt.GPT({config.name!r}): missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = {k: _owned_tensor(weights[k]) for k in expected}
    tmp = out / f".{CHECKPOINT_FILE}.tmp"
    torch.save(ordered, tmp)
    tmp.replace(out / CHECKPOINT_FILE)
    save_config(config, out)
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        if src.resolve() != out.resolve():
            for name in COPIED_FILES:
                if (src / name).is_file():
                    shutil.copy(src / name, out / name)
    if prompt_style is not None:
        from litgpt.prompts import save_prompt_style

        save_prompt_style(prompt_style, out)
    return out


def load_litgpt_checkpoint(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint directory the way LitGPT does; returns ``(model, config, tokenizer_or_None)``.

    Builds ``litgpt.GPT`` from ``model_config.yaml``, loads ``lit_model.pth`` with ``weights_only=True`` and
    ``strict=True``, and loads ``litgpt.Tokenizer`` if tokenizer files are present. Raises on any mismatch, so it
    doubles as the check that an exported directory is usable.
    """
    from litgpt import Tokenizer
    from litgpt.model import GPT

    from lightning_tawpipe.tokenizer import has_tokenizer

    d = Path(checkpoint_dir)
    config = Config.from_file(d / CONFIG_FILE)
    state = torch.load(d / CHECKPOINT_FILE, map_location=device, weights_only=True)
    with torch.device(device):
        model = GPT(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = Tokenizer(d) if has_tokenizer(d) else None
    return model, config, tokenizer


def check_litgpt_checkpoint(checkpoint_dir: str | Path, require_tokenizer: bool = True) -> None:
    """Raise if ``checkpoint_dir`` is not a complete LitGPT checkpoint that loads into ``litgpt.GPT``.

    Uses LitGPT's own ``check_valid_checkpoint_dir`` for the file set, then :func:`load_litgpt_checkpoint`.
    """
    from litgpt.utils import check_valid_checkpoint_dir

    d = Path(checkpoint_dir)
    check_valid_checkpoint_dir(d, ignore_tokenizer_files=not require_tokenizer, raise_error=True, verbose=False)
    _, _, tokenizer = load_litgpt_checkpoint(d)
    if require_tokenizer and tokenizer is None:
        raise FileNotFoundError(f"{d} has no tokenizer files")
