"""The single-GPU part of the speed benchmark: CUDA parity, world-size-1 overhead, per-block times for the planner.

    python -m benchmarks.gpu_single --out benchmarks/results/gpu          # everything below, on one CUDA device

1. **Parity on CUDA/NCCL** — the demo job (``python -m lightning_tawpipe.demo --worker``) under ``tawpipe`` (nccl
   process group) and ``ddp`` on one GPU, fp32 with TF32 off: per-step losses and final weights are compared.
2. **World-size-1 overhead** — the same LitGPT LLaMA trained by plain Lightning (single device) and by TawPipe
   with one rank (which still binds every unit's weights from its flat shard just in time, runs the engine, keeps
   fp32 masters and its own gradient accumulator). Step time (median after warm-up, CUDA-synchronised), tokens/s
   and peak CUDA memory, alternating order, each run in its own process.
3. **Per-block times** — forward and forward+backward of one LitGPT ``Block`` (and of the head: final norm, LM head
   and cross-entropy) for several real LitGPT configs and sequence lengths, in bf16 and fp32: the compute side of
   the planner's cost model (``lightning_tawpipe.plan``).

Writes ``gpu_single.json`` and ``gpu_single.md`` (with the device name) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BLOCK_CONFIGS = {
    # name: (LitGPT config name, overrides) — the paper's H=1024 model and three real LLaMA-family blocks
    "paper-h1024": ("tiny-llama-1.1b", dict(n_embd=1024, n_head=16, n_query_groups=16, intermediate_size=4096)),
    "tiny-llama-1.1b": ("tiny-llama-1.1b", {}),
    "Llama-3.2-1B": ("Llama-3.2-1B", {}),
    "Llama-3.1-8B": ("Llama-3.1-8B", {}),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/gpu")
    p.add_argument("--parts", default="parity,overhead,blocks")
    p.add_argument("--job", default=None, help="internal: run one timed training job (plain | tawpipe)")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--n_head", type=int, default=16)
    p.add_argument("--n_query_groups", type=int, default=4)
    p.add_argument("--seq_length", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="overhead: alternating plain/tawpipe rounds")
    p.add_argument("--seq_lengths", default="1024,2048,4096,8192", help="blocks: sequence lengths")
    p.add_argument("--result", default=None, help="internal: JSON path of --job")
    return p


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# -- 1. parity ---------------------------------------------------------------------------------------------------
def parity(precision: str) -> dict:
    from lightning_tawpipe.demo import launch_worker

    args = ["--precision", precision, "--accelerator", "cuda", "--devices", "1", "--num_nodes", "1", "--group_size", "0", "--n_layer", "5",
            "--n_embd", "128", "--n_head", "4", "--n_query_groups", "2", "--seq_length", "128", "--batch_size", "8",
            "--n_microbatches", "2", "--steps", "10", "--val_batches", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        taw = launch_worker([*args, "--strategy", "tawpipe"], os.path.join(tmp, "taw"))
        ddp = launch_worker([*args, "--strategy", "ddp"], os.path.join(tmp, "ddp"))
    rel = [abs(x - y) / abs(y) for x, y in zip(taw["losses"], ddp["losses"])]
    weight_diff = max(float((taw["state_dict"][k].float().cpu() - v.float().cpu()).abs().max())
                      for k, v in ddp["state_dict"].items())
    backend = re.findall(r"distributed_backend=(\w+)", taw["log"])
    return {"tawpipe_losses": taw["losses"], "ddp_losses": ddp["losses"], "max_rel_loss_diff": max(rel),
            "max_abs_weight_diff": weight_diff, "validation": {"tawpipe": taw["validation"], "ddp": ddp["validation"]},
            "backend": backend[0] if backend else "not printed"}


# -- 2. world-size-1 overhead -----------------------------------------------------------------------------------
def run_job(a: argparse.Namespace) -> None:
    """One timed single-GPU training job (``--job plain|tawpipe``), in its own process."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    import lightning_tawpipe  # noqa: F401
    from lightning_tawpipe.data import EmbeddedTextDataModule
    from lightning_tawpipe.module import LitGPTModule, tiny_llama_config

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            torch.cuda.synchronize()
            if batch_idx == a.warmup:
                torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)
            self.losses.append(float(outputs["loss"]))

    torch.backends.cuda.matmul.allow_tf32 = False
    L.seed_everything(1234, verbose=False)
    cfg = tiny_llama_config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, n_query_groups=a.n_query_groups,
                            block_size=a.seq_length)
    module = LitGPTModule(cfg, learning_rate=3e-4)
    timer = Timer()
    trainer = L.Trainer(accelerator="cuda", devices=1, strategy="tawpipe" if a.job == "tawpipe" else "auto",
                        precision=a.precision, max_steps=a.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer],
                        use_distributed_sampler=False)  # same batches as plain: its losses must match too
    trainer.fit(module, EmbeddedTextDataModule(seq_length=a.seq_length, batch_size=a.batch_size))
    timed = timer.times[a.warmup:]
    median = statistics.median(timed)
    result = {"job": a.job, "precision": a.precision, "step_time_median_s": median,
              "tokens_per_s": a.batch_size * a.seq_length / median, "peak_cuda_memory_mb":
              torch.cuda.max_memory_allocated() / 2**20, "losses": timer.losses,
              "n_params": sum(p.numel() for p in cfg_params(cfg))}
    with open(a.result, "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cfg_params(cfg):
    from litgpt.model import GPT

    with torch.device("meta"):
        return list(GPT(cfg).parameters())


def overhead(a: argparse.Namespace, argv: list[str]) -> dict:
    runs: dict[str, list[dict]] = {"plain": [], "tawpipe": []}
    order = ["plain", "tawpipe"]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for job in (order if r % 2 == 0 else order[::-1]):
                path = os.path.join(tmp, f"{job}{r}.json")
                cmd = [sys.executable, "-m", "benchmarks.gpu_single", *argv, "--job", job, "--result", path]
                env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + r))
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{job} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                runs[job].append(json.load(open(path)))
    best = {job: min(rs, key=lambda r: r["step_time_median_s"]) for job, rs in runs.items()}
    return {"config": {k: getattr(a, k) for k in ("n_layer", "n_embd", "n_head", "n_query_groups", "seq_length",
                                                 "batch_size", "precision", "steps", "warmup")},
            "runs": runs, "best": best,
            "step_time_ratio_tawpipe_over_plain": best["tawpipe"]["step_time_median_s"]
            / best["plain"]["step_time_median_s"],
            "peak_memory_ratio_tawpipe_over_plain": best["tawpipe"]["peak_cuda_memory_mb"]
            / best["plain"]["peak_cuda_memory_mb"],
            "max_rel_loss_diff": max(abs(x - y) / abs(y) for x, y in zip(best["tawpipe"]["losses"],
                                                                          best["plain"]["losses"]))}


