"""``TawPipeFabricStrategy``: TawPipe weight-pipeline training in ``lightning.fabric`` loops (glue only).

Importing :mod:`lightning_tawpipe` registers ``"tawpipe"`` (and the ``"weipipe"`` ablation) in Fabric's own registry,
so a loop written like ``litgpt/pretrain.py`` switches with one argument::

    fabric = L.Fabric(strategy="tawpipe", devices=4)          # or TawPipeFabricStrategy(group_size=2, ...)
    fabric.launch()
    model = fabric.setup(GPT(config))                         # partitions and shards the model
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))
    for batch in loader:
        loss = loss_fn(model(batch["input_ids"]), batch["labels"])   # a training forward starts an iteration
        fabric.backward(loss)                                       # backward; the iteration ends
        fabric.clip_gradients(model, optimizer, max_norm=1.0)       # global norm over every rank's shard
        optimizer.step()                                            # owners step their averaged gradients
        optimizer.zero_grad()

How the plain loop drives the pipeline (one micro-batch per iteration):

* a forward with gradients enabled and the module in training mode begins a training iteration; the model's own
  forward and backward request each chunk from the engine, and ``fabric.backward`` ends the iteration;
* a forward under ``torch.no_grad()``/``inference_mode`` or in eval mode runs the forward-only schedule and ends
  at once (it runs without autograd: the sharded weights cannot be back-propagated outside a training iteration);
* the first ``clip_gradients`` or ``optimizer.step()`` after the backward passes finalizes the gradients: owners
  expose their accumulated gradient divided by the world size (exactly ``ddp``'s average) as ``.grad`` of the
  masters their optimizer steps. The next training forward clears the accumulators if ``optimizer.zero_grad()``
  ran (and otherwise keeps accumulating, as PyTorch does when gradients are not zeroed);
* gradient accumulation: several forward/backward pairs before one ``optimizer.step()`` accumulate in the owners'
  buffers. ``fabric.no_backward_sync`` has nothing to skip: a rank keeps no gradient for weights it does not own,
  so every backward sends its gradients to their owners (with the loss divided by the number of accumulated
  batches, as in ``litgpt/pretrain.py``, the result equals ``ddp``'s). It does tell which iterations accumulate:
  with mirrored chunks (``replicate_first_chunk``) any other iteration sums their gradients between the holders
  inside its program. If it was not the last before ``optimizer.step()`` after all (a loop that accumulates without
  ``no_backward_sync``), the owners carry the sum on and the step sums again: still exact, one exchange more;
* several micro-batches per iteration (the pipeline overlaps their weight traffic, and ``weipipe`` interleaves them):
  ``loss = fabric.strategy.train_step(model, batch, loss_fn)``.

Checkpoints: ``fabric.save(path, {"model": model, "optimizer": optimizer, "iter_num": n, ...})`` writes, by default,
the Trainer strategy's sharded layout (a directory: DCP ``model`` and ``optimizer_<i>`` entries, each rank writing
the weights and optimizer state it owns, plus ``meta.pt`` with everything else), committed atomically;
``fabric.load(path, state)`` reads only each rank's own part, on any topology. ``state_dict_type="full"`` writes one
ordinary Fabric file on rank 0 instead (loadable by ``strategy="ddp"``), and ``fabric.load`` also reads such files,
including those ``ddp`` writes.

Not supported: ``torch.compile`` of the set-up model (units call into the engine), more than one model per strategy,
``module.load_state_dict`` on the set-up model (use ``fabric.load``/``fabric.load_raw``) and reading ``.grad`` of
the model's parameters (gradients live with their owners; read them from the optimizer's parameters after
``clip_gradients``). A rank's optimizer holds only the masters it owns, so ``optimizer.state_dict()`` is this rank's
part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.fabric.wrappers as fabric_wrappers
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.fabric.strategies.parallel import ParallelStrategy
from lightning.fabric.strategies.strategy import TBroadcast, _BackwardSyncControl, _validate_keys_for_strict_loading
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.distributed import _get_default_process_group_backend_for_device
from lightning.fabric.utilities.distributed import _init_dist_connection, _sync_ddp_if_available
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.init import _EmptyInit
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.fabric.utilities.types import Optimizable, ReduceOp, _Stateful
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_tawpipe import init
from lightning_tawpipe.checkpoint_io import TawPipeCheckpointIO, atomic_torch_save, check_checkpoint, load_local_shards
from lightning_tawpipe.checkpoint_io import read_meta
from lightning_tawpipe.fabric_precision import TawPipeFabricPrecision
from lightning_tawpipe.runtime import optim_state
from lightning_tawpipe.runtime.microbatch import MicrobatchRunner, batch_size
from lightning_tawpipe.runtime.pipeline import (
    Pipeline,
    check_microbatch_order,
    check_replicate_first_chunk,
    check_stripe,
)
from lightning_tawpipe.environment import TawPipeEnvironment, check_knobs
from lightning_tawpipe.runtime import health
from lightning_tawpipe.strategy import DEFAULT_TIMEOUT

# meta.pt keys written by this strategy next to the user's own objects
_LAYOUT_KEY = "tawpipe_fabric"  # which state keys held the model and the optimizers
_RESERVED = ("state_dict", "optimizer_states", "tawpipe", _LAYOUT_KEY)


class _TawPipeModule(nn.Module):
    """What ``setup_module`` returns (Fabric wraps it in its ``_FabricModule``): every call goes through the
    strategy, which runs it inside a pipeline iteration."""

    def __init__(self, module: nn.Module, strategy: "TawPipeFabricStrategy") -> None:
        super().__init__()
        self.module = module
        self._tawpipe_strategy = strategy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._tawpipe_strategy._pipelined_forward(self.module, *args, **kwargs)


class _TawPipeBackwardSyncControl(_BackwardSyncControl):
    """``fabric.no_backward_sync`` for TawPipe: nothing to skip, but it marks the iterations that accumulate.

    Under ``ddp`` a rank can keep its local gradients and all-reduce once per optimizer step. A TawPipe rank keeps
    no gradients for the weights it does not own (that is where its memory saving comes from), so each backward
    sends them to their owners, which accumulate them; the accumulated result is the same. What the context does
    tell is that no optimizer step follows the iteration inside it, so mirrored chunks' gradients are not summed
    there (Fabric calls it only with ``enabled=True``).
    """

    def __init__(self, strategy: "TawPipeFabricStrategy") -> None:
        self._strategy = strategy

    @override
    @contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool):
        previous, self._strategy._accumulating = self._strategy._accumulating, bool(enabled)
        try:
            yield
        finally:
            self._strategy._accumulating = previous


class TawPipeFabricStrategy(TawPipeEnvironment, ParallelStrategy):
    """Topology-aware weight pipeline parallelism (TawPipe) for ``lightning.fabric`` and LitGPT models.

    Every rank trains its own batches through the whole model; each rank owns ~1/world of the weights, gradients
    and optimizer state; weights travel to the ranks that need them just in time and gradients back to their owners.
    The model passed to ``fabric.setup`` must hold one LitGPT ``GPT`` (or define ``pipeline_units()``).

    Arguments (as :class:`~lightning_tawpipe.strategy.TawPipeStrategy`):
        n_microbatches: default micro-batches of :meth:`train_step` (the plain loop runs one per iteration).
        prefetch: chunks fetched ahead of the one computing (``int >= 1``).
        reuse: chunks kept resident across each forward/backward turn (``1..prefetch``; ``None``: ``prefetch``).
        grad_buffers: gradient buffers (``int >= 2``, TawPipe schedule only): more let backward outrun slow sends
            (``None``: 3 with three or more nodes, else 2).
        schedule: ``"tawpipe"`` (topology-aware, default) or ``"weipipe"`` (ring baseline).
        group_size: ranks per TawPipe group (``None``: processes per node); emulates nodes on one machine.
        partition: ``"parameters"``, ``"uniform"`` or units per chunk, e.g. ``[2, 3, 2, 3]``.
        validate_schedules: simulate every rank's program before running it.
        p2p_groups: ``"rail"``, ``"directed"`` or ``None`` (``"directed"`` on nccl, ``"rail"`` otherwise).
        activation_checkpointing: recompute each unit in backward instead of keeping its activations.
        meta_init: ``fabric.init_module()`` builds on the meta device and each owner materializes only its chunk,
            initialized per module from a generator seeded by the run's seed and the module's name
            (``lightning_tawpipe.init.seeded_reset_parameters`` reproduces it on an ordinary model).
        state_dict_type: ``"sharded"`` (default; each rank writes its part) or ``"full"`` (rank 0 writes one file).
        process_group_backend: ``"gloo"``, ``"nccl"`` or ``None`` (gloo on CPU, nccl on CUDA).
        timeout: collective timeout (default 10 minutes): bounds how long ranks wait for a peer that died.
        start_method: ``"popen"`` (default), ``"spawn"``, ``"fork"``, ``"forkserver"``.
        check_finite_loss: before each backward, stop every rank together (naming the iteration) when any rank's
            loss is NaN/inf (one tiny all-gather per iteration; default True).
        replicate_first_chunk: keep a mirror of chunk 0 (``True``) or of the first ``k`` chunks (an int) on one rank
            of every other node, so they never cross nodes and their gradients are summed by one exchange per
            optimizer step instead of a round trip between iterations (TawPipe schedule, several nodes; default
            False). An iteration outside ``fabric.no_backward_sync`` sums their gradients inside its program.
        stripe: move remote chunks' weights and gradient sums in stripes over every rank's own NIC, all-gathered in
            the receiving node or gathered onto the owner (TawPipe schedule; default False): for nodes with one NIC
            per device (see ``TawPipeStrategy``).
        microbatch_order: ``"sample"`` (default) or ``"chunk"``: :meth:`train_step` runs every micro-batch through a
            chunk while it is resident, for the weight and gradient traffic of one micro-batch (TawPipe schedule; see
            ``TawPipeStrategy``).
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
        validate_schedules: bool = True,
        p2p_groups: Optional[Literal["rail", "directed"]] = None,
        activation_checkpointing: bool = False,
        meta_init: bool = False,
        state_dict_type: Literal["sharded", "full"] = "sharded",
        accelerator=None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment=None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = DEFAULT_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        check_finite_loss: bool = True,
        replicate_first_chunk: bool | int = False,
        stripe: bool = False,
        microbatch_order: Literal["sample", "chunk"] = "sample",
    ) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io, precision=precision)
        self._set_engine_knobs(n_microbatches, prefetch, reuse, grad_buffers, schedule, group_size, partition,
                               validate_schedules, p2p_groups, activation_checkpointing, meta_init, state_dict_type,
                               process_group_backend, timeout, start_method, check_finite_loss)
        check_replicate_first_chunk(replicate_first_chunk, schedule, n_replicas=1)
        self.replicate_first_chunk = replicate_first_chunk
        check_stripe(stripe, schedule)
        self.stripe = stripe
        check_microbatch_order(microbatch_order, schedule)
        self.microbatch_order = microbatch_order
        self._backward_sync_control = _TawPipeBackwardSyncControl(self)
        self._accumulating = False  # inside fabric.no_backward_sync: no optimizer step follows this iteration
        self.pipeline: Optional[Pipeline] = None
        self._module: Optional[nn.Module] = None
        self._name_of: dict[nn.Parameter, str] = {}
        self._local_names: dict[nn.Parameter, str] = {}  # what this rank steps and loads (its mirrors too)
        self._saved_names: dict[nn.Parameter, str] = {}  # what it saves (a mirrored chunk is its owner's to save)
        self._mirrored: set[nn.Parameter] = set()  # masters of its mirrors: counted by their owners in norms
        self._full_group_names: dict[Optimizer, list[list[str]]] = {}
        self._released = False
        self._grads_final = False  # gradients exposed to the optimizers (averaged) since the last training forward
        self._in_train_step = False
        self._health: Optional[health.Health] = None
        self._iteration = 0  # training iterations started (Fabric has no global step): named in failure messages

    # -- precision and checkpoint IO ---------------------------------------------------------------------------------
    @property
    @override
    def precision(self) -> TawPipeFabricPrecision:
        if self._precision is None:
            self._precision = TawPipeFabricPrecision()
        return self._precision

    @precision.setter
    @override
    def precision(self, precision: Optional[Precision]) -> None:
        self._precision = None if precision is None else TawPipeFabricPrecision.from_fabric(precision)

    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = TawPipeCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    @override
    def checkpoint_io(self, io: Optional[CheckpointIO]) -> None:
        self._checkpoint_io = io

    # -- ranks, devices, process group (as ddp; shared parts in TawPipeEnvironment) ---------------------------------
    @override
    def _configure_launcher(self) -> None:
        self._check_accelerator()
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._set_world_ranks()
        self._process_group_backend = (
            self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        )
        assert self.cluster_environment is not None
        self._share_malloc_arena_if_interleaved()
        _init_dist_connection(self.cluster_environment, self._process_group_backend, timeout=self._timeout)
        self._health = self._start_health()

    def _set_world_ranks(self) -> None:
        self._assign_world_ranks()
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # -- model and optimizer setup -----------------------------------------------------------------------------------
    @override
    def module_init_context(self, empty_init: Optional[bool] = None) -> AbstractContextManager:
        """``fabric.init_module()``: on the meta device with ``meta_init`` (each owner materializes its chunk at
        setup), else directly on this rank's device."""
        stack = ExitStack()
        if self.meta_init:
            stack.enter_context(torch.device("meta"))
        else:
            stack.enter_context(self.root_device)
            stack.enter_context(_EmptyInit(enabled=bool(empty_init)))
        stack.enter_context(self.precision.module_init_context())
        return stack

    @override
    def module_to_device(self, module: nn.Module) -> None:
        if init.has_meta_tensors(module):  # materialized by the pipeline, one chunk per rank
            return
        module.to(self.root_device)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Partition and shard ``module`` (the module's full weights stay until the first forward, so an optimizer
        built afterwards from ``model.parameters()`` still sees real shapes)."""
        if self.pipeline is not None:
            raise RuntimeError(
                "TawPipeFabricStrategy pipelines one model per Fabric instance, and one was already set up. Put the "
                "models into one nn.Module, or use another Fabric instance for the second model."
            )
        precision = self.precision
        precision.bind_device(self.root_device.type)
        self.pipeline = Pipeline(
            module,
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
            replicate_first_chunk=self.replicate_first_chunk,
            stripe=self.stripe,
            microbatch_order=self.microbatch_order,
        )
        rank_zero_info(self.pipeline.describe())
        if self.meta_init and not self.pipeline.meta_init:
            rank_zero_warn(
                "meta_init=True, but the model had no meta tensors at setup: it was built outside "
                "`fabric.init_module()`, so every rank materialized all of it."
            )
        precision.core.replicated = set(self.pipeline.replicated)
        self._module = module
        self._name_of = {p: n for n, p in module.named_parameters()}
        replicated = {p: self._name_of[p] for p in self.pipeline.replicated}
        self._local_names = {**replicated, **self.pipeline.master_names()}
        self._saved_names = {**replicated, **self.pipeline.master_names(with_mirror=False)}
        self._mirrored = self.pipeline.mirrored_masters
        return _TawPipeModule(module, self)

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """Hand the optimizer only what this rank steps: the masters it owns and any replicated parameters."""
        if self.pipeline is None:
            raise RuntimeError(
                "Set up the model before its optimizer with TawPipe: `fabric.setup(model, optimizer)`, or "
                "`fabric.setup_module(model)` then `fabric.setup_optimizers(optimizer)`."
            )
        groups = [self.pipeline.optimizer_params(group["params"]) for group in optimizer.param_groups]  # checks
        self._full_group_names[optimizer] = optim_state.group_names(optimizer, {**self._name_of, **self._local_names})
        for group, params in zip(optimizer.param_groups, groups):
            group["params"] = params
        return optimizer

    def _module_of(self, obj: Any) -> Optional[nn.Module]:
        """The pipelined root module if ``obj`` is it (or its wrapper), else ``None``."""
        if isinstance(obj, _TawPipeModule):
            obj = obj.module
        return obj if obj is not None and obj is self._module else None

    # -- the training iteration ---------------------------------------------------------------------------------------
    def _pipelined_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        engine = self.pipeline.engine
        if self._in_train_step:  # train_step runs the iteration
            return module(*args, **kwargs)
        if engine.active:
            raise RuntimeError(
                "The TawPipe model was called again before `fabric.backward(loss)` of its previous training forward. "
                "Each training forward must be followed by its backward (every rank runs the same schedule). For "
                "several micro-batches per step use `fabric.strategy.train_step(model, batch, loss_fn)`; for a "
                "forward without backward use `torch.no_grad()` or `model.eval()`."
            )
        self._release_module_weights()
        if torch.is_grad_enabled() and module.training:
            self._iteration += 1
            self._health.step_started(self._iteration)
            inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            with self._reporting_failures():
                if inputs:  # owners average gradients over ranks like ddp: every rank needs the same batch size
                    health.check_step_inputs(self._iteration, inputs[0].shape[0], self.root_device)
                self._start_accumulating()
                self.pipeline.comm.stats.reset()
                engine.begin(train=True, n_microbatches=1, ends_step=not self._accumulating)
                return module(*args, **kwargs)
        engine.begin(train=False, n_microbatches=1)
        with torch.no_grad():
            out = module(*args, **kwargs)
        engine.end()
        return out

    @override
    def backward(self, tensor: Tensor, module: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        """Back-propagate (the engine streams the chunks back in, gradients go to their owners) and end the
        iteration the training forward began."""
        engine = self.pipeline.engine if self.pipeline is not None else None
        with self._reporting_failures():
            if self.check_finite_loss and engine is not None and not self._in_train_step:
                health.check_loss_finite(self._iteration, tensor)  # every rank stops together, before any gradient
            self.precision.pre_backward(tensor, module)
            self.precision.backward(tensor, module, *args, **kwargs)
            self.precision.post_backward(tensor, module)
            if engine is not None and engine.training_iteration and not self._in_train_step:
                engine.end()
            elif engine is not None:
                engine.flush_deferred()  # back to user code, which may run a collective

    @contextmanager
    def _reporting_failures(self):
        """A communication error names the rank that failed; this rank's own errors are recorded for the others."""
        try:
            yield
        except Exception as error:
            if self._health is None:
                raise
            failure = self._health.failure(self._iteration, error)
            if failure is error:
                raise
            raise failure from error

    def train_step(self, model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor],
                   n_microbatches: Optional[int] = None) -> Tensor:
        """One training iteration over ``n_microbatches`` micro-batches of ``batch`` (default: the strategy's).

        ``loss_fn(model, micro_batch)`` runs the model once and returns the micro-batch's loss; each loss is
        back-propagated divided by ``n_microbatches`` (so gradients equal those of the whole batch's mean loss),
        and the mean loss is returned, detached. Follow it with ``clip_gradients``/``optimizer.step()`` as usual.
        Like the Trainer's step it checks that every rank fed the same batch size and got a finite loss, posting both
        checks and judging them when the iteration has ended (``runtime/health.py``), before any optimizer step.
        """
        n = self.n_microbatches if n_microbatches is None else n_microbatches
        check_knobs(n, self.prefetch, self.schedule, self.group_size, self.partition, self.reuse, self.grad_buffers)
        engine = self.pipeline.engine
        if engine.active:
            raise RuntimeError("train_step was called while a TawPipe iteration is running (a forward without its "
                               "backward?); every iteration must finish first.")
        self._iteration += 1
        self._health.step_started(self._iteration)
        with self._reporting_failures():
            return self._train_step(model, batch, loss_fn, n)

    def _train_step(self, model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor],
                    n: int) -> Tensor:
        engine = self.pipeline.engine
        checks = health.StepChecks(self._iteration, batch_size(batch), self.root_device)
        self._release_module_weights()
        self._start_accumulating()
        self.pipeline.comm.stats.reset()
        micro_batches = checks.split(batch, n)
        engine.begin(train=True, n_microbatches=n, ends_step=not self._accumulating)

        def run(i: int) -> Tensor:
            loss = loss_fn(model, micro_batches[i])
            if not isinstance(loss, Tensor):
                raise RuntimeError(f"loss_fn must return the micro-batch's loss tensor, got {type(loss).__name__}.")
            self.precision.backward(loss / n, None)
            engine.flush_deferred()  # the next micro-batch's loss_fn is user code
            return loss.detach()

        self._in_train_step = True
        fabric_wrappers._in_fabric_backward = True  # this is Fabric's backward: let the module's hooks through
        try:
            losses = MicrobatchRunner(engine).run(n, run)
        finally:
            self._in_train_step = False
            fabric_wrappers._in_fabric_backward = False
        mean = torch.stack(losses).mean()
        if self.check_finite_loss:
            checks.post_loss(mean)
        engine.end()
        checks.judge()
        return mean

    def _release_module_weights(self) -> None:
        if not self._released:
            self.pipeline.release_module_weights()
            self._released = True

    def _start_accumulating(self) -> None:
        """Before a training iteration: after an optimizer step, zeroed gradients start afresh, kept ones continue;
        without one, gradients the previous iteration summed between mirrors' holders stay with their owners."""
        if not self._grads_final:
            self.pipeline.carry_exchanged_gradients()
            return
        shard = self.pipeline.shard
        trainable = [m for m in shard.params.values() if m.requires_grad]
        if all(m.grad is None for m in trainable):  # optimizer.zero_grad() (set_to_none) ran
            self.pipeline.zero_grad()
        else:  # zeroed in place (set_to_none=False) or kept: accumulation goes on
            self.pipeline.resume_accumulation()
        self._grads_final = False

    def _finalize_gradients(self) -> None:
        """Owners expose the averaged gradients (once per step, whatever reads them first)."""
        if self._grads_final or self.pipeline is None:
            return
        self.pipeline.engine.end()  # raises if a training forward had no backward
        self.pipeline.finalize_gradients()
        self._grads_final = True

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        self._finalize_gradients()
        return self.precision.optimizer_step(optimizer, **kwargs)

    @override
    def clip_gradients_norm(self, module: nn.Module, optimizer: Optimizer, max_norm: Union[float, int],
                            norm_type: Union[float, int] = 2.0, error_if_nonfinite: bool = True) -> Tensor:
        """Clip by the norm of the *whole* gradient (every rank's shard), exactly what ``ddp`` computes; returns it."""
        self._finalize_gradients()
        self.precision.unscale_gradients(optimizer)
        params = [p for p in self.precision.main_params(optimizer) if p.grad is not None]
        total = self._global_grad_norm(params, float(norm_type))
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from all ranks is non-finite, so it cannot be "
                "clipped. Pass `error_if_nonfinite=False` to clip anyway."
            )
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    @override
    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: Union[float, int]) -> None:
        self._finalize_gradients()
        self.precision.unscale_gradients(optimizer)
        torch.nn.utils.clip_grad_value_(list(self.precision.main_params(optimizer)), clip_value=clip_val)

    def _global_grad_norm(self, params: list[Tensor], norm_type: float) -> Tensor:
        replicated = set(self.pipeline.replicated)
        owned = [p.grad for p in params if p not in replicated and p not in self._mirrored]
        shared = [p.grad for p in params if p in replicated]  # identical on every rank: counted once
        zero = torch.zeros((), dtype=torch.float64, device=self.root_device)

        def local_norm(grads: list[Tensor]) -> Tensor:
            return torch.nn.utils.get_total_norm(grads, norm_type=norm_type).double() if grads else zero.clone()

        if math.isinf(norm_type):
            total = local_norm(owned)
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
            total = torch.maximum(total, local_norm(shared))
        else:
            total = local_norm(owned) ** norm_type
            dist.all_reduce(total)
            total = (total + local_norm(shared) ** norm_type) ** (1.0 / norm_type)
        return total.float()

    # -- state and checkpoints ---------------------------------------------------------------------------------------
    def full_state_dict(self, module: Optional[nn.Module] = None) -> dict[str, Tensor]:
        """The model's full state dict gathered on global rank 0 (``{}`` on the others); a collective call."""
        return self.pipeline.full_state_dict(self._module)

    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        if self._module_of(module) is None:
            return module.state_dict()
        if self.state_dict_type == "sharded":
            return self.pipeline.local_state_dict(self._module)
        return self.full_state_dict()

    @override
    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        root = self._module_of(module)
        if root is None:
            module.load_state_dict(state_dict, strict=strict)
            return
        if strict:
            expected = set(root.state_dict())
            missing, unexpected = expected - set(state_dict), set(state_dict) - expected
            if missing or unexpected:
                raise KeyError(
                    f"The model state does not match the model: missing {sorted(missing)[:5]}, unexpected "
                    f"{sorted(unexpected)[:5]}. Pass strict=False to load what matches."
                )
        self.pipeline.load_state_dict(root, state_dict)

    @override
    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Sharded: this rank's state by parameter name. Full: the unsharded ``torch.optim`` state on rank 0."""
        names = self._optimizer_names(optimizer)
        if self.state_dict_type == "sharded":
            return optim_state.local_state_by_name(optimizer, self._saved_names, names)
        return optim_state.gather_full_state(optimizer, self._saved_names, names)

    def _optimizer_names(self, optimizer: Optimizer) -> list[list[str]]:
        if optimizer not in self._full_group_names:
            raise ValueError("This optimizer was not set up with the TawPipe strategy (`fabric.setup_optimizers`).")
        return self._full_group_names[optimizer]

    def _split_state(self, state: dict[str, Any]) -> tuple[Optional[str], list[str]]:
        """The key of the pipelined model and the keys of the optimizers in a ``fabric.save``/``load`` state."""
        modules = [k for k, v in state.items() if isinstance(v, nn.Module)]
        foreign = [k for k in modules if self._module_of(state[k]) is None]
        if foreign:
            raise ValueError(
                f"TawPipe can save and load only the model it pipelines; {foreign} hold(s) another nn.Module. Save "
                "that module's state_dict() as a plain object instead."
            )
        reserved = [k for k in state if k in _RESERVED]
        if reserved:
            raise ValueError(f"The state keys {reserved} are reserved by TawPipe checkpoints; rename them.")
        return (modules[0] if modules else None), [k for k, v in state.items() if isinstance(v, Optimizer)]

    @override
    def save_checkpoint(self, path, state: dict[str, Any], storage_options: Optional[Any] = None,
                        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"TawPipeFabricStrategy.save_checkpoint takes no storage_options, got {storage_options!r}.")
        model_key, optimizer_keys = self._split_state(state)
        if self.state_dict_type == "full":
            converted = self._convert_stateful_objects_in_state(state, filter=filter or {})  # collectives inside
            if self.is_global_zero:
                atomic_torch_save(converted, path)
            return
        if filter:
            raise ValueError("`fabric.save(..., filter=...)` needs TawPipeFabricStrategy(state_dict_type='full'): "
                             "a sharded checkpoint always holds the whole model.")
        checkpoint: dict[str, Any] = {}
        for key, obj in state.items():
            if key != model_key and key not in optimizer_keys:
                checkpoint[key] = obj.state_dict() if isinstance(obj, _Stateful) else obj
        checkpoint["state_dict"] = self.pipeline.local_state_dict(self._module) if model_key is not None else {}
        checkpoint["optimizer_states"] = [self.get_optimizer_state(state[k]) for k in optimizer_keys]
        checkpoint["tawpipe"] = self.pipeline.describe_for_checkpoint()
        checkpoint[_LAYOUT_KEY] = {"model": model_key, "optimizers": optimizer_keys}
        self.checkpoint_io.save_checkpoint(checkpoint, path)  # every rank writes its part

    @override
    def load_checkpoint(self, path, state: Optional[Union[nn.Module, Optimizer, dict[str, Any]]] = None,
                        strict: bool = True, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """A sharded directory: each rank reads only its own part. A file (``full`` or any strategy's): read whole,
        each rank keeps its part."""
        path = check_checkpoint(path)
        if path.is_dir():
            if not state:
                return self._read_sharded_whole(path)
            if not isinstance(state, dict):
                raise TypeError(f"{path} is a sharded checkpoint: load it with `fabric.load(path, state_dict)`.")
            return self._load_sharded(path, state, strict)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
        if not state:
            return checkpoint
        if isinstance(state, nn.Module):
            self.load_module_state_dict(state, checkpoint, strict=strict)
            return {}
        if isinstance(state, Optimizer):
            optim_state.load_local_state(state, checkpoint, self._local_names, self._optimizer_names(state))
            return {}
        _validate_keys_for_strict_loading(state.keys(), checkpoint.keys(), strict=strict)
        self._split_state(state)
        for key, obj in list(state.items()):
            if key not in checkpoint:
                continue
            if isinstance(obj, nn.Module):
                self.load_module_state_dict(obj, checkpoint.pop(key), strict=strict)
            elif isinstance(obj, Optimizer):
                optim_state.load_local_state(obj, checkpoint.pop(key), self._local_names, self._optimizer_names(obj))
            elif isinstance(obj, _Stateful):
                obj.load_state_dict(checkpoint.pop(key))
            else:
                state[key] = checkpoint.pop(key)
        return checkpoint

    def _load_sharded(self, path: Path, state: dict[str, Any], strict: bool) -> dict[str, Any]:
        model_key, optimizer_keys = self._split_state(state)
        meta = read_meta(path)
        layout = meta.get(_LAYOUT_KEY)
        if layout is None:  # written by the Trainer strategy: its model, its optimizers in order
            n_saved = len({k.split(".")[0] for k in _dcp_keys(path) if k.startswith("optimizer_")})
            layout = {"model": model_key, "optimizers": optimizer_keys[:n_saved]}
        saved_keys = set(meta) - set(_RESERVED)
        saved_keys |= set(layout["optimizers"]) | ({layout["model"]} if layout["model"] is not None else set())
        _validate_keys_for_strict_loading(state.keys(), saved_keys, strict=strict)
        if model_key is not None and model_key not in saved_keys:
            model_key = None
        optimizer_keys = [k for k in optimizer_keys if k in layout["optimizers"]]
        names: list[list[str]] = [[] for _ in layout["optimizers"]]
        for key in optimizer_keys:
            names[layout["optimizers"].index(key)] = [
                self._local_names[p] for group in state[key].param_groups for p in group["params"]]
        local = self.pipeline.local_state_dict(self._module, with_mirror=True) if model_key is not None else {}
        checkpoint = load_local_shards(path, local, names)
        if model_key is not None:
            self.pipeline.load_state_dict(self._module, checkpoint["state_dict"])
        for key in optimizer_keys:
            named = checkpoint["optimizer_states"][layout["optimizers"].index(key)]
            optim_state.load_local_state(state[key], optim_state.indexed_from_named(named), self._local_names,
                                         self._optimizer_names(state[key]))
        remainder = {k: v for k, v in checkpoint.items() if k not in _RESERVED}
        for key, obj in list(state.items()):
            if key == model_key or key in optimizer_keys or key not in remainder:
                continue
            if isinstance(obj, _Stateful):
                obj.load_state_dict(remainder.pop(key))
            else:
                state[key] = remainder.pop(key)
        return remainder

    def _read_sharded_whole(self, path: Path) -> dict[str, Any]:
        """``fabric.load(dir)`` with no state: the whole checkpoint, under the keys it was saved with."""
        full = TawPipeCheckpointIO().load_checkpoint(path)
        layout = full.get(_LAYOUT_KEY) or {"model": "model", "optimizers": [
            f"optimizer_{i}" for i in range(len(full.get("optimizer_states", [])))]}
        out = {k: v for k, v in full.items() if k not in _RESERVED}
        if layout["model"] is not None:
            out[layout["model"]] = full.get("state_dict", {})
        out.update(zip(layout["optimizers"], full.get("optimizer_states", [])))
        return out

    # -- collectives ---------------------------------------------------------------------------------------------------
    @override
    def all_reduce(self, tensor: Tensor, group: Optional[Any] = None,
                   reduce_op: Optional[Union[ReduceOp, str]] = "mean") -> Tensor:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, group=_group.WORLD)
        return box[0]

    @override
    def teardown(self) -> None:
        if self.pipeline is not None:
            self.pipeline.teardown()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls,
                                   description="TawPipe topology-aware weight pipeline parallelism")
        strategy_registry.register("weipipe", cls, schedule="weipipe",
                                   description="WeiPipe-style topology-unaware weight ring (TawPipe ablation)")


def _dcp_keys(path: Path) -> list[str]:
    from lightning_tawpipe.checkpoint_io import tensor_index

    return list(tensor_index(path))


def register() -> None:
    """Register ``"tawpipe"`` and ``"weipipe"`` in Fabric's strategy registry (idempotent)."""
    if TawPipeFabricStrategy.strategy_name not in STRATEGY_REGISTRY:
        TawPipeFabricStrategy.register_strategies(STRATEGY_REGISTRY)


register()
