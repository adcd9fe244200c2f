"""``replicate_first_chunk``: mirrored chunks train exactly like ``ddp``, and their copies stay equal.

One 3-node x 2-rank job with chunks 0 and 1 mirrored (``replicate_first_chunk=2``: three holders of each, so the
all-reduce that sums a gradient has more than two members, and one rank mirrors both) with two micro-batches,
gradient accumulation over two batches (the holders must sum once per optimizer step, not per batch: inside the
program of the step's last iteration) and norm clipping (a mirror's gradient must not count twice in the global
norm), checkpointing every two steps. Against ``ddp`` with the same settings: same losses (1e-5) and weights; each
chunk's owner and mirrors hold the same weights and optimizer state bit for bit. Its step-2 checkpoint resumes bit
for bit with the knob, and under the default (no mirrors) like ``ddp`` resumed from it.
"""

import pytest
import torch
from litgpt import GPT

from lightning_tawpipe.module import tiny_llama_config
from lightning_tawpipe.partition import partition_units
from lightning_tawpipe.runtime.units import find_units
from lightning_tawpipe.schedule.tawpipe import build_tawpipe
from lightning_tawpipe.topology import Topology
from program_bytes import program_bytes

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
    result = train_job(*ARGS, *TAW_3X2, "--replicate_first_chunk", "2", "--checkpoint_dir", str(ckpt_dir),
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
    assert "chunk 1 replicated on ranks [2, 0, 4]" in result["log"]
    for chunk in ("0", "1"):
        digests = result["mirrored_digests"][chunk]
        assert [d is not None for d in digests] == [True, False, True, False, True, False]
        assert len({d for d in digests if d}) == 1, digests  # owner and both mirrors: same weights and Adam moments
    # the holders' all-reduces (ring: 2 (N - 1) / N of each chunk's fp32 gradient from each) are in the engine's
    # figures of the iteration that ends each optimizer step (batches 1 and 3), not of the accumulating ones; they
    # go unit by unit (each unit's as soon as its backward is done), so the bytes round per unit
    units = find_units(GPT(tiny_llama_config(n_layer=6, n_embd=32, block_size=32)))
    ranges = partition_units([u.numel() for u in units], 6)
    numel = [sum(units[u].numel() for u in r) for r in ranges]
    for rank, per_batch in enumerate(result["comm_per_rank"]):
        extra = sum(4 * units[u].numel() * 2 * 2 // 3 for c in (0, 1) for u in ranges[c]) if rank % 2 == 0 else 0
        assert per_batch[1][0] - per_batch[0][0] == extra, rank
        assert per_batch[0][0] == per_batch[2][0] and per_batch[1][0] == per_batch[3][0], rank
    # the mirrors hold their chunks' state (fp32 weights, gradient, two Adam moments) on top of their own: two copies
    # of chunks 0 and 1 more than ddp's per-rank total, on ranks 0, 2 and 4 (up to the few bytes every rank holds)
    per_rank, ddp_total = result["model_state_bytes"], reference["model_state_bytes"][0]
    assert sum(per_rank) - ddp_total == pytest.approx(16 * 2 * (numel[0] + numel[1]), rel=1e-3)
    assert per_rank[4] - per_rank[5] > per_rank[0] - per_rank[1] > 0  # rank 4 mirrors both chunks


def test_resumes_exactly_and_without_mirrors(train_job, mirrored):
    result, ckpt_dir = mirrored
    step2 = str(ckpt_dir / "epoch=0-step=2.ckpt")
    resumed = train_job(*ARGS, *TAW_3X2, "--replicate_first_chunk", "2", "--resume", step2)
    assert resumed["losses"] == result["losses"][4:]  # bit for bit: mirrors reload their chunks and Adam moments
    for name, value in result["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)
    assert all(len({d for d in digests if d}) == 1 for digests in resumed["mirrored_digests"].values())
    plain = train_job(*ARGS, *TAW_3X2, "--resume", step2)  # the checkpoint holds chunk 0 once: any layout reads it
    _close(plain["losses"], result["losses"][4:], 1e-5)


def test_bf16_mixed_mirrors_sum_in_bf16_and_stay_identical(train_job):
    """Under bf16-mixed the holders sum chunk 0's gradient in bf16, the precision every gradient crosses nodes in
    (half the bytes of the fp32 accumulators), and still end identical; the losses follow ddp's to the bound the
    precision tests use for bf16-mixed (2e-3: half a bf16 ulp). With activation checkpointing, so the per-unit
    exchange also runs where each unit is recomputed in backward."""
    args = ("--steps", "3", "--lr", "3e-3", "--seq_length", "32", "--n_embd", "32", "--n_layer", "4", "--batch_size",
            "2", "--precision", "bf16-mixed")
    result = train_job(*args, "--strategy", "tawpipe", "--devices", "4", "--group_size", "2",
                       "--replicate_first_chunk", "--activation_checkpointing")  # recomputed units name themselves too
    reference = train_job(*args, "--strategy", "ddp", "--devices", "4")
    _close(result["losses"], reference["losses"], 2e-3)
    digests = result["mirrored_digests"]["0"]
    assert digests[0] is not None and digests[0] == digests[2] and digests[1] is digests[3] is None
    # bf16, two holders: each sends the whole gradient once, inside every iteration (each ends an optimizer step),
    # on top of what its program sends to the other node
    units = find_units(GPT(tiny_llama_config(n_layer=4, n_embd=32, block_size=32)))
    numel = [sum(units[u].numel() for u in r) for r in partition_units([u.numel() for u in units], 4)]
    schedule = build_tawpipe(Topology(2, 2), 2, prefetch=2, replicate_first_chunk=True, exchange=True)  # demo's
    for rank in (0, 2):
        sent = program_bytes(schedule, rank, numel, numel, itemsize=2)[0]  # its inter-node sends
        assert [batch[0] for batch in result["comm_per_rank"][rank]] == [sent + 2 * numel[0]] * 3, rank


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
    Pipeline.resume_accumulation(SimpleNamespace(shard=owner, mirrors={}, topo=SimpleNamespace(world_size=world)))
    for m in mirrors:
        Pipeline.resume_accumulation(SimpleNamespace(shard=SimpleNamespace(grad_acc=torch.zeros(8)), mirrors={0: m},
                                                     topo=SimpleNamespace(world_size=world)))
    new = [torch.randn(8, dtype=torch.float64) for _ in range(holders)]  # each node's next gradients
    total = owner.grad_acc + new[0] + sum(m.grad_acc + n for m, n in zip(mirrors, new[1:]))  # the holders' sum
    torch.testing.assert_close(total, summed + sum(new))


def test_an_exchange_without_a_step_after_it_is_carried_by_the_owner():
    """Fabric guesses that an iteration outside ``no_backward_sync`` ends the optimizer step and sums the mirrored
    gradients in its program. If another iteration follows before the step (a loop that accumulates without the
    context), every holder already has the sum: ``Pipeline.carry_exchanged_gradients`` leaves it with the owner and
    zeroes the mirrors, so the step's exchange counts it once."""
    from types import SimpleNamespace

    from lightning_tawpipe.runtime.pipeline import Pipeline

    first = [torch.randn(8, dtype=torch.float64) for _ in range(3)]  # each node's gradients before the guess
    summed = sum(first)  # what the in-program exchange left on every holder
    owner, *mirrors = (SimpleNamespace(grad_acc=summed.clone()) for _ in range(3))
    for m in mirrors:
        m.zero_grad = m.grad_acc.zero_
    for rank_mirrors in ({}, {0: mirrors[0]}, {0: mirrors[1]}):  # the owner's rank, then each mirror's
        taken = []
        engine = SimpleNamespace(take_exchanged=lambda: taken.append(0) or {0})  # the engine's in-program sums
        Pipeline.carry_exchanged_gradients(SimpleNamespace(engine=engine, mirrors=rank_mirrors))
        assert taken == [0]  # asked once, so the engine forgets them
    later = [torch.randn(8, dtype=torch.float64) for _ in range(3)]
    total = sum(h.grad_acc + g for h, g in zip((owner, *mirrors), later))  # the step's exchange
    torch.testing.assert_close(total, summed + sum(later))
