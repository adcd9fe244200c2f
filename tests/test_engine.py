"""The engine's deferred gradient sends, on one rank with a scripted communicator (no processes, no model).

The schedule places a node's gradient send right behind the reduce that fills its buffer. The engine must not block
the host on that reduce: it defers the send and posts it at the first unit boundary after the reduce is done. It
must still post it, waiting if need be, before the host blocks on anything else, before anything touches the
buffer, before a forward step, after a backward pass (``flush_deferred``) and at the end of the iteration. The
multi-rank parity tests check that results stay exact; these check the order of events, which they cannot see.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lightning_tawpipe.runtime.engine import Engine
from lightning_tawpipe.schedule.actions import Action, Op
from lightning_tawpipe.schedule.program import Schedule
from lightning_tawpipe.topology import Topology

NUMEL = 4


class ScriptedWork:
    def __init__(self, name: str) -> None:
        self.name, self.done = name, False

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> None:
        self.done = True


class ScriptedComm:
    """Records every post and every wait, in order; work finishes only when a test says so (or is waited on)."""

    rank = 0

    def __init__(self) -> None:
        self.events: list[str] = []
        self.works: dict[str, ScriptedWork] = {}

    def _post(self, kind: str, peer: int) -> ScriptedWork:
        name = f"{kind}{peer}#{len(self.works)}"
        self.events.append(f"post {kind}")
        self.works[kind] = work = ScriptedWork(name)
        return work

    def isend(self, tensor, peer, lane):
        return self._post("send", peer)

    def irecv(self, tensor, peer, lane):
        return self._post("recv", peer)

    def broadcast(self, tensor, root, lane):
        return self._post("bcast", root)

    def reduce(self, tensor, root, lane):
        return self._post("reduce", root)

    def wait(self, work, what: str = "other") -> None:
        self.events.append(f"wait {what}")
        work.wait()


class NoModelLayout:
    """A chunk layout without parameters: the engine binds and unbinds nothing."""

    max_numel = NUMEL
    numel = n_trainable = {0: NUMEL, 1: NUMEL, 2: NUMEL}
    entries = {0: [], 1: [], 2: []}

    def bind(self, chunk, view) -> None:
        pass

    def unbind(self, chunk) -> None:
        pass

    def views(self, chunk, flat):
        return []


def engine_running(program: list[Action]) -> tuple[Engine, ScriptedComm]:
    comm = ScriptedComm()
    schedule = Schedule(name="scripted", topology=Topology.from_world(4, 2), owners=(0, 2, 1, 3), n_microbatches=1,
                        prefetch=1, train=True, programs=(tuple(program),) * 4, n_slots=2, n_grad_buffers=2,
                        n_recv_buffers=1)
    shard = SimpleNamespace(chunk=0, weights=torch.zeros(NUMEL), grad_acc=torch.zeros(NUMEL))
    engine = Engine(comm, NoModelLayout(), shard, lambda train, n: schedule, torch.float32, torch.device("cpu"))
    engine.begin(train=True, n_microbatches=1)
    return engine, comm


B1 = Action(Op.BACKWARD, 1, mb=0, buf="s1", buf2="g0")
REDUCE = Action(Op.REDUCE_G, 1, peer=0, buf="g0")
SEND = Action(Op.SEND_G, 1, peer=2, buf="g0")
B0 = Action(Op.BACKWARD, 0, mb=0, buf="s0", buf2="g1")
B2_INTO_G0 = Action(Op.BACKWARD, 2, mb=0, buf="s1", buf2="g0")


def test_a_send_behind_a_running_reduce_is_posted_at_the_next_unit_boundary_after_it_finishes():
    engine, comm = engine_running([B1, REDUCE, SEND, B0])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 0)  # the reduce runs: the send waits in the engine, the host computes B0
    assert comm.events == ["post reduce"]
    engine.enter(Op.BACKWARD, 0)  # a unit boundary inside B0, the reduce still running: nothing happens
    assert comm.events == ["post reduce"]
    comm.works["reduce"].done = True
    engine.enter(Op.BACKWARD, 0)  # the next boundary: the send goes out, without blocking on anything unfinished
    assert comm.events == ["post reduce", "wait RG", "post send"]
    engine.end()
    assert comm.events[-1] == "wait drain:SG"


def test_a_deferred_send_is_posted_before_the_host_blocks_and_after_a_backward_pass():
    engine, comm = engine_running([B1, REDUCE, SEND, B0])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 0)
    engine.flush_deferred()  # a backward pass returned: user code may run a collective next
    assert comm.events == ["post reduce", "wait RG", "post send"]
    engine.end()

    engine, comm = engine_running([B1, REDUCE, SEND, B0])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 0)
    engine.end()  # the end of the iteration posts it too, before draining
    assert comm.events == ["post reduce", "wait RG", "post send", "wait drain:SG"]


def test_touching_a_deferred_sends_buffer_posts_it_and_waits_for_it_first():
    engine, comm = engine_running([B1, REDUCE, SEND, B2_INTO_G0])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 2)  # B2 writes g0, which the send must read first
    assert comm.events == ["post reduce", "wait RG", "post send", "wait SG"]
    engine.end()


def test_sends_keep_their_program_order():
    second_reduce = Action(Op.REDUCE_G, 0, peer=0, buf="g1")
    second_send = Action(Op.SEND_G, 0, peer=2, buf="g1")
    engine, comm = engine_running([B1, REDUCE, SEND, B0, second_reduce, second_send])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 0)
    engine.end()  # B0's send queues behind B1's, still deferred: both go out in program order
    assert comm.events == ["post reduce", "post reduce", "wait RG", "post send", "wait RG", "post send",
                           "wait drain:SG", "wait drain:SG"]


def test_a_send_whose_reduce_has_finished_goes_out_at_once():
    engine, comm = engine_running([B1, REDUCE, B0, SEND])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 0)
    comm.works["reduce"].done = True
    engine.end()
    assert comm.events == ["post reduce", "wait RG", "post send", "wait drain:SG"]
    assert not engine._deferred


def test_a_deferred_send_does_not_wait_through_a_forward_step():
    """Between micro-batches the next compute is a forward, and user code runs after it: post first."""
    f0_next = Action(Op.FORWARD, 0, mb=1, buf="s0")
    engine, comm = engine_running([B1, REDUCE, SEND, f0_next])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.FORWARD, 0)
    assert comm.events == ["post reduce", "wait RG", "post send"]
    engine.end()
