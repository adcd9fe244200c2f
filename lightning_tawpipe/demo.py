"""The main job: train a small LitGPT LLaMA on the embedded text under ``tawpipe`` and ``ddp``, side by side.

    python -m lightning_tawpipe.demo                 # 2 emulated nodes x 2 ranks, prints both loss curves
    python -m lightning_tawpipe.demo --help

Each strategy runs in its own multi-process Lightning job (``--worker`` mode, also used by the tests); this
process only launches them one after the other and prints per-step losses, their relative difference and the
communication TawPipe measured. Same seed, same global batch: the two columns must agree (fp32: to ~1e-6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch

from lightning_tawpipe.partition import parse_partition


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_tawpipe.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="tawpipe", help="worker mode: tawpipe | ddp | any Lightning strategy name")
    p.add_argument("--schedule", default="tawpipe", choices=["tawpipe", "weipipe"])
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--devices", type=int, default=4, help="processes per node")
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--group_size", type=int, default=2, help="ranks per TawPipe group (emulated node); 0 = per node")
    p.add_argument("--n_microbatches", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--reuse", type=int, default=0, help="chunks kept resident across a turn (0: the default, prefetch)")
    p.add_argument("--grad_buffers", type=int, default=0, help="tawpipe: gradient buffers (>= 2; 0: by node count)")
    p.add_argument("--p2p_groups", default=None, choices=["rail", "directed"])
    p.add_argument("--replicate_first_chunk", type=int, nargs="?", const=1, default=0,
                   help="tawpipe: mirror chunk 0 (or the first N chunks) on every node")
    p.add_argument("--stripe", action="store_true",
                   help="tawpipe: move remote weights and gradient sums in stripes over every rail")
    p.add_argument("--microbatch_order", default="sample", choices=["sample", "chunk"],
                   help="tawpipe: micro-batch order (chunk: every micro-batch through a chunk while it is resident)")
    p.add_argument("--partition", default="parameters", type=parse_partition,
                   help="'parameters', 'uniform', or units per chunk, e.g. 2,1,2,3")
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute each unit in backward")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_query_groups", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=4, help="per rank")
    p.add_argument("--seq_length", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--clip_val", type=float, default=None, help="gradient_clip_val")
    p.add_argument("--manual", action="store_true", help="train with manual optimization")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--param_groups", action="store_true", help="two AdamW groups (decay 0.1 / none) + warmup schedule")
    p.add_argument("--clip_algorithm", default="norm", choices=["norm", "value"])
    p.add_argument("--precision", default="32-true", help="Trainer precision (32-true, bf16-mixed, 16-mixed, bf16-true)")
    p.add_argument("--meta_init", action="store_true", help="tawpipe: build on the meta device, init by the chunk")
    p.add_argument("--init_weights", default=None,
                   help="start from this LitGPT lit_model.pth (tawpipe: each owner reads only its chunk)")
    p.add_argument("--seeded_init", action="store_true",
                   help="initialize an ordinary model as meta_init does (name-seeded reset_parameters)")
    p.add_argument("--init_scale", type=float, default=2.0**16, help="16-mixed: the gradient scaler's initial scale")
    p.add_argument("--lora", action="store_true", help="a LitGPT LoRA model: only the LoRA matrices train")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--val_batches", type=int, default=0, help="validation batches after training (0: none)")
    p.add_argument("--save_ckpt", default=None, help="worker: save a checkpoint here after fit")
    p.add_argument("--resume", default=None, help="worker: resume fit from this checkpoint")
    p.add_argument("--state_dict_type", default="sharded", choices=["sharded", "full"], help="tawpipe checkpoints")
    p.add_argument("--eval_loops", action="store_true",
                   help="worker: sanity-check validation before fit, then trainer.test and trainer.predict after it")
    p.add_argument("--save_top_k", type=int, default=-1, help="worker: ModelCheckpoint save_top_k (by train_loss)")
    p.add_argument("--async_save", action="store_true", help="tawpipe: write checkpoints in the background")
    p.add_argument("--checkpoint_dir", default=None, help="worker: ModelCheckpoint directory (every_n_steps, last)")
    p.add_argument("--every_n_steps", type=int, default=0, help="worker: ModelCheckpoint every_n_train_steps")
    p.add_argument("--crash_on_save", type=int, default=0,
                   help="fault injection for tests: rank 1 dies at the start of its N-th checkpoint save")
    p.add_argument("--fault", default=None, choices=["kill", "nan", "ragged", "mismatch"],
                   help="fault injection for tests: on --fault_rank at --fault_step, SIGKILL mid-forward / NaN loss / "
                        "a different batch size / a different model")
    p.add_argument("--fault_rank", type=int, default=1)
    p.add_argument("--fault_step", type=int, default=1)
    p.add_argument("--timeout_s", type=float, default=None, help="collective timeout in seconds (tawpipe)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--replicas", default="1",
                   help="tawpipe: a number of equal replicas, or shapes like 1x1,2x2 (nodes x ranks per node)")
    p.add_argument("--replica_batch", type=int, default=0,
                   help="samples per replica per step (per-rank batch = this / ranks of the replica); 0: --batch_size")
    p.add_argument("--outer", default="sparseloco", choices=["sparseloco", "diloco", "none"])
    p.add_argument("--sync_every", type=int, default=15)
    p.add_argument("--density", type=float, default=0.03125)
    p.add_argument("--quant_bits", type=int, default=2, help="0: float32 values")
    p.add_argument("--outer_lr", type=float, default=None)
    p.add_argument("--outer_momentum", type=float, default=0.9)
    p.add_argument("--error_decay", type=float, default=0.95)
    p.add_argument("--out", default=None, help="directory for result.pt / result.json")
    p.add_argument("--worker", action="store_true", help="run one training job (used by the compare mode and tests)")
    return p


def run_worker(a: argparse.Namespace) -> None:
    """One Lightning job; global rank 0 writes ``result.pt`` (losses, full weights, per-rank state bytes)."""
    import lightning as L
    import psutil
    from lightning.pytorch.callbacks import Callback

    import lightning_tawpipe  # noqa: F401  registers "tawpipe"
    from lightning_tawpipe import TawPipePrecision, TawPipeStrategy
    from lightning_tawpipe.data import EmbeddedTextDataModule
    from lightning_tawpipe.module import DecayGroupsLitGPTModule, LitGPTModule, ManualLitGPTModule, tiny_llama_config

    class Record(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.comm: list[dict[str, float]] = []
            self.setup_growth_mb = 0.0
            self.step_end_s: list[float] = []  # wall clock at the end of every step (benchmarks: step times)
            self.link_tx: list[int] = []  # bytes sent on this node's emulated link so far, per step (netns runs)
            self.grad_norm: list[float] = []  # before clipping, where the module holds full gradients (not TawPipe)
            self.grad_abs_max: list[float] = []
            self.grad_above_clip: list[float] = []  # fraction of gradient elements above --clip_val

        def setup(self, trainer, pl_module, stage) -> None:  # before configure_model
            self._rss = psutil.Process().memory_info().rss

        def on_fit_start(self, trainer, pl_module) -> None:  # after the strategy built (and sharded) the model
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.setup_growth_mb = max(0, peak - self._rss) / 2**20

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            """Lightning calls this after the gradient sync and before clipping: what the clip is applied to."""
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                self.grad_norm.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
                self.grad_abs_max.append(max(float(g.abs().max()) for g in grads))
                if a.clip_val is not None:
                    above = sum(int((g.abs() > a.clip_val).sum()) for g in grads)
                    self.grad_above_clip.append(above / sum(g.numel() for g in grads))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))
            self.comm.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("tawpipe/")})
            self.step_end_s.append(time.perf_counter())
            self.link_tx.append(_link_tx_bytes())

    class Fault(Callback):
        """Fault injection (tests): kill this rank in the middle of a forward, or make its loss NaN."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_rank != a.fault_rank or trainer.global_step != a.fault_step:
                return
            if a.fault == "kill":
                last_block = pl_module.model.transformer.h[-1]
                last_block.register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
            elif a.fault == "nan":
                pl_module.model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan"))

    rank_from_env = int(os.environ.get("NODE_RANK", 0)) * a.devices + int(os.environ.get("LOCAL_RANK", 0))
    faulty = a.fault is not None and rank_from_env == a.fault_rank
    torch.set_num_threads(1)
    L.seed_everything(a.seed, verbose=False)
    n_layer = a.n_layer + int(faulty and a.fault == "mismatch")
    cfg = tiny_llama_config(n_layer=n_layer, n_embd=a.n_embd, n_head=a.n_head, n_query_groups=a.n_query_groups,
                            block_size=a.seq_length)
    from lightning_tawpipe.checkpoint_io import TawPipeCheckpointIO

    class CrashingCheckpointIO(TawPipeCheckpointIO):
        """Fault injection: rank 1 dies once every rank has agreed on the staging directory of the N-th save."""

        saves = 0

        def _write_shards(self, shards, staging) -> None:
            CrashingCheckpointIO.saves += 1
            if CrashingCheckpointIO.saves == a.crash_on_save and torch.distributed.get_rank() == 1:
                os._exit(13)
            super()._write_shards(shards, staging)

    model = None
    if a.init_weights and a.strategy != "tawpipe":  # the reference: an ordinary model loads the whole file
        from litgpt import GPT

        model = GPT(cfg)
        model.load_state_dict(torch.load(a.init_weights, weights_only=True))
    if a.seeded_init:
        from litgpt import GPT

        from lightning_tawpipe.init import seeded_reset_parameters

        model = GPT(cfg)
        seeded_reset_parameters(model, a.seed, prefix="model")  # names as inside the LightningModule
    if a.lora:
        from litgpt.lora import GPT as LoRAGPT, Config as LoRAConfig, mark_only_lora_as_trainable

        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
        cfg = LoRAConfig(**{**fields, "lora_r": 4, "lora_alpha": 8, "lora_query": True, "lora_value": True,
                            "lora_projection": True})
        model = LoRAGPT(cfg)
        for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapters do something at once
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        mark_only_lora_as_trainable(model)
    if a.param_groups:
        module = DecayGroupsLitGPTModule(cfg, learning_rate=a.lr, weight_decay=0.1, warmup_steps=a.warmup_steps)
    else:
        module = (ManualLitGPTModule if a.manual else LitGPTModule)(cfg, learning_rate=a.lr, weight_decay=a.weight_decay,
                                                                   warmup_steps=a.warmup_steps, model=model,
                                                                   optimizer=a.optimizer, momentum=a.momentum)
    batch = a.batch_size + int(faulty and a.fault == "ragged")
    replicas = parse_replicas(a.replicas)
    if a.replica_batch:  # equal samples per replica whatever its shape (see ReplicaLayout.sampler_slot)
        from lightning_tawpipe.replicas import ReplicaLayout

        layout = ReplicaLayout.parse(replicas, a.devices * a.num_nodes, a.group_size or a.devices)
        batch = a.replica_batch // layout.topologies[layout.replica_of(rank_from_env)].world_size
    data = EmbeddedTextDataModule(seq_length=a.seq_length, batch_size=batch)
    strategy, plugins = a.strategy, []
    if a.strategy == "tawpipe":
        strategy = TawPipeStrategy(n_microbatches=a.n_microbatches, prefetch=a.prefetch, schedule=a.schedule,
                                   reuse=a.reuse or None, grad_buffers=a.grad_buffers or None,
                                   group_size=a.group_size or None, p2p_groups=a.p2p_groups,
                                   partition=a.partition, replicate_first_chunk=a.replicate_first_chunk,
                                   stripe=a.stripe, microbatch_order=a.microbatch_order,
                                   activation_checkpointing=a.activation_checkpointing, meta_init=a.meta_init,
                                   state_dict_type=a.state_dict_type, async_checkpointing=a.async_save,
                                   init_weights=a.init_weights, replicas=replicas,
                                   outer=None if a.outer == "none" else a.outer, sync_every=a.sync_every,
                                   density=a.density, quant_bits=a.quant_bits or None, outer_lr=a.outer_lr,
                                   outer_momentum=a.outer_momentum, error_decay=a.error_decay,
                                   checkpoint_io=CrashingCheckpointIO(a.async_save) if a.crash_on_save else None,
                                   **({"timeout": timedelta(seconds=a.timeout_s)} if a.timeout_s else {}))
    elif a.resume and os.path.isdir(a.resume):  # another strategy resuming from a sharded TawPipe checkpoint
        plugins.append(TawPipeCheckpointIO())
    record = Record()
    callbacks = [record, Fault()] if a.fault in ("kill", "nan") else [record]
    if a.checkpoint_dir:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=a.checkpoint_dir, every_n_train_steps=a.every_n_steps or None,
                                         save_top_k=a.save_top_k, save_last=True,
                                         monitor="train_loss" if a.save_top_k >= 0 else None))
    precision = a.precision
    if a.precision == "16-mixed" and a.accelerator == "cpu":  # Lightning turns Trainer(precision="16-mixed") into bf16
        if a.strategy == "tawpipe":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            plugins.append(TawPipePrecision("16-mixed", ShardedGradScaler("cpu", init_scale=a.init_scale)))
        else:
            from lightning.pytorch.plugins.precision import MixedPrecision

            plugins.append(MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=a.init_scale)))
        precision = None
    trainer = L.Trainer(accelerator=a.accelerator, devices=a.devices, num_nodes=a.num_nodes, strategy=strategy,
                        precision=precision, plugins=plugins,
                        max_steps=a.steps, accumulate_grad_batches=a.accumulate, logger=False,
                        gradient_clip_val=a.clip_val, gradient_clip_algorithm=a.clip_algorithm,
                        enable_checkpointing=bool(a.checkpoint_dir), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=2 if a.eval_loops else 0,
                        limit_val_batches=a.val_batches, limit_test_batches=2, limit_predict_batches=2,
                        callbacks=callbacks)
    trainer.fit(module, data, ckpt_path=a.resume)
    if a.save_ckpt:
        trainer.save_checkpoint(a.save_ckpt)
    val = trainer.validate(module, data, verbose=False)[0] if a.val_batches else {}
    tested, predicted = {}, []
    if a.eval_loops:
        tested = trainer.test(module, data, verbose=False)[0]
        predicted = [p.cpu() for p in trainer.predict(module, data)]
    if a.strategy == "tawpipe":
        state = trainer.strategy.full_state_dict()
        state_bytes = trainer.strategy.model_state_bytes()
        resident = sum(p.numel() for p in module.parameters())
    else:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        opt_state = trainer.optimizers[0].state
        state_bytes = sum(t.nbytes for s in opt_state.values() for t in s.values() if torch.is_tensor(t))
        state_bytes += sum(p.nbytes * 2 for p in module.parameters())
        resident = sum(p.numel() for p in module.parameters())
    device = trainer.strategy.root_device  # nccl gathers CUDA tensors only
    per_rank = trainer.strategy.all_gather(torch.tensor([state_bytes, resident], device=device)).reshape(-1, 2)
    per_rank = per_rank.tolist()
    comm_per_rank = trainer.strategy.all_gather(
        torch.tensor([[c.get("tawpipe/inter_node_bytes", 0.0), c.get("tawpipe/intra_node_bytes", 0.0)]
                      for c in record.comm], dtype=torch.float64, device=device)
    ).tolist()
    grad_bytes = trainer.strategy.all_gather(
        torch.tensor([c.get("tawpipe/grad_bytes", 0.0) for c in record.comm], dtype=torch.float64, device=device)
    ).tolist()
    setup_growth = trainer.strategy.all_gather(torch.tensor(record.setup_growth_mb, device=device)).reshape(-1)
    losses_per_rank = trainer.strategy.all_gather(torch.tensor(record.losses, dtype=torch.float64, device=device))
    timing = trainer.strategy.all_gather(torch.tensor([record.step_end_s, record.link_tx], dtype=torch.float64,
                                                      device=device)).reshape(len(per_rank), 2, -1).tolist()
    outer = getattr(trainer.strategy, "outer", None)
    outer_bytes = trainer.strategy.all_gather(torch.tensor(
        [outer.stats.bytes_sent if outer else 0, outer.stats.exchanges if outer else 0], device=device)).tolist()
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    mirrored = _mirrored_digests(trainer) if a.strategy == "tawpipe" else {}
    if trainer.global_rank == 0 and a.out:
        os.makedirs(a.out, exist_ok=True)
        result = {"losses": record.losses, "model_state_bytes": [r[0] for r in per_rank],
                  "resident_params": [r[1] for r in per_rank], "comm_per_rank": comm_per_rank,
                  "validation": {k: float(v) for k, v in val.items()},
                  "grad_bytes_per_rank": grad_bytes, "mirrored_digests": mirrored,
                  "test": {k: float(v) for k, v in tested.items()},
                  "setup_peak_growth_mb": setup_growth.tolist(),
                  "grad_scale": float(scaler.get_scale()) if scaler is not None else None,
                  "losses_per_rank": losses_per_rank.reshape(len(per_rank), -1).tolist(),
                  "outer_bytes_per_rank": [b[0] for b in outer_bytes], "outer_exchanges": outer_bytes[0][1],
                  "grad_norm": record.grad_norm, "grad_abs_max": record.grad_abs_max,
                  "grad_above_clip": record.grad_above_clip,
                  "step_end_s_per_rank": [t[0] for t in timing], "link_tx_per_rank": [t[1] for t in timing],
                  "n_params": sum(v.numel() for k, v in state.items() if not k.endswith((".cos", ".sin")))}
        torch.save({**result, "state_dict": {k: v.cpu() for k, v in state.items()}, "predictions": predicted},
                   os.path.join(a.out, "result.pt"))
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump(result, f)
    # Exit cleanly: with gloo's threads still alive at interpreter exit, a process can abort in C++ teardown
    # ("terminate called without an active exception") after finishing its work.
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


