"""Mixed and half precision, and frozen parameters, against DDP (real gloo processes, 2 emulated nodes x 2 ranks).

Tolerances, and why they are not fp32's 1e-5:

* ``bf16-mixed``: TawPipe computes with bf16 *copies* of the weights (FSDP's ``param_dtype`` semantics), so the
  residual stream runs in bf16, while DDP's autocast keeps fp32 parameters and runs element-wise ops in fp32. The
  two runs differ by bf16 rounding (unit roundoff 2^-8 = 3.9e-3) in activations; after 5 steps the losses agree to
  ~2e-4 relative. The bound, 2e-3, is half a bf16 ulp: a schedule bug (a wrong or stale chunk) moves the loss by
  more than 1e-2 at the first step that uses it.
* ``bf16-true``: everything (losses included) is bf16, so the bound is two bf16 ulps of the loss (1.2e-2 relative);
  masters and optimizer state are bf16 exactly as under DDP.
* ``16-mixed``: fp16 keeps 3 more mantissa bits than bf16; losses agree to ~1e-5, the bound is 2e-4. The scaler
  starts high enough that the first steps overflow: every rank must skip them together (the sharded scaler's
  all-reduced inf check), which a per-rank scaler fails by ~3e-2 (checked by hand: the shards diverge once some
  owners see finite gradients and others do not).
"""

import math

import pytest
import torch

COMMON = ("--steps", "5", "--lr", "3e-3", "--seq_length", "32", "--n_embd", "32", "--batch_size", "4", "--n_layer",
          "5", "--val_batches", "2")
TAWPIPE = ("--strategy", "tawpipe", "--devices", "2", "--num_nodes", "2", "--group_size", "0", "--n_microbatches",
           "2", "--prefetch", "2")
DDP = ("--strategy", "ddp", "--devices", "4")


def _assert_losses_close(result: dict, reference: dict, rel: float) -> None:
    assert len(result["losses"]) == len(reference["losses"])
    for step, (x, y) in enumerate(zip(result["losses"], reference["losses"])):
        assert abs(x - y) <= rel * abs(y), f"step {step}: loss {x} vs ddp {y} (rel {abs(x - y) / abs(y):.1e})"
    for name, ref in reference["validation"].items():  # perplexity = exp(loss): compare its log like a loss
        x, y = (math.log(result["validation"][name]), math.log(ref)) if name == "val_ppl" else (result["validation"][name], ref)
        assert abs(x - y) <= rel * abs(y), f"{name}: {result['validation'][name]} vs ddp {ref}"


def _expected_bytes_per_rank(element_size: int, lora: bool = False, stripe: bool = False, n_microbatches: int = 2):
    """(inter-node, intra-node, gradient) bytes each rank's program sends per step, from the schedule itself (a
    stripe: the chunk's weights, or its trainable prefix, over the node's ranks, rounded up)."""
    from lightning_tawpipe.module import tiny_llama_config
    from lightning_tawpipe.partition import partition_units
    from lightning_tawpipe.runtime.shard import ChunkLayout
    from lightning_tawpipe.runtime.units import find_units
    from lightning_tawpipe.schedule import build_tawpipe
    from lightning_tawpipe.topology import Topology
    from program_bytes import program_bytes

    cfg = tiny_llama_config(n_layer=5, n_embd=32, block_size=32)
    if lora:
        import dataclasses

        from litgpt.lora import GPT, Config, mark_only_lora_as_trainable

        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
        model = GPT(Config(**fields, lora_r=4, lora_alpha=8, lora_query=True, lora_value=True, lora_projection=True))
        mark_only_lora_as_trainable(model)
    else:
        from litgpt import GPT

        model = GPT(cfg)
    units = find_units(model)
    ranges = partition_units([u.numel() for u in units], 4)
    layout = ChunkLayout([[np for u in r for np in units[u].named_parameters()] for r in ranges])
    schedule = build_tawpipe(Topology(2, 2), n_microbatches=n_microbatches, prefetch=2, stripe=stripe)
    out = [program_bytes(schedule, rank, layout.numel, layout.n_trainable, element_size)
           for rank in range(schedule.topology.world_size)]
    return out, layout


@pytest.mark.parametrize("order", ["sample", "chunk"])
def test_bf16_mixed_matches_ddp_and_halves_the_traffic(train_job, order):
    """In chunk-major order a chunk's two micro-batches are summed in its bf16 gradient buffer before it leaves (a
    node's reduce sums its ranks' in bf16 too), and the bytes are those of one micro-batch's program."""
    result = train_job(*COMMON, *TAWPIPE, "--precision", "bf16-mixed", "--microbatch_order", order, node_ranks=2)
    reference = train_job(*COMMON, *DDP, "--precision", "bf16-mixed")
    _assert_losses_close(result, reference, rel=2e-3)
    assert result["losses"][-1] < result["losses"][0]
    # weights and gradients travel in bf16
    expected, _ = _expected_bytes_per_rank(element_size=2, n_microbatches=1 if order == "chunk" else 2)
    for rank, (per_step, grads) in enumerate(zip(result["comm_per_rank"], result["grad_bytes_per_rank"])):
        for step, g in zip(per_step, grads):
            assert [*step, g] == list(expected[rank]), f"rank {rank}: measured {step, g}, schedule {expected[rank]}"
    # owners keep fp32 masters: the gathered weights are fp32, like DDP's
    assert all(v.dtype == torch.float32 for k, v in result["state_dict"].items() if "weight" in k)
    # model state: fp32 masters + fp32 gradient accumulators + fp32 AdamW moments, split over 4 ranks
    assert abs(sum(result["model_state_bytes"]) - reference["model_state_bytes"][0]) <= 64 * 4


