"""The engine's deferred operations, on one rank with a scripted communicator (no processes, no model).

The schedule places a node's gradient send right behind the reduce that fills its buffer, and a relay's broadcast
of a remote chunk one compute step before its use, whether or not the inter-node receive has arrived. The engine
must not block the host on either input: it defers the operation and posts it at the first unit boundary after the
input is done. Later operations of the same communicator family queue behind it (every member must issue them in
one order); other families go on. It must still post it, waiting if need be, before the host blocks on anything
else, before anything touches its buffers, before the forward step after which user code runs, after a backward
pass (``flush_deferred``) and at the end of the iteration. The multi-rank parity tests check that results stay
exact; these check the order of events, which they cannot see.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
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


def engine_running(program: list[Action], comm: ScriptedComm | None = None,
                   watch_inputs: bool = False) -> tuple[Engine, ScriptedComm]:
    comm = comm or ScriptedComm()
    schedule = Schedule(name="scripted", topology=Topology.from_world(4, 2), owners=(0, 2, 1, 3), n_microbatches=1,
                        prefetch=2, train=True, programs=(tuple(program),) * 4, n_slots=3, n_grad_buffers=2,
                        n_recv_buffers=1)
    shard = SimpleNamespace(chunk=0, weights=torch.zeros(NUMEL), grad_acc=torch.zeros(NUMEL))
    engine = Engine(comm, NoModelLayout(), shard, lambda train, n, exchange: schedule, torch.float32, torch.device("cpu"),
                    watch_inputs=watch_inputs)
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


# rank 0 relays chunk 2: it receives it from rank 2 (another node) into s2 and broadcasts it in its node
RECV_2 = Action(Op.RECV_W, 2, peer=2, buf="s2")
RELAY_2 = Action(Op.BCAST_W, 2, peer=0, buf="s2")
F0, F1, F2 = (Action(Op.FORWARD, c, mb=0, buf=f"s{c}") for c in range(3))


def test_a_relay_broadcast_waits_for_its_receive_without_blocking_compute_that_does_not_need_it():
    engine, comm = engine_running([RECV_2, F0, RELAY_2, F1, F2])
    engine.enter(Op.FORWARD, 0)
    engine.enter(Op.FORWARD, 1)  # the receive is in flight: F1 (its own weights) runs, the broadcast waits
    assert comm.events == ["post recv"]
    engine.enter(Op.FORWARD, 1)  # a unit boundary, still in flight
    assert comm.events == ["post recv"]
    comm.works["recv"].done = True
    engine.enter(Op.FORWARD, 1)  # the next boundary: the broadcast goes out
    assert comm.events == ["post recv", "wait RW", "post bcast"]
    engine.enter(Op.FORWARD, 2)  # reads s2 like the broadcast from it: nothing to wait for
    assert comm.events == ["post recv", "wait RW", "post bcast"]
    engine.end()


def test_a_compute_that_needs_a_relayed_chunk_posts_its_broadcast_before_waiting_for_the_receive():
    engine, comm = engine_running([RECV_2, F0, RELAY_2, F2, F1])
    engine.enter(Op.FORWARD, 0)
    engine.enter(Op.FORWARD, 2)  # the node's other ranks wait for this broadcast: post it before blocking
    assert comm.events == ["post recv", "wait RW", "post bcast"]
    engine.enter(Op.FORWARD, 1)
    engine.end()


def test_the_forward_step_after_which_user_code_runs_posts_everything_deferred_first():
    engine, comm = engine_running([RECV_2, F0, RELAY_2, F1, B1])
    engine.enter(Op.FORWARD, 0)
    engine.enter(Op.FORWARD, 1)  # the micro-batch's last forward: the loss (user code) comes next
    assert comm.events == ["post recv", "wait RW", "post bcast"]
    engine.enter(Op.BACKWARD, 1)
    engine.end()


def test_a_deferred_broadcast_holds_back_its_familys_later_operations_and_no_other():
    """A non-root broadcast after a deferred relay queues behind it (the node's ranks must issue broadcasts in one
    order); a gradient send, another family, goes out as soon as its own reduce is done."""
    bcast_1 = Action(Op.BCAST_W, 1, peer=1, buf="s1")
    engine, comm = engine_running([RECV_2, B1, REDUCE, SEND, RELAY_2, bcast_1, B0])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 0)  # reduce running, receive in flight: the send and both broadcasts wait
    assert comm.events == ["post recv", "post reduce"]
    comm.works["reduce"].done = True
    engine.enter(Op.BACKWARD, 0)
    assert comm.events == ["post recv", "post reduce", "wait RG", "post send"]
    comm.works["recv"].done = True
    engine.enter(Op.BACKWARD, 0)  # the relay, then the broadcast queued behind it, in program order
    assert comm.events[4:] == ["wait RW", "post bcast", "post bcast"]
    assert not engine._deferred
    engine.end()


def test_a_compute_that_needs_a_queued_broadcast_posts_the_queue_and_waits():
    bcast_1 = Action(Op.BCAST_W, 1, peer=1, buf="s1")
    engine, comm = engine_running([RECV_2, F0, RELAY_2, bcast_1, F1, F2])
    engine.enter(Op.FORWARD, 0)
    assert comm.events == ["post recv"]
    engine.enter(Op.FORWARD, 1)  # F1 reads s1, which the queued broadcast writes: post both, wait for it
    assert comm.events == ["post recv", "wait RW", "post bcast", "post bcast", "wait BW"]
    engine.enter(Op.FORWARD, 2)
    engine.end()


def test_a_receive_is_not_held_back_by_a_deferred_send_to_the_same_peer():
    """Messages match in order per direction and peer: a receive from rank 2 is independent of a send to it."""
    receive = Action(Op.RECV_G, 0, peer=2, buf="q0")
    engine, comm = engine_running([B1, REDUCE, SEND, receive, B0])
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 0)
    assert comm.events == ["post reduce", "post recv"]  # the send still waits for its reduce
    engine.end()


# -- helper threads (``watch_inputs``, on for gloo): post the moment the input completes, with no unit boundary ------
class GlooLikeWork:
    """Finishes when the test releases it (or fails with ``error``). Like gloo's point-to-point work it reports
    completion only after a wait, and it counts waits: a second wait on a gloo receive blocks until the timeout."""

    def __init__(self) -> None:
        self.released, self.finished, self.waits, self.error = threading.Event(), False, 0, None

    def is_completed(self) -> bool:
        return self.finished

    def wait(self) -> None:
        self.waits += 1
        assert self.released.wait(10), "the test never released this work"
        if self.error is not None:
            raise self.error
        self.finished = True


class ThreadedComm(ScriptedComm):
    def _post(self, kind: str, peer: int) -> GlooLikeWork:
        self.events.append(f"post {kind}")
        self.works[kind] = work = GlooLikeWork()
        if kind in ("send", "bcast"):
            work.released.set()  # outputs: done when waited for
        return work


def wait_for_event(comm: ScriptedComm, event: str) -> None:
    deadline = time.monotonic() + 10
    while event not in comm.events:
        assert time.monotonic() < deadline, f"{event!r} never happened: {comm.events}"
        time.sleep(0.001)


def test_a_helper_thread_posts_a_deferred_send_the_moment_its_reduce_finishes():
    engine, comm = engine_running([B1, REDUCE, SEND, B0], ThreadedComm(), watch_inputs=True)
    engine.enter(Op.BACKWARD, 1)
    engine.enter(Op.BACKWARD, 0)  # the host computes B0; no unit boundary comes until it is done
    time.sleep(0.05)
    assert comm.events == ["post reduce"]
    comm.works["reduce"].released.set()
    wait_for_event(comm, "post send")  # posted while the host is still inside B0
    assert comm.events == ["post reduce", "wait RG", "post send"]
    engine.end()
    assert comm.works["reduce"].waits == 1


def test_a_helper_thread_posts_a_relay_broadcast_when_its_receive_lands_and_waits_for_it_only_once():
    engine, comm = engine_running([RECV_2, F0, RELAY_2, F1, F2], ThreadedComm(), watch_inputs=True)
    engine.enter(Op.FORWARD, 0)
    engine.enter(Op.FORWARD, 1)  # the receive is in flight: F1 runs, the broadcast waits for it
    assert comm.events == ["post recv"]
    comm.works["recv"].released.set()
    wait_for_event(comm, "post bcast")
    engine.enter(Op.FORWARD, 2)  # reads s2: the receive is done, and only the helper ever waited on it
    engine.end()
    assert comm.events[:3] == ["post recv", "wait RW", "post bcast"]
    assert comm.works["recv"].waits == 1


def test_an_input_that_fails_in_a_helper_thread_fails_the_host_where_it_needs_it():
    engine, comm = engine_running([RECV_2, F0, RELAY_2, F1, F2], ThreadedComm(), watch_inputs=True)
    engine.enter(Op.FORWARD, 0)
    engine.enter(Op.FORWARD, 1)
    comm.works["recv"].error = RuntimeError("connection closed by peer rank 2")
    comm.works["recv"].released.set()
    with pytest.raises(RuntimeError, match="connection closed by peer rank 2"):
        engine.enter(Op.FORWARD, 2)  # F2 needs the relayed chunk: the helper's failure is raised here
    assert "post bcast" not in comm.events  # nothing was posted from a failed receive
    assert comm.works["recv"].waits == 1


class ExchangingComm(ScriptedComm):
    """Also records the size of every reduce and of every holders' exchange (the rail all-reduce)."""

    def reduce(self, tensor, root, lane):
        return self._post(f"reduce[{tensor.numel()}]", root)

    def all_reduce_rail(self, tensor, between_steps=False):
        return self._post(f"exchange[{tensor.numel()}]", -1)


