"""``Fabric(strategy="tawpipe")``: a plain ``lightning.fabric`` loop (``examples/fabric_pretrain.py``) under TawPipe.

The multi-process tests launch the example itself (real processes, gloo, Fabric's own launcher) and compare it with
the same loop under Fabric's ``ddp``: per-iteration losses, gradient norms from ``fabric.clip_gradients``,
validation losses and final weights. Every run trains on the same global batches: 2 ranks x 4 samples and 4 ranks x 2
samples cover the same samples per iteration (the distributed sampler deals them round-robin), so a 4-rank run that
resumes a 2-rank checkpoint continues the 2-rank reference exactly (up to summation order).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.strategies import STRATEGY_REGISTRY

from lightning_tawpipe.checkpoint_io import TawPipeCheckpointIO
from lightning_tawpipe.fabric import TawPipeFabricPrecision, TawPipeFabricStrategy
from lightning_tawpipe.runtime.optim_state import indexed_from_named

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fabric_pretrain.py"
# 6 optimizer steps of 2 accumulated iterations, clipped (the norms stay above 0.5), validated and saved at 3 and 6
COMMON = ["--max_steps", "6", "--gradient_accumulation_iters", "2", "--max_norm", "0.5", "--eval_interval", "3",
          "--eval_iters", "2", "--save_interval", "3", "--log_interval", "3", "--n_layer", "2", "--n_embd", "32",
          "--seq_length", "32", "--warmup_steps", "2"]
RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "WORLD_SIZE", "RANK",
            "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED")


def _run(cmd: list[str], env: dict, logs: Path) -> tuple[int, str, str]:
    """Run ``cmd`` in a session of its own with its output in files, then kill whatever it left behind.

    Output goes to files, not pipes: reading a pipe to its end would also wait for any rank process that outlives
    the launcher while holding the pipe (seen once: the ddp run had exited 0 and the read hung for minutes)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout.log", "w") as stdout, open(logs / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            returncode = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return returncode, (logs / "stdout.log").read_text(), (logs / "stderr.log").read_text()


def _launch(out: Path, *args: str) -> dict:
    """Run the example (Fabric launches the other ranks itself) and load what rank 0 recorded."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    cmd = [sys.executable, str(EXAMPLE), "--out_dir", str(out), "--results", str(out / "result.pt"), *args]
    for attempt in range(2):
        returncode, stdout, stderr = _run(cmd, env, out.parent / f"{out.name}-launch-{attempt}")
        if returncode == 0:
            break
        if attempt == 0 and ("Address already in use" in stderr or "EADDRINUSE" in stderr):
            continue  # the free port Fabric picked was taken before it bound it
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return {**torch.load(out / "result.pt", weights_only=True), "log": stdout + stderr}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The example's runs, launched once per module on first use (later runs resume earlier runs' checkpoints)."""
    root = tmp_path_factory.mktemp("fabric")
    specs = {
        "ddp": ["--strategy", "ddp", "--devices", "2", "--micro_batch_size", "4"],
        "tawpipe": ["--devices", "2", "--micro_batch_size", "4"],
        # resharded: 4 ranks (2 emulated nodes) resume the 2-rank TawPipe checkpoint, 2 pipelined micro-batches in
        # chunk-major order, chunk 0 mirrored on node 1 (its mirror reads the owner's weights and optimizer state from
        # the checkpoint), the other chunks striped over both ranks of a node
        "tawpipe4": ["--devices", "4", "--group_size", "2", "--micro_batch_size", "2", "--n_microbatches", "2",
                     "--replicate_first_chunk", "true", "--stripe", "true", "--microbatch_order", "chunk",
                     "--resume", str(root / "tawpipe" / "step-000003.ckpt")],
        # regrouped (2 groups of 1 rank), full-file checkpoints, resuming the ddp run's checkpoint
        "tawpipe_from_ddp": ["--devices", "2", "--group_size", "1", "--micro_batch_size", "4",
                             "--state_dict_type", "full", "--resume", str(root / "ddp" / "step-000003.ckpt")],
    }
    needs = {"tawpipe4": "tawpipe", "tawpipe_from_ddp": "ddp"}
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            if name in needs:
                get(needs[name])
            done[name] = _launch(root / name, *COMMON, *specs[name])
            done[name]["dir"] = root / name
        return done[name]

    return get


def _assert_close_rel(actual: list[float], expected: list[float], rtol: float = 1e-5) -> None:
    assert len(actual) == len(expected) and len(expected) > 0
    assert torch.allclose(torch.tensor(actual), torch.tensor(expected), rtol=rtol, atol=0.0), (actual, expected)


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


