"""Optimizer state between TawPipe shards and the standard, topology-independent ``torch.optim`` format.

Each rank's optimizer steps only its masters (and the replicated parameters). A checkpoint, though, should not
depend on how the model was cut: this module merges every rank's per-parameter state into the ordinary
``optimizer.state_dict()`` layout of the *unsharded* optimizer (state indexed by the parameters' positions in the
param groups as ``configure_optimizers`` built them), which any strategy - ``ddp``, or TawPipe on another topology -
can load; and it takes such a state dict apart again for this rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim import Optimizer


def group_names(optimizer: Optimizer, name_of: dict) -> list[list[str]]:
    """Names of the parameters in each param group, in order (call before the groups are sharded)."""
    return [[name_of[p] for p in group["params"]] for group in optimizer.param_groups]


def gather_full_state(optimizer: Optimizer, local_name: dict, full_names: list[list[str]], dst: int = 0) -> dict:
    """The unsharded ``state_dict`` on rank ``dst`` (``{}`` elsewhere); a collective call. Parameters missing from
    ``local_name`` (a mirror's copies of another rank's masters) are left to the rank that names them."""
    mine = {local_name[p]: _cpu(s) for p, s in optimizer.state.items() if s and p in local_name}
    gathered: list = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(mine, gathered, dst=dst)
    if dist.get_rank() != dst:
        return {}
    by_name: dict = {}
    for part in gathered:
        by_name.update(part)
    state, groups, index = {}, [], 0
    for names, group in zip(full_names, optimizer.param_groups):
        ids = []
        for name in names:
            if name in by_name:
                state[index] = by_name[name]
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def load_local_state(optimizer: Optimizer, full: dict, local_name: dict, full_names: list[list[str]]) -> None:
    """Load this rank's part of an unsharded ``state_dict`` into its sharded ``optimizer``."""
    if len(full["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"The checkpoint's optimizer has {len(full['param_groups'])} param groups, this one has "
            f"{len(optimizer.param_groups)}: it was saved from a different configure_optimizers."
        )
    index_of, sizes = {}, []
    for names, saved in zip(full_names, full["param_groups"]):
        if len(names) != len(saved["params"]):
            raise ValueError(
                f"A param group of the checkpoint's optimizer has {len(saved['params'])} parameters, this model's has "
                f"{len(names)}: the checkpoint comes from another model or optimizer setup."
            )
        index_of.update({n: i for n, i in zip(names, saved["params"])})
        sizes.append(len(names))
    state, groups, local_index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, full["param_groups"]):
        ids = []
        for p in group["params"]:
            saved_state = full["state"].get(index_of[local_name[p]])
            if saved_state is not None:
                state[local_index] = saved_state
            ids.append(local_index)
            local_index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def local_state_by_name(optimizer: Optimizer, local_name: dict, full_names: list[list[str]]) -> dict:
    """This rank's optimizer state keyed by parameter name, with the unsharded param groups (names, not indices).

    This is the sharded checkpoint's ``optimizer_<i>`` entry (the layout of FSDP's sharded optimizer state): every
    rank contributes the state of the parameters it owns (those ``local_name`` names); the param groups, identical
    everywhere, list every parameter of the unsharded optimizer by name, so the state can be resharded onto any
    topology or strategy.
    """
    state = {local_name[p]: dict(s) for p, s in optimizer.state.items() if s and p in local_name}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": list(names)}
              for names, group in zip(full_names, optimizer.param_groups)]
    return {"state": state, "param_groups": groups}


def indexed_from_named(named: dict) -> dict:
    """A name-keyed optimizer state (as sharded checkpoints store it) in ``torch.optim``'s index-keyed layout."""
    index_of: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = []
        for name in group["params"]:
            index_of[name] = len(index_of)
            ids.append(index_of[name])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    unknown = [n for n in named["state"] if n not in index_of]
    if unknown:
        raise ValueError(f"Optimizer state for parameters that are in no param group, e.g. {unknown[:3]}.")
    return {"state": {index_of[n]: s for n, s in named["state"].items()}, "param_groups": groups}
