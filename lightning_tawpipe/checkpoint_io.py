"""Sharded checkpoints: every rank writes what it owns, in parallel, with ``torch.distributed.checkpoint``.

Layout (Lightning's sharded layout, the one its FSDP strategy writes, so
``python -m lightning.pytorch.utilities.consolidate_checkpoint DIR`` works on it unchanged)::

    epoch=0-step=3.ckpt/          a directory
        .metadata                 DCP's index of every tensor
        __<rank>_0.distcp         what rank <rank> owns: its chunk's weights and their optimizer state
        meta.pt                   everything else Lightning saves (loops, schedulers, callbacks, hyperparameters)

DCP keys: ``model`` (the LightningModule's state dict, by parameter name) and ``optimizer_<i>`` (state keyed by
parameter name, param groups listing parameter names). With several replicas these hold replica 0's state;
replica ``r``'s own weights and optimizer state are under ``replica<r>.model`` / ``replica<r>.optimizer_<i>`` and
every replica's outer-loop state under ``outer.replica<r>`` (anchors, error feedback or momentum, step counters). TawPipe owns whole parameters, so a rank's shard is a set of
names; nothing in the files depends on the topology, and any topology (or ``ddp``) can read them back.

Nothing is lost: a save writes into a hidden staging directory (``.<name>.partial-<token>``) and only a complete
one is renamed into place, so a crash mid-save leaves the previous checkpoint intact and the partial one is refused
by name. Everything is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from typing_extensions import override

from lightning_tawpipe.runtime.optim_state import indexed_from_named

SHARDED_EXTRA = "tawpipe_sharded"  # checkpoint entry whose tensors go into the DCP shards (never into meta.pt)
META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
DCP_INDEX = ".metadata"
_PARTIAL = re.compile(r"^\..+\.partial-[0-9a-f]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what is wrong and what to do."""


