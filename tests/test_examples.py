"""End-to-end tests of ``examples/pretrain.py`` and ``examples/finetune.py``: 2 ranks on CPU (gloo), default data.

One pretraining run is shared by the module (fixture). Each multi-process run uses a different launcher, so the
launch paths the examples README documents are all exercised:

* pretrain (tawpipe):            Lightning's own launcher, ``--devices 2`` (several processes on one machine)
* full fine-tune (tawpipe):      two emulated nodes x 2 processes, one launcher per node (``NODE_RANK``,
                                 ``--num_nodes 2``)
* LoRA fine-tune (tawpipe):      two processes with the variables ``srun`` sets (Lightning's SLURM detection)
* pretrain (fsdp, 4 steps):      ``torchrun --nproc_per_node 2``; its losses must equal the tawpipe run's

Every run must lower the loss on the embedded data and leave a LitGPT checkpoint that ``litgpt generate`` (called
in-process through its ``main``) loads and generates from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

PRETRAIN_STEPS = 30
FAST = ["--progress_bar", "false", "--log_interval", "5", "--sample_tokens", "5"]
PORT_RACE = ("Address already in use", "EADDRINUSE")


def _free_port() -> str:
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    return str(find_free_network_port())


def _launch(commands: list[list[str]], envs: list[dict[str, str]], timeout: float = 300) -> str:
    """Start the processes of one job together, wait for all; raise with their logs if any fails.

    Each process writes to a file of its own, not a pipe: reading one process's pipe to its end while another fills
    its own pipe would leave that one blocked on a write, and with it the job's collectives, until the timeout. When
    one process fails, the others are stopped at once instead of waiting for it in a collective."""
    with tempfile.TemporaryDirectory() as tmp:
        files = [open(Path(tmp) / f"rank{i}.log", "w+") for i in range(len(commands))]
        procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                 for cmd, env, f in zip(commands, envs, files)]
        deadline = time.monotonic() + timeout
        try:  # until all are done, one failed (its peers would wait for it), or the time is up
            while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(commands[0], timeout)
                time.sleep(0.2)
        finally:
            for proc in procs:  # a rank left behind (timeout, or its peer died) takes its children with it
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        logs = []
        for f in files:
            f.seek(0)
            logs.append(f.read())
            f.close()
    if any(p.returncode for p in procs):
        raise RuntimeError("job failed:\n" + "\n---\n".join(log[-5000:] for log in logs))
    return "\n".join(logs)


def _job(make: callable) -> str:
    """Run ``make(port)`` -> (commands, envs) once, and once more only if the picked port was taken meanwhile."""
    try:
        return _launch(*make(_free_port()))
    except RuntimeError as e:
        if not any(sig in str(e) for sig in PORT_RACE):
            raise
        return _launch(*make(_free_port()))


def _base_env(port: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "NODE_RANK",
                                                                      "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK"))}
    return dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONUNBUFFERED="1")


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _assert_learned(metrics: dict, margin: float) -> None:
    losses = metrics["train_loss"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - margin, f"loss did not go down enough: first {losses[:3]} last {losses[-3:]}"
    val = metrics["validation"]
    assert val and all(v["val_ppl"] > 1 and abs(v["val_ppl"] - torch.tensor(v["val_loss"]).exp().item()) /
                       v["val_ppl"] < 0.2 for v in val), val  # perplexity ~ exp(mean loss) (batch-weighted)
    assert metrics["tokens_per_sec"] and metrics["tokens_per_sec"] > 0
    assert metrics["mfu"] is not None and 0 < metrics["mfu"]


def _assert_outputs(out: Path) -> None:
    from lightning_tawpipe.export import check_litgpt_checkpoint

    final = out / "final"
    for name in ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (final / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "logs").rglob("metrics.csv")), "CSV logger wrote nothing"
    check_litgpt_checkpoint(final)


def _litgpt_generate(final: Path, prompt: str, capsys) -> str:
    """What ``litgpt generate FINAL --prompt PROMPT --max_new_tokens 6`` prints (run in-process)."""
    from litgpt.generate.base import main as litgpt_generate
    from litgpt.tokenizer import Tokenizer

    capsys.readouterr()
    litgpt_generate(final, prompt, max_new_tokens=6, top_k=1, precision="32-true")
    text = capsys.readouterr().out
    assert prompt in text
    tokenizer = Tokenizer(final)
    generated = text[text.index(prompt) + len(prompt):]
    assert tokenizer.encode(generated, bos=False).numel() >= 1 or generated.strip(), text
    return text


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, str]:
    """``examples/pretrain.py`` under tawpipe, 2 processes started by Lightning's launcher."""
    out = tmp_path_factory.mktemp("pretrain")
    cmd = [sys.executable, str(EXAMPLES / "pretrain.py"), "--out_dir", str(out), "--max_steps", str(PRETRAIN_STEPS),
           "--eval_interval", "15", "--eval_iters", "2", *FAST]
    log = _job(lambda port: ([cmd], [_base_env(port)]))
    return out, log


