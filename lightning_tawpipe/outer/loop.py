"""The outer loop: replicas train apart for ``sync_every`` steps, then combine what they learned, shard by shard.

Every rank owns a shard of its replica's model (TawPipe's device-bound storage). The outer loop adds, for each tensor
a rank owns, an *anchor* (the model at the last outer step) and one buffer: SparseLoCo's error feedback or DiLoCo's
outer momentum. Every ``sync_every`` inner steps each owner forms the pseudo-gradient ``anchor - weights`` of its
tensors and exchanges it only with the ranks that own the same tensors in the other replicas:

* ``"sparseloco"`` (arXiv 2508.15706, the default): ``e <- beta*e + delta``; Top-k per 64x64 tile of ``e``,
  2-bit quantized (:mod:`lightning_tawpipe.outer.codec`), is all-gathered; ``e`` keeps what was not sent; the
  anchor moves by ``outer_lr`` times the aggregate. No outer momentum.
* ``"diloco"`` (arXiv 2311.08105): the dense pseudo-gradient is averaged (all-reduce) and applied by SGD with
  Nesterov momentum.
* ``None``: no outer loop; replicas average their gradients every step (data parallel across replicas, the
  synchronous baseline), again only between owners of the same tensors.

**Matching across replicas of different shapes.** Tensors are matched by name. For each trainable tensor, the
*owner tuple* lists the global rank owning it in every replica (a replicated tensor, outside TawPipe's chunks, is
owned by its replica's local rank 0). Tensors with the same owner tuple form a *segment*, exchanged in one message
over one process group. With equal replicas segments are the chunks; with a one-process replica next to a 2x2 one,
the one process is in every segment. Tiles and Top-k depend only on a tensor's full shape, so every replica
compresses a tensor identically whatever its cut.

**Determinism.** All members of a segment decode the same messages in the same (replica) order and sum them in that
order, so every replica computes bit-identical anchors; a checksum per segment verifies it after every outer step.

The exact reductions (density 100%, no quantization, ``outer_lr=1``: one outer step = parameter averaging; inner SGD
with ``sync_every=1``: exactly ``ddp``) are what ``tests/test_replicas.py`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_tawpipe.outer.codec import SparseCodec, aggregate

OUTER_METHODS = ("sparseloco", "diloco")
AGGREGATE_RULES = ("contributors", "replicas")


@dataclass(frozen=True)
class OuterConfig:
    """The outer loop's knobs (``method=None``: replicas average gradients every step instead)."""

    method: str | None = "sparseloco"
    sync_every: int = 15
    outer_lr: float | None = None  # default: 1.0 for SparseLoCo, 0.7 for DiLoCo (the papers' settings)
    outer_momentum: float = 0.9  # DiLoCo's Nesterov momentum
    error_decay: float = 0.95  # SparseLoCo's beta
    density: float = 0.03125  # SparseLoCo: Top-k fraction per tile (128 of 4096)
    quant_bits: int | None = 2  # SparseLoCo: bits per sent value (None: float32)
    aggregate: str = "contributors"  # SparseLoCo: mean over the replicas that sent a coordinate, or over all

    def __post_init__(self) -> None:
        if self.method not in (*OUTER_METHODS, None):
            raise ValueError(f"outer must be one of {OUTER_METHODS} or None, got {self.method!r}.")
        if isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int) or self.sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1 (inner steps per outer step), got {self.sync_every!r}.")
        if self.outer_lr is not None and not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr!r}.")
        if not 0 <= self.outer_momentum < 1 or not 0 <= self.error_decay <= 1:
            raise ValueError(f"outer_momentum must be in [0, 1) and error_decay in [0, 1], got "
                             f"{self.outer_momentum!r} and {self.error_decay!r}.")
        if self.aggregate not in AGGREGATE_RULES:
            raise ValueError(f"sparse aggregate must be one of {AGGREGATE_RULES}, got {self.aggregate!r}.")
        if self.method == "sparseloco":
            self.codec()  # validates density and quant_bits

    @property
    def lr(self) -> float:
        if self.outer_lr is not None:
            return self.outer_lr
        return 0.7 if self.method == "diloco" else 1.0

    def codec(self) -> SparseCodec:
        return SparseCodec(self.density, self.quant_bits)


@dataclass
class _Segment:
    """Tensors with the same owner in every replica: exchanged together over ``group``."""

    ranks: tuple[int, ...]  # the owning global rank in each replica, in replica order
    names: list[str]
    group: object = None


@dataclass
class OuterStats:
    """Bytes this rank sent to other replicas (outer exchanges or per-step gradient averaging)."""

    bytes_sent: int = 0
    exchanges: int = 0
    last_bytes: int = 0  # of the most recent exchange