def _mirrored_digests(trainer) -> dict[str, list]:
    """For each mirrored chunk (``replicate_first_chunk``), per rank: a digest of its copy (master weights and
    optimizer state) if it holds one, else None. A chunk's owner and its mirrors must agree bit for bit; a collective
    call."""
    import hashlib

    import torch.distributed as dist

    pipeline = trainer.strategy.pipeline
    mine = {}
    for c, shard in pipeline.held_shards().items():
        h = hashlib.sha256(shard.weights.detach().cpu().numpy().tobytes())
        for optimizer in trainer.optimizers:
            for master in shard.params.values():
                for key, value in sorted(optimizer.state.get(master, {}).items()):
                    if torch.is_tensor(value):
                        h.update(key.encode() + value.detach().cpu().numpy().tobytes())
        mine[c] = h.hexdigest()
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {str(c): [d.get(c) for d in everyone] for c in range(len(pipeline.holders))}


def _link_tx_bytes() -> int:
    """Bytes sent so far on the interface gloo uses (``GLOO_SOCKET_IFNAME``: an emulated node's link), else 0."""
    path = f"/sys/class/net/{os.environ.get('GLOO_SOCKET_IFNAME', '')}/statistics/tx_bytes"
    if "GLOO_SOCKET_IFNAME" not in os.environ or not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(f.read())