# ---- cheap in-process checks of the building blocks ---------------------------------------------------------


def test_tokenizer_is_deterministic_and_litgpt_loads_it(tmp_path):
    from litgpt.tokenizer import Tokenizer

    from lightning_tawpipe.tokenizer import _trained_json, save_tokenizer

    first = _trained_json(512)
    _trained_json.cache_clear()
    assert _trained_json(512) == first
    tok = Tokenizer(save_tokenizer(tmp_path, vocab_size=512))
    ids = tok.encode('The "with" statement: café ∑')
    assert ids[0].item() == tok.bos_id == 0 and tok.eos_id == 1 and tok.vocab_size == 512
    assert tok.decode(ids) == 'The "with" statement: café ∑'


def test_instruction_set_from_python_docs(tmp_path):
    from common import instruction_examples, write_instruction_set

    examples = instruction_examples()
    assert len(examples) >= 150
    assert examples == instruction_examples()
    assert all(e["instruction"].startswith("What does the Python reference say about ") and len(e["output"]) >= 40
               for e in examples)
    assert any('"with" statement' in e["instruction"] for e in examples)
    d = write_instruction_set(tmp_path)
    train, val = (json.loads((d / f"{s}.json").read_text()) for s in ("train", "val"))
    assert len(train) + len(val) == len(examples) and len(val) >= 15


def test_export_plain_and_lora_round_trip(tmp_path):
    from dataclasses import asdict

    from litgpt.lora import GPT as LoRAGPT
    from litgpt.lora import Config as LoRAConfig
    from litgpt.model import GPT

    from lightning_tawpipe.export import load_litgpt_checkpoint, save_litgpt_checkpoint
    from lightning_tawpipe.module import tiny_llama_config
    from lightning_tawpipe.tokenizer import save_tokenizer

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=512, n_layer=2)
    tok_dir = save_tokenizer(tmp_path / "tok", vocab_size=512)
    model = GPT(config)
    x = torch.randint(0, 512, (1, 12))
    # a LightningModule state dict (``model.`` prefix) is accepted
    save_litgpt_checkpoint({f"model.{k}": v for k, v in model.state_dict().items()}, config, tmp_path / "plain",
                           tokenizer_dir=tok_dir, prompt_style="alpaca")
    loaded, _, tokenizer = load_litgpt_checkpoint(tmp_path / "plain")
    assert torch.equal(loaded(x), model(x)) and tokenizer is not None
    assert set(torch.load(tmp_path / "plain" / "lit_model.pth", weights_only=True)) == set(model.state_dict())
    with pytest.raises(ValueError, match="missing"):
        save_litgpt_checkpoint({"lm_head.weight": torch.zeros(1)}, config, tmp_path / "bad")
    # LoRA: merged into plain weights, written with a plain config
    lora_config = LoRAConfig(**asdict(config), lora_r=4, lora_alpha=8, lora_query=True, lora_value=True, lora_mlp=True)
    lora = LoRAGPT(lora_config)
    lora.load_state_dict(model.state_dict(), strict=False)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    lora.eval()
    save_litgpt_checkpoint(lora.state_dict(), lora_config, tmp_path / "lora")
    merged, merged_config, _ = load_litgpt_checkpoint(tmp_path / "lora")
    assert type(merged_config).__name__ == "Config" and not hasattr(merged_config, "lora_r")
    torch.testing.assert_close(merged(x), lora(x), atol=1e-4, rtol=1e-4)


# ---- the examples, end to end ----------------------------------------------------------------------------------


def test_pretrain(pretrained, capsys):
    out, log = pretrained
    assert "TawPipe layout" in log and "validation at step 15" in log and "tok/s" in log and "MFU" in log
    metrics = _metrics(out)
    assert metrics["strategy"] == "tawpipe" and metrics["world_size"] == 2
    assert metrics["steps"] == list(range(1, PRETRAIN_STEPS + 1))
    _assert_learned(metrics, margin=0.8)
    _assert_outputs(out)
    _litgpt_generate(out / "final", 'The "with" statement', capsys)


