"""Turn a model into a TawPipe pipeline on this rank: partition, shard, wire the engine, and gather back.

This is everything the Lightning strategy (and, later, a Fabric strategy) needs, with no Lightning in it:

1. find the model's pipeline units and cut them into one chunk per rank (``partition.py``);
2. give every rank the chunk it owns under the schedule's placement, with rank 0's initial values (the same
   starting point ``ddp`` gives by broadcasting rank 0's module), then free every module parameter's storage;
3. build the engine and route the units' forward/backward through it;
4. keep parameters that are in no unit as replicated, averaged across ranks like DDP;
5. with ``replicate_first_chunk``, keep a mirror of chunk 0 (or of the first ``k`` chunks) on every other node and sum
   its gradient across the holders once per optimizer step (``schedule/tawpipe.py`` says why);
6. gather a full state dict back to one rank when someone asks (export, checks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from lightning_tawpipe import init
from lightning_tawpipe.partition import partition_units
from lightning_tawpipe.runtime import units as unit_hooks
from lightning_tawpipe.runtime.comm import Comm
from lightning_tawpipe.runtime.engine import Engine
from lightning_tawpipe.runtime.shard import ChunkLayout, OwnedShard
from lightning_tawpipe.schedule import build_tawpipe, validate, with_user_barriers
from lightning_tawpipe.schedule.program import ORDERS, Schedule
from lightning_tawpipe.schedule.tawpipe import chunk_mirrors, default_grad_buffers, default_reuse, mirrored_chunk_count
from lightning_tawpipe.replicas import ReplicaLayout
from lightning_tawpipe.topology import Topology, ring_owner, tawpipe_owner

SCHEDULES = ("tawpipe", "weipipe")


def check_replicate_first_chunk(replicate_first_chunk, schedule: str, n_replicas: int) -> None:
    """Mirrored chunks need nodes to mirror them in (TawPipe's groups, not the WeiPipe ring) and a single replica:
    the outer loop of several replicas would update a chunk's owner but not its mirrors. Checked where a user sets
    it (the strategy, at construction) and where the runtime is built directly (``Pipeline``); how many chunks there
    are to mirror is known only at setup (:func:`mirrored_chunk_count`)."""
    if not (isinstance(replicate_first_chunk, int) and replicate_first_chunk >= 0):  # bool is an int
        raise ValueError(f"replicate_first_chunk must be True, False or a number of leading chunks to mirror, got "
                         f"{replicate_first_chunk!r}.")
    if replicate_first_chunk and (schedule != "tawpipe" or n_replicas != 1):
        raise ValueError(f"replicate_first_chunk={replicate_first_chunk!r} needs schedule='tawpipe' and one replica "
                         "(the WeiPipe ring has no nodes to mirror chunks in, and the outer loop of several replicas "
                         "would update a chunk's owner but not its mirrors); got "
                         f"schedule={schedule!r}, replicas={n_replicas!r}.")


def check_stripe(stripe, schedule: str) -> None:
    """Striped transfers (``stripe``) are a TawPipe schedule's: the WeiPipe ring passes whole chunks between
    neighbours. Checked where a user sets it and where the runtime is built directly."""
    if not isinstance(stripe, bool):
        raise ValueError(f"stripe must be True or False, got {stripe!r}.")
    if stripe and schedule != "tawpipe":
        raise ValueError(f"stripe=True needs schedule='tawpipe' (the WeiPipe ring passes whole chunks from rank to "
                         f"rank); got schedule={schedule!r}.")


def check_microbatch_order(order, schedule: str) -> None:
    """Chunk-major order (``microbatch_order="chunk"``) is a TawPipe schedule's: the WeiPipe ring passes chunks
    around in its own order. Checked where a user sets it and where the runtime is built directly."""
    if order not in ORDERS:
        raise ValueError(f"microbatch_order must be one of {ORDERS} ('sample': each micro-batch forward and backward "
                         f"in turn, the paper's order; 'chunk': every micro-batch through a chunk while it is "
                         f"resident), got {order!r}.")
    if order == "chunk" and schedule != "tawpipe":
        raise ValueError(f"microbatch_order='chunk' needs schedule='tawpipe' (the WeiPipe ring has its own order); "
                         f"got schedule={schedule!r}.")


class Pipeline:
    """The sharded, pipelined view of ``root`` on this rank."""

    def __init__(
        self,
        root: nn.Module,
        topo: Topology,
        *,
        schedule: str = "tawpipe",
        prefetch: int = 1,
        reuse: int | None = None,
        grad_buffers: int | None = None,
        partition: str | Sequence[int] = "parameters",
        device: torch.device,
        param_dtype: torch.dtype = torch.float32,
        master_dtype: torch.dtype = torch.float32,
        validate_schedules: bool = True,
        p2p_groups: str = "rail",
        activation_checkpointing: bool = False,
        initial_state: dict[str, torch.Tensor] | None = None,
        initial_state_strict: bool = True,
        replicas: ReplicaLayout | None = None,
        replicate_first_chunk: bool | int = False,
        stripe: bool = False,
        microbatch_order: str = "sample",
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {schedule!r}; choose one of {SCHEDULES}.")
        check_replicate_first_chunk(replicate_first_chunk, schedule, replicas.n_replicas if replicas else 1)
        check_stripe(stripe, schedule)
        self.stripe = bool(stripe)
        check_microbatch_order(microbatch_order, schedule)
        self.microbatch_order = microbatch_order
        self.topo, self.schedule_name, self.prefetch, self.partition = topo, schedule, prefetch, partition
        self.reuse = reuse
        self.replicate_first_chunk = replicate_first_chunk
        # None: by the node count (resolved here so the layout line and the planner say what runs)
        self.grad_buffers = default_grad_buffers(topo, grad_buffers) if schedule == "tawpipe" else grad_buffers
        self.replicas = replicas or ReplicaLayout((topo,))
        self.comm = Comm.build(topo, device.type, ring_peers=(schedule == "weipipe"), p2p_groups=p2p_groups,
                               replicas=self.replicas)
        self.rank, self.replica = self.comm.rank, self.comm.replica  # replica-local rank
        self.root = root
        self.units = unit_hooks.find_units(root)
        ranges, self.owners = self.placement(topo)
        self.chunk_units = ranges
        self.chunk_of_unit = [c for c, r in enumerate(ranges) for _ in r]
        self.layout = self._layout(ranges)
        self._check_same_model_everywhere()
        self.owned_chunk = self.owners.index(self.rank)
        self.meta_init = init.has_meta_tensors(root)
        initial = self._materialize_owned_chunk(root, device) if self.meta_init else self._initial_weights(device)
        self.shard = OwnedShard(self.layout, self.owned_chunk, initial, master_dtype)
        if initial_state is not None:
            self._load_initial_state(root, initial_state, initial_state_strict)
        n_mirrored = mirrored_chunk_count(replicate_first_chunk, topo.world_size)  # a bad count fails on one node too
        # the ranks that hold each mirrored chunk (its owner and mirrors, one rail) sum its gradient before every step
        self.holders = [(self.owners[c],) + m for c, m in enumerate(chunk_mirrors(topo, n_mirrored))]
        self.mirrors: dict[int, OwnedShard] = {}  # chunk -> this rank's mirror of it
        for c, holders in enumerate(self.holders):
            if self.rank in holders[1:]:
                fresh = torch.empty(self.layout.numel[c], dtype=self.shard.weights.dtype, device=device)
                self.mirrors[c] = OwnedShard(self.layout, c, fresh, master_dtype)
        self.sync_mirrors()
        in_units = set(self.layout.chunk_of_param())
        self.replicated = [p for p in root.parameters() if p not in in_units]
        for p in self.replicated:
            dist.broadcast(p.data, src=0)
        self._validate = validate_schedules
        self.engine = Engine(self.comm, self.layout, self.shard, self._build_schedule, param_dtype, device,
                             activation_checkpointing=activation_checkpointing, mirrors=self.mirrors,
                             watch_inputs=device.type == "cpu", mirrored_chunks=bool(self.holders),
                             unit_slices=self._unit_gradient_slices())
        unit_hooks.install(self.units, self.chunk_of_unit, self.engine)

    def _unit_gradient_slices(self) -> list[tuple[int, int, int]]:
        """Per unit, ``(chunk, start, end)`` of its gradients in its chunk's gradient prefix: trainable parameters
        come first in a chunk's layout, unit after unit, so each unit's are one range (empty for a frozen unit)."""
        entry_of = {e.param: e for entries in self.layout.entries for e in entries}
        out = []
        for unit, chunk in zip(self.units, self.chunk_of_unit):
            trainable = [entry_of[p] for _, p in unit.named_parameters() if p.requires_grad]
            start = min((e.offset for e in trainable), default=0)
            out.append((chunk, start, max((e.offset + e.numel for e in trainable), default=start)))
        return out

    def _check_same_model_everywhere(self) -> None:
        """Every rank must have cut the same model the same way, or transfers would silently mismatch in size."""
        mine = [(e.name, tuple(e.shape), str(e.dtype), e.param.requires_grad) for es in self.layout.entries for e in es]
        mine = sorted(mine)  # replicas of other shapes cut the same model differently
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for rank, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                diff = next((f"{a} vs {b}" for a, b in zip(everyone[0], theirs) if a != b),
                            f"{len(everyone[0])} vs {len(theirs)} parameters")
                raise RuntimeError(
                    f"Rank {rank} built a different model than rank 0 (parameter name, shape, dtype, requires_grad: "
                    f"{diff}). Every rank must construct the same model with the same config and freeze the same "
                    "parameters before fit."
                )

    # -- placement and schedules -----------------------------------------------------------------------------------
    def placement(self, topo: Topology) -> tuple[list[range], list[int]]:
        """How a replica of shape ``topo`` cuts the model: the units of each chunk, and each chunk's local owner."""
        ranges = partition_units([u.numel() for u in self.units], topo.world_size, self.partition)
        if self.schedule_name == "weipipe":
            return ranges, [ring_owner(c, topo.world_size) for c in range(topo.world_size)]
        return ranges, [tawpipe_owner(c, topo) for c in range(topo.world_size)]

    def _layout(self, ranges: list[range]) -> ChunkLayout:
        return ChunkLayout([[np for u in r for np in self.units[u].named_parameters()] for r in ranges])

    def owner_of_names(self, topo: Topology) -> dict[str, int]:
        """Parameter name -> local rank that owns it in a replica of shape ``topo`` (replicated ones: rank 0)."""
        ranges, owners = self.placement(topo)
        out = {name: owners[c] for c, r in enumerate(ranges) for u in r for name, _ in self.units[u].named_parameters()}
        return {name: out.get(name, 0) for name, _ in self.root.named_parameters()}

    def _build_schedule(self, train: bool, n_microbatches: int, exchange: bool = False) -> Schedule:
        """The programs of one iteration; ``exchange``: it ends an optimizer step, so the holders of mirrored chunks
        sum their gradients inside it (``XG``)."""
        if self.schedule_name == "weipipe":
            from lightning_tawpipe.schedule.weipipe import build_weipipe as builder
        else:
            builder = partial(build_tawpipe, reuse=self.reuse, grad_buffers=self.grad_buffers,
                              replicate_first_chunk=self.replicate_first_chunk, exchange=exchange, stripe=self.stripe,
                              order=self.microbatch_order)
        schedule = builder(self.topo, n_microbatches, prefetch=self.prefetch, train=train)
        if self._validate:
            validate(schedule)
            if self.schedule_name == "tawpipe":  # TawPipe promises to survive collectives in user code
                validate(with_user_barriers(schedule))
        return schedule

    # -- mirrored chunks (replicate_first_chunk) -----------------------------------------------------------------
    def held_shards(self) -> dict[int, OwnedShard]:
        """The mirrored chunks this rank holds (as owner or mirror), each with its copy."""
        return {c: self.mirrors.get(c, self.shard) for c, holders in enumerate(self.holders) if self.rank in holders}

    @property
    def mirrored_masters(self) -> set[nn.Parameter]:
        """The masters of this rank's mirrors: their owners count them in global norms, the mirrors must not."""
        return {m for mirror in self.mirrors.values() for m in mirror.params.values()}

    def sync_mirrors(self) -> None:
        """Copy each mirrored chunk's master weights from its owner to its mirrors (after init, loads and anything
        that set them); a collective over each chunk's holders (the ranks of its owner's local index: one rail),
        chunk by chunk in order, a no-op elsewhere."""
        for c, shard in self.held_shards().items():
            dist.broadcast(shard.weights, src=self.comm.base + self.owners[c], group=self.comm.lanes["grads"].rail_group)

    def _materialize_owned_chunk(self, root: nn.Module, device: torch.device) -> torch.Tensor:
        """Meta-device model: initialize only this rank's chunk (name-seeded, see ``lightning_tawpipe.init``).

        Units of other chunks get one-element placeholders with the right shapes; parameters and buffers outside
        the units (small: rope caches, anything replicated) are materialized on every rank, identically.
        """
        seed = torch.initial_seed()
        owned = set(self.chunk_units[self.owned_chunk])
        entries = self.layout.entries[self.owned_chunk]
        flat_dtype = entries[0].dtype if len({e.dtype for e in entries}) == 1 else torch.float32
        flat = torch.empty(self.layout.numel[self.owned_chunk], dtype=flat_dtype, device=device)
        # owned parameters are initialized directly inside the flat buffer that becomes the master copy
        views = self.layout.views(self.owned_chunk, flat)
        storage = {e.param: v for e, v in zip(entries, views) if e.dtype == flat_dtype}
        for u, unit in enumerate(self.units):
            for name, module in unit.modules:
                if any(b.is_meta for b in module.buffers()):
                    raise TypeError(
                        f"{name} has buffers on the meta device; TawPipe streams only parameters, so meta_init needs "
                        "units without buffers (LitGPT blocks have none). Build the model on a real device instead."
                    )
                if u in owned:
                    init.materialize(module, device, seed, name, storage=storage)
                else:
                    for p in module.parameters():
                        init.swap_in(p, init.placeholder(p, device))
        for name, module in root.named_modules():  # the rest: identical on every rank
            init.materialize(module, device, seed, name, recurse=False)
        if len(storage) < len(entries):  # mixed dtypes in one chunk: copy the stragglers in
            self.layout.gather(self.owned_chunk, flat)
        for e in entries:  # the master copy is all this rank keeps
            init.swap_in(e.param, init.placeholder(e.param, device))
        return flat

    def _load_initial_state(self, root: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
        """Copy pretrained weights (e.g. LitGPT's ``lit_model.pth``, memory-mapped) into this rank's chunk only.

        Keys may be relative to the GPT (``transformer.h.0...``, as LitGPT saves them) or to the LightningModule, and
        LitGPT LoRA layers (``qkv.linear.weight``) read the base checkpoint's ``qkv.weight``. With ``strict=False``,
        *trainable* parameters the file lacks keep their initialization (LoRA adapters on a base model); a missing
        frozen one is still an error, since it would silently stay random.
        """
        gpt = unit_hooks.find_gpt(root)
        prefix = next((f"{n}." for n, m in root.named_modules() if m is gpt and n), "") if gpt is not None else ""

        def key_of(name: str) -> str:
            for candidate in (name, name[len(prefix):] if name.startswith(prefix) else name):
                # LitGPT's LoRA layers wrap the original Linear as ``.linear``; base checkpoints lack that level
                for key in (candidate, candidate.replace(".linear.", ".")):
                    if key in state:
                        return key
            return name

        entries = self.layout.entries[self.owned_chunk]
        names = {e.name: key_of(e.name) for e in entries}
        missing = [e for e in entries if names[e.name] not in state]
        # without strict, only trainable parameters (adapters) may be absent: frozen ones would stay random
        refused = missing if strict else [e for e in missing if not e.param.requires_grad]
        if refused:
            raise KeyError(
                f"The initial weights lack {len(refused)} parameter(s) of this rank's chunk, e.g. "
                f"{[e.name for e in refused[:3]]}: they were saved from another model"
                f"{'' if not strict else ' (pass init_weights_strict=False to let trainable adapters keep their init)'}."
            )
        for e, view in zip(entries, self.layout.views(self.owned_chunk, self.shard.weights)):
            key = names[e.name]
            if key not in state:
                continue
            if tuple(state[key].shape) != tuple(e.shape):
                raise ValueError(f"{key} has shape {tuple(state[key].shape)} in the initial weights and "
                                 f"{tuple(e.shape)} in this model: the file belongs to another model config.")
            view.copy_(state[key].reshape(e.shape))
        in_chunks = {e.name for es in self.layout.entries for e in es}
        for name, p in root.named_parameters():  # replicated parameters: every rank copies them
            if name not in in_chunks and key_of(name) in state:
                p.data.copy_(state[key_of(name)])

    def _initial_weights(self, device: torch.device) -> torch.Tensor:
        """This rank's chunk with global rank 0's values: rank 0 sends every owner of every replica its chunk."""
        mine = torch.empty(self.layout.numel[self.owned_chunk], dtype=torch.float32, device=device)
        if dist.get_rank() == 0:
            works = []
            for r, topo in enumerate(self.replicas.topologies):
                ranges, owners = self.placement(topo)
                layout = self.layout if r == self.replica else self._layout(ranges)
                for c, owner in enumerate(owners):
                    flat = layout.gather(c, torch.empty(layout.numel[c], dtype=torch.float32, device=mine.device))
                    dst = self.replicas.offset(r) + owner
                    if dst == 0:
                        mine.copy_(flat)
                    else:
                        works.append(dist.isend(flat, dst=dst))
            for w in works:
                w.wait()
        else:
            dist.recv(mine, src=0)
        return mine

    # -- what the strategy calls ------------------------------------------------------------------------------------
    def release_module_weights(self) -> None:
        """Drop the module's full copy of the weights: from now on a chunk is resident only while it computes.

        Called after the optimizers are built, so ``configure_optimizers`` still sees real parameter shapes (code
        that splits param groups by ``p.ndim``, as LitGPT and nanoGPT do, must see the same groups as under ddp).
        """
        for c in range(self.layout.n_chunks):
            self.layout.unbind(c)

    def describe(self) -> str:
        """Which rank owns which units, for humans (printed by rank 0 at setup)."""
        lines = [
            f"TawPipe layout: schedule={self.schedule_name}, {self.topo.n_groups} node(s) x {self.topo.group_size} "
            f"rank(s), prefetch={self.prefetch}"
            + (f", reuse={default_reuse(self.prefetch, self.reuse)}, grad_buffers={self.grad_buffers}"
               if self.schedule_name == "tawpipe" else "")
            + (f", striped over {self.topo.group_size} rails" if self.stripe and self.topo.group_size > 1
               and self.topo.n_groups > 1 else "")
            + (", chunk-major micro-batches" if self.microbatch_order == "chunk" else "")
            + (f", replica {self.replica} of {self.replicas}" if self.replicas.n_replicas > 1 else "")
        ]
        for c, holders in enumerate(self.holders):
            lines.append(f"  chunk {c} replicated on ranks {list(holders)} (replicate_first_chunk: gradients "
                         "all-reduced between them once per optimizer step)")
        for c, units in enumerate(self.chunk_units):
            owner = self.owners[c]
            parts = _compress_block_labels([self.units[u].label for u in units])
            lines.append(
                f"  chunk {c}: rank {owner} (node {self.topo.group_of(owner)}, local {self.topo.local_index(owner)})"
                f"  {', '.join(parts)}  [{self.layout.numel[c]:,} params]"
            )
        if self.replicated:
            lines.append(f"  replicated on every rank: {sum(p.numel() for p in self.replicated):,} params")
        return "\n".join(lines)

    def finalize_gradients(self) -> None:
        """After the last backward of an optimizer step: owners expose the averaged gradient, replicas all-reduce."""
        world = self.topo.world_size  # this replica's ranks: replicas combine their models in the outer loop
        # the holders sum what the iteration did not (an iteration that ended the step sums inside its program)
        summed = self.engine.take_exchanged()
        self.engine.sum_mirrored_gradients([c for c in self.held_shards() if c not in summed])
        self.shard.attach_grads(1.0 / world)
        for mirror in self.mirrors.values():
            mirror.attach_grads(1.0 / world)
        for p in self.replicated:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.comm.replica_group)
            p.grad.div_(world)

    def resume_accumulation(self) -> None:
        """Accumulate on top of gradients an optimizer step has already seen (a Fabric loop that kept or zeroed them
        in place instead of setting them to None): undo :meth:`finalize_gradients`' averaging. Mirrors start from
        zero instead, because each mirrored chunk's owner carries the sum every holder has; otherwise the holders'
        next sum would count it once per holder."""
        self.shard.grad_acc.mul_(self.topo.world_size)
        for mirror in self.mirrors.values():
            mirror.zero_grad()

    def carry_exchanged_gradients(self) -> None:
        """Accumulate on after an iteration that summed mirrored chunks' gradients in its program but was not the
        last before the optimizer step (a guess the strategy could not make for sure): every holder now has the sum,
        so the owner keeps it and each mirror starts from zero, and the step sums them again (``finalize_gradients``
        sums every held chunk again once this is cleared)."""
        for c in self.engine.take_exchanged():
            if c in self.mirrors:
                self.mirrors[c].zero_grad()

    def zero_grad(self) -> None:
        self.shard.zero_grad()
        for mirror in self.mirrors.values():
            mirror.zero_grad()

    @property
    def masters(self) -> dict[nn.Parameter, nn.Parameter]:
        """Module parameter -> the master this rank steps for it: its shard's, and its mirrors'."""
        masters = dict(self.shard.params)
        for mirror in self.mirrors.values():
            masters.update(mirror.params)
        return masters

    def master_names(self, with_mirror: bool = True) -> dict[nn.Parameter, str]:
        """Master parameter -> name. ``with_mirror=False`` leaves out the mirrors: what a checkpoint saves from this
        rank (an owner saves its chunk; the mirrors read it back on load)."""
        names = self.shard.names()
        for mirror in self.mirrors.values() if with_mirror else ():
            names.update(mirror.names())
        return names

    def optimizer_params(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """Map a param group's module parameters to what this rank steps: its masters and the replicated ones."""
        lookup = self.masters
        masters = set(lookup.values())
        known = set(self.layout.chunk_of_param()) | set(self.replicated) | masters
        unknown = [p for p in params if p not in known]
        if unknown:
            raise ValueError(
                f"The optimizer holds {len(unknown)} parameter(s) that are not part of the model TawPipe sharded. "
                "Build optimizers from `self.parameters()` in `configure_optimizers`."
            )
        mine = set(lookup) | set(self.replicated) | masters
        return [lookup.get(p, p) for p in params if p in mine]

    def model_state_bytes(self, optimizer_state: dict | None = None) -> int:
        """Bytes of model state this rank holds: its shard (+ optimizer state) and any replicated parameters."""
        replicated = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in self.replicated)
        mirrors = sum(m.state_bytes(optimizer_state) for m in self.mirrors.values())
        return self.shard.state_bytes(optimizer_state) + mirrors + replicated

    def full_state_dict(self, root: nn.Module, dst: int = 0) -> dict[str, torch.Tensor]:
        """``root.state_dict()`` with every chunk parameter filled in, on rank ``dst`` (other ranks get ``{}``).

        With several replicas this is replica 0's model, gathered to its rank ``dst``.
        """
        if self.replica != 0:
            return {}
        works, flats = [], {}
        for c, owner in enumerate(self.owners):
            if self.rank == dst:
                flats[c] = torch.empty(self.layout.numel[c], dtype=self.shard.weights.dtype, device=self.shard.weights.device)
                if owner == dst:
                    flats[c].copy_(self.shard.weights)
                if owner != dst:
                    works.append(dist.irecv(flats[c], src=owner))
            elif owner == self.rank:
                works.append(dist.isend(self.shard.weights, dst=dst))
        for w in works:
            w.wait()
        if self.rank != dst:
            return {}
        state = {k: v for k, v in root.state_dict().items()}
        for c, flat in flats.items():
            for e, view in zip(self.layout.entries[c], self.layout.views(c, flat)):
                state[e.name] = view.clone().to(e.dtype)
        return state

    def local_state_dict(self, root: nn.Module, with_mirror: bool = False) -> dict[str, torch.Tensor]:
        """What this rank contributes to a sharded checkpoint: its chunk's masters (in each parameter's own dtype),
        plus everything outside the chunks (replicated parameters, persistent buffers), which every rank holds.
        ``with_mirror``: the mirrored chunks too (what the mirrors read on load; the owner alone saves a chunk)."""
        in_chunks = {e.name for entries in self.layout.entries for e in entries}
        state = {k: v for k, v in root.state_dict().items() if k not in in_chunks}
        for shard in (self.shard, *(self.mirrors.values() if with_mirror else ())):
            for e, view in zip(self.layout.entries[shard.chunk], self.layout.views(shard.chunk, shard.weights)):
                state[e.name] = view.to(e.dtype)
        return state

    def load_state_dict(self, root: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's chunk (and the chunks it mirrors) and everything outside the chunks from a (full or this
        rank's) state dict."""
        for shard in (self.shard, *self.mirrors.values()):
            self._load_chunk(shard, state)
        self.sync_mirrors()  # a mirror must match the owner bit for bit, whatever the state held
        in_chunks = {e.name for es in self.layout.entries for e in es}
        rest = {k: v for k, v in state.items() if k not in in_chunks}
        own = {k: v for k, v in root.state_dict().items() if k not in in_chunks}
        for name, value in own.items():
            if name in rest:
                value.copy_(rest[name])

    def _load_chunk(self, shard: OwnedShard, state: dict[str, torch.Tensor]) -> None:
        entries = self.layout.entries[shard.chunk]
        missing = [e.name for e in entries if e.name not in state]
        if missing:
            raise KeyError(
                f"The checkpoint lacks {len(missing)} parameter(s) of this rank's chunk, e.g. {missing[:3]}: it was "
                "saved from another model."
            )
        for e, view in zip(entries, self.layout.views(shard.chunk, shard.weights)):
            saved = state[e.name]
            if saved.shape != e.shape:
                raise ValueError(
                    f"{e.name} has shape {tuple(saved.shape)} in the checkpoint and {tuple(e.shape)} in this model: "
                    "the checkpoint was saved from a different model config."
                )
            view.copy_(saved.reshape(e.shape))

    def describe_for_checkpoint(self) -> dict:
        """Plain data saved with every checkpoint: the layout it was written from and the LitGPT config (export)."""
        gpt = unit_hooks.find_gpt(self.root)
        config = getattr(gpt, "config", None)
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init} if config else None
        return {"world_size": self.topo.world_size, "group_size": self.topo.group_size,
                "schedule": self.schedule_name, "litgpt_config": fields,
                "litgpt_lora": type(config).__module__.startswith("litgpt.lora") if config else False}


    def teardown(self) -> None:
        unit_hooks.uninstall(self.units)


def _compress_block_labels(labels: list[str]) -> list[str]:
    """["embedding", "block 0", "block 1", "block 2"] -> ["embedding", "blocks 0-2"]."""
    out: list[str] = []
    for label in labels:
        if label.startswith("block ") and out and out[-1].startswith("block"):
            first = out[-1].split()[1].split("-")[0]
            out[-1] = f"blocks {first}-{label.split()[1]}"
        else:
            out.append(label)
    return out