def parse_replicas(text: str) -> int | list[tuple[int, int]]:
    """``"2"`` -> 2; ``"1x1,2x2"`` -> [(1, 1), (2, 2)] (nodes x ranks per node)."""
    if "x" not in text:
        return int(text)
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]


def launch_worker(args: list[str], out: str, node_ranks: int = 1, timeout: float = 900) -> dict:
    """Run ``--worker`` jobs (one launcher per emulated node, sharing one port) and load ``result.pt``."""
    env = job_env()
    cmd = [sys.executable, "-m", "lightning_tawpipe.demo", "--worker", "--out", out, *args]
    procs = [subprocess.Popen(cmd, env=dict(env, NODE_RANK=str(n)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in range(node_ranks)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"worker {cmd} timed out after {timeout}s")
    return worker_result(cmd, [proc.returncode for proc in procs], logs, out)


def job_env() -> dict[str, str]:
    """This process's environment plus a rendezvous on this machine at a free port: what every rank of a job gets."""
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_network_port()))


def worker_result(cmd: list[str], exit_codes: list[int], logs: list[str], out: str) -> dict:
    """Rank 0's ``result.pt`` with every log attached, or an error carrying the logs' tails if any process failed."""
    if any(exit_codes):
        raise RuntimeError(f"worker {' '.join(cmd)} failed (exit codes {exit_codes}):\n"
                           + "\n".join(log[-12000:] for log in logs))
    result = torch.load(os.path.join(out, "result.pt"), weights_only=True)
    result["log"] = "\n".join(logs)
    return result


