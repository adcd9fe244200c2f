"""The schedule IR: one list of actions per rank, each with a compact string form.

A rank's *program* is the exact sequence of compute and communication actions it performs in one pipeline
iteration. The engine executes it literally; the validator simulates all ranks' programs together. Nothing else
in the package decides what happens when, so the whole schedule can be read, printed and checked as data.

Buffers an action may name (``buf`` / ``buf2``):

* ``own``: the owner's fixed copy of its chunk (device-bound storage; read-only during an iteration),
* ``s<i>``: weight slot *i* (a working buffer holding one chunk's weights; ``prefetch + 1`` of them),
* ``g<i>``: local-gradient buffer *i* (a backward step writes its chunk's gradients here),
* ``q<i>``: gradient-receive buffer *i* (an owner receives remote gradient sums here),
* ``t<c>``: this rank's stripe of chunk *c*, owned in its node (``stripe``: each rank of the owner's node sends its
  stripe over its own rail, see ``schedule/tawpipe.py``),
* ``r<i>``: stripe-receive buffer *i* (``stripe``: a rank receives its stripe of a remote node's gradient sum here,
  for a chunk owned in its node).

Semantics shared by the engine and the validator: communication actions are posted asynchronously; any later
action that touches the same buffer first waits for every earlier, conflicting action on it (read-after-write,
write-after-read, write-after-write). So no async op is read or reused before it has completed, by construction.

String form (``str(action)`` / :func:`parse_action`), ``c`` chunk, ``m`` micro-batch, ``r`` peer rank::

    F3.1@s0        forward of chunk 3, micro-batch 1, weights in slot 0
    B3.1@s0>g1     backward of chunk 3, micro-batch 1, weights in s0, local gradients into g1
    B3.1@s0+g1     the same, adding to the gradients of chunk 3's earlier micro-batches already in g1
                   (chunk-major order: one gradient per chunk and iteration leaves the rank)
    X3@s0          release slot 0 (chunk 3 no longer resident)
    CW3@s0         owner copies its own chunk 3 into slot 0
    SW3>5@own      send chunk 3's weights to rank 5 (from ``own`` or from a slot when relaying a ring)
    RW3<5@s0       receive chunk 3's weights from rank 5 into slot 0
    PW3^5@t3       scatter chunk 3's weights in the node from rank 5 (its owner): each rank gets its stripe in t3
    SW3>7@t3       send this rank's stripe of chunk 3 to rank 7 (the same local index on another node)
    RT3<5@s0       receive this rank's stripe of chunk 3 from rank 5 into its part of slot 0
    AW3@s0         all-gather chunk 3's stripes in the node: every rank then has the whole chunk in slot 0
    YG3@g1         reduce-scatter chunk 3's gradients in the node: each rank gets its stripe of the sum, in its part
                   of g1
    TG3>5@g1       send this rank's stripe of the node's gradient sum in g1 to rank 5 (same local index, owner's node)
    UG3<5@r0       receive this rank's stripe of a node's gradient sum of chunk 3 from rank 5 into r0
    GG3^5@r0>q1    gather the node's stripes in r0 onto rank 5 (chunk 3's owner), whole, into its q1
    BW3^5@s0       broadcast chunk 3's weights in the node from rank 5, into slot 0
    RG3^5@g1       reduce chunk 3's gradients in the node onto rank 5
    SG3>5@g1       send chunk 3's gradient sum to rank 5
    QG3<5@q0       receive chunk 3's gradient sum from rank 5 into q0
    AG3@q0         owner adds the gradient in q0 into its accumulator for chunk 3
    GA3@q0+g1      add the local gradient g1 into q0 (a ring accumulator picking up this rank's share)
    XG1@acc1       a holder of mirrored chunk 1 sums its accumulator with the other holders' (an all-reduce on the
                   holders' rail; only in an iteration that ends an optimizer step, see ``schedule/tawpipe.py``)
    BAR            stand-in for a collective the user's code may issue (validation only)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum


class Op(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"
    RELEASE = "X"
    COPY_W = "CW"
    SEND_W = "SW"
    RECV_W = "RW"
    BCAST_W = "BW"
    REDUCE_G = "RG"
    SEND_G = "SG"
    RECV_G = "QG"
    ACC_G = "AG"
    ADD_G = "GA"
    EXCHANGE_G = "XG"
    SCATTER_W = "PW"
    RECV_STRIPE_W = "RT"
    GATHER_W = "AW"
    REDUCE_SCATTER_G = "YG"
    SEND_STRIPE_G = "TG"
    RECV_STRIPE_G = "UG"
    GATHER_G = "GG"
    BARRIER = "BAR"


COMPUTE_OPS = frozenset({Op.FORWARD, Op.BACKWARD})
ASYNC_OPS = frozenset({Op.SEND_W, Op.RECV_W, Op.BCAST_W, Op.REDUCE_G, Op.SEND_G, Op.RECV_G, Op.EXCHANGE_G,
                       Op.SCATTER_W, Op.RECV_STRIPE_W, Op.GATHER_W, Op.REDUCE_SCATTER_G, Op.SEND_STRIPE_G,
                       Op.RECV_STRIPE_G, Op.GATHER_G})
P2P_OPS = frozenset({Op.SEND_W, Op.RECV_W, Op.SEND_G, Op.RECV_G, Op.RECV_STRIPE_W, Op.SEND_STRIPE_G,
                     Op.RECV_STRIPE_G})
COLLECTIVE_OPS = frozenset({Op.BCAST_W, Op.REDUCE_G, Op.EXCHANGE_G, Op.SCATTER_W, Op.GATHER_W, Op.REDUCE_SCATTER_G,
                            Op.GATHER_G})
SEND_OPS = frozenset({Op.SEND_W, Op.SEND_G, Op.SEND_STRIPE_G})
WEIGHT_OPS = frozenset({Op.COPY_W, Op.SEND_W, Op.RECV_W, Op.BCAST_W, Op.SCATTER_W, Op.RECV_STRIPE_W, Op.GATHER_W})


def stripe_numel(numel: int, group_size: int) -> int:
    """Elements of one rank's stripe of ``numel`` elements cut over the ``group_size`` ranks of a node: rounded up, so
    the last stripe is padded and stripe ``k`` starts at ``k`` times this on every rank."""
    return -(-numel // group_size)


def is_stripe(action: Action) -> bool:
    """Whether ``action`` moves one rank's stripe of its chunk (``1 / G`` of it) rather than the whole chunk: a
    stripe's send or receive (weights from a stripe buffer ``t<c>``, or a gradient stripe)."""
    return (action.op is Op.RECV_STRIPE_W or action.op is Op.SEND_STRIPE_G or action.op is Op.RECV_STRIPE_G
            or (action.op is Op.SEND_W and action.buf[:1] == "t"))


