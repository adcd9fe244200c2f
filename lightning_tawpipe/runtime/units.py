"""Find the pipeline units of a LitGPT model and route their forward and backward through the engine.

Units, in forward order: the token embedding, every transformer block, and the final norm with the LM head. The
model file is never edited: each unit module's ``forward`` is replaced on the instance by a wrapper that

* asks the engine for the unit's chunk before computing (the engine makes sure its weights are resident), and
* when gradients are needed, either (default) runs the original forward under autograd with saved-tensor hooks
  that store weights as references to "chunk c's weights" instead of keeping the working buffer alive (the
  engine re-materialises them from whichever slot holds the chunk in backward), and a hook on the unit's output
  that brings the chunk back before the unit's backward runs; or, with ``activation_checkpointing``, runs the
  forward inside :class:`_UnitFunction`, which keeps only the unit's inputs and recomputes the unit in backward.
  Either way the parameter gradients land in the engine's gradient buffer for the chunk (``param.grad`` is a
  view into it during the chunk's backward step).

So a user's ``training_step`` stays ``logits = self.model(idx); loss = ...; return loss``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_tawpipe.schedule.actions import Op

UNIT_HELP = (
    "TawPipe streams a LitGPT `GPT` (litgpt.model.GPT, with `transformer.wte`, `transformer.h`, `transformer.ln_f` "
    "and `lm_head`) through its weight pipeline. Make the LightningModule hold the GPT as a submodule (for example "
    "`self.model = GPT(config)`), or define `pipeline_units(self) -> list[list[nn.Module]]` on the LightningModule "
    "returning the units in forward order (first: the embedding, last: the head), each called once per forward."
)


@dataclass
class Unit:
    """One pipeline unit: modules that always live in the same chunk (e.g. final norm + LM head)."""

    modules: list[tuple[str, nn.Module]]
    label: str = ""  # for humans: "embedding", "block 3", "norm+head", or the module name

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for prefix, module in self.modules:
            out += [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters()]
        return out

    def numel(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())


def find_units(root: nn.Module) -> list[Unit]:
    """The units of the single LitGPT-style GPT inside ``root`` (or ``root.pipeline_units()``)."""
    names = {m: n for n, m in root.named_modules()}
    if callable(getattr(root, "pipeline_units", None)):
        units = [Unit([(names[m], m) for m in group], label=names[group[0]]) for group in root.pipeline_units()]
    else:
        gpts = [(n, m) for n, m in root.named_modules() if _looks_like_gpt(m)]
        if len(gpts) != 1:
            found = "none" if not gpts else ", ".join(repr(n) for n, _ in gpts)
            raise TypeError(f"TawPipe found {found} LitGPT GPT models in {type(root).__name__}. {UNIT_HELP}")
        prefix, gpt = gpts[0]
        dot = f"{prefix}." if prefix else ""
        t = gpt.transformer
        units = [Unit([(f"{dot}transformer.wte", t.wte)], label="embedding")]
        units += [Unit([(f"{dot}transformer.h.{i}", block)], label=f"block {i}") for i, block in enumerate(t.h)]
        units.append(Unit([(f"{dot}transformer.ln_f", t.ln_f), (f"{dot}lm_head", gpt.lm_head)], label="norm+head"))
    _check_no_shared_parameters(units)
    return units


def find_gpt(root: nn.Module) -> nn.Module | None:
    """The one LitGPT-style GPT inside ``root`` (``None`` if there is not exactly one)."""
    gpts = [m for _, m in root.named_modules() if _looks_like_gpt(m)]
    return gpts[0] if len(gpts) == 1 else None


def _looks_like_gpt(m: nn.Module) -> bool:
    t = getattr(m, "transformer", None)
    return (
        isinstance(t, nn.ModuleDict)
        and all(k in t for k in ("wte", "h", "ln_f"))
        and isinstance(t["h"], nn.ModuleList)
        and isinstance(getattr(m, "lm_head", None), nn.Module)
    )


def _check_no_shared_parameters(units: list[Unit]) -> None:
    seen: dict[nn.Parameter, str] = {}
    for unit in units:
        for name, p in unit.named_parameters():
            if p in seen:
                raise ValueError(
                    f"Parameters {seen[p]!r} and {name!r} are the same tensor (tied weights). TawPipe places each "
                    "parameter in exactly one chunk; untie them (LitGPT's GPT is untied unless you tie it by hand)."
                )
            seen[p] = name


class _UnitFunction(torch.autograd.Function):
    """Forward without a graph, keep the inputs; backward recomputes the unit and returns input gradients."""

    @staticmethod
    def forward(ctx, runner: _UnitRunner, token: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.runner = runner
        ctx.save_for_backward(*tensors)
        return runner.call(tensors)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grads = ctx.runner.backward(ctx.saved_tensors, ctx.needs_input_grad[2:], grad_out)
        return (None, None, *grads)


class _JoinGraph(torch.autograd.Function):
    """Identity that puts a unit's output into the autograd graph (through the engine's token).

    A frozen first unit (e.g. a LoRA model's embedding) gets integer token ids and has no trainable weights, so its
    output would not require grad: its backward would never run and the schedule's backward step for it would
    never be requested. Joining the graph makes autograd reach it like every other unit.
    """

    @staticmethod
    def forward(ctx, token: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


class _UnitRunner:
    """Binds one unit module call (its non-tensor arguments) to the engine."""

    def __init__(self, engine, chunk: int, module: nn.Module, forward: Callable, template: list, kwargs_keys: list,
                 unit: int):
        self.engine, self.chunk, self.module, self.forward = engine, chunk, module, forward
        self.template, self.kwargs_keys, self.unit = template, kwargs_keys, unit

    def call(self, tensors) -> torch.Tensor:
        it = iter(tensors)
        values = [next(it) if v is _TENSOR else v for v in self.template]
        n_pos = len(values) - len(self.kwargs_keys)
        out = self.forward(*values[:n_pos], **dict(zip(self.kwargs_keys, values[n_pos:])))
        if not torch.is_tensor(out):
            raise TypeError(f"TawPipe units must return one tensor; {type(self.module).__name__} returned {type(out)}")
        return out

    def backward(self, saved, needs_grad, grad_out):
        self.engine.enter(Op.BACKWARD, self.chunk, self.unit)
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved, needs_grad)]
        params = [p for p in self.module.parameters() if p.requires_grad]
        with torch.enable_grad():
            out = self.call(inputs)
        wrt = [t for t in inputs if t.requires_grad] + params
        grads = list(torch.autograd.grad(out, wrt, grad_out, allow_unused=True)) if wrt else []
        n_in = len(wrt) - len(params)
        for p, g in zip(params, grads[n_in:]):
            if g is not None:
                p.grad.add_(g)
        in_grads = iter(grads[:n_in])
        return [next(in_grads) if t.requires_grad else None for t in inputs]


class _Tensor:
    pass


_TENSOR = _Tensor()


def install(units: list[Unit], chunk_of_unit: list[int], engine) -> None:
    """Replace each unit module's ``forward`` with the pipelined wrapper (idempotent)."""
    for index, (unit, chunk) in enumerate(zip(units, chunk_of_unit)):
        # the output of a chunk's last unit (but the model's) is where chunk-major order cuts the graph (Engine.cut)
        ends_chunk = index + 1 < len(chunk_of_unit) and chunk_of_unit[index + 1] != chunk
        for _, module in unit.modules:
            original = module.__dict__.get("_tawpipe_original_forward") or module.forward
            module._tawpipe_original_forward = original
            cut = ends_chunk and module is unit.modules[-1][1]  # a unit's modules run in order; cut after its last
            module.forward = types.MethodType(_make_wrapper(engine, chunk, original, index, cut), module)


def uninstall(units: list[Unit]) -> None:
    for unit in units:
        for _, module in unit.modules:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_tawpipe_original_forward", None)


def _make_wrapper(engine, chunk: int, original: Callable, unit: int, cut: bool = False) -> Callable:
    def enter_backward(grad: torch.Tensor) -> None:
        engine.enter(Op.BACKWARD, chunk, unit)

    def pipelined_forward(module: nn.Module, *args, **kwargs):
        engine.enter(Op.FORWARD, chunk)
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        out = unit_forward(module, *args, **kwargs)
        return engine.cut(chunk, out) if cut and engine.cuts_graph else out

    def unit_forward(module: nn.Module, *args, **kwargs):
        if not engine.activation_checkpointing:
            with engine.weight_saving_hooks():
                out = original(*args, **kwargs)
            if not torch.is_tensor(out):
                raise TypeError(f"TawPipe units must return one tensor; {type(module).__name__} returned {type(out)}")
            if not out.requires_grad and engine.training_iteration and out.is_floating_point():
                out = _JoinGraph.apply(engine.token, out)
            if out.requires_grad:
                out.register_hook(enter_backward)
            return out
        values = list(args) + list(kwargs.values())
        tensors = [v for v in values if torch.is_tensor(v)]
        template = [_TENSOR if torch.is_tensor(v) else v for v in values]
        runner = _UnitRunner(engine, chunk, module, original, template, list(kwargs), unit)
        return _UnitFunction.apply(runner, engine.token, *tensors)

    return pipelined_forward