# -- 3. per-block times -----------------------------------------------------------------------------------------
def _time_cuda(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def block_times(seq_lengths: list[int]) -> list[dict]:
    """Forward and forward+backward seconds of one block and of the head, micro-batch 1."""
    from litgpt import Config
    from litgpt.model import Block, build_rope_cache

    rows = []
    for label, (name, overrides) in BLOCK_CONFIGS.items():
        cfg = Config.from_name(name, **overrides)
        for dtype in (torch.bfloat16, torch.float32):
            block = Block(cfg, block_idx=0).to("cuda", dtype)
            norm = cfg.norm_class(cfg.n_embd, eps=cfg.norm_eps).to("cuda", dtype)
            head = torch.nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False).to("cuda", dtype)
            for seq in seq_lengths:
                try:
                    cos, sin = build_rope_cache(seq, n_elem=cfg.rope_n_elem, device=torch.device("cuda"),
                                                base=cfg.rope_base, condense_ratio=cfg.rope_condense_ratio)
                    cos, sin = cos.to(dtype).unsqueeze(0), sin.to(dtype).unsqueeze(0)
                    x = torch.randn(1, seq, cfg.n_embd, device="cuda", dtype=dtype, requires_grad=True)
                    labels = torch.randint(cfg.padded_vocab_size, (1, seq), device="cuda")

                    def fwd():
                        with torch.no_grad():
                            block(x, cos, sin)

                    def fwd_bwd():
                        block(x, cos, sin).float().sum().backward()

                    def head_fwd_bwd():
                        logits = head(norm(x))
                        torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(),
                                                          labels.view(-1)).backward()

                    row = {"block": label, "config": name, "dtype": str(dtype).replace("torch.", ""), "seq": seq,
                           "n_embd": cfg.n_embd, "block_params": sum(p.numel() for p in block.parameters()),
                           "head_params": cfg.padded_vocab_size * cfg.n_embd,
                           "forward_s": _time_cuda(fwd), "forward_backward_s": _time_cuda(fwd_bwd),
                           "head_forward_backward_s": _time_cuda(head_fwd_bwd)}
                    flops = 6 * row["block_params"] * seq + 12 * seq * seq * cfg.n_embd / 2 * 2  # dense + causal attn
                    row["block_tflops"] = flops / row["forward_backward_s"] / 1e12
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                except torch.OutOfMemoryError:
                    rows.append({"block": label, "dtype": str(dtype), "seq": seq, "error": "out of memory"})
                finally:
                    x = None
                    torch.cuda.empty_cache()
            block = norm = head = None  # free before the next config (the closures above are done with them)
            torch.cuda.empty_cache()
    return rows


