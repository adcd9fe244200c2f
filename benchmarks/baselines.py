"""Baseline strategies for the speed benchmark: one factory for TawPipe and every data-parallel competitor.

The benchmark worker builds, per run::

    module = make_module(name, cfg, learning_rate=lr)
    strategy = make_strategy(name, topology=(num_nodes, devices), n_microbatches=M, prefetch=d)
    Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, ...)

Why the FSDP baselines need code at all (measured on this CPU/gloo testbed, see
``shared/research/lightning-litgpt.md`` §4 and ``shared/design/overview.md``):

* ``FSDPStrategy`` refuses ``accelerator="cpu"`` by exact type check, and once subclassed it passes
  ``device_id=root_device.index`` (``None`` on CPU), which FSDP1 rejects. :class:`CPUFSDPStrategy` passes
  ``device_id=cpu`` instead.
* ``HYBRID_SHARD`` without a mesh builds its intra-node group from the *CUDA* device count: on CPU every rank
  ends up alone in its shard group and FSDP silently switches to ``NO_SHARD`` (4 independent models, different
  losses, no error). :class:`CPUHSDPStrategy` builds an explicit ``("replicate", "shard")`` DeviceMesh on the CPU
  process group and hands it to FSDP1 as ``device_mesh=``.
* Both classes check after wrapping that every rank really holds only its shard (``1/shard_size`` of the
  parameters), so a silent degradation fails the run instead of producing a fast, wrong baseline.

``fsdp2`` needs no strategy hack (``ModelParallelStrategy`` works on CPU) but the module has to apply
``fully_shard`` itself: :class:`FSDP2LitGPTModule`.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from litgpt import Config
from litgpt.model import GPT, Block
from torch import nn
from typing_extensions import override

from lightning_tawpipe.module import LitGPTModule, fully_shard_blocks

STRATEGIES = ("tawpipe", "weipipe", "ddp", "fsdp", "hsdp", "fsdp2", "compute")
"""Names accepted by :func:`make_strategy` and :func:`make_module`."""

# FSDP1 pads each flat parameter to a multiple of the shard count; allow that much (plus rounding) on top of
# the ideal 1/shard_size share before calling a rank "not sharded".
_SHARD_SLACK = 1.05


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) made to run on CPU/gloo, with a check that it really shards.

    Mirrors ``FSDPStrategy._setup_model`` except for ``device_id=torch.device("cpu")``: upstream passes the
    device *index*, which is ``None`` on CPU and makes FSDP1 raise "FSDP needs a non-CPU accelerator device"
    (Lightning issue #21812). After wrapping, :meth:`_verify_sharding` asserts every rank holds about
    ``1/shard_size`` of the parameters and no FSDP unit fell back to ``NO_SHARD``.
    """

    def _shard_size(self) -> int:
        """Ranks one parameter is split over (the whole world for ``FULL_SHARD``)."""
        return self.world_size

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return model
        total = sum(p.numel() for p in model.parameters())
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        self._verify_sharding(model, total)
        return model

    def _verify_sharding(self, model: nn.Module, total: int) -> None:
        """Raise unless this rank's flat parameters are ~``total / shard_size`` and no unit is ``NO_SHARD``."""
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
        strategies = {m.sharding_strategy for m in units}
        if strategies != {self.sharding_strategy}:
            raise RuntimeError(
                f"{type(self).__name__}: expected every FSDP unit to use {self.sharding_strategy.name}, got "
                f"{sorted(s.name for s in strategies)} (FSDP degrades to NO_SHARD when a shard group has 1 rank)."
            )
        shard_size = self._shard_size()
        local = sum(p.numel() for p in model.parameters())
        if self.sharding_strategy is not ShardingStrategy.NO_SHARD and local > _SHARD_SLACK * total / shard_size:
            raise RuntimeError(
                f"{type(self).__name__}: rank {self.global_rank} holds {local} of {total} parameters, expected "
                f"~{total // shard_size} (1/{shard_size}): the model is not sharded."
            )
        rank_zero_info(
            f"{type(self).__name__}: {len(units)} FSDP units, {self.sharding_strategy.name}, "
            f"rank 0 holds {local}/{total} parameters (shard size {shard_size})"
        )


class CPUHSDPStrategy(CPUFSDPStrategy):
    """Hybrid sharding on CPU: shard inside a node, replicate across nodes, from an explicit 2-D DeviceMesh.

    ``mesh_shape = (replicas, shard_size)``: rank ``r`` sits at ``(r // shard_size, r % shard_size)``, so with
    ``mesh_shape = (num_nodes, devices)`` the shard groups are exactly the nodes (Lightning numbers ranks
    ``node_rank * devices + local_rank``) and only the gradient all-reduce of each shard crosses nodes. A mesh
    different from the Trainer's layout (e.g. ``(2, 2)`` on ``devices=4, num_nodes=1``) emulates nodes on one
    machine. The mesh is built in :meth:`setup_environment`, after the gloo process group exists; passing a
    tuple to ``FSDPStrategy(device_mesh=...)`` instead would build a *CUDA* mesh and fail on CPU.
    """

    def __init__(self, mesh_shape: tuple[int, int], **kwargs: Any) -> None:
        kwargs.setdefault("sharding_strategy", "HYBRID_SHARD")
        super().__init__(**kwargs)
        replicas, shard_size = (int(x) for x in mesh_shape)
        if replicas < 1 or shard_size < 1:
            raise ValueError(f"mesh_shape must be two positive ints, got {mesh_shape}")
        self.mesh_shape = (replicas, shard_size)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        replicas, shard_size = self.mesh_shape
        if replicas * shard_size != self.world_size:
            raise ValueError(
                f"HSDP mesh {self.mesh_shape} has {replicas * shard_size} ranks but the world size is {self.world_size}"
            )
        self.kwargs["device_mesh"] = init_device_mesh(
            "cpu", self.mesh_shape, mesh_dim_names=("replicate", "shard")
        )

    @override
    def _shard_size(self) -> int:
        return self.mesh_shape[1]


