"""Turn a TawPipe checkpoint into one file, or into a LitGPT checkpoint directory.

    python -m lightning_tawpipe.consolidate CKPT OUT.ckpt               # an ordinary Lightning checkpoint file
    python -m lightning_tawpipe.consolidate CKPT OUT_DIR --litgpt       # lit_model.pth + model_config.yaml (+ tokenizer)

``CKPT`` is a sharded checkpoint directory (or a full checkpoint file). The Lightning file has the weights by name
and the optimizer state in ``torch.optim``'s index layout, so ``Trainer(strategy="ddp").fit(..., ckpt_path=OUT)`` and
any other strategy resume from it. ``--litgpt`` writes what ``litgpt generate``/``litgpt finetune`` read; the model
config comes from the checkpoint (TawPipe records the LitGPT config of the model it trained), LoRA weights are
merged, and ``--tokenizer_dir`` copies tokenizer files when the model has a tokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_tawpipe.checkpoint_io import CheckpointError, TawPipeCheckpointIO, atomic_torch_save


def litgpt_config(checkpoint: dict):
    """The ``litgpt.Config`` (or LoRA config) recorded in a TawPipe checkpoint."""
    recorded = checkpoint.get("tawpipe", {})
    fields = recorded.get("litgpt_config")
    if not fields:
        raise CheckpointError(
            "This checkpoint records no LitGPT config (it was not written by TawPipe from a LitGPT model), so it "
            "cannot be exported with --litgpt. Export the state dict yourself with "
            "lightning_tawpipe.export.save_litgpt_checkpoint(state_dict, config, out_dir)."
        )
    if recorded.get("litgpt_lora"):
        from litgpt.lora import Config
    else:
        from litgpt import Config
    return Config(**fields)


def consolidate(checkpoint_path: str | Path, out: str | Path, litgpt: bool = False,
                tokenizer_dir: str | Path | None = None) -> Path:
    checkpoint = TawPipeCheckpointIO().load_checkpoint(checkpoint_path)
    out = Path(out)
    if litgpt:
        from lightning_tawpipe.export import save_litgpt_checkpoint

        return save_litgpt_checkpoint(checkpoint["state_dict"], litgpt_config(checkpoint), out,
                                      tokenizer_dir=tokenizer_dir)
    atomic_torch_save(checkpoint, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_tawpipe.consolidate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a sharded checkpoint directory (or a full checkpoint file)")
    p.add_argument("out", help="output file (default mode) or directory (--litgpt)")
    p.add_argument("--litgpt", action="store_true", help="write a LitGPT checkpoint directory")
    p.add_argument("--tokenizer_dir", default=None, help="with --litgpt: copy tokenizer files from here")
    a = p.parse_args(argv)
    try:
        out = consolidate(a.checkpoint, a.out, litgpt=a.litgpt, tokenizer_dir=a.tokenizer_dir)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