def channel(action: Action) -> tuple:
    """The family of operations that must be posted in program order with ``action``: the node's collectives of its
    lane (every member issues them in one order), or its lane's messages in one direction with one peer (a pair's
    messages match in order). Different families are independent, so the engine may post them in any order."""
    op = action.op
    lane = "weights" if op in WEIGHT_OPS else "grads"
    if op in P2P_OPS:
        return (lane, "send" if op in SEND_OPS else "recv", action.peer)
    if op is Op.EXCHANGE_G:  # the holders' rail: every holder issues its exchanges in one (backward) order
        return (lane, "rail")
    return (lane, "node")


def deferrable(action: Action, rank: int) -> bool:
    """Whether the engine may post ``action`` later than its place in the program, once its input is ready, instead
    of blocking the host on that input: a node's gradient send (its input is the reduce before it), a relay's
    broadcast (its input is the inter-node receive before it), a node's all-gather of stripes (its input is the
    rank's own stripe receive) and a gradient stripe's send (its input is the node's reduce-scatter). These inputs
    complete without this rank doing anything more, which is what makes deferring them safe (``runtime/engine.py``)."""
    return (action.op is Op.SEND_G or action.op is Op.SEND_STRIPE_G or action.op is Op.GATHER_W
            or (action.op is Op.BCAST_W and action.peer == rank))


def user_code_follows(program: tuple[Action, ...], j: int) -> bool:
    """Whether user code runs after the forward step ``program[j]``: the next compute is not a forward step of a later
    chunk. Between those only the model's own forward runs: this micro-batch's, or in chunk-major order that of the
    next micro-batch, whose thread paused inside its forward (``runtime/microbatch.py``). A first chunk's forward
    starts a micro-batch's ``training_step``; a backward follows the loss. Nothing may stay deferred past it."""
    for k in range(j + 1, len(program)):
        op = program[k].op
        if op is Op.FORWARD or op is Op.BACKWARD:
            return op is not Op.FORWARD or program[k].chunk == 0
    return True