def test_finetune_full_on_emulated_nodes(pretrained, tmp_path, capsys):
    """Full fine-tuning from the pretrain output; 2 emulated nodes x 2 processes, one Lightning launcher per node."""
    base, _ = pretrained
    out = tmp_path / "ft"
    cmd = [sys.executable, str(EXAMPLES / "finetune.py"), "--checkpoint_dir", str(base / "final"), "--out_dir",
           str(out), "--devices", "2", "--num_nodes", "2", "--max_steps", "16", "--eval_interval", "8",
           "--eval_iters", "2", *FAST]
    log = _job(lambda port: ([cmd, cmd], [dict(_base_env(port), NODE_RANK=str(n)) for n in (0, 1)]))
    assert "2 node(s) x 2 rank(s)" in log
    metrics = _metrics(out)
    assert metrics["finetune"] == "full" and metrics["world_size"] == 4
    _assert_learned(metrics, margin=0.3)
    _assert_outputs(out)
    assert (out / "final" / "prompt_style.yaml").is_file() and (out / "data" / "train.json").is_file()
    before = torch.load(base / "final" / "lit_model.pth", weights_only=True)
    after = torch.load(out / "final" / "lit_model.pth", weights_only=True)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every weight was trained
    text = _litgpt_generate(out / "final", 'What does the Python reference say about the "with" statement?', capsys)
    assert "### Response:" in text  # litgpt applied the saved Alpaca prompt style


def test_finetune_lora_under_slurm(pretrained, tmp_path, capsys):
    """LoRA fine-tuning; the two processes get the environment ``srun --ntasks-per-node=2`` would give them. Two
    micro-batches in chunk-major order: the frozen embedding's chunk is cut from the next and its backward still
    runs (it has no gradient to send)."""
    base, _ = pretrained
    out = tmp_path / "lora"
    cmd = [sys.executable, str(EXAMPLES / "finetune.py"), "--lora", "--checkpoint_dir", str(base / "final"),
           "--out_dir", str(out), "--devices", "2", "--max_steps", "20", "--eval_interval", "10", "--eval_iters",
           "2", "--n_microbatches", "2", "--microbatch_order", "chunk", *FAST]

    def make(port):
        slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_NODEID="0",
                     SLURM_JOB_ID="4242", SLURM_JOB_NAME="tawpipe-examples", SLURM_NODELIST="localhost")
        return [cmd, cmd], [dict(_base_env(port), **slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)) for r in (0, 1)]

    log = _job(make)
    assert "TawPipe layout" in log and "MEMBER: 2/2" in log and "chunk-major micro-batches" in log
    metrics = _metrics(out)
    assert metrics["finetune"] == "LoRA"
    _assert_learned(metrics, margin=0.3)
    _assert_outputs(out)
    before = torch.load(base / "final" / "lit_model.pth", weights_only=True)
    after = torch.load(out / "final" / "lit_model.pth", weights_only=True)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"transformer.h.{i}.attn.qkv.weight" for i in range(4)}  # LoRA on query and value only
    adapters = torch.load(out / "final" / "lit_model.pth.lora", weights_only=True)
    assert adapters and all("lora_" in k for k in adapters)
    _litgpt_generate(out / "final", "What does the Python reference say about the \"for\" statement?", capsys)


def test_pretrain_fsdp_under_torchrun_matches_tawpipe(pretrained, tmp_path):
    """``torchrun --nproc_per_node 2`` with ``--strategy fsdp``: same seed, data and batches as the tawpipe run, so
    the first steps' losses agree."""
    base, _ = pretrained
    out = tmp_path / "fsdp"
    steps = 4

    def make(port):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port, str(EXAMPLES / "pretrain.py"), "--strategy", "fsdp", "--out_dir", str(out),
               "--max_steps", str(steps), "--eval_interval", "15", "--eval_iters", "2", *FAST]
        return [cmd], [_base_env(port)]

    _job(make)
    fsdp = _metrics(out)
    assert fsdp["strategy"] == "fsdp" and fsdp["world_size"] == 2
    torch.testing.assert_close(fsdp["train_loss"], _metrics(base)["train_loss"][:steps], rtol=1e-4, atol=1e-5)
    _assert_outputs(out)