class FSDP2LitGPTModule(LitGPTModule):
    """``LitGPTModule`` that applies FSDP2 (``fully_shard``) itself, as ``ModelParallelStrategy`` requires.

    Every ``Block`` becomes its own FSDP2 unit (all-gathered just before it runs, freed after), then the root
    ``GPT`` groups the remaining parameters (embedding, final norm, LM head). Sharding is over the strategy's
    ``"data_parallel"`` mesh dimension, which :func:`make_strategy` sizes to the whole world.
    """

    @override
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this hook again for later stages (validate, test)
            return
        self.model = fully_shard_blocks(GPT(self.config), self.device_mesh["data_parallel"])


class ComputeOnlyStrategy(DDPStrategy):
    """The compute-only reference: DDP's processes and sampler, but no gradient synchronisation at all.

    Every rank trains its own full replica on its own batch, so it does each rank's forward and backward with no
    communication while the job's processes share the machine exactly as in the real runs (the benchmark worker's
    per-step barriers keep them in lockstep). Timing it beside a strategy shows how much of that strategy's step
    is communication that compute did not hide.
    """

    def configure_ddp(self) -> None:
        pass  # no DistributedDataParallel wrapper: gradients stay local


def make_strategy(
    name: str, topology: tuple[int, int], n_microbatches: int = 1, prefetch: int = 1,
    activation_checkpointing: bool = False, reuse: int | None = None, partition: Any = "parameters",
    grad_buffers: int | None = None, replicate_first_chunk: bool | int = False, stripe: bool = False,
    microbatch_order: str = "sample",
) -> Union[Strategy, str]:
    """Return the strategy (instance or Lightning name) for baseline ``name`` on ``topology``.

    Arguments:
        name: one of :data:`STRATEGIES`.
        topology: ``(num_nodes, devices)``: nodes and processes per node. It usually equals the Trainer's
            ``(num_nodes, devices)``; a different factorisation of the same world emulates nodes on one machine
            (``hsdp`` shards over ``devices`` and replicates over ``num_nodes``; ``tawpipe``/``weipipe`` use
            ``devices`` as their group size).
        n_microbatches, prefetch, activation_checkpointing: TawPipe/WeiPipe knobs; ignored by the baselines.
        reuse: TawPipe's turn reuse (``None``: its default, ``prefetch``); ignored by every other strategy.
        partition: TawPipe/WeiPipe's cut into chunks (a method name or units per chunk); ignored by the baselines.
        grad_buffers: TawPipe's gradient buffers (``>= 2``; ``None``: its default); ignored by every other strategy.
        replicate_first_chunk: TawPipe's mirrors of chunk 0 (or the first N chunks) on every node; ignored by the
            others.
        stripe: TawPipe's striped weight transfers over every rank's rail; ignored by the others.
        microbatch_order: TawPipe's micro-batch order (``"sample"`` or ``"chunk"``); ignored by the others.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    num_nodes, devices = (int(x) for x in topology)
    if num_nodes < 1 or devices < 1:
        raise ValueError(f"topology must be (num_nodes >= 1, devices >= 1), got {topology}")
    if name in ("tawpipe", "weipipe"):
        from lightning_tawpipe import TawPipeStrategy

        # group_size=devices equals TawPipe's default (processes per node) when the topology is the Trainer's,
        # and regroups one machine's processes as emulated nodes when it is not.
        return TawPipeStrategy(n_microbatches=n_microbatches, prefetch=prefetch, schedule=name, group_size=devices,
                               activation_checkpointing=activation_checkpointing, partition=partition,
                               reuse=reuse if name == "tawpipe" else None,
                               grad_buffers=grad_buffers if name == "tawpipe" else None,
                               replicate_first_chunk=replicate_first_chunk if name == "tawpipe" else False,
                               stripe=stripe and name == "tawpipe",
                               microbatch_order=microbatch_order if name == "tawpipe" else "sample")
    if name == "ddp":
        return "ddp"
    if name == "compute":
        return ComputeOnlyStrategy()
    fsdp_kwargs: dict[str, Any] = dict(auto_wrap_policy={Block}, state_dict_type="sharded")
    if name == "fsdp":
        return CPUFSDPStrategy(sharding_strategy="FULL_SHARD", **fsdp_kwargs)
    if name == "hsdp":
        return CPUHSDPStrategy(mesh_shape=(num_nodes, devices), sharding_strategy="HYBRID_SHARD", **fsdp_kwargs)
    return ModelParallelStrategy(data_parallel_size=num_nodes * devices, tensor_parallel_size=1)


def make_module(name: str, cfg: Config, learning_rate: float, **kwargs: Any) -> LitGPTModule:
    """Return the LightningModule for baseline ``name``: ``LitGPTModule``, or its FSDP2 subclass for ``fsdp2``.

    Extra keyword arguments go to ``LitGPTModule`` (weight decay, betas, warmup). The caller seeds the RNG:
    every strategy builds the GPT in ``configure_model`` right after Lightning re-seeds, so equal seeds give
    equal initial weights across strategies.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    cls = FSDP2LitGPTModule if name == "fsdp2" else LitGPTModule
    return cls(cfg, learning_rate=learning_rate, **kwargs)
