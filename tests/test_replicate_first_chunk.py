"""``replicate_first_chunk``: chunk 0 mirrored on every node trains exactly like ``ddp``, and its copies stay equal.

One 3-node x 2-rank job (three holders of chunk 0, so the all-reduce that sums its gradient has more than two members)
with two micro-batches, gradient accumulation over two batches (the holders must sum once per optimizer step, not
per batch) and norm clipping (a mirror's gradient must not count twice in the global norm), checkpointing every two
steps. Against ``ddp`` with the same settings: same losses (1e-5) and weights; chunk 0's owner and mirrors hold the
same weights and optimizer state bit for bit. Its step-2 checkpoint resumes bit for bit with the knob, and under the
default (no mirrors) like ``ddp`` resumed from it.
"""

import pytest
import torch
from litgpt import GPT

from lightning_tawpipe.module import tiny_llama_config
from lightning_tawpipe.partition import partition_units
from lightning_tawpipe.runtime.units import find_units

ARGS = ("--steps", "4", "--accumulate", "2", "--clip_val", "0.05", "--lr", "3e-3", "--seq_length", "32",
        "--n_embd", "32", "--n_layer", "6", "--batch_size", "2", "--n_microbatches", "2")
TAW_3X2 = ("--strategy", "tawpipe", "--devices", "6", "--group_size", "2")


def _close(xs, ys, rel):
    assert len(xs) == len(ys) > 0
    for step, (x, y) in enumerate(zip(xs, ys)):
        assert abs(x - y) <= rel * abs(y), f"batch {step}: {x} vs {y}"


@pytest.fixture(scope="module")
def mirrored(train_job, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("mirrored")
    result = train_job(*ARGS, *TAW_3X2, "--replicate_first_chunk", "--checkpoint_dir", str(ckpt_dir),
                       "--every_n_steps", "2")
    return result, ckpt_dir


def test_matches_ddp_and_mirrors_stay_identical(train_job, mirrored):
    result, _ = mirrored
    reference = train_job(*ARGS, "--strategy", "ddp", "--devices", "6")
    assert len(result["losses"]) == 8  # batches: 4 optimizer steps of 2
    _close(result["losses"], reference["losses"], 1e-5)
    for name, ref in reference["state_dict"].items():
        torch.testing.assert_close(result["state_dict"][name], ref, rtol=0, atol=1e-4, msg=name)
    assert "chunk 0 replicated on ranks [0, 2, 4]" in result["log"]
    digests = result["first_chunk_digests"]
    assert [d is not None for d in digests] == [True, False, True, False, True, False]
    assert len({d for d in digests if d}) == 1, digests  # owner and both mirrors: same weights and Adam moments
    # the holders' all-reduce (ring: 2 (N - 1) / N of chunk 0's fp32 gradient from each) is in the engine's figures,
    # carried into the first batch after each optimizer step: batch 2 sends that much more than batch 0 on a holder
    units = find_units(GPT(tiny_llama_config(n_layer=6, n_embd=32, block_size=32)))
    chunk0 = sum(units[u].numel() for u in partition_units([u.numel() for u in units], 6)[0])
    for rank, per_batch in enumerate(result["comm_per_rank"]):
        extra = 4 * chunk0 * 2 * 2 // 3 if digests[rank] else 0
        assert per_batch[2][0] - per_batch[0][0] == extra and per_batch[1][0] == per_batch[3][0], rank
    # the mirrors hold chunk 0's state on top of their own: the total exceeds ddp's per-rank total by two copies
    per_rank, ddp_total = result["model_state_bytes"], reference["model_state_bytes"][0]
    extra = sum(per_rank) - ddp_total
    assert per_rank[2] - per_rank[3] > 0.5 * extra / 2 and extra > 0


def test_resumes_exactly_and_without_mirrors(train_job, mirrored):
    result, ckpt_dir = mirrored
    step2 = str(ckpt_dir / "epoch=0-step=2.ckpt")
    resumed = train_job(*ARGS, *TAW_3X2, "--replicate_first_chunk", "--resume", step2)
    assert resumed["losses"] == result["losses"][4:]  # bit for bit: mirrors reload chunk 0 and its Adam moments
    for name, value in result["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)
    assert len({d for d in resumed["first_chunk_digests"] if d}) == 1
    plain = train_job(*ARGS, *TAW_3X2, "--resume", step2)  # the checkpoint holds chunk 0 once: any layout reads it
    _close(plain["losses"], result["losses"][4:], 1e-5)


def test_bf16_mixed_mirrors_sum_in_bf16_and_stay_identical(train_job):
    """Under bf16-mixed the holders sum chunk 0's gradient in bf16, the precision every gradient crosses nodes in
    (half the bytes of the fp32 accumulators), and still end identical; the losses follow ddp's to the bound the
    precision tests use for bf16-mixed (2e-3: half a bf16 ulp)."""
    args = ("--steps", "3", "--lr", "3e-3", "--seq_length", "32", "--n_embd", "32", "--n_layer", "4", "--batch_size",
            "2", "--precision", "bf16-mixed")
    result = train_job(*args, "--strategy", "tawpipe", "--devices", "4", "--group_size", "2",
                       "--replicate_first_chunk")
    reference = train_job(*args, "--strategy", "ddp", "--devices", "4")
    _close(result["losses"], reference["losses"], 2e-3)
    digests = result["first_chunk_digests"]
    assert digests[0] is not None and digests[0] == digests[2] and digests[1] is digests[3] is None
    units = find_units(GPT(tiny_llama_config(n_layer=4, n_embd=32, block_size=32)))
    chunk0 = sum(units[u].numel() for u in partition_units([u.numel() for u in units], 4)[0])
    holder = result["comm_per_rank"][2]
    assert holder[1][0] - holder[0][0] == 2 * chunk0  # bf16, two holders: each sends the whole gradient once


def test_gradients_kept_across_an_optimizer_step_are_summed_once_across_holders():
    """A Fabric loop may keep its gradients through ``optimizer.step()`` and accumulate on (no ``zero_grad``). The
    holders then all hold the step's sum, so if each simply undid the averaging, their next exchange would count it
    once per holder. ``Pipeline.resume_accumulation`` leaves it with the owner and starts each mirror from zero."""
    from types import SimpleNamespace

    from lightning_tawpipe.runtime.pipeline import Pipeline

    world, holders = 6, 3
    summed = torch.randn(8, dtype=torch.float64)  # the step's gradient sum, which finalize_gradients averaged
    owner = SimpleNamespace(grad_acc=summed / world)
    mirrors = [SimpleNamespace(grad_acc=summed / world) for _ in range(holders - 1)]
    for m in mirrors:
        m.zero_grad = m.grad_acc.zero_
    Pipeline.resume_accumulation(SimpleNamespace(shard=owner, mirror=None, topo=SimpleNamespace(world_size=world)))
    for m in mirrors:
        Pipeline.resume_accumulation(SimpleNamespace(shard=SimpleNamespace(grad_acc=torch.zeros(8)), mirror=m,
                                                     topo=SimpleNamespace(world_size=world)))
    new = [torch.randn(8, dtype=torch.float64) for _ in range(holders)]  # each node's next gradients
    total = owner.grad_acc + new[0] + sum(m.grad_acc + n for m, n in zip(mirrors, new[1:]))  # the holders' sum
    torch.testing.assert_close(total, summed + sum(new))
