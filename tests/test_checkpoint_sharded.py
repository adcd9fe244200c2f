"""Sharded checkpoints (the default): parallel DCP save, exact resume, reshard, consolidate, export, nothing lost.

One 2-node x 2-rank run trains 6 steps with ``ModelCheckpoint(every_n_train_steps=3, save_last=True)``; everything
else starts from its step-3 checkpoint:

* exact resume: resuming at 2x2 reproduces that run's steps 3-5 bit for bit (the data position is restored too);
* reshard: resuming at 1x2, 1x1, 3x1 and under ddp (4 ranks) gives the same losses as ddp resumed from the same
  checkpoint at that world size (1e-5, fp32);
* Lightning's own ``consolidate_checkpoint`` and ours (``--litgpt``) work on it, and LitGPT generates from the export;
* a save killed mid-way (rank 1 dies) leaves the step-3 checkpoint intact and usable; the partial one is refused.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from lightning_tawpipe.checkpoint_io import CheckpointError, TawPipeCheckpointIO, check_checkpoint, load_local_shards

ARGS = ("--n_layer", "4", "--n_embd", "32", "--seq_length", "32", "--batch_size", "2", "--lr", "3e-3")
TAW_2X2 = ("--strategy", "tawpipe", "--devices", "2", "--num_nodes", "2", "--group_size", "0", "--n_microbatches", "2")


@pytest.fixture(scope="module")
def trained(train_job, tmp_path_factory):
    """The 6-step 2x2 run with checkpoints at steps 3 and 6 (and last)."""
    ckpt_dir = tmp_path_factory.mktemp("sharded")
    result = train_job(*ARGS, *TAW_2X2, "--steps", "6", "--checkpoint_dir", str(ckpt_dir), "--every_n_steps", "3",
                       node_ranks=2)
    return result, ckpt_dir


def _close(xs, ys, rel):
    assert len(xs) == len(ys)
    for step, (x, y) in enumerate(zip(xs, ys)):
        assert abs(x - y) <= rel * abs(y), f"step {step}: {x} vs {y}"


def test_layout_exact_resume_and_lightning_consolidation(train_job, trained, tmp_path):
    result, ckpt_dir = trained
    step3 = ckpt_dir / "epoch=0-step=3.ckpt"
    assert sorted(p.name for p in step3.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp",
                                                      "__3_0.distcp", "meta.pt"]
    assert (ckpt_dir / "epoch=0-step=6.ckpt").is_dir() and (ckpt_dir / "last.ckpt").is_dir()
    assert not [p for p in ckpt_dir.iterdir() if ".partial-" in p.name]  # every save was committed

    resumed = train_job(*ARGS, *TAW_2X2, "--steps", "6", "--resume", str(step3), node_ranks=2)
    assert resumed["losses"] == result["losses"][3:]  # bit for bit: same weights, optimizer, data position
    for name, value in result["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)

    # Lightning's own tool, unchanged, consolidates it; the weights are the trained ones
    out = tmp_path / "full.ckpt"
    subprocess.run([sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint", str(ckpt_dir /
                    "epoch=0-step=6.ckpt"), "--output_file", str(out)], check=True, capture_output=True)
    full = torch.load(out, weights_only=True)
    for name, value in result["state_dict"].items():
        torch.testing.assert_close(full["state_dict"][name], value, rtol=0, atol=0, msg=name)
    state = full["optimizer_states"][0]["state"]
    assert set(state) == {k for k in result["state_dict"] if not k.endswith((".cos", ".sin"))}
    assert all(int(s["step"]) == 6 for s in state.values())


@pytest.mark.parametrize("devices, group_size", [(2, 0), (1, 0), (3, 1)], ids=["1x2", "1x1", "3x1"])
def test_resumes_on_other_topologies(train_job, trained, devices, group_size):
    _, ckpt_dir = trained
    step3 = str(ckpt_dir / "epoch=0-step=3.ckpt")
    resumed = train_job(*ARGS, "--strategy", "tawpipe", "--devices", str(devices), "--group_size", str(group_size),
                        "--steps", "6", "--resume", step3)
    reference = train_job(*ARGS, "--strategy", "ddp", "--devices", str(devices), "--steps", "6", "--resume", step3)
    assert len(resumed["losses"]) == 3
    _close(resumed["losses"], reference["losses"], 1e-5)
    for name, ref in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], ref, rtol=0, atol=1e-4, msg=name)


def test_ddp_resumes_from_a_sharded_checkpoint(train_job, trained):
    result, ckpt_dir = trained
    reference = train_job(*ARGS, "--strategy", "ddp", "--devices", "4", "--steps", "6", "--resume",
                          str(ckpt_dir / "epoch=0-step=3.ckpt"))
    _close(reference["losses"], result["losses"][3:], 1e-5)


def test_export_to_litgpt_generates(trained, tmp_path):
    from litgpt.generate.base import generate

    from lightning_tawpipe.consolidate import main
    from lightning_tawpipe.export import load_litgpt_checkpoint

    result, ckpt_dir = trained
    main([str(ckpt_dir / "last.ckpt"), str(tmp_path / "lit"), "--litgpt"])
    assert (tmp_path / "lit" / "lit_model.pth").is_file() and (tmp_path / "lit" / "model_config.yaml").is_file()
    model, _, _ = load_litgpt_checkpoint(tmp_path / "lit")
    for name, value in model.state_dict().items():
        if not name.endswith((".cos", ".sin")):
            torch.testing.assert_close(value, result["state_dict"][f"model.{name}"], rtol=0, atol=0, msg=name)
    model.set_kv_cache(batch_size=1)
    prompt = torch.tensor(list(b"def "), dtype=torch.long)
    out = generate(model, prompt, max_returned_tokens=prompt.numel() + 8, temperature=0.0)
    assert out.shape[0] == prompt.numel() + 8 and torch.equal(out[: prompt.numel()], prompt)


def test_killed_save_leaves_the_previous_checkpoint(train_job, trained, tmp_path):
    result, _ = trained
    ckpt_dir = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="failed"):
        train_job(*ARGS, *TAW_2X2, "--steps", "6", "--checkpoint_dir", str(ckpt_dir), "--every_n_steps", "3",
                  "--crash_on_save", "3", "--timeout_s", "60", node_ranks=2)
    partial = [p for p in ckpt_dir.iterdir() if ".partial-" in p.name]
    assert partial, "the interrupted save should have left its staging directory"
    with pytest.raises(CheckpointError, match="interrupted save"):
        check_checkpoint(partial[0])
    assert not (ckpt_dir / "epoch=0-step=6.ckpt").exists()
    # the step-3 checkpoint is intact: the same as the uninterrupted run's
    survivor = TawPipeCheckpointIO().load_checkpoint(ckpt_dir / "epoch=0-step=3.ckpt")
    reference = TawPipeCheckpointIO().load_checkpoint(trained[1] / "epoch=0-step=3.ckpt")
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(survivor["state_dict"][name], value, rtol=0, atol=0, msg=name)
    assert survivor["global_step"] == 3
    resumed = train_job(*ARGS, *TAW_2X2, "--steps", "6", "--resume", str(ckpt_dir / "epoch=0-step=3.ckpt"),
                        node_ranks=2)
    assert resumed["losses"] == result["losses"][3:]  # training goes on as if nothing had happened


def test_top_k_keeps_the_best_checkpoint_directories(train_job, tmp_path):
    """``ModelCheckpoint(save_top_k=2, monitor="train_loss")`` removes sharded directories it no longer keeps."""
    ckpt_dir = tmp_path / "topk"
    run = train_job(*ARGS, "--strategy", "tawpipe", "--devices", "1", "--group_size", "0", "--steps", "4",
                    "--checkpoint_dir", str(ckpt_dir), "--every_n_steps", "1", "--save_top_k", "2")
    kept = sorted(p.name for p in ckpt_dir.iterdir())
    assert len(run["losses"]) == 4
    # four step checkpoints were written; the two that fell out of the top 2 were removed, directories and all
    assert len(kept) == 3 and "last.ckpt" in kept and all(n.startswith("epoch=0-step=") for n in kept if n != "last.ckpt")
    for name in kept:
        check_checkpoint(ckpt_dir / name)


def test_async_save_does_not_change_training_and_resumes_exactly(train_job, trained, tmp_path):
    """Shards are written by a background thread from a snapshot; training goes on meanwhile and gives the same
    losses, and its step-3 checkpoint resumes bit for bit like the synchronous one."""
    result, _ = trained
    ckpt_dir = tmp_path / "async"
    run = train_job(*ARGS, *TAW_2X2, "--steps", "6", "--checkpoint_dir", str(ckpt_dir), "--every_n_steps", "3",
                    "--async_save", node_ranks=2)
    assert run["losses"] == result["losses"]
    assert {p.name for p in ckpt_dir.iterdir()} == {"epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"}
    resumed = train_job(*ARGS, *TAW_2X2, "--steps", "6", "--resume", str(ckpt_dir / "epoch=0-step=3.ckpt"),
                        node_ranks=2)
    assert resumed["losses"] == result["losses"][3:]


def test_async_save_error_surfaces_at_the_next_save_or_teardown(tmp_path, monkeypatch):
    from concurrent.futures import Future

    import torch.distributed.checkpoint as dcp

    io = TawPipeCheckpointIO(async_save=True)
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, tmp_path / "good.ckpt")

    def background_write_fails(*args, **kwargs):
        future = Future()
        future.set_exception(OSError("No space left on device"))
        return future

    monkeypatch.setattr(dcp, "async_save", background_write_fails)
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 2}, tmp_path / "bad.ckpt")  # returns at once
    with pytest.raises(CheckpointError, match="bad.ckpt failed.*No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 3}, tmp_path / "next.ckpt")
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 4}, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="last.ckpt failed"):
        io.teardown()
    assert not (tmp_path / "bad.ckpt").exists() and not (tmp_path / "last.ckpt").exists()
    good = io.load_checkpoint(tmp_path / "good.ckpt")
    assert good["step"] == 1 and torch.equal(good["state_dict"]["w"], torch.ones(3))


def test_bad_checkpoints_are_refused_clearly(trained, tmp_path):
    _, ckpt_dir = trained
    good = ckpt_dir / "epoch=0-step=3.ckpt"
    with pytest.raises(CheckpointError, match="No checkpoint"):
        check_checkpoint(tmp_path / "nope.ckpt")
    broken = tmp_path / "broken.ckpt"
    shutil.copytree(good, broken)
    os.remove(broken / ".metadata")
    with pytest.raises(CheckpointError, match="lacks .metadata"):
        check_checkpoint(broken)
    lost_shard = tmp_path / "lost-shard.ckpt"
    shutil.copytree(good, lost_shard)
    os.remove(lost_shard / "__2_0.distcp")
    with pytest.raises(CheckpointError, match="__2_0.distcp listed in its index are missing"):
        check_checkpoint(lost_shard)
    truncated = tmp_path / "truncated.ckpt"
    shutil.copytree(good, truncated)
    with open(truncated / "meta.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="corrupt"):
        TawPipeCheckpointIO().load_checkpoint(truncated)
    bad_file = tmp_path / "bad.ckpt"
    bad_file.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        TawPipeCheckpointIO().load_checkpoint(bad_file)
    # another model: shapes are checked before anything is read
    other = {"model.transformer.wte.weight": torch.empty(256, 64)}
    with pytest.raises(CheckpointError, match="different model"):
        load_local_shards(good, other, [])
    with pytest.raises(CheckpointError, match="lacks 1 parameter"):
        load_local_shards(good, {"model.transformer.h.9.attn.qkv.weight": torch.empty(1)}, [])