def write_report(out: str, result: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_single.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# Single-GPU results — {result['device']} (torch {result['torch']})", ""]
    for key in [k for k in result if k.startswith("parity")]:
        p = result[key]
        lines += [f"## Parity, tawpipe (nccl, 1 rank) vs ddp, {key.partition('_')[2] or '32-true'}, TF32 off", "",
                  f"max relative loss difference over {len(p['ddp_losses'])} steps: {p['max_rel_loss_diff']:.2e}; "
                  f"max |weight difference|: {p['max_abs_weight_diff']:.2e}", ""]
    for key in [k for k in result if k.startswith("overhead")]:
        o = result[key]
        c = o["config"]
        lines += [f"## World-size-1 overhead: {c['n_layer']} layers, n_embd {c['n_embd']}, S={c['seq_length']}, "
                  f"batch {c['batch_size']}, {c['precision']}", "",
                  "| run | step time (s) | tokens/s | peak CUDA memory (MB) |", "|---|---|---|---|"]
        for job, r in o["best"].items():
            lines.append(f"| {job} | {r['step_time_median_s']:.4f} | {r['tokens_per_s']:.0f} | "
                         f"{r['peak_cuda_memory_mb']:.0f} |")
        lines += ["", f"tawpipe / plain: step time {o['step_time_ratio_tawpipe_over_plain']:.3f}, peak memory "
                      f"{o['peak_memory_ratio_tawpipe_over_plain']:.3f}; losses agree to "
                      f"{o['max_rel_loss_diff']:.1e} relative", ""]
    if "blocks" in result:
        lines += ["## Per-block times (micro-batch 1)", "",
                  "| block | dtype | S | forward (ms) | fwd+bwd (ms) | head fwd+bwd (ms) | block TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["blocks"]:
            if "error" in r:
                lines.append(f"| {r['block']} | {r['dtype']} | {r['seq']} | {r['error']} | | | |")
                continue
            lines.append(f"| {r['block']} | {r['dtype']} | {r['seq']} | {r['forward_s'] * 1e3:.2f} | "
                         f"{r['forward_backward_s'] * 1e3:.2f} | {r['head_forward_backward_s'] * 1e3:.2f} | "
                         f"{r['block_tflops']:.0f} |")
    with open(os.path.join(out, "gpu_single.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    if a.job:
        run_job(a)
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_single needs a CUDA device (torch.cuda.is_available() is False).")
    parts = a.parts.split(",")
    result: dict = {"device": device_name(), "torch": torch.__version__, "command": "python -m benchmarks.gpu_single "
                    + " ".join(argv)}
    path = os.path.join(a.out, "gpu_single.json")
    if os.path.exists(path):  # add parts to an earlier run's results
        result = {**json.load(open(path)), **result}
    if "parity" in parts:
        result["parity" if a.precision == "32-true" else f"parity_{a.precision}"] = parity(a.precision)
        write_report(a.out, result)
    if "overhead" in parts:
        result["overhead" if a.precision == "32-true" else f"overhead_{a.precision}"] = overhead(a, _strip(argv))
        write_report(a.out, result)
    if "blocks" in parts:
        result["blocks"] = block_times([int(s) for s in a.seq_lengths.split(",")])
        write_report(a.out, result)


def _strip(argv: list[str]) -> list[str]:
    """Arguments for a --job child: the model/run flags, without --out/--parts."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in ("--out", "--parts"):
            skip = True
            continue
        if x.startswith(("--out=", "--parts=")):
            continue
        out.append(x)
    return out


if __name__ == "__main__":
    main()