def buffers_conflict(reads: set[str], writes: set[str], other_reads: set[str], other_writes: set[str]) -> bool:
    """Whether two operations touching these buffers must be ordered (read/write after write, write after read)."""
    return bool((other_writes & (reads | writes)) or (other_reads & writes))


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a rank's program. ``peer`` is the P2P partner or the collective's root (-1 if none).

    Immutable, so builders share one object between every rank (and step) that runs the same action: the programs
    of a node's ranks mostly hold the same objects, which keeps 1024-rank schedules small and quick to check.
    """

    op: Op
    chunk: int = -1
    mb: int = -1
    peer: int = -1
    buf: str = ""
    buf2: str = ""
    # a backward step that adds its gradients to ``buf2`` (which holds the same chunk's earlier micro-batches')
    # instead of overwriting it
    acc: bool = False
    # the validator's compact form of this action, computed once per object (not part of its value)
    _sim: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __reduce__(self):  # pickles and copies carry the value only, never the validator's process-local cache
        return (Action, (self.op, self.chunk, self.mb, self.peer, self.buf, self.buf2, self.acc))

    @property
    def stream(self) -> str:
        """The CUDA-stream-like lane this action belongs to (for traces and grids)."""
        if self.op in COMPUTE_OPS or self.op in (Op.RELEASE, Op.BARRIER):
            return "compute"
        return "weights" if self.op in WEIGHT_OPS else "grads"

    def reads_writes(self, rank: int) -> tuple[set[str], set[str]]:
        """Buffers this action reads and writes on ``rank`` (drives the implicit waits)."""
        op, b, b2 = self.op, self.buf, self.buf2
        if op is Op.FORWARD or op is Op.SEND_W or op is Op.SEND_G or op is Op.SEND_STRIPE_G:
            return {b}, set()
        if op is Op.BACKWARD:
            return {b}, {b2}
        if op in (Op.RELEASE, Op.RECV_W, Op.RECV_G, Op.RECV_STRIPE_W, Op.RECV_STRIPE_G):
            return set(), {b}
        if op is Op.REDUCE_SCATTER_G:  # like a reduce: every member's buffer is input and (its part) output
            return {b}, {b}
        if op is Op.GATHER_G:  # every member's stripe is read; the owner writes the whole sum
            return ({b}, {self.buf2}) if self.peer == rank else ({b}, set())
        if op is Op.GATHER_W:  # every member writes the whole slot (its own part is read as the input)
            return {b}, {b}
        if op is Op.SCATTER_W:
            return ({"own"}, {b}) if self.peer == rank else (set(), {b})
        if op is Op.COPY_W:
            return {"own"}, {b}
        if op is Op.BCAST_W:
            return ({b}, set()) if self.peer == rank else (set(), {b})
        if op is Op.REDUCE_G:  # gloo may use non-root inputs as scratch: treat every member as a writer
            return {b}, {b}
        if op is Op.ACC_G:
            return {b}, {f"acc{self.chunk}"}
        if op is Op.EXCHANGE_G:
            return {b}, {b}
        if op is Op.ADD_G:
            return {b, b2}, {b}
        return set(), set()

    def __str__(self) -> str:
        op = self.op.value
        if self.op is Op.BARRIER:
            return op
        s = f"{op}{self.chunk}"
        if self.mb >= 0:
            s += f".{self.mb}"
        if self.peer >= 0:
            s += {Op.SEND_W: ">", Op.SEND_G: ">", Op.SEND_STRIPE_G: ">", Op.RECV_W: "<", Op.RECV_G: "<",
                  Op.RECV_STRIPE_W: "<", Op.RECV_STRIPE_G: "<"}.get(self.op, "^") + str(self.peer)
        s += f"@{self.buf}"
        if self.buf2:
            s += ("+" if self.op is Op.ADD_G or self.acc else ">") + self.buf2
        return s


class ActionPool:
    """Makes actions like ``Action(...)``, but one shared object per distinct action (builders share them between
    ranks and steps: fewer objects, and the validator decodes each once)."""

    def __init__(self) -> None:
        self._pool: dict[tuple, Action] = {}

    def __call__(self, op: Op, chunk: int = -1, mb: int = -1, peer: int = -1, buf: str = "", buf2: str = "") -> Action:
        key = (op._value_, chunk, mb, peer, buf, buf2)  # an Op hashes in Python; its value is a plain str
        action = self._pool.get(key)
        if action is None:
            action = self._pool[key] = Action(op, chunk, mb, peer, buf, buf2)
        return action


_ACTION_RE = re.compile(
    r"^(?P<op>BAR|SW|RW|CW|BW|RG|SG|QG|AG|GA|XG|PW|RT|AW|YG|TG|UG|GG|F|B|X)"
    r"(?:(?P<chunk>\d+)(?:\.(?P<mb>\d+))?(?:[<>^](?P<peer>\d+))?@(?P<buf>\w+)(?:(?P<sep>[>+])(?P<buf2>\w+))?)?$"
)


def parse_action(text: str) -> Action:
    """Inverse of ``str(action)``; raises ``ValueError`` naming the text it could not read."""
    m = _ACTION_RE.match(text.strip())
    if m is None or (m["op"] != "BAR" and m["chunk"] is None):
        raise ValueError(f"Not a schedule action: {text!r} (expected e.g. 'F3.1@s0' or 'RW3<5@s0').")
    return Action(
        op=Op(m["op"]),
        chunk=int(m["chunk"]) if m["chunk"] is not None else -1,
        mb=int(m["mb"]) if m["mb"] is not None else -1,
        peer=int(m["peer"]) if m["peer"] is not None else -1,
        buf=m["buf"] or "",
        buf2=m["buf2"] or "",
        acc=m["op"] == Op.BACKWARD.value and m["sep"] == "+",
    )


def format_program(program: list[Action]) -> str:
    return " ".join(str(a) for a in program)


def parse_program(text: str) -> list[Action]:
    return [parse_action(t) for t in text.split()]
