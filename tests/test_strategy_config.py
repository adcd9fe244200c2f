"""Strategy registration, knob checks at construction, batch splitting and unit discovery (no process group)."""

from __future__ import annotations

import lightning
import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from litgpt.model import GPT
from torch import nn

import lightning_tawpipe
from lightning_tawpipe import TawPipeStrategy
from lightning_tawpipe.module import tiny_llama_config
from lightning_tawpipe.runtime.units import find_units
from lightning_tawpipe.runtime.microbatch import split_batch


def make_trainer(strategy, devices: int = 2, **kwargs) -> lightning.Trainer:
    return lightning.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# -- registration ---------------------------------------------------------------------------------------------------


def test_import_registers_both_names():
    assert "tawpipe" in StrategyRegistry
    assert "weipipe" in StrategyRegistry
    assert StrategyRegistry["tawpipe"]["strategy"] is TawPipeStrategy
    assert StrategyRegistry["weipipe"]["strategy"] is TawPipeStrategy
    assert StrategyRegistry["weipipe"]["init_params"] == {"schedule": "weipipe"}


def test_register_is_idempotent():
    before = {name: dict(StrategyRegistry[name]) for name in ("tawpipe", "weipipe")}
    lightning_tawpipe.register()
    lightning_tawpipe.register()
    assert {name: dict(StrategyRegistry[name]) for name in ("tawpipe", "weipipe")} == before


def test_trainer_by_name_tawpipe():
    trainer = make_trainer("tawpipe")
    strategy = trainer.strategy
    assert isinstance(strategy, TawPipeStrategy)
    assert strategy.schedule == "tawpipe"
    assert (strategy.n_microbatches, strategy.prefetch, strategy.partition) == (1, 1, "parameters")
    assert strategy.grad_buffers is None  # by node count, resolved when the pipeline is built
    assert strategy.group_size is None
    assert strategy.validate_schedules is True
    assert trainer.world_size == 2
    topo = strategy.topology
    assert (topo.n_groups, topo.group_size) == (1, 2)  # one node of the trainer's two processes
    assert not (dist.is_available() and dist.is_initialized())  # nothing launched yet


def test_trainer_by_name_weipipe():
    strategy = make_trainer("weipipe").strategy
    assert isinstance(strategy, TawPipeStrategy)
    assert strategy.schedule == "weipipe"
    assert TawPipeStrategy(schedule="weipipe", grad_buffers=2).grad_buffers == 2  # the ring's own count: allowed


def test_trainer_uses_instance_as_is():
    mine = TawPipeStrategy(n_microbatches=4, prefetch=2)
    trainer = make_trainer(mine)
    assert trainer.strategy is mine
    assert (mine.n_microbatches, mine.prefetch, mine.schedule) == (4, 2, "tawpipe")


def test_topology_follows_nodes_and_group_size():
    topo = make_trainer("tawpipe", num_nodes=2).strategy.topology
    assert (topo.n_groups, topo.group_size) == (2, 2)
    topo = make_trainer(TawPipeStrategy(group_size=1), devices=4).strategy.topology
    assert (topo.n_groups, topo.group_size) == (4, 1)


# -- bad knobs fail at construction, before any process starts ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_microbatches": 0}, "n_microbatches"),
        ({"n_microbatches": -2}, "n_microbatches"),
        ({"n_microbatches": 2.0}, "n_microbatches"),
        ({"prefetch": 0}, "prefetch"),
        ({"schedule": "ring"}, "schedule must be one of"),
        ({"partition": "x"}, "partition must be one of"),
        ({"partition": [2, 0, 3]}, "explicit partition is a list of positive ints"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -1}, "group_size"),
        ({"prefetch": 1, "reuse": 2}, r"reuse must be an int in 1..prefetch=1 .*raise prefetch"),
        ({"prefetch": 2, "reuse": 0}, "reuse must be an int"),
        ({"schedule": "weipipe", "prefetch": 2, "reuse": 2}, "reuse applies to schedule='tawpipe' only"),
        ({"grad_buffers": 1}, r"grad_buffers must be an int >= 2 \(a backward step writes one buffer"),
        ({"grad_buffers": 3.0}, "grad_buffers must be an int"),
        ({"grad_buffers": True}, "grad_buffers must be an int"),
        ({"grad_buffers": 0}, r"grad_buffers must be an int >= 2 .* or None \(by node count\)"),
        ({"schedule": "weipipe", "grad_buffers": 3}, "grad_buffers applies to schedule='tawpipe' only"),
        ({"replicate_first_chunk": -1}, "replicate_first_chunk must be True, False or a number of leading chunks"),
        ({"replicate_first_chunk": 1.0}, "replicate_first_chunk must be True, False or a number of leading chunks"),
        ({"schedule": "weipipe", "replicate_first_chunk": True}, "replicate_first_chunk=True needs schedule='tawpipe'"),
        ({"replicas": 2, "replicate_first_chunk": True}, r"and one replica .*replicas=2"),
        ({"stripe": 1}, "stripe must be True or False"),
        ({"schedule": "weipipe", "stripe": True}, r"stripe=True needs schedule='tawpipe' \(the WeiPipe ring"),
        ({"microbatch_order": "chunk-major"}, r"microbatch_order must be one of \('sample', 'chunk'\)"),
        ({"schedule": "weipipe", "microbatch_order": "chunk"}, r"microbatch_order='chunk' needs schedule='tawpipe'"),
    ],
)
def test_bad_knobs_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TawPipeStrategy(**kwargs)


