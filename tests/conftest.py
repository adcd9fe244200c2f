"""Shared fixtures: launching real multi-process Lightning jobs (gloo) and caching the DDP references."""

import atexit
import functools
import os
import sys

import pytest
import torch

from lightning_tawpipe.demo import _parser, job_env, launch_worker, worker_result

torch.set_num_threads(1)


PORT_RACE = ("Address already in use", "EADDRINUSE")
JOB_TIMEOUT_S = 540  # below pytest-timeout's 600 s, so a hung job is killed and reported, not abandoned


_SERVER = []


def _fork_server():
    """One server per test session (see ``fork_server.py``): started on first use, restarted if it died."""
    from fork_server import ForkServer

    if not _SERVER or _SERVER[0].proc.poll() is not None:
        _SERVER[:] = [ForkServer()]
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


def _launch_forked(args: list[str], out: str, node_ranks: int) -> dict:
    """The job ``launch_worker`` would run, with every rank forked from the fork server instead of started anew."""
    argv = ["--worker", "--out", out, *args]
    shape = _parser().parse_args(argv)
    if node_ranks != shape.num_nodes:
        raise ValueError(f"node_ranks={node_ranks} but the job asks for --num_nodes {shape.num_nodes}")
    codes, logs, timed_out = _fork_server().run(argv, out, shape.num_nodes, shape.devices, job_env(), JOB_TIMEOUT_S)
    cmd = [sys.executable, "-m", "lightning_tawpipe.demo", *argv]
    if timed_out:
        raise RuntimeError(f"worker {cmd} timed out after {JOB_TIMEOUT_S}s:\n" + "\n".join(l[-3000:] for l in logs))
    return worker_result(cmd, codes, logs, out)


def launch_job(args: list[str], out: str, node_ranks: int = 1, launcher: str | None = None) -> dict:
    """Run one ``--worker`` job, forked (the default) or through the real script launch (``launcher="script"``)."""
    launcher = launcher or os.environ.get("TAWPIPE_TEST_LAUNCH", "fork")
    if launcher == "script":
        return launch_worker(args, out, node_ranks=node_ranks, timeout=JOB_TIMEOUT_S)
    return _launch_forked(args, out, node_ranks)


@functools.lru_cache(maxsize=None)
def _run(args: tuple[str, ...], node_ranks: int, tmp_root: str, launcher: str | None) -> dict:
    out = os.path.join(tmp_root, f"run{abs(hash((args, node_ranks, launcher)))}")
    try:
        return launch_job(list(args), out, node_ranks, launcher)
    except RuntimeError as e:  # the free port we picked was taken before the job bound it: only that is retried
        if not any(sig in str(e) for sig in PORT_RACE):
            raise
        return launch_job(list(args), out, node_ranks, launcher)


@pytest.fixture(scope="session")
def train_job(tmp_path_factory):
    """``train_job(*args, node_ranks=1)`` runs ``python -m lightning_tawpipe.demo --worker ARGS`` once per session."""
    root = str(tmp_path_factory.mktemp("jobs"))

    def run(*args: str, node_ranks: int = 1, launcher: str | None = None) -> dict:
        return _run(tuple(args), node_ranks, root, launcher)

    return run