def test_bf16_true_matches_ddp(train_job):
    result = train_job(*COMMON, *TAWPIPE, "--precision", "bf16-true", node_ranks=2)
    reference = train_job(*COMMON, *DDP, "--precision", "bf16-true")
    _assert_losses_close(result, reference, rel=1.2e-2)
    for name, ref in reference["state_dict"].items():
        if ref.is_floating_point():
            assert result["state_dict"][name].dtype == ref.dtype == torch.bfloat16, name
    # bf16 masters, gradient accumulators and AdamW moments: half of DDP-bf16's per-rank total, summed over ranks
    assert abs(sum(result["model_state_bytes"]) - reference["model_state_bytes"][0]) <= 64 * 4


@pytest.mark.parametrize("order", ["sample", "chunk"])
def test_16_mixed_skips_overflowing_steps_on_every_rank_together(train_job, order):
    """In chunk-major order a chunk's micro-batches are summed in its fp16 gradient buffer, where ddp sums them in
    fp32: that sum can overflow where ddp's does not, never the other way round. Then every rank skips the step
    together and the scaler backs off, so the scale ends at most at ddp's and training goes on (measured: one more
    skip than ddp in these 8 steps, the losses equal before it)."""
    scale = ("--precision", "16-mixed", "--init_scale", str(2.0**20), "--steps", "8")
    result = train_job(*COMMON, *TAWPIPE, *scale, "--microbatch_order", order, node_ranks=2)
    reference = train_job(*COMMON, *DDP, *scale)
    if order == "chunk":
        assert result["grad_scale"] <= reference["grad_scale"] < 2.0**20
        assert all(math.isfinite(x) for x in result["losses"]) and result["losses"][-1] < result["losses"][0]
        assert all(torch.isfinite(v).all() for v in result["state_dict"].values())
        for x, y in zip(result["losses"][:4], reference["losses"][:4]):  # before the extra skip
            assert abs(x - y) <= 2e-4 * abs(y), (result["losses"], reference["losses"])
        return
    _assert_losses_close(result, reference, rel=2e-4)
    assert result["grad_scale"] == reference["grad_scale"] < 2.0**20  # overflow happened, skipped identically
    # fp16 gradient rounding flips AdamW's update sign for a few near-zero-gradient elements (up to 2 x lr apart);
    # on average the weights agree to ~1e-5, while fp16 vs fp32 training differs by ~7e-3 (measured)
    for name, ref in reference["state_dict"].items():
        diff = (result["state_dict"][name] - ref).abs()
        assert diff.mean() <= 1e-4 and diff.max() <= 1e-2, f"{name}: mean {diff.mean():.1e}, max {diff.max():.1e}"


def test_striped_bf16_lora_matches_ddp_and_sends_trainable_stripes(train_job):
    """Striped transfers under bf16-mixed with a LoRA model: stripes of weights and gradients travel in bf16, a
    gradient stripe covers only the trainable prefix (a frozen chunk sends none), and training equals DDP's."""
    result = train_job(*COMMON, *TAWPIPE, "--lora", "--stripe", "--precision", "bf16-mixed", node_ranks=2)
    reference = train_job(*COMMON, *DDP, "--lora", "--precision", "bf16-mixed")
    _assert_losses_close(result, reference, rel=2e-3)
    assert "striped over 2 rails" in result["log"]
    for name, ref in reference["state_dict"].items():
        if "lora_" not in name:  # frozen: bit for bit the initial weights, as under DDP
            assert torch.equal(result["state_dict"][name], ref), name
    expected, layout = _expected_bytes_per_rank(element_size=2, lora=True, stripe=True)
    assert 0 in layout.n_trainable, "expected a fully frozen chunk in this layout"
    for rank, (per_step, grads) in enumerate(zip(result["comm_per_rank"], result["grad_bytes_per_rank"])):
        for step, g in zip(per_step, grads):
            assert [*step, g] == list(expected[rank]), f"rank {rank}: measured {step, g}, schedule {expected[rank]}"


def test_frozen_parameters_send_no_gradients(train_job):
    """A LitGPT LoRA model (frozen base, trainable adapters): the same training as DDP, frozen weights unchanged,
    and gradient traffic only for the trainable prefix of each chunk (none at all for fully frozen chunks)."""
    result = train_job(*COMMON, *TAWPIPE, "--lora", node_ranks=2)
    reference = train_job(*COMMON, *DDP, "--lora")
    _assert_losses_close(result, reference, rel=1e-5)
    for name, ref in reference["state_dict"].items():
        torch.testing.assert_close(result["state_dict"][name], ref, rtol=0, atol=1e-4, msg=name)
    expected, layout = _expected_bytes_per_rank(element_size=4, lora=True)
    assert 0 in layout.n_trainable, "expected a fully frozen chunk (the embedding) in this layout"
    assert sum(layout.n_trainable) < 0.2 * sum(layout.numel)
    for rank, (per_step, grads) in enumerate(zip(result["comm_per_rank"], result["grad_bytes_per_rank"])):
        for step, g in zip(per_step, grads):
            assert [*step, g] == list(expected[rank]), f"rank {rank}: measured {step, g}, schedule {expected[rank]}"