def test_group_size_must_divide_world():
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the world size 2"):
        make_trainer(TawPipeStrategy(group_size=3))
    assert not (dist.is_available() and dist.is_initialized())


def test_nccl_backend_rejected_on_cpu():
    with pytest.raises(ValueError, match=r"process_group_backend='nccl' on cpu"):
        make_trainer(TawPipeStrategy(process_group_backend="nccl"))


def test_gloo_backend_accepted_on_cpu():
    assert make_trainer(TawPipeStrategy(process_group_backend="gloo")).strategy._process_group_backend == "gloo"


# -- split_batch ----------------------------------------------------------------------------------------------------


def test_split_batch_dict():
    batch = {"input_ids": torch.arange(24).view(6, 4), "labels": torch.arange(6), "name": "keep"}
    pieces = split_batch(batch, 3)
    assert len(pieces) == 3
    for i, piece in enumerate(pieces):
        assert piece["name"] == "keep"
        assert torch.equal(piece["input_ids"], batch["input_ids"][2 * i : 2 * i + 2])
        assert torch.equal(piece["labels"], batch["labels"][2 * i : 2 * i + 2])


def test_split_batch_tuple_and_tensor():
    x, y = torch.randn(8, 3), torch.randint(0, 5, (8,))
    pieces = split_batch((x, y), 4)
    assert len(pieces) == 4 and all(isinstance(p, tuple) for p in pieces)
    assert torch.equal(torch.cat([p[0] for p in pieces]), x)
    assert torch.equal(torch.cat([p[1] for p in pieces]), y)
    assert all(p[0].shape == (2, 3) for p in pieces)
    assert [p.shape[0] for p in split_batch(x, 1)] == [8]


@pytest.mark.parametrize(("size", "n"), [(6, 4), (2, 4), (5, 2)])
def test_split_batch_rejects_uneven(size, n):
    with pytest.raises(ValueError, match=rf"n_microbatches={n} must divide the per-rank batch size {size}"):
        split_batch({"x": torch.zeros(size, 2)}, n)


def test_split_batch_rejects_mismatched_or_missing_tensors():
    with pytest.raises(ValueError, match="different leading sizes"):
        split_batch((torch.zeros(4), torch.zeros(6)), 2)
    with pytest.raises(ValueError, match="could not find a tensor"):
        split_batch({"a": [1, 2]}, 2)


# -- find_units -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(tiny_llama_config(n_layer=3, n_embd=32))


def test_find_units_rejects_plain_module():
    with pytest.raises(TypeError, match="pipeline_units") as info:
        find_units(nn.Linear(3, 3))
    assert "found none LitGPT GPT models in Linear" in str(info.value)


def test_find_units_rejects_two_gpts(tiny_gpt):
    holder = nn.Module()
    holder.a, holder.b = tiny_gpt, GPT(tiny_llama_config(n_layer=1, n_embd=32))
    with pytest.raises(TypeError, match="'a', 'b'"):
        find_units(holder)


def test_find_units_litgpt(tiny_gpt):
    units = find_units(tiny_gpt)
    assert len(units) == 2 + 3
    assert [name for name, _ in units[0].modules] == ["transformer.wte"]
    assert [name for name, _ in units[2].modules] == ["transformer.h.1"]
    assert [name for name, _ in units[-1].modules] == ["transformer.ln_f", "lm_head"]
    # every parameter lands in exactly one unit
    in_units = [p for u in units for _, p in u.named_parameters()]
    assert len(in_units) == len({id(p) for p in in_units}) == len(list(tiny_gpt.parameters()))
    assert sum(u.numel() for u in units) == sum(p.numel() for p in tiny_gpt.parameters())


def test_find_units_nested_prefix(tiny_gpt):
    holder = nn.Module()
    holder.model = tiny_gpt
    units = find_units(holder)
    assert len(units) == 5
    assert units[0].modules[0][0] == "model.transformer.wte"
    assert units[-1].named_parameters()[-1][0].startswith("model.lm_head.")