def test_the_last_backward_of_an_exchanged_chunk_sends_each_finished_unit_at_the_next_unit_boundary():
    """Chunk 0 (two units of two elements) mirrored, in an iteration that ends the step: when the backward reaches
    unit 0, unit 1's gradients are final, so they are reduced in the node, added and exchanged right then; the
    program's reduce, add and exchange after the backward cover unit 0 only, and the accumulator gets both."""
    comm = ExchangingComm()
    b0 = Action(Op.BACKWARD, 0, mb=0, buf="s0", buf2="g1")
    program = (b0, Action(Op.REDUCE_G, 0, peer=0, buf="g1"), Action(Op.ACC_G, 0, buf="g1"),
               Action(Op.EXCHANGE_G, 0, buf="acc0"))
    schedule = Schedule(name="scripted", topology=Topology.from_world(4, 2), owners=(0, 2, 1, 3), n_microbatches=1,
                        prefetch=2, train=True, programs=(program,) * 4, n_slots=3, n_grad_buffers=2,
                        n_recv_buffers=1, mirrors=((2,),), exchanges=True)
    shard = SimpleNamespace(chunk=0, weights=torch.zeros(NUMEL), grad_acc=torch.zeros(NUMEL))
    engine = Engine(comm, NoModelLayout(), shard, lambda train, n, exchange: schedule, torch.float32,
                    torch.device("cpu"), mirrored_chunks=True, unit_slices=[(0, 0, 2), (0, 2, 4), (1, 0, 4)])
    engine.begin(train=True, n_microbatches=1, ends_step=True)
    engine.enter(Op.BACKWARD, 0, 1)  # the backward of chunk 0 starts with its last unit
    engine._buffers["g1"].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # what the two units' backward produce
    assert comm.events == []
    engine.enter(Op.BACKWARD, 0, 0)  # unit 1 is done: its two elements go now
    assert comm.events == ["post reduce[2]", "wait piece", "post exchange[2]"]
    assert shard.grad_acc.tolist() == [0.0, 0.0, 3.0, 4.0]
    engine.end()
    assert comm.events[3:6] == ["post reduce[2]", "wait RG", "post exchange[2]"]  # the program's: unit 0 only
    assert shard.grad_acc.tolist() == [1.0, 2.0, 3.0, 4.0] and engine.exchanged == {0}


