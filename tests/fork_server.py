"""Start the tests' training jobs by forking every rank from one process that has already imported Lightning.

Why: on the 2-core CI box a 4-rank ``python -m lightning_tawpipe.demo --worker`` job spends about 8 of its
~10 s importing torch, Lightning and LitGPT, once in each node's launcher and again in each child Lightning starts.
Those imports were most of the suite's time. Here one long-lived server imports them once, and for every job
forks ``num_nodes x devices`` ranks from that clean state (it never runs a torch op or a collective itself).

Each forked rank gets what ``torchrun`` gives a process: ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``NODE_RANK`` and ``LOCAL_RANK``. Lightning therefore treats it as externally launched and does not start children,
as under ``torchrun``; everything after that (the Trainer, the strategy, gloo, the real model and data) is the same
code the subprocess launch runs. Lightning's own script launcher stays covered by the jobs that still launch for
real: the examples, the Fabric scripts, and ``test_parity``'s ``script-launch`` case. ``TAWPIPE_TEST_LAUNCH=script``
sends every job through :func:`lightning_tawpipe.demo.launch_worker` instead.

Protocol: one JSON request per line on the server's stdin, one JSON reply per line on its stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def _run_rank(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """In the forked child: become one rank of the job, write everything to ``log_path``, never return."""
    code = 1
    try:
        os.environ.update(env)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the server's request pipe is not the rank's to read
        from lightning_tawpipe.demo import main

        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # as the interpreter would: torch.distributed's excepthook adds the "[rankN]: " prefix
        sys.excepthook(*sys.exc_info())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait_all(pids: list[int], timeout: float) -> tuple[list[int], bool]:
    """Exit codes of ``pids`` (negative: killed by that signal); past ``timeout`` every survivor is killed."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    timed_out = False
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in pids:
            codes[pid] = os.waitstatus_to_exitcode(status)
            continue
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            for p in pids:
                if p not in codes:
                    os.kill(p, signal.SIGKILL)
        time.sleep(0.02)
    return [codes[p] for p in pids], timed_out


def serve() -> None:
    """The server's loop: import once, then fork one job's ranks per request."""
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch  # noqa: F401  everything the worker imports lazily, so no rank pays for it
    import litgpt  # noqa: F401
    import litgpt.lora  # noqa: F401
    import psutil  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    import lightning_tawpipe.checkpoint_io  # noqa: F401
    import lightning_tawpipe.data  # noqa: F401
    import lightning_tawpipe.demo  # noqa: F401
    import lightning_tawpipe.module  # noqa: F401

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything an import or a library prints goes to stderr, never into the reply stream
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        job = json.loads(line)
        pids, logs = [], []
        for node in range(job["num_nodes"]):
            for local in range(job["devices"]):
                log = os.path.join(job["out"], f"node{node}-rank{local}.log")
                env = dict(job["env"], NODE_RANK=str(node), LOCAL_RANK=str(local),
                           WORLD_SIZE=str(job["num_nodes"] * job["devices"]))
                pid = os.fork()
                if pid == 0:
                    _run_rank(job["argv"], env, log)
                pids.append(pid)
                logs.append(log)
        codes, timed_out = _wait_all(pids, job["timeout"])
        replies.write(json.dumps({"id": job["id"], "codes": codes, "logs": logs, "timed_out": timed_out}) + "\n")
        replies.flush()


class ForkServer:
    """The tests' handle on a running server (see the module docstring)."""

    def __init__(self) -> None:
        self.jobs = 0
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the test fork server did not start (exit code {self.proc.poll()})")

    def run(self, argv: list[str], out: str, num_nodes: int, devices: int, env: dict[str, str],
            timeout: float) -> tuple[list[int], list[str], bool]:
        """Run one job; returns each rank's exit code and log text (node-major), and whether it timed out."""
        os.makedirs(out, exist_ok=True)
        self.jobs += 1
        request = {"id": self.jobs, "argv": argv, "out": out, "num_nodes": num_nodes, "devices": devices, "env": env,
                   "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the test fork server died (exit code {self.proc.wait()})")
        reply = json.loads(reply)
        if reply["id"] != request["id"]:  # an earlier job's late answer: this server can no longer be trusted
            self.proc.kill()
            raise RuntimeError(f"the test fork server answered job {reply['id']} to job {request['id']}; restarted")
        texts = []
        for path in reply["logs"]:
            with open(path, errors="replace") as f:
                texts.append(f.read())
        return reply["codes"], texts, reply["timed_out"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