def compare(a: argparse.Namespace, argv: list[str]) -> None:
    """Run the same job under tawpipe and ddp and print the losses side by side."""
    shared = [x for x in argv if x not in ("--worker",)]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Training a {a.n_layer}-layer LitGPT LLaMA (n_embd={a.n_embd}) on the embedded text, "
              f"{a.devices * a.num_nodes} processes, {a.steps} steps, under tawpipe and ddp ...", flush=True)
        taw = launch_worker([*shared, "--strategy", "tawpipe"], os.path.join(tmp, "taw"))
        print(next(line for line in taw["log"].splitlines() if line.startswith("TawPipe layout")))
        print("\n".join(line for line in taw["log"].splitlines() if line.startswith("  chunk ")))
        ddp = launch_worker([*shared, "--strategy", "ddp"], os.path.join(tmp, "ddp"))
    print(f"\n{'step':>4}  {'tawpipe loss':>12}  {'ddp loss':>12}  {'rel diff':>9}  {'inter-node MB (all ranks)':>25}")
    worst = 0.0
    for i, (x, y) in enumerate(zip(taw["losses"], ddp["losses"])):
        rel = abs(x - y) / abs(y)
        worst = max(worst, rel)
        inter = sum(rank[i][0] for rank in taw["comm_per_rank"]) / 1e6
        print(f"{i:>4}  {x:>12.6f}  {y:>12.6f}  {rel:>9.2e}  {inter:>25.3f}")
    print(f"\nlargest relative loss difference: {worst:.2e}")
    print(f"model-state bytes per rank, tawpipe: {taw['model_state_bytes']}  ddp: {ddp['model_state_bytes']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = _parser().parse_args(argv)
    if a.worker:
        run_worker(a)
    else:
        compare(a, argv)


if __name__ == "__main__":
    main()
