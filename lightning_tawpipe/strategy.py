"""``TawPipeStrategy``: TawPipe weight-pipeline training inside Lightning's Trainer (glue only).

The pipeline itself lives in :mod:`lightning_tawpipe.runtime`; this class connects it to the Trainer:

* process group and ranks exactly like ``ddp`` (same launchers, cluster environments, samplers);
* ``setup`` partitions and shards the model, and hands each optimizer only what this rank owns;
* ``training_step`` splits the batch into ``n_microbatches`` and runs, for each, the user's ``training_step`` and
  its backward while the engine streams weights in and gradients out; the returned loss is the micro-batch mean,
  already back-propagated, so ``backward`` only fires the callbacks (the Graphcore/DeepSpeed pattern);
* ``optimizer_step`` exposes the owners' averaged gradients to the optimizer, steps, and clears the accumulators;
* ``validation_step``/``test_step``/``predict_step`` stream the weights through a forward-only schedule.

Loss scaling: micro-batch ``i`` back-propagates ``loss_i / (n_microbatches * accumulate_grad_batches)`` and owners
divide the gradient sum by the world size, so gradients equal ``ddp``'s for the same global batch when the loss is a
mean over equally sized micro-batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.distributed import _distributed_is_initialized, _init_dist_connection
from lightning.fabric.utilities.distributed import _get_default_process_group_backend_for_device
from lightning.fabric.utilities.distributed import _sync_ddp_if_available
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning.pytorch.plugins.precision import Precision

from lightning_tawpipe import init
from lightning_tawpipe.environment import TawPipeEnvironment
from lightning_tawpipe.checkpoint_io import (
    CheckpointError,
    TawPipeCheckpointIO,
    atomic_torch_save,
    SHARDED_EXTRA,
    check_checkpoint,
    load_local_shards,
    load_tensors,
)
from lightning_tawpipe.outer.loop import OuterConfig, OuterLoop
from lightning_tawpipe.precision import TawPipePrecision
from lightning_tawpipe.runtime import optim_state
from lightning_tawpipe.runtime import health
from lightning_tawpipe.runtime.microbatch import MicrobatchRunner, batch_size
from lightning_tawpipe.runtime.pipeline import (
    Pipeline,
    check_microbatch_order,
    check_replicate_first_chunk,
    check_stripe,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=10)
"""Collective timeout: bounds how long ranks wait for a peer that died before they stop (Lightning's default is 30
minutes; a weight pipeline touches every rank every step, so a dead peer is noticed within one step anyway)."""


class TawPipeStrategy(TawPipeEnvironment, ParallelStrategy):
    """Topology-aware weight pipeline parallelism (TawPipe, AAAI 2026) for LitGPT models.

    Every rank trains its own micro-batches through the whole model; each rank owns ~1/world of the weights,
    gradients and optimizer state; weights travel to the ranks that need them just in time (broadcast inside a node,
    point-to-point between nodes) and gradients travel back to their owners.

    Arguments:
        n_microbatches: micro-batches each batch is split into (``int >= 1``, must divide the batch size). Default 1.
        prefetch: chunks fetched ahead of the one computing (``int >= 1``; ``prefetch + 1`` weight buffers). Default 1.
        reuse: chunks kept resident across each forward/backward turn instead of fetched again (``int`` in
            ``1..prefetch``, or ``None`` for ``prefetch``; TawPipe schedule only). The weight slots are reused, so it
            costs no memory; it saves ``reuse - 1`` chunk fetches per turn (``1`` is the paper's schedule).
        grad_buffers: gradient buffers of the largest chunk's size (``int >= 2``, or ``None``; TawPipe schedule
            only). A backward step writes one while earlier steps' gradients drain to their owners from the others;
            on a slow link a third lets backward run on while two sends are still in flight, for one more chunk of
            memory (``python -m lightning_tawpipe.plan --grad_buffers 2,3`` predicts the effect). Default ``None``:
            3 with three or more nodes (groups), where it was measured faster, and 2 with fewer.
        schedule: ``"tawpipe"`` (topology-aware, the default) or ``"weipipe"`` (topology-unaware ring, the WeiPipe
            baseline for ablations).
        group_size: ranks per TawPipe group (``int`` dividing the world size, or ``None`` for the processes per node).
            Regroups one machine's processes as several "nodes", or shows what the topology buys.
        partition: ``"parameters"`` (balance parameter counts, default), ``"uniform"`` (balance unit counts), or
            the units of each rank's chunk, e.g. ``[2, 3, 2, 3]``: a lighter chunk 0 shortens the round trip every
            iteration exposes on slow links (``python -m lightning_tawpipe.plan`` predicts the effect).
        replicate_first_chunk: keep a mirror of chunk 0 (weights, gradient accumulator, optimizer state) on one rank
            of every other node (``bool``, default False; TawPipe schedule, one replica). Chunk 0's gradient is the
            last an iteration makes and its weights the first the next needs, so without a mirror every other node
            pays a gradient-out, weights-back round trip over the slow link between two steps. With it, the holders
            sum chunk 0's gradient with one all-reduce per optimizer step and step identically: one exchange instead
            of the round trip, and no chunk-0 weight traffic between nodes, for chunk 0's state once more per node.
            An int ``k`` mirrors the first ``k`` chunks: with ``2`` chunk 1's round trip (which binds next, over slow
            links) goes too, and its exchange overlaps chunk 0's backward in the iteration that ends the step.
        stripe: move every remote chunk's weights and gradient sums in stripes (``bool``, default False; TawPipe
            schedule): each rank of the owner's node sends ``1 / G`` of a chunk over its own NIC to the rank of its
            local index, and the receiving node all-gathers the stripes over its fast links; gradients go back the
            same way (reduce-scatter, stripes, gather onto the owner). For nodes with one NIC per device
            (multi-rail), where one rank pair's transfer leaves the other NICs idle; with a single shared NIC it
            changes nothing measurable (``python -m lightning_tawpipe.plan --nics N --stripe both`` predicts it).
        microbatch_order: ``"sample"`` (default, the paper's order: each micro-batch forward and backward in turn,
            so every micro-batch fetches every chunk and sends every gradient again) or ``"chunk"`` (every
            micro-batch through a chunk while its weights are resident, and one gradient per chunk: the weight and
            gradient traffic of ``n_microbatches=1`` whatever ``n_microbatches`` is; TawPipe schedule). Its price is
            activation memory: every micro-batch's activations stay alive until its backward, as with one
            micro-batch of the whole batch, while the loss and the LM head's logits are still made one micro-batch
            at a time. Combine with ``activation_checkpointing=True`` to keep only each unit's input.
        validate_schedules: simulate every rank's program before running it (``bool``, default True).
        activation_checkpointing: ``False`` (default: keep each unit's activations for backward, like FSDP; weights
            are not kept, they are fetched again) or ``True`` (keep only each unit's input and recompute the unit in
            backward: less activation memory, one more forward of compute).
        meta_init: build the model in ``configure_model`` on the meta device and let each owner materialize and
            initialize only its own chunk (``bool``, default False), so no rank ever holds the whole model. Weights
            are then initialized per module from a generator seeded by the run's seed and the module's name
            (``lightning_tawpipe.init.seeded_reset_parameters`` reproduces them on an ordinary model).
        init_weights: a state dict file (e.g. LitGPT's ``lit_model.pth``) to start from. It is memory-mapped and each
            owner copies only its own chunk, so with ``meta_init=True`` no rank ever holds the whole pretrained
            model. Keys may be relative to the GPT (as LitGPT saves them) or to the LightningModule.
        init_weights_strict: require every parameter in ``init_weights`` (``bool``, default True); False lets
            parameters the file lacks (e.g. LoRA adapters) keep their initialization.
        state_dict_type: ``"sharded"`` (default: every rank writes its own part with ``torch.distributed.checkpoint``
            into a checkpoint directory, see :mod:`lightning_tawpipe.checkpoint_io`) or ``"full"`` (rank 0 writes one
            ordinary Lightning file with the gathered weights and unsharded optimizer state).
        async_checkpointing: write sharded checkpoints in a background thread (``bool``, default False): training
            continues while the shards go to disk; a save's error surfaces at the next save or at teardown.
        p2p_groups: ``"rail"`` (one group per rail; right for gloo), ``"directed"`` (one communicator per direction
            of every peer pair; needed by NCCL, which runs a communicator's operations in order) or ``None``
            (``"directed"`` on nccl, ``"rail"`` otherwise).
        process_group_backend: ``"gloo"``, ``"nccl"`` or ``None`` (gloo on CPU, nccl on CUDA).
        timeout: collective timeout (``datetime.timedelta``, default 10 minutes): the longest any rank waits for a
            peer that died or hangs before it stops, naming the failed rank and step.
        check_finite_loss: stop every rank together, with the step number, when any rank's loss is NaN/inf
            (``bool``, default True; one tiny all-gather per step).
        start_method: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``, as for ``ddp``.
        log_comm_stats: log ``tawpipe/*`` communication metrics every training step (``bool``, default True).

    Several replicas (see :mod:`lightning_tawpipe.outer.loop`): the world can be ``replicas`` TawPipe groups, each
    holding one copy of the model sharded over its own ranks, that train apart and combine their progress every
    ``sync_every`` steps over the (slow) links between them, each rank only with the owners of the same tensors.

        replicas: ``1`` (default), a number of equal replicas (consecutive ranks), or each replica's shape in rank
            order, ``[(nodes, ranks_per_node), ...]``, e.g. ``[(1, 1), (2, 2)]``: one process holding the whole
            model next to a 2x2 TawPipe group. Each replica reads its own data; give its ranks per-rank batches of
            (replica batch) / (its ranks) so every replica consumes the same tokens per step.
        outer: ``"sparseloco"`` (default: Top-k + 2-bit pseudo-gradients with error feedback), ``"diloco"`` (dense
            pseudo-gradient, Nesterov outer momentum) or ``None`` (average gradients across replicas every step).
        sync_every: inner steps between outer steps (H, default 15).
        density: SparseLoCo's Top-k fraction per 64x64 tile (default 0.03125, i.e. 128 of 4096).
        quant_bits: SparseLoCo's bits per sent value (default 2; ``None`` sends float32 values).
        outer_lr: outer learning rate (default 1.0 for SparseLoCo, 0.7 for DiLoCo).
        outer_momentum: DiLoCo's Nesterov momentum (default 0.9).
        error_decay: SparseLoCo's error-feedback decay beta (default 0.95).
        sparse_aggregate: ``"contributors"`` (default: each coordinate averages the replicas that sent it, as the
            SparseLoCo reference code) or ``"replicas"`` (divide by the number of replicas).
    """

    strategy_name = "tawpipe"

    def __init__(
        self,
        n_microbatches: int = 1,
        prefetch: int = 1,
        reuse: Optional[int] = None,
        grad_buffers: int | None = None,
        schedule: Literal["tawpipe", "weipipe"] = "tawpipe",
        group_size: Optional[int] = None,
        partition: Union[Literal["parameters", "uniform"], Sequence[int]] = "parameters",
        replicate_first_chunk: bool | int = False,
        stripe: bool = False,
        microbatch_order: Literal["sample", "chunk"] = "sample",
        validate_schedules: bool = True,
        p2p_groups: Optional[Literal["rail", "directed"]] = None,
        activation_checkpointing: bool = False,
        meta_init: bool = False,
        state_dict_type: Literal["sharded", "full"] = "sharded",
        async_checkpointing: bool = False,
        init_weights: Optional[str] = None,
        init_weights_strict: bool = True,
        accelerator=None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment=None,
        checkpoint_io=None,
        precision_plugin=None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = DEFAULT_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        log_comm_stats: bool = True,
        check_finite_loss: bool = True,
        replicas: int | list[tuple[int, int]] = 1,
        outer: Optional[Literal["sparseloco", "diloco"]] = "sparseloco",
        sync_every: int = 15,
        density: float = 0.03125,
        quant_bits: Optional[int] = 2,
        outer_lr: Optional[float] = None,
        outer_momentum: float = 0.9,
        error_decay: float = 0.95,
        sparse_aggregate: Literal["contributors", "replicas"] = "contributors",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._set_engine_knobs(n_microbatches, prefetch, reuse, grad_buffers, schedule, group_size, partition,
                               validate_schedules, p2p_groups, activation_checkpointing, meta_init, state_dict_type,
                               process_group_backend, timeout, start_method, check_finite_loss)
        check_replicate_first_chunk(replicate_first_chunk, schedule, replicas)
        self.replicate_first_chunk = replicate_first_chunk
        check_stripe(stripe, schedule)
        self.stripe = stripe
        check_microbatch_order(microbatch_order, schedule)
        self.microbatch_order = microbatch_order
        self.log_comm_stats = log_comm_stats
        self.async_checkpointing = bool(async_checkpointing)
        self.init_weights, self.init_weights_strict = init_weights, bool(init_weights_strict)
        self.replicas = replicas
        self.outer_config = OuterConfig(outer, sync_every, outer_lr, outer_momentum, error_decay, density, quant_bits,
                                        sparse_aggregate)
        if replicas != 1 and state_dict_type != "sharded":
            raise ValueError("With several replicas checkpoints must be sharded (each replica's state and the outer "
                             "state are saved per rank): use state_dict_type='sharded'.")
        self.outer: Optional[OuterLoop] = None
        self.pipeline: Optional[Pipeline] = None
        self._health: Optional[health.Health] = None
        self._backward_done = False
        self._in_optimizer_step = False  # the closure of an optimizer step runs: its iteration ends the step

    # -- precision ------------------------------------------------------------------------------------------------
    @property
    @override
    def precision_plugin(self) -> TawPipePrecision:
        if self._precision_plugin is None:
            self._precision_plugin = TawPipePrecision()
        return self._precision_plugin

    @precision_plugin.setter
    @override
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        # Lightning builds Precision / MixedPrecision / HalfPrecision from Trainer(precision=...): take their meaning
        self._precision_plugin = None if plugin is None else TawPipePrecision.from_lightning(plugin)

    # -- ranks, devices, process group (as ddp) ----------------------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        return True

    @property
    def device_mesh(self):
        """The ``("node", "local")`` DeviceMesh of the weight lane (available after setup)."""
        return self.pipeline.comm.mesh if self.pipeline else None

    @override
    def _configure_launcher(self) -> None:
        # the Trainer calls this in its constructor, once devices and num_nodes are known: fail before launching
        self._check_accelerator()
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        assert self.cluster_environment is not None
        self._share_malloc_arena_if_interleaved()
        _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        self._health = self._start_health()

    def set_world_ranks(self) -> None:
        self._assign_world_ranks()
        rank_zero_only.rank = self.global_rank

    # -- setup -------------------------------------------------------------------------------------------------
    @override
    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        """``configure_model`` runs in here: on the meta device with ``meta_init`` (each owner materializes its chunk
        at setup), else directly on this rank's device."""
        device = torch.device("meta") if self.meta_init else self.root_device
        with device, self.precision_plugin.tensor_init_context():
            yield

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        if init.has_meta_tensors(self.model):  # materialized by the pipeline, one chunk per rank
            return
        self.model.to(self.root_device)

    @override
    def setup(self, trainer) -> None:
        if not trainer.lightning_module.automatic_optimization and self.n_microbatches > 1:
            raise ValueError(
                "n_microbatches > 1 needs automatic optimization: with manual optimization training_step runs once "
                "per batch and calls manual_backward itself. Use n_microbatches=1 (and split the batch in your "
                "training_step) or automatic optimization."
            )
        super().setup(trainer)
        if self.outer is not None and len(self.optimizers) > 1:
            raise ValueError(f"With several replicas TawPipe supports one optimizer (the outer step follows its "
                             f"steps); configure_optimizers returned {len(self.optimizers)}.")
        self.pipeline.release_module_weights()  # after configure_optimizers: it saw real parameter shapes
        if trainer.state.fn == TrainerFn.FITTING:
            name_of = {p: n for n, p in self.lightning_module.named_parameters()}
            self._full_group_names = [optim_state.group_names(opt, name_of) for opt in self.optimizers]
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["params"] = self.pipeline.optimizer_params(group["params"])
            replicated = {p: name_of[p] for p in self.pipeline.replicated}
            self._local_names = {**replicated, **self.pipeline.master_names()}  # what this rank steps (and loads)
            self._saved_names = {**replicated, **self.pipeline.master_names(with_mirror=False)}  # what it saves
            self.precision_plugin.mirrored = self.pipeline.mirrored_masters

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.pipeline is None:
            precision = self.precision_plugin
            precision.bind_device(self.root_device.type)
            self.pipeline = Pipeline(
                model,
                self.topology,
                schedule=self.schedule,
                prefetch=self.prefetch,
                reuse=self.reuse,
                grad_buffers=self.grad_buffers,
                partition=self.partition,
                device=self.root_device,
                param_dtype=precision.param_dtype,
                master_dtype=precision.master_dtype,
                validate_schedules=self.validate_schedules,
                p2p_groups=self.p2p_groups or ("directed" if self._process_group_backend == "nccl" else "rail"),
                activation_checkpointing=self.activation_checkpointing,
                initial_state=self._read_init_weights(),
                initial_state_strict=self.init_weights_strict,
                replicas=self.replica_layout,
                replicate_first_chunk=self.replicate_first_chunk,
                stripe=self.stripe,
                microbatch_order=self.microbatch_order,
            )
            if self.pipeline.replicas.n_replicas > 1:
                self.outer = OuterLoop.build(self.pipeline, self.outer_config)
                precision.group = self.pipeline.comm.replica_group
                if hasattr(precision.scaler, "process_group"):  # inf checks: within the replica
                    precision.scaler.process_group = self.pipeline.comm.replica_group
            rank_zero_info(self.pipeline.describe())
            if self.meta_init and not self.pipeline.meta_init:
                rank_zero_warn(
                    "meta_init=True, but the model had no meta tensors at setup: it was built outside "
                    "configure_model (e.g. in __init__), so every rank materialized all of it. Build it in "
                    "configure_model to keep each rank at its own chunk."
                )
            precision.replicated = set(self.pipeline.replicated)
            if self.schedule == "weipipe" and self.topology.world_size >= 3:
                rank_zero_warn(
                    "schedule='weipipe' on 3+ ranks: the ring couples ranks across micro-batches, so a collective "
                    "inside training_step (e.g. self.log(..., sync_dist=True)) would deadlock. Log without sync_dist "
                    "in training_step, or use schedule='tawpipe', which is safe."
                )
        return model

    def _read_init_weights(self) -> Optional[dict[str, Tensor]]:
        if self.init_weights is None:
            return None
        path = check_checkpoint(self.init_weights)
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"Could not read the initial weights {path} (corrupt or not a state dict): {e}") from e
        return state.get("model", state) if isinstance(state.get("model"), Mapping) else state

    # -- the training step -------------------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any):
        assert self.lightning_module is not None and self.pipeline is not None
        step = self.lightning_module.trainer.global_step
        self._health.step_started(step)
        try:
            return self._training_step(step, *args, **kwargs)
        except Exception as error:
            failure = self._health.failure(step, error)
            if failure is error:
                raise
            raise failure from error

    def _training_step(self, step: int, *args: Any, **kwargs: Any):
        module, engine = self.lightning_module, self.pipeline.engine
        self.pipeline.comm.stats.reset()
        batch, rest = args[0], args[1:]
        # posted, judged once the iteration has ended and before any optimizer step (runtime/health.py)
        checks = health.StepChecks(step, batch_size(batch), self.root_device, group=self.pipeline.comm.replica_group)
        if self.outer is not None:
            self.outer.begin()
        if not module.automatic_optimization:
            checks.judge()  # the user's training_step may step the optimizer
            engine.begin(train=True, n_microbatches=1)
            out = super().training_step(*args, **kwargs)
            engine.end()
            self._log_comm_stats()
            return out
        precision = self.precision_plugin
        micro_batches = checks.split(batch, self.n_microbatches)
        scale = 1.0 / (self.n_microbatches * self.lightning_module.trainer.accumulate_grad_batches)
        # the last iteration of an optimizer step runs inside optimizer_step (Lightning calls the closure there): its
        # program can then sum the mirrored chunks' gradients as soon as they are final
        engine.begin(train=True, n_microbatches=self.n_microbatches, ends_step=self._in_optimizer_step)

        def run_micro_batch(i: int):
            with precision.train_step_context():
                output = module.training_step(micro_batches[i], *rest, **kwargs)
            loss = output["loss"] if isinstance(output, Mapping) else output
            if not isinstance(loss, Tensor):
                raise RuntimeError(
                    "TawPipe needs training_step to return a loss tensor for every micro-batch (skipping a batch by "
                    "returning None would leave the other ranks waiting for this rank's weights and gradients)."
                )
            precision.backward(precision.scale_loss(loss * scale), module, None)
            engine.flush_deferred()  # the next micro-batch's training_step is user code
            return loss.detach(), output

        results = MicrobatchRunner(engine).run(len(micro_batches), run_micro_batch)
        losses, output = [r[0] for r in results], results[-1][1]
        mean = torch.stack(losses).mean()
        if self.check_finite_loss:
            checks.post_loss(mean)  # rides along the drain
        engine.end()
        self._backward_done = True
        self._log_comm_stats()
        checks.judge()
        return {**output, "loss": mean} if isinstance(output, Mapping) else mean

    @override
    def backward(self, closure_loss: Tensor, optimizer, *args: Any, **kwargs: Any) -> Tensor:
        if not self._backward_done:  # manual optimization: the real backward, inside the user's training_step
            out = super().backward(closure_loss, optimizer, *args, **kwargs)
            if self.pipeline is not None:
                self.pipeline.engine.flush_deferred()  # back to user code, which may run a collective
            return out
        self._backward_done = False
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        pipeline = self.pipeline
        pipeline.engine.end()  # manual optimization steps inside training_step: drain the pipeline first

        outer = self.outer

        def closure_then_gradients():
            self._in_optimizer_step = True
            try:
                result = closure()
            finally:
                self._in_optimizer_step = False
            pipeline.finalize_gradients()
            if outer is not None and outer.config.method is None:
                outer.average_gradients()  # synchronous replicas: one data-parallel job
            return result

        output = super().optimizer_step(optimizer, closure_then_gradients, model, **kwargs)
        pipeline.zero_grad()
        if outer is not None and outer.after_optimizer_step() and self.log_comm_stats:
            self.lightning_module.log("tawpipe/outer_bytes", float(outer.stats.last_bytes), on_step=True,
                                      on_epoch=False, batch_size=1)
        return output

    def _log_comm_stats(self) -> None:
        if not self.log_comm_stats:
            return
        for name, value in self.pipeline.comm.stats.as_dict().items():
            self.lightning_module.log(f"tawpipe/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    # -- forward-only loops --------------------------------------------------------------------------------------
    def _forward_only(self, step: Callable, *args: Any, **kwargs: Any):
        engine = self.pipeline.engine
        engine.begin(train=False, n_microbatches=1)
        out = step(*args, **kwargs)
        engine.end()
        return out

    @override
    def validation_step(self, *args: Any, **kwargs: Any):
        return self._forward_only(super().validation_step, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any):
        return self._forward_only(super().test_step, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any):
        return self._forward_only(super().predict_step, *args, **kwargs)

    # -- collectives for Lightning -----------------------------------------------------------------------------
    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _distributed_is_initialized():
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

    @override
    def broadcast(self, obj, src: int = 0):
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(self, tensor, group=None, reduce_op="mean"):
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # -- state and checkpoints --------------------------------------------------------------------------------------
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """Checkpoints load into the sharded pipeline, which exists only after setup."""
        return True

    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = TawPipeCheckpointIO(async_save=self.async_checkpointing)
        return self._checkpoint_io

    @checkpoint_io.setter
    @override
    def checkpoint_io(self, io: Optional[CheckpointIO]) -> None:
        self._checkpoint_io = io

    def full_state_dict(self) -> dict[str, Tensor]:
        """The LightningModule's full state dict gathered on global rank 0 (``{}`` on the others)."""
        return self.pipeline.full_state_dict(self.lightning_module)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.state_dict_type == "sharded":
            return self.pipeline.local_state_dict(self.lightning_module)
        return self.full_state_dict()

    @override
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """Sharded: this rank's state by parameter name. Full: the unsharded ``torch.optim`` state on rank 0."""
        index = [o if not hasattr(o, "_optimizer") else o._optimizer for o in self.optimizers].index(
            getattr(optimizer, "_optimizer", optimizer))
        if self.state_dict_type == "sharded":
            return optim_state.local_state_by_name(optimizer, self._saved_names, self._full_group_names[index])
        return optim_state.gather_full_state(optimizer, self._saved_names, self._full_group_names[index])

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        checkpoint["tawpipe"] = self.pipeline.describe_for_checkpoint()
        if self.outer is not None:
            checkpoint = self._with_replica_state(checkpoint)
        if self.state_dict_type == "sharded":
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # every rank
            if self.lightning_module.trainer.state.status != TrainerStatus.RUNNING and hasattr(self.checkpoint_io,
                                                                                                 "wait"):
                self.checkpoint_io.wait()  # saved after fit/validate returned: nothing would wait for it later
        elif self.is_global_zero:
            atomic_torch_save(checkpoint, filepath)

    def _with_replica_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Several replicas: replica 0's state stays where one replica's would be (so the checkpoint consolidates and
        loads like any other); other replicas' go under ``replica<r>``, and everyone's outer state under ``outer``."""
        r = self.pipeline.replica
        extra: dict[str, Any] = {"outer": {f"replica{r}": self.outer.state_dict()}}
        if r != 0:
            extra[f"replica{r}"] = {"model": checkpoint["state_dict"],
                                   **{f"optimizer_{i}": s for i, s in enumerate(checkpoint["optimizer_states"])}}
            checkpoint = {**checkpoint, "state_dict": {}, "optimizer_states": []}
        return {**checkpoint, SHARDED_EXTRA: extra}

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """A sharded directory: each rank reads only its own part. A file (any strategy's): read whole."""
        path = check_checkpoint(checkpoint_path)
        if path.is_file():
            return self.checkpoint_io.load_checkpoint(path)
        local = self.pipeline.local_state_dict(self.lightning_module, with_mirror=True)
        names = [[self._local_names[p] for group in opt.param_groups for p in group["params"]]
                 for opt in self.optimizers] if self.lightning_module.trainer.state.fn == TrainerFn.FITTING else []
        checkpoint = load_local_shards(path, local, names, replica=self.pipeline.replica)
        if self.outer is not None:
            key = f"outer.replica{self.pipeline.replica}"
            state = load_tensors(path, key, self.outer.state_template())
            if state is not None:
                self.outer.load_state_dict(state)
            else:  # a checkpoint without this replica's outer state: start a fresh outer round from its weights
                self.outer.reset(inner_steps=int(checkpoint.get("global_step", 0)))
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        self.pipeline.load_state_dict(self.lightning_module, checkpoint["state_dict"])

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, names, state in zip(self.optimizers, self._full_group_names, checkpoint["optimizer_states"]):
            if any(isinstance(k, str) for k in state["state"]):  # by name (sharded checkpoints): to torch's layout
                state = optim_state.indexed_from_named(state)
            optim_state.load_local_state(optimizer, state, self._local_names, names)

    def model_state_bytes(self) -> int:
        """Bytes of model state (weights, gradients, optimizer state) held by this rank."""
        state: dict = {}
        for optimizer in self.optimizers:
            state.update(optimizer.state)
        return self.pipeline.model_state_bytes(state)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="TawPipe topology-aware weight pipeline parallelism"
        )
        strategy_registry.register(
            "weipipe", cls, description="WeiPipe-style topology-unaware weight ring (TawPipe ablation)",
            schedule="weipipe",
        )