@dataclass
class OuterLoop:
    """The outer loop for this rank: its tensors, their segments, anchors and buffers."""

    config: OuterConfig
    tensors: dict[str, Tensor]  # name -> the live weights this rank steps (masters, or replicated parameters)
    segments: list[_Segment]  # the segments this rank is in, in canonical order
    replicated: dict[str, Tensor]  # replicated parameters (every replica rank holds them; local rank 0 exchanges)
    replica_group: object
    replica_root: int  # global rank of this replica's local rank 0
    anchors: dict[str, Tensor] | None = None
    buffers: dict[str, Tensor] = field(default_factory=dict)
    inner_steps: int = 0
    outer_steps: int = 0
    stats: OuterStats = field(default_factory=OuterStats)

    @classmethod
    def build(cls, pipeline, config: OuterConfig) -> OuterLoop:
        """Work out every segment (a collective call: every rank creates every segment's group, in order)."""
        replicas, root = pipeline.replicas, pipeline.root
        trainable = [n for n, p in root.named_parameters() if p.requires_grad]
        owners = [pipeline.owner_of_names(t) for t in replicas.topologies]
        tuples: dict[tuple[int, ...], list[str]] = {}
        for name in trainable:
            key = tuple(replicas.offset(r) + owners[r][name] for r in range(replicas.n_replicas))
            tuples.setdefault(key, []).append(name)
        me = dist.get_rank()
        mine = []
        for ranks, names in tuples.items():
            group = dist.new_group(list(ranks))  # collective over the world, same order everywhere
            if me in ranks:
                mine.append(_Segment(ranks, names, group))
        masters = {name: master for master, name in pipeline.shard.names().items()}
        module_params = dict(root.named_parameters())
        replicated = set(pipeline.replicated)
        replicated_names = {n for n, p in module_params.items() if p in replicated}
        tensors = {}
        for seg in mine:
            for name in seg.names:
                tensors[name] = module_params[name] if name in replicated_names else masters[name]
        base = pipeline.comm.base
        return cls(config, tensors, mine,
                   {n: module_params[n] for n in sorted(replicated_names) if module_params[n].requires_grad},
                   pipeline.comm.replica_group, base)

    # -- when the strategy calls ----------------------------------------------------------------------------------
    def begin(self) -> None:
        """Before an inner step: the first one (or the first after loading weights only) takes the anchors."""
        if self.anchors is None:
            self.anchors = {n: t.detach().float().clone() for n, t in self.tensors.items()}
            if self.config.method is not None:
                self.buffers = {n: torch.zeros_like(a) for n, a in self.anchors.items()}

    def reset(self, inner_steps: int = 0) -> None:
        """Forget the anchors and buffers (new weights were loaded): the next step starts a fresh outer round."""
        self.anchors, self.buffers, self.inner_steps = None, {}, inner_steps

    def after_optimizer_step(self) -> bool:
        """Count an inner step; run the outer step every ``sync_every`` of them. Returns whether replicas
        exchanged anything in this step (``stats.last_bytes`` then says how much)."""
        self.inner_steps += 1
        if self.config.method is None:
            return True  # gradients were averaged in this step
        if self.inner_steps % self.config.sync_every:
            return False
        self.outer_step()
        return True

    # -- the outer step ----------------------------------------------------------------------------------------------
    def outer_step(self) -> None:
        self.begin()
        self.stats.last_bytes = 0
        with torch.no_grad():
            for seg in self.segments:
                if self.config.method == "sparseloco":
                    update = self._sparse_exchange(seg)
                else:
                    update = self._dense_exchange(seg)
                for name, delta in zip(seg.names, update):
                    self.anchors[name].sub_(delta, alpha=self.config.lr)
                    self.tensors[name].copy_(self.anchors[name])
                self._check_agreement(seg)
            self._share_replicated(lambda p: p.data)
        self.outer_steps += 1
        self.stats.exchanges += 1

    def _pseudo_gradients(self, seg: _Segment) -> list[Tensor]:
        return [self.anchors[n] - self.tensors[n].detach().float() for n in seg.names]

    def _sparse_exchange(self, seg: _Segment) -> list[Tensor]:
        """SparseLoCo: error feedback, Top-k + quantization, all-gather, decode every replica's message in order."""
        codec, beta = self.config.codec(), self.config.error_decay
        messages = []
        for name, delta in zip(seg.names, self._pseudo_gradients(seg)):
            error = self.buffers[name]
            error.mul_(beta).add_(delta)
            message, sent = codec.encode(error)
            error.sub_(sent)  # what peers will decode, bit for bit: the rest stays for later rounds
            messages.append(message)
        payload = torch.cat(messages)
        gathered = self._all_gather(payload, seg)
        sizes = [m.numel() for m in messages]
        update, start = [], 0
        for name, size in zip(seg.names, sizes):
            shape = self.tensors[name].shape
            decoded = [codec.decode(peer[start:start + size], shape) for peer in gathered]
            update.append(aggregate(decoded, self.config.aggregate))
            start += size
        return update

    def _dense_exchange(self, seg: _Segment) -> list[Tensor]:
        """DiLoCo: average the dense pseudo-gradients, then SGD with Nesterov momentum (``torch.optim.SGD``'s form)."""
        deltas = self._pseudo_gradients(seg)
        flat = self._all_reduce_mean(torch.cat([d.reshape(-1) for d in deltas]), seg)
        update, start = [], 0
        mu = self.config.outer_momentum
        for name, delta in zip(seg.names, deltas):
            mean = flat[start:start + delta.numel()].view_as(delta)
            start += delta.numel()
            momentum = self.buffers[name]
            momentum.mul_(mu).add_(mean)
            update.append(mean + mu * momentum)
        return update

    def _check_agreement(self, seg: _Segment) -> None:
        """Every replica must now hold bit-identical anchors for the segment, or they would silently drift."""
        digest = torch.stack([self.anchors[n].double().sum() for n in seg.names]
                             + [self.anchors[n].double().abs().sum() for n in seg.names])
        everyone = [torch.empty_like(digest) for _ in seg.ranks]
        dist.all_gather(everyone, digest, group=seg.group)
        if any(not torch.equal(everyone[0], d) for d in everyone[1:]):
            raise RuntimeError(
                f"Replicas disagree after outer step {self.outer_steps} on {seg.names[:3]}... (ranks {seg.ranks}): "
                "their anchors should be bit-identical. This is a bug or a non-deterministic reduction; please report "
                "it with the replica shapes."
            )

    # -- synchronous mode: average gradients every step --------------------------------------------------------------
    def average_gradients(self) -> None:
        """``outer=None``: after each step's gradients are final, owners average them across replicas."""
        self.stats.last_bytes = 0
        for seg in self.segments:
            grads = [self._grad_of(n) for n in seg.names]
            flat = self._all_reduce_mean(torch.cat([g.reshape(-1).float() for g in grads]), seg)
            start = 0
            for g in grads:
                g.copy_(flat[start:start + g.numel()].view_as(g))
                start += g.numel()
        self._share_replicated(lambda p: p.grad)
        self.stats.exchanges += 1

    def _grad_of(self, name: str) -> Tensor:
        tensor = self.tensors[name]
        if tensor.grad is None:
            tensor.grad = torch.zeros_like(tensor)
        return tensor.grad

    # -- communication ---------------------------------------------------------------------------------------------
    def _all_gather(self, payload: Tensor, seg: _Segment) -> list[Tensor]:
        gathered = [torch.empty_like(payload) for _ in seg.ranks]
        dist.all_gather(gathered, payload, group=seg.group)
        self._count(payload.nbytes * (len(seg.ranks) - 1))  # ring all-gather: each rank forwards R-1 messages
        return gathered

    def _all_reduce_mean(self, flat: Tensor, seg: _Segment) -> Tensor:
        dist.all_reduce(flat, group=seg.group)  # every member ends with the same sum (one result, broadcast)
        r = len(seg.ranks)
        self._count(int(flat.nbytes * 2 * (r - 1) / r))  # ring all-reduce: reduce-scatter + all-gather
        return flat.div_(r)

    def _count(self, nbytes: int) -> None:
        self.stats.bytes_sent += nbytes
        self.stats.last_bytes += nbytes

    def _share_replicated(self, what) -> None:
        """Replicated parameters were exchanged by the replica's local rank 0: every rank of the replica takes them."""
        for p in self.replicated.values():
            tensor = what(p)
            if tensor is not None:
                dist.broadcast(tensor, src=self.replica_root, group=self.replica_group)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    @property
    def _buffer_kind(self) -> str | None:
        """The checkpoint key of the per-tensor buffer: SparseLoCo's error feedback, DiLoCo's momentum, or none."""
        return {"sparseloco": "error", "diloco": "momentum"}.get(self.config.method)

    def state_dict(self) -> dict:
        """This rank's outer state by tensor name (anchors; error feedback or momentum) and the step counters."""
        self.begin()
        state = {"inner_steps": self.inner_steps, "outer_steps": self.outer_steps,
                 "anchor": {n: a.clone() for n, a in self.anchors.items()}}
        if self._buffer_kind is not None:
            state[self._buffer_kind] = {n: b.clone() for n, b in self.buffers.items()}
        return state

    def state_template(self) -> dict:
        """What :meth:`load_state_dict` needs, shaped as :meth:`state_dict` returns it (for reading checkpoints:
        tensors of the right shapes, ``None`` for the counters)."""
        def empty() -> dict[str, Tensor]:
            return {n: torch.empty(t.shape, dtype=torch.float32) for n, t in self.tensors.items()}

        template = {"inner_steps": None, "outer_steps": None, "anchor": empty()}
        if self._buffer_kind is not None:
            template[self._buffer_kind] = empty()
        return template

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")
        self.inner_steps, self.outer_steps = int(state["inner_steps"]), int(state["outer_steps"])
        self.anchors = {n: state["anchor"][n].to(device, torch.float32).clone() for n in self.tensors}
        if self._buffer_kind is not None:
            self.buffers = {n: state[self._buffer_kind][n].to(device, torch.float32).clone() for n in self.tensors}