def check_checkpoint(path: str | Path) -> Path:
    """Refuse missing, partial and incomplete checkpoints early, with a message that says what to do."""
    path = Path(path)
    if _PARTIAL.match(path.name):
        raise CheckpointError(
            f"{path} is an incomplete checkpoint left by an interrupted save (it was never committed). Resume from "
            "the previous checkpoint instead; this directory can be deleted."
        )
    if not path.exists():
        partial = sorted(p.name for p in path.parent.glob(f".{path.name}.partial-*")) if path.parent.exists() else []
        hint = f" An interrupted save of it exists ({partial[0]}) but was never committed." if partial else ""
        raise CheckpointError(f"No checkpoint at {path}.{hint} Check the path, or resume from an earlier checkpoint.")
    if path.is_dir():
        missing = [name for name in (DCP_INDEX, META_FILE) if not (path / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{path} is not a complete sharded checkpoint: it lacks {', '.join(missing)}. It was not written by a "
                "finished Lightning/TawPipe save (or files were removed); resume from another checkpoint."
            )
        referenced = {info.relative_path for info in _storage_data(path).values()}
        absent = sorted(name for name in referenced if not (path / name).is_file())
        if absent or not referenced:
            raise CheckpointError(
                f"{path} is incomplete: shard file(s) {', '.join(absent) or '*.distcp'} listed in its index are "
                "missing (a rank's write was lost or the files were moved). Resume from another checkpoint."
            )
    return path


def _storage_data(path: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata().storage_data or {}
    except Exception as e:
        raise CheckpointError(f"Could not read the shard index {path / DCP_INDEX} (corrupt?): {e}") from e


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"Could not read {path / META_FILE} (corrupt or not a checkpoint): {e}") from e


def tensor_index(path: Path) -> dict[str, Any]:
    """DCP's metadata: flattened key -> storage metadata (``.size``, ``.properties.dtype`` for tensors)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"Could not read the shard index {path / DCP_INDEX} (corrupt?): {e}") from e


class TawPipeCheckpointIO(CheckpointIO):
    """Saves TawPipe's sharded state with DCP (all ranks call ``save_checkpoint``) and loads any checkpoint.

    ``load_checkpoint`` returns a *full* checkpoint in Lightning's ordinary format (weights by name, optimizer state
    in ``torch.optim``'s index layout): it is what another strategy (``ddp``, single device) needs to resume from a
    TawPipe checkpoint, e.g. ``Trainer(strategy="ddp", plugins=[TawPipeCheckpointIO()])``. ``TawPipeStrategy`` itself
    loads only each rank's own part (see ``TawPipeStrategy.load_checkpoint``).
    """

    def __init__(self, async_save: bool = False) -> None:
        super().__init__()
        self.async_save = async_save
        self._pending = None  # the last asynchronous save: its future and rank 0's commit outcome
        self._group = None  # a gloo group of its own for background saves (never shared with training)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"TawPipeCheckpointIO takes no storage_options, got {storage_options!r}.")
        self.wait()  # one save at a time; the previous one's error surfaces here
        path = Path(path)
        checkpoint = dict(checkpoint)
        shards = {"model": checkpoint.pop("state_dict")}
        for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
            shards[f"optimizer_{i}"] = state
        shards.update(checkpoint.pop(SHARDED_EXTRA, {}))
        staging = path.parent / f".{path.name}.partial-{_shared_token()}"
        if _rank() == 0:
            staging.mkdir(parents=True)
        _barrier()
        if not self.async_save:
            self._write_shards(shards, staging)
            if _rank() == 0:
                torch.save(checkpoint, staging / META_FILE)
                _commit(staging, path)
            _barrier()
            return
        self._start_async(_snapshot(shards), checkpoint, staging, path)

    def _start_async(self, shards: dict[str, Any], checkpoint: dict[str, Any], staging: Path, path: Path) -> None:
        """Write in a background thread; rank 0 commits once every rank's shard is on disk (DCP's coordinator only
        finishes after gathering every rank's write results)."""
        from torch.distributed.checkpoint import async_save

        meta = io.BytesIO()
        torch.save(checkpoint, meta)  # serialized now: the Trainer's state keeps changing while the write runs
        if dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo")
        future = async_save(shards, checkpoint_id=str(staging), process_group=self._group)
        future = getattr(future, "upload_completion", future)
        outcome: dict[str, BaseException] = {}
        committed = threading.Event()
        if _rank() == 0:
            def commit(done) -> None:
                try:
                    if done.exception() is None:
                        (staging / META_FILE).write_bytes(meta.getvalue())
                        _commit(staging, path)
                except BaseException as e:  # surfaced by wait()
                    outcome["error"] = e
                finally:
                    committed.set()

            future.add_done_callback(commit)
        else:
            committed.set()
        self._pending = (future, committed, outcome, path)

    def wait(self) -> None:
        """Block until the last asynchronous save is committed; raise its error, if any (on every rank that saw it)."""
        if self._pending is None:
            return
        future, committed, outcome, path = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as e:
            raise CheckpointError(f"The asynchronous save of {path} failed; it was not committed: {e}") from e
        finally:
            committed.wait()  # rank 0's commit runs in a callback after the future resolves
        if "error" in outcome:
            raise CheckpointError(f"Committing the asynchronous save of {path} failed: {outcome['error']}")

    @override
    def teardown(self) -> None:
        self.wait()

    def _write_shards(self, shards: dict[str, Any], staging: Path) -> None:
        from torch.distributed.checkpoint import save

        save(shards, checkpoint_id=str(staging))

    @override
    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = True):
        path = check_checkpoint(path)
        if path.is_file():
            try:
                return torch.load(path, map_location=map_location or "cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"Could not read checkpoint file {path} (corrupt or truncated?): {e}") from e
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
        from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

        read_meta(path)  # a clear error if meta.pt is damaged
        checkpoint = _format_checkpoint(_load_distributed_checkpoint(path))
        checkpoint["optimizer_states"] = [indexed_from_named(o) for o in checkpoint.get("optimizer_states", [])]
        return checkpoint

    @override
    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _snapshot(tree: Any) -> Any:
    """Copies of every tensor in ``tree``: an asynchronous save must not see the optimizer's next updates."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_snapshot(v) for v in tree)
    return tree


def _commit(staging: Path, path: Path) -> None:
    """Move a complete staging directory into place; an existing checkpoint of that name is replaced."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(staging, path)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.rename(staging, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _shared_token() -> str:
    """A token all ranks agree on (rank 0 draws it), naming this save's staging directory."""
    box = [uuid.uuid4().hex[:12]]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def load_local_shards(path: Path, model: dict[str, torch.Tensor], optimizer_names: list[list[str]],
                      replica: int = 0) -> dict[str, Any]:
    """Read only the named parts of a sharded checkpoint (a collective call: every rank asks for its own part).

    ``model`` maps the parameter names this rank needs to tensors of the expected shape (their dtype is what is
    returned); ``optimizer_names[i]`` lists the parameters whose ``optimizer_<i>`` state this rank steps. Returns
    Lightning's checkpoint dict with this rank's ``state_dict`` and name-keyed ``optimizer_states``. Missing
    parameters or different shapes (a checkpoint of another model) raise :class:`CheckpointError` before reading.
    ``replica``: read that replica's own state (``replica<r>.*``) where the checkpoint has it, else replica 0's (a
    checkpoint of fewer replicas: the new ones start from replica 0).
    """
    from torch.distributed.checkpoint import load

    path = check_checkpoint(path)
    meta = read_meta(path)
    index = tensor_index(path)
    scope = f"replica{replica}"
    if replica == 0 or not any(k.startswith(f"{scope}.model.") for k in index):
        scope = ""
    request = _local_request(path, index, model, optimizer_names, f"{scope}." if scope else "")
    load({scope: request} if scope else request, checkpoint_id=str(path))
    meta["state_dict"] = request.pop("model")
    meta["optimizer_states"] = [request[f"optimizer_{i}"] for i in range(len(optimizer_names))]
    return meta


def load_tensors(path: Path, key: str, template: dict[str, Any]) -> dict[str, Any] | None:
    """Read the subtree ``key`` (e.g. ``outer.replica1``) shaped like ``template`` (tensors of the right shapes;
    ``None`` for plain values); ``None`` if the checkpoint has no such entry. A collective call: every rank reads
    (possibly nothing) together, so ranks whose entry is missing do not leave the others waiting."""
    from torch.distributed.checkpoint import load

    index = tensor_index(check_checkpoint(path))
    present = any(k.startswith(f"{key}.") for k in index)
    request: Any = template if present else {}
    for part in reversed(key.split(".")):
        request = {part: request}
    load(request if present else {}, checkpoint_id=str(path))
    if not present:
        return None
    for part in key.split("."):
        request = request[part]
    return request


def _local_request(path: Path, index: dict, model: dict[str, torch.Tensor], optimizer_names: list[list[str]],
                   scope: str) -> dict[str, Any]:
    """The DCP request for this rank's weights and optimizer state under ``scope`` (checked against the index)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index = {k[len(scope):]: v for k, v in index.items() if k.startswith(scope)} if scope else index
    missing = [n for n in model if f"model.{n}" not in index]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} parameter(s) of this model, e.g. {missing[:3]}: it was saved from another "
            "model (different config or wrapper). Load a checkpoint of this model."
        )
    wrong = [(n, tuple(index[f"model.{n}"].size), tuple(t.shape)) for n, t in model.items()
             if tuple(index[f"model.{n}"].size) != tuple(t.shape)]
    if wrong:
        n, saved, here = wrong[0]
        raise CheckpointError(
            f"{path} was saved from a different model: {n} has shape {saved} there and {here} here "
            f"({len(wrong)} parameter(s) differ). Load a checkpoint of this model config."
        )
    request: dict[str, Any] = {"model": {n: torch.empty_like(t, device="cpu") for n, t in model.items()}}
    for i, names in enumerate(optimizer_names):
        prefix = f"optimizer_{i}."
        if not any(k.startswith(prefix) for k in index):
            raise CheckpointError(f"{path} has no state for optimizer {i}: it was saved with fewer optimizers.")
        state: dict[str, dict] = {}
        groups: dict[int, dict] = {}
        wanted = set(names)
        for key, md in index.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest.startswith("state."):
                name, _, field = rest[len("state."):].rpartition(".")
                if name in wanted:
                    value = None if isinstance(md, BytesStorageMetadata) else torch.empty(
                        tuple(md.size), dtype=md.properties.dtype)
                    state.setdefault(name, {})[field] = value
            elif rest.startswith("param_groups."):
                j, _, field = rest[len("param_groups."):].partition(".")
                groups.setdefault(int(j), {})[field] = None
        request[f"optimizer_{i}"] = {"state": state, "param_groups": [groups[j] for j in sorted(groups)]}
    return request


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, then rename: a crash never leaves a truncated file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    torch.save(obj, staging)
    os.replace(staging, path)
