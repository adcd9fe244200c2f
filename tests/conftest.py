"""Shared fixtures: launching real multi-process Lightning jobs (gloo) and caching the DDP references."""

import functools
import os

import pytest
import torch

from lightning_tawpipe.demo import launch_worker

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _run(args: tuple[str, ...], node_ranks: int, tmp_root: str) -> dict:
    out = os.path.join(tmp_root, f"run{abs(hash((args, node_ranks)))}")
    return launch_worker(list(args), out, node_ranks=node_ranks)


@pytest.fixture(scope="session")
def train_job(tmp_path_factory):
    """``train_job(*args, node_ranks=1)`` runs ``python -m lightning_tawpipe.demo --worker ARGS`` once per session."""
    root = str(tmp_path_factory.mktemp("jobs"))

    def run(*args: str, node_ranks: int = 1) -> dict:
        return _run(tuple(args), node_ranks, root)

    return run