# -- in-process: registration, configuration, the loop's semantics on one rank ---------------------------------------
def test_registered_in_fabrics_registry_and_built_from_flags():
    import lightning_tawpipe  # noqa: F401

    assert STRATEGY_REGISTRY["tawpipe"]["strategy"] is TawPipeFabricStrategy
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="tawpipe", precision="bf16-mixed")
    assert isinstance(fabric.strategy, TawPipeFabricStrategy)
    precision = fabric.strategy.precision
    assert isinstance(precision, TawPipeFabricPrecision)
    assert (precision.param_dtype, precision.master_dtype) == (torch.bfloat16, torch.float32)
    assert L.Fabric(accelerator="cpu", devices=2, strategy="weipipe").strategy.schedule == "weipipe"
    with pytest.raises(ValueError, match="group_size"):
        L.Fabric(accelerator="cpu", devices=3, strategy=TawPipeFabricStrategy(group_size=2))
    with pytest.raises(TypeError, match="TawPipeFabricPrecision"):
        L.Fabric(accelerator="cpu", devices=2, strategy="tawpipe", precision="64-true")
    with pytest.raises(ValueError, match="replicate_first_chunk=True needs schedule='tawpipe'"):
        TawPipeFabricStrategy(schedule="weipipe", replicate_first_chunk=True)
    with pytest.raises(ValueError, match="microbatch_order must be one of"):
        TawPipeFabricStrategy(microbatch_order="chunks")


@pytest.fixture
def one_rank_fabric():
    """A one-process TawPipe Fabric in this process (its process group is destroyed afterwards)."""
    saved = dict(os.environ)
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy="tawpipe")
    fabric.launch()
    try:
        yield fabric
    finally:
        torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def test_one_rank_loop_semantics_match_plain_pytorch(one_rank_fabric, tmp_path):
    """Accumulation, global clipping, zero_grad(set_to_none=False), eval/no_grad forwards, clear misuse errors, and a
    sharded save/load round trip through ``fabric.save``/``fabric.load``."""
    from litgpt.model import GPT
    from litgpt.utils import chunked_cross_entropy

    from lightning_tawpipe.module import tiny_llama_config

    fabric = one_rank_fabric
    torch.manual_seed(0)
    reference = GPT(tiny_llama_config(n_layer=2, n_embd=32, block_size=16))
    piped = GPT(reference.config)
    piped.load_state_dict(reference.state_dict())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(piped, torch.optim.AdamW(piped.parameters(), lr=1e-2))  # joint setup
    data = torch.randint(0, 256, (8, 2, 17), generator=torch.Generator().manual_seed(1))

    def loss_of(m, batch):
        return chunked_cross_entropy(m(batch[:, :-1]), batch[:, 1:])

    for step in range(4):  # 2 accumulated iterations per step; steps 2 and 3 zero with set_to_none=False
        for i in (2 * step, 2 * step + 1):
            with fabric.no_backward_sync(model, enabled=i % 2 == 0):
                loss = loss_of(model, data[i])
                fabric.backward(loss / 2)
            (loss_of(reference, data[i]) / 2).backward()
            assert abs(loss.item() - loss_of(reference, data[i]).item()) < 1e-5
        norm = fabric.clip_gradients(model, optimizer, max_norm=0.3)
        assert abs(norm.item() - torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.3).item()) < 1e-5
        optimizer.step()
        ref_opt.step()
        optimizer.zero_grad(set_to_none=step < 2)
        ref_opt.zero_grad(set_to_none=step < 2)

    _assert_same_weights(fabric.strategy.full_state_dict(), reference.state_dict(), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(data[0, :, :-1]), reference(data[0, :, :-1]), atol=1e-5)
    model.eval()  # eval mode: forward-only schedule, no autograd graph
    assert not model(data[0, :, :-1]).requires_grad
    model.train()
    loss = loss_of(model, data[0])
    with pytest.raises(RuntimeError, match="called again before `fabric.backward"):
        model(data[1, :, :-1])
    fabric.backward(loss)  # the pending iteration still completes
    optimizer.zero_grad()

    saved_weights = {k: v.clone() for k, v in fabric.strategy.full_state_dict().items()}
    saved_moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    fabric.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "iter_num": 8})
    assert (tmp_path / "ckpt").is_dir()
    fabric.backward(loss_of(model, data[2]))  # move on, then restore
    optimizer.step()
    state = {"model": model, "optimizer": optimizer, "iter_num": 0}
    assert fabric.load(tmp_path / "ckpt", state) == {} and state["iter_num"] == 8
    _assert_same_weights(fabric.strategy.full_state_dict(), saved_weights, atol=0.0)
    assert all(torch.equal(v["exp_avg"], saved_moments[k]) for k, v in optimizer.state_dict()["state"].items())
    whole = fabric.load(tmp_path / "ckpt")  # no state: everything, under the saved keys
    assert whole.keys() == {"model", "optimizer", "iter_num"}
    _assert_same_weights(whole["model"], saved_weights, atol=0.0)

    iteration = fabric.strategy._iteration + 1  # the pipelined train_step checks its loss too, naming its iteration
    with pytest.raises(FloatingPointError, match=f"Non-finite loss at step {iteration} on rank"):
        fabric.strategy.train_step(model, data[3], lambda m, b: loss_of(m, b) * float("nan"), n_microbatches=2)
    assert not fabric.strategy.pipeline.engine.active  # the iteration ended before the verdict
    iteration = fabric.strategy._iteration + 1
    bad = loss_of(model, data[3]) * float("nan")  # stopped before any gradient moves, naming the iteration
    with pytest.raises(FloatingPointError, match=f"Non-finite loss at step {iteration} on rank"):
        fabric.backward(bad)