def test_find_units_rejects_tied_embeddings():
    gpt = GPT(tiny_llama_config(n_layer=2, n_embd=32))
    gpt.lm_head.weight = gpt.transformer.wte.weight
    with pytest.raises(ValueError, match="tied weights"):
        find_units(gpt)


def test_find_units_honours_pipeline_units():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10)

        def pipeline_units(self):
            return [[self.embed], [self.body], [self.norm, self.head]]

    model = Custom()
    units = find_units(model)
    assert [[name for name, _ in u.modules] for u in units] == [["embed"], ["body"], ["norm", "head"]]
    assert units[2].numel() == 8 + 50


def test_find_units_pipeline_units_take_precedence_over_gpt(tiny_gpt):
    class Wrapper(nn.Module):
        def __init__(self, gpt):
            super().__init__()
            self.model = gpt

        def pipeline_units(self):
            t = self.model.transformer
            return [[t.wte, t.h[0]], [t.h[1], t.h[2]], [t.ln_f, self.model.lm_head]]

    units = find_units(Wrapper(tiny_gpt))
    assert len(units) == 3
    assert [name for name, _ in units[1].modules] == ["model.transformer.h.1", "model.transformer.h.2"]


# -- precision -------------------------------------------------------------------------------------------------------


def test_default_precision_plugin_is_tawpipe_precision():
    from lightning_tawpipe import TawPipePrecision

    trainer = L.Trainer(strategy="tawpipe", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy.precision_plugin, TawPipePrecision)
    assert isinstance(trainer.precision_plugin, TawPipePrecision)


@pytest.mark.parametrize(
    "precision, param_dtype, master_dtype, peak_dtype",
    [("32-true", torch.float32, torch.float32, torch.float32),
     ("bf16-mixed", torch.bfloat16, torch.float32, torch.bfloat16),
     ("bf16-true", torch.bfloat16, torch.bfloat16, torch.bfloat16),
     ("16-true", torch.float16, torch.float16, torch.float16)],
)
def test_trainer_precision_becomes_tawpipe_precision(precision, param_dtype, master_dtype, peak_dtype):
    """Trainer(precision=...) gives a TawPipePrecision with the right traffic/master dtypes, and ThroughputMonitor
    measures MFU against the peak of the dtype the model really computes in (not fp32 for a bf16 run)."""
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    from lightning_tawpipe import TawPipePrecision

    trainer = L.Trainer(strategy="tawpipe", accelerator="cpu", devices=2, precision=precision, logger=False)
    plugin = trainer.precision_plugin
    assert isinstance(plugin, TawPipePrecision) and plugin.precision == precision
    assert (plugin.param_dtype, plugin.master_dtype) == (param_dtype, master_dtype)
    assert _plugin_to_compute_dtype(plugin) == peak_dtype


def test_16_mixed_gets_a_sharded_scaler():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from lightning_tawpipe import TawPipePrecision

    plugin = TawPipePrecision("16-mixed")
    plugin.bind_device("cpu")
    assert isinstance(plugin.scaler, ShardedGradScaler)  # its inf/nan check is all-reduced over every rank


@pytest.mark.parametrize("precision", ["64-true"])
def test_unsupported_precision_raises_at_construction(precision):
    with pytest.raises((TypeError, ValueError), match="TawPipe"):
        L.Trainer(strategy="tawpipe", accelerator="cpu", devices=2, precision=precision, logger=False)


def test_unknown_precision_string_for_the_plugin():
    from lightning_tawpipe import TawPipePrecision

    with pytest.raises(ValueError, match="bf16-mixed"):
        TawPipePrecision("fp8")


def test_cpu_runs_whose_micro_batches_run_on_threads_share_the_main_malloc_arena(monkeypatch):
    """Chunk-major order and the WeiPipe ring run micro-batches on threads: on CPU they keep to the main malloc arena
    (runtime/malloc.py), set before the process group starts its threads; other runs leave malloc alone."""
    from types import SimpleNamespace

    from lightning_tawpipe import environment
    from lightning_tawpipe.environment import TawPipeEnvironment

    calls = []
    monkeypatch.setattr(environment, "share_main_arena", lambda: calls.append(1) or True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)

    def limits(device, order, schedule):
        knobs = SimpleNamespace(root_device=device, microbatch_order=order, schedule=schedule)
        return TawPipeEnvironment._share_malloc_arena_if_interleaved(knobs)

    assert limits(cpu, "chunk", "tawpipe") and limits(cpu, "sample", "weipipe")
    assert not limits(cpu, "sample", "tawpipe") and not limits(cuda, "chunk", "tawpipe")
    assert len(calls) == 2
    strategy = TawPipeStrategy(microbatch_order="chunk")
    assert strategy.microbatch_order == "chunk" and hasattr(strategy, "_share_malloc_arena_if_interleaved")
