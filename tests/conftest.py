"""Shared fixtures: launching real multi-process Lightning jobs (gloo) and caching the DDP references."""

import functools
import os

import pytest
import torch

from lightning_tawpipe.demo import launch_worker

torch.set_num_threads(1)


PORT_RACE = ("Address already in use", "EADDRINUSE")


@functools.lru_cache(maxsize=None)
def _run(args: tuple[str, ...], node_ranks: int, tmp_root: str) -> dict:
    out = os.path.join(tmp_root, f"run{abs(hash((args, node_ranks)))}")
    try:
        return launch_worker(list(args), out, node_ranks=node_ranks)
    except RuntimeError as e:  # the free port we picked was taken before the job bound it: only that is retried
        if not any(sig in str(e) for sig in PORT_RACE):
            raise
        return launch_worker(list(args), out, node_ranks=node_ranks)


@pytest.fixture(scope="session")
def train_job(tmp_path_factory):
    """``train_job(*args, node_ranks=1)`` runs ``python -m lightning_tawpipe.demo --worker ARGS`` once per session."""
    root = str(tmp_path_factory.mktemp("jobs"))

    def run(*args: str, node_ranks: int = 1) -> dict:
        return _run(tuple(args), node_ranks, root)

    return run