def test_interleaved_micro_batches_compute_with_the_callers_intra_op_threads_and_lend_their_turn_to_helpers():
    """OpenMP keeps its thread count per thread: without setting it again, a micro-batch's thread would compute with
    every core whatever ``torch.set_num_threads`` said (on the 2-core box, 4 ranks then oversubscribed the cores).
    Read from OpenMP itself, as ``torch.get_num_threads()`` does not show it."""
    import ctypes
    from pathlib import Path

    from lightning_tawpipe.runtime.microbatch import MicrobatchRunner

    gomp = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*"))
    if not gomp:
        pytest.skip("this torch build does not bundle OpenMP (libgomp)")
    omp_threads = ctypes.CDLL(str(gomp[0])).omp_get_max_threads
    order = [1, 0, 1, 0]  # the compute steps' micro-batches: interleaved, so each runs on its own thread
    engine = SimpleNamespace(interleaves_microbatches=lambda: True, gate=None, thread_microbatch=None,
                             run_cut_backward=lambda: None, peek_compute=lambda: None)
    engine.peek_compute = lambda: SimpleNamespace(mb=order[0]) if order else None

    acting_for = []

    def step(i: int) -> int:
        for _ in range(2):  # each micro-batch's two compute steps
            while order[0] != i:
                engine.gate(order[0])  # hand over the baton until it is this micro-batch's turn, as Engine.enter does
            # another thread working for this micro-batch (CUDA runs a worker's backward on its autograd thread) is
            # taken to compute for the worker holding the baton
            helper = threading.Thread(target=lambda: acting_for.append((i, engine.thread_microbatch())))
            helper.start()
            helper.join()
            order.pop(0)
        return omp_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert MicrobatchRunner(engine).run(2, step) == [1, 1]
        assert acting_for == [(1, 1), (0, 0), (1, 1), (0, 0)]
    finally:
        torch.set_num_threads(before)