# -- multi-process: parity with ddp, checkpoints, resharding ---------------------------------------------------------
def test_two_ranks_match_ddp_with_accumulation_clipping_and_validation(runs):
    ddp, taw = runs("ddp"), runs("tawpipe")
    assert len(ddp["losses"]) == 12 and len(ddp["grad_norms"]) == 6 and len(ddp["val_losses"]) == 2
    assert min(ddp["grad_norms"]) > 0.5  # clipping was active at every step
    _assert_close_rel(taw["losses"], ddp["losses"])
    _assert_close_rel(taw["grad_norms"], ddp["grad_norms"])
    _assert_close_rel(taw["val_losses"], ddp["val_losses"])
    _assert_same_weights(taw["state_dict"], ddp["state_dict"])
    assert taw["losses"][-1] < taw["losses"][0]
    # the Trainer strategy's sharded layout: a directory, one shard file per rank, DCP index and meta.pt
    ckpt = taw["dir"] / "step-000003.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert (taw["dir"] / "final" / "lit_model.pth").is_file() and (taw["dir"] / "final" / "model_config.yaml").is_file()


def test_four_ranks_resume_two_rank_sharded_checkpoint_with_chunk_major_microbatches_mirrored_chunk_0_and_stripes(runs):
    """Chunk 0's mirror must sum its gradient with the owner's once per optimizer step (2 accumulated iterations) and
    count once in the clipping norm; its own step-6 checkpoint saves chunk 0 once (from the owner)."""
    ddp, resumed = runs("ddp"), runs("tawpipe4")
    assert "2 node(s) x 2 rank(s)" in resumed["log"] and "chunk 0 replicated on ranks [0, 2]" in resumed["log"]
    assert "striped over 2 rails" in resumed["log"] and "chunk-major micro-batches" in resumed["log"]
    _assert_close_rel(resumed["losses"], ddp["losses"][6:])
    _assert_close_rel(resumed["grad_norms"], ddp["grad_norms"][3:])
    _assert_close_rel(resumed["val_losses"], ddp["val_losses"][1:])
    _assert_same_weights(resumed["state_dict"], ddp["state_dict"])
    # its step-6 checkpoint (written by 4 ranks, chunk 0 by its owner only) holds what ddp's holds
    ours = TawPipeCheckpointIO().load_checkpoint(resumed["dir"] / "step-000006.ckpt")
    theirs = torch.load(ddp["dir"] / "step-000006.ckpt", weights_only=True)
    _assert_same_weights(ours["state_dict"], theirs["model"])
    moments = indexed_from_named(ours["optimizer_states"][0])["state"]
    assert moments.keys() == theirs["optimizer"]["state"].keys()
    for i, state in theirs["optimizer"]["state"].items():
        torch.testing.assert_close(moments[i]["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-6)


def test_resume_from_ddp_checkpoint_and_write_ddp_compatible_full_checkpoints(runs):
    ddp, resumed = runs("ddp"), runs("tawpipe_from_ddp")
    assert "2 node(s) x 1 rank(s)" in resumed["log"]
    _assert_close_rel(resumed["losses"], ddp["losses"][6:])
    _assert_close_rel(resumed["grad_norms"], ddp["grad_norms"][3:])
    _assert_same_weights(resumed["state_dict"], ddp["state_dict"])
    # its own step-6 checkpoint is an ordinary Fabric file, like ddp's: same keys, model and optimizer state
    ours = torch.load(resumed["dir"] / "step-000006.ckpt", weights_only=True)
    theirs = torch.load(ddp["dir"] / "step-000006.ckpt", weights_only=True)
    assert ours.keys() == theirs.keys() == {"model", "optimizer", "iter_num", "step_count"}
    assert (ours["iter_num"], ours["step_count"]) == (theirs["iter_num"], theirs["step_count"]) == (12, 6)
    _assert_same_weights(ours["model"], theirs["model"])
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for i, state in theirs["optimizer"]["state"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(ours["optimizer"]["state"][i][field], state[field], atol=1e-6)
