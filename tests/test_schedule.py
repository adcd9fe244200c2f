"""Schedule IR, builders, validator and grid printer: pure data, no process group."""

from __future__ import annotations

import pickle
from collections import Counter
from dataclasses import replace
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_tawpipe.schedule import (
    Action,
    Op,
    ScheduleError,
    build_tawpipe,
    compute_ticks,
    format_grid,
    format_program,
    parse_action,
    parse_program,
    validate,
    with_user_barriers,
)
from lightning_tawpipe.schedule.actions import P2P_OPS, ActionPool
from lightning_tawpipe.schedule.program import chunk_major_steps, gradient_runs, residency, sample_major_steps
from lightning_tawpipe.schedule.weipipe import build_weipipe
from lightning_tawpipe.topology import Topology, ring_owner, tawpipe_owner

PROPERTY = settings(max_examples=60, deadline=None)


@lru_cache(maxsize=None)
def tawpipe(n_groups: int, group_size: int, n_microbatches: int, prefetch: int = 1, train: bool = True):
    return build_tawpipe(Topology(n_groups, group_size), n_microbatches, prefetch=prefetch, train=train)


@lru_cache(maxsize=None)
def weipipe(n_groups: int, group_size: int, n_microbatches: int, prefetch: int = 1, train: bool = True):
    return build_weipipe(Topology(n_groups, group_size), n_microbatches, prefetch=prefetch, train=train)


configs = st.tuples(
    st.integers(1, 4),  # n_groups
    st.integers(1, 4),  # group_size
    st.integers(1, 4),  # n_microbatches
    st.integers(1, 3),  # prefetch
    st.booleans(),  # train
)


def mutate(schedule, rank: int, edit):
    """A copy of ``schedule`` whose program on ``rank`` is ``edit(list(program))``."""
    programs = list(schedule.programs)
    programs[rank] = tuple(edit(list(programs[rank])))
    return replace(schedule, programs=tuple(programs))


def index_of(program, pred, last: bool = False) -> int:
    hits = [i for i, a in enumerate(program) if pred(a)]
    assert hits, "the mutation found nothing to mutate"
    return hits[-1] if last else hits[0]


# -- the IR's string form -------------------------------------------------------------------------------------------

EVERY_KIND = [
    Action(Op.FORWARD, 3, mb=1, buf="s0"),
    Action(Op.BACKWARD, 3, mb=1, buf="s0", buf2="g1"),
    Action(Op.BACKWARD, 3, mb=1, buf="s0", buf2="g1", acc=True),
    Action(Op.RELEASE, 3, buf="s0"),
    Action(Op.COPY_W, 3, buf="s0"),
    Action(Op.SEND_W, 3, peer=5, buf="own"),
    Action(Op.SEND_W, 12, peer=10, buf="s3"),
    Action(Op.RECV_W, 3, peer=5, buf="s0"),
    Action(Op.BCAST_W, 3, peer=5, buf="s0"),
    Action(Op.REDUCE_G, 3, peer=5, buf="g1"),
    Action(Op.SEND_G, 3, peer=5, buf="g1"),
    Action(Op.RECV_G, 3, peer=5, buf="q0"),
    Action(Op.ACC_G, 3, buf="q0"),
    Action(Op.ADD_G, 3, buf="q0", buf2="g1"),
    Action(Op.EXCHANGE_G, 1, buf="acc1"),
    Action(Op.SCATTER_W, 3, peer=5, buf="t3"),
    Action(Op.SEND_W, 3, peer=7, buf="t3"),
    Action(Op.RECV_STRIPE_W, 3, peer=5, buf="s0"),
    Action(Op.GATHER_W, 3, buf="s0"),
    Action(Op.REDUCE_SCATTER_G, 3, buf="g1"),
    Action(Op.SEND_STRIPE_G, 3, peer=5, buf="g1"),
    Action(Op.RECV_STRIPE_G, 3, peer=5, buf="r0"),
    Action(Op.GATHER_G, 3, peer=5, buf="r0", buf2="q1"),
    Action(Op.BARRIER),
    Action(Op.FORWARD, 0, mb=0, buf="s0"),  # zeros must not be confused with "absent" (-1)
    Action(Op.RECV_W, 0, peer=0, buf="s0"),
]


def test_examples_cover_every_op():
    assert {a.op for a in EVERY_KIND} == set(Op)


@pytest.mark.parametrize("action", EVERY_KIND, ids=str)
def test_parse_action_round_trip(action):
    assert parse_action(str(action)) == action


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("F3.1@s0", Action(Op.FORWARD, 3, mb=1, buf="s0")),
        ("B3.1@s0>g1", Action(Op.BACKWARD, 3, mb=1, buf="s0", buf2="g1")),
        ("B3.1@s0+g1", Action(Op.BACKWARD, 3, mb=1, buf="s0", buf2="g1", acc=True)),
        ("RW3<5@s0", Action(Op.RECV_W, 3, peer=5, buf="s0")),
        ("GA3@q0+g1", Action(Op.ADD_G, 3, buf="q0", buf2="g1")),
        ("  BAR ", Action(Op.BARRIER)),
    ],
)
def test_parse_action_documented_forms(text, expected):
    assert parse_action(text) == expected


@pytest.mark.parametrize("text", ["nonsense", "", "F", "F3.1", "Q3@s0", "SW3>@own", "F3.1@", "BAR3"])
def test_parse_action_rejects_garbage(text):
    with pytest.raises(ValueError, match="Not a schedule action"):
        parse_action(text)


@pytest.mark.parametrize(
    "schedule",
    [
        tawpipe(2, 2, 1),
        tawpipe(3, 2, 2, prefetch=2),
        tawpipe(2, 3, 2, train=False),
        weipipe(1, 4, 2),
        weipipe(2, 2, 3, prefetch=2, train=False),
        with_user_barriers(tawpipe(2, 2, 2)),
    ],
    ids=lambda s: s.name,
)
def test_parse_program_round_trip(schedule):
    for program in schedule.programs:
        assert parse_program(format_program(list(program))) == list(program)
    # and the dump is one "rank: program" line per rank
    lines = schedule.dump().splitlines()
    assert len(lines) == schedule.topology.world_size
    for rank, line in enumerate(lines):
        head, text = line.split(": ", 1)
        assert int(head) == rank
        assert tuple(parse_program(text)) == schedule.programs[rank]


# -- golden TawPipe program -----------------------------------------------------------------------------------------

# Topology(2, 2): node 0 = ranks 0, 1; node 1 = ranks 2, 3. Rank n*G+k owns chunk k*N+n, so owners = (0, 2, 1, 3):
# chunk 0 -> rank 0, chunk 1 -> rank 2, chunk 2 -> rank 1, chunk 3 -> rank 3 (consecutive chunks alternate nodes).
# One micro-batch, prefetch 1 (two slots): compute F0 F1 F2 F3 B3 B2 B1 B0, loaded as F0@s0, F1@s1, F2@s0,
# F3+B3@s1 (the turnaround keeps its chunk), B2@s0, B1@s1, B0@s0; each slot is refilled right after its previous
# load's last use (X). One line per point (after the compute that starts the line).
#
# Rank 0 (node 0, local 0, owns chunk 0):
#  * head: node 1 loads chunk 0 twice (F0, B0); its receiver is rank 2 (same local index 0), so two SW0>2@own, posted
#    up front from `own`. QG0<2: node 1 reduces chunk 0's gradients onto rank 2 (local index of owner 0) which sends
#    the sum here; the add (AG0@q0) lands at the very end because node 1 is one step behind.
#  * chunk 0 is in-node: CW into the slot, then BW0^0 to the node. Chunk 1 (owner rank 2, other node): rank 0 (local
#    index 0 = owner's) receives it RW1<2 and broadcasts it BW1^0 one compute later. Chunks 2/3 are broadcast by
#    rank 1 (their local index), so rank 0 only joins BW2^1 / BW3^1.
#  * gradients: after B3 reduce onto rank 1 (RG3^1), after B2 onto rank 1, after B1 onto rank 0 which sends the sum
#    to the owner (SG1>2) right behind the reduce (the engine defers it until the reduce is done), after B0 onto
#    rank 0 = owner which adds it (AG0@g1) one step later.
GOLDEN_RANK0 = [
    "SW0>2@own SW0>2@own QG0<2@q0 CW0@s0 BW0^0@s0 RW1<2@s1",
    "F0.0@s0 X0@s0 BW1^0@s1 BW2^1@s0",
    "F1.0@s1 X1@s1",
    "F2.0@s0 X2@s0 BW3^1@s1 BW2^1@s0",
    "F3.0@s1",
    "B3.0@s1>g0 X3@s1 RW1<2@s1 RG3^1@g0",
    "B2.0@s0>g1 X2@s0 BW1^0@s1 CW0@s0 BW0^0@s0 RG2^1@g1",
    "B1.0@s1>g0 X1@s1 RG1^0@g0 SG1>2@g0",
    "B0.0@s0>g1 X0@s0 RG0^0@g1 AG0@g1",
    "AG0@q0",
]
# Rank 3 (node 1, local 1, owns chunk 3): node 0 loads chunk 3 once (F3+B3), received by rank 1 (local index 1):
# one SW3>1@own. QG3<1: node 0's reduced chunk-3 gradient arrives from rank 1. Node 1's first loads are broadcast
# before its first compute (it starts one step late, so the broadcast cannot overlap a compute of its own); chunk 2
# (owner rank 1, local 1) is received by rank 3 itself (RW2<1) and broadcast one compute later (BW2^3); chunk 3 is
# its own (CW3 + BW3^3). Gradients: B3 reduces onto rank 3 = owner (AG3@g0 one step later), B2 onto rank 3 which
# sends to owner rank 1 right behind the reduce (SG2>1), B1/B0 onto rank 2. Node 0's chunk-3 sum is added at point
# 6: the sender posts it by its point 5 (node 1 is behind, so it is certainly posted by then) and the add waits one
# more compute step so the transfer overlaps it.
GOLDEN_RANK3 = [
    "SW3>1@own QG3<1@q0 BW0^2@s0 BW1^2@s1",
    "F0.0@s0 X0@s0 RW2<1@s0",
    "F1.0@s1 X1@s1 BW2^3@s0 CW3@s1 BW3^3@s1",
    "F2.0@s0 X2@s0 RW2<1@s0",
    "F3.0@s1 BW2^3@s0",
    "B3.0@s1>g0 X3@s1 BW1^2@s1 RG3^3@g0",
    "B2.0@s0>g1 X2@s0 AG3@g0 RG2^3@g1 SG2>1@g1",
    "B1.0@s1>g0 X1@s1 BW0^2@s0 RG1^2@g0 AG3@q0",
    "B0.0@s0>g1 X0@s0 RG0^2@g1",
]


def test_golden_tawpipe_2x2():
    s = tawpipe(2, 2, 1)
    assert s.owners == (0, 2, 1, 3)
    assert (s.n_slots, s.n_grad_buffers, s.n_recv_buffers) == (2, 2, 1)
    assert format_program(list(s.program(0))) == " ".join(GOLDEN_RANK0)
    assert format_program(list(s.program(3))) == " ".join(GOLDEN_RANK3)
    validate(s)


@pytest.mark.parametrize(("n_groups", "group_size", "n_microbatches"), [(2, 2, 1), (2, 2, 3), (3, 1, 2), (1, 4, 2)])
def test_tawpipe_compute_order_is_sample_major(n_groups, group_size, n_microbatches):
    s = tawpipe(n_groups, group_size, n_microbatches)
    P = s.n_chunks
    expected = []
    for mb in range(n_microbatches):
        expected += [f"F{c}.{mb}" for c in range(P)] + [f"B{c}.{mb}" for c in reversed(range(P))]
    for rank in range(P):
        assert [f"{a.op.value}{a.chunk}.{a.mb}" for a in s.compute_steps(rank)] == expected


# -- properties of every built schedule -----------------------------------------------------------------------------


def _check_compute_counts(s, train: bool) -> None:
    P = s.n_chunks
    for rank in range(P):
        steps = s.compute_steps(rank)
        forward = [(a.chunk, a.mb) for a in steps if a.op is Op.FORWARD]
        backward = [(a.chunk, a.mb) for a in steps if a.op is Op.BACKWARD]
        every = sorted((c, m) for c in range(P) for m in range(s.n_microbatches))
        assert sorted(forward) == every
        assert sorted(backward) == (every if train else [])


@PROPERTY
@given(configs)
def test_tawpipe_properties(config):
    n_groups, group_size, n_microbatches, prefetch, train = config
    s = tawpipe(*config)
    topo = s.topology
    validate(s)
    validate(with_user_barriers(s))
    _check_compute_counts(s, train)
    assert s.owners == tuple(tawpipe_owner(c, topo) for c in range(topo.world_size))
    for rank, program in enumerate(s.programs):
        for a in program:
            if a.op in P2P_OPS:
                # weights and gradients cross nodes only on rails: same local index at both ends
                assert not topo.same_group(rank, a.peer), f"rank {rank}: intra-node P2P {a}"
                assert topo.local_index(rank) == topo.local_index(a.peer), f"rank {rank}: cross-rail P2P {a}"
            if a.op is Op.SEND_W:
                assert a.buf == "own", f"rank {rank}: {a} does not send from the owner's copy"
                assert s.owners[a.chunk] == rank, f"rank {rank}: {a} sends a chunk it does not own"
            if a.op is Op.COPY_W:
                assert s.owners[a.chunk] == rank


def test_residency_keeps_nested_chunks_across_the_turn():
    steps = sample_major_steps(4, 1, train=True)  # F0 F1 F2 F3 B3 B2 B1 B0
    as_tuples = lambda loads: [(l.chunk, l.uses, l.slot, l.issue) for l in loads]  # noqa: E731
    # reuse 1 (the paper's): only F3/B3 share a load; round-robin slots, each filled when load i - n_slots is released
    assert as_tuples(residency(steps, 3, reuse=1)) == [
        (0, [0], 0, -1), (1, [1], 1, -1), (2, [2], 2, -1), (3, [3, 4], 0, 0), (2, [5], 1, 1), (1, [6], 2, 2),
        (0, [7], 0, 4)]
    # reuse 2: chunk 2 also stays (F2 ... B2 around F3 B3), in the same three slots; chunk 1 comes back into the
    # slot chunk 3 frees, still two compute steps ahead of B1
    assert as_tuples(residency(steps, 3, reuse=2)) == [
        (0, [0], 0, -1), (1, [1], 1, -1), (2, [2, 5], 2, -1), (3, [3, 4], 0, 0), (1, [6], 1, 1), (0, [7], 0, 4)]
    with pytest.raises(ValueError, match="reuse must be in 1..2"):
        residency(steps, 3, reuse=3)  # a kept chunk may not take the slot the next fetch needs
    with pytest.raises(ValueError, match="reuse"):
        build_tawpipe(Topology(2, 2), 1, prefetch=1, reuse=2)


@PROPERTY
@given(configs, st.integers(1, 3))
def test_tawpipe_reuse_properties(config, reuse):
    """Any reuse up to prefetch: a valid schedule that fetches each kept chunk once per turn, never twice."""
    n_groups, group_size, n_microbatches, prefetch, train = config
    reuse = min(reuse, prefetch)
    topo = Topology(n_groups, group_size)
    s = build_tawpipe(topo, n_microbatches, prefetch=prefetch, train=train, reuse=reuse)
    validate(s)
    validate(with_user_barriers(s))
    _check_compute_counts(s, train)
    P, M = s.n_chunks, n_microbatches
    if train:  # 2M - 1 turns (F->B per micro-batch, B->F between them), each keeps min(reuse, P) chunks
        expected_loads = 2 * P * M - (2 * M - 1) * min(reuse, P)
    else:  # forward only: a chunk comes back after the P - 1 others, so it stays only if every chunk fits
        expected_loads = P if P <= reuse else P * M
    for node in range(n_groups):  # every load is filled once per node: by the owner's copy or a rail's receive
        fills = sum(a.op in (Op.COPY_W, Op.RECV_W) for r in topo.group_ranks(node) for a in s.programs[r])
        assert fills == expected_loads
    if reuse > 1:  # never more inter-node weight traffic than the paper's schedule
        plain = build_tawpipe(topo, n_microbatches, prefetch=prefetch, train=train, reuse=1)
        sends = lambda sch: sum(a.op is Op.SEND_W for p in sch.programs for a in p)  # noqa: E731
        assert sends(s) <= sends(plain)


def test_reuse_cuts_inter_node_chunks_of_3x2():
    """The speed benchmark's 3 x 2 point: reuse 2 sends 32 chunks between nodes per iteration instead of 34."""

    def inter_node_transfers(s):
        topo = s.topology
        return sum(a.op in (Op.SEND_W, Op.SEND_G) and not topo.same_group(r, a.peer)
                   for r, p in enumerate(s.programs) for a in p)

    topo = Topology(3, 2)
    assert inter_node_transfers(build_tawpipe(topo, 1, prefetch=2, reuse=1)) == 34
    assert inter_node_transfers(build_tawpipe(topo, 1, prefetch=2)) == 32  # the default: reuse = prefetch


def _relay_leads(s) -> list[tuple[int, int, int]]:
    """For every inter-node weight receive: (rank, computes overlapping the receive, computes overlapping the relay).

    The receive overlaps the computes between its posting and the broadcast that relays it in the node; the relay
    overlaps those between the broadcast and the chunk's first use from that slot.
    """
    leads = []
    for rank, program in enumerate(s.programs):
        for i, a in enumerate(program):
            if a.op is not Op.RECV_W:
                continue
            j = next(k for k in range(i + 1, len(program))
                     if program[k].op is Op.BCAST_W and (program[k].chunk, program[k].buf) == (a.chunk, a.buf))
            use = next(k for k in range(j + 1, len(program))
                       if program[k].op in (Op.FORWARD, Op.BACKWARD) and program[k].buf == a.buf)
            computes = lambda lo, hi: sum(x.op in (Op.FORWARD, Op.BACKWARD) for x in program[lo:hi])  # noqa: E731
            assert program[use].chunk == a.chunk
            leads.append((rank, computes(i, j), computes(j, use)))
    return leads


@pytest.mark.parametrize("nodes,ranks,mbs,prefetch,reuse", [
    (2, 2, 1, 2, None), (2, 2, 2, 2, 1), (2, 2, 1, 3, None), (3, 2, 1, 2, None), (3, 2, 2, 3, 2), (2, 3, 2, 1, None),
])
def test_relay_leaves_the_inter_node_receive_all_but_one_compute(nodes, ranks, mbs, prefetch, reuse):
    """An inter-node receive is relayed one compute before its chunk is used, not one compute after it is posted.

    The inter-node link is the slow one, so the receive gets every compute step from the slot's release on, and the
    intra-node broadcast only the last; with a single compute in between, the broadcast goes right before the use.
    """
    s = build_tawpipe(Topology(nodes, ranks), mbs, prefetch=prefetch, reuse=reuse)
    leads = _relay_leads(s)
    assert leads
    for _, receive, relay in leads:
        assert relay == (1 if receive + relay >= 2 else 0)
    if (nodes, ranks, mbs, prefetch, reuse) == (2, 2, 1, 2, None):
        # chunk 1 comes back for B1 while chunk 3 stays across the turn: its receive overlaps F2 F3 B3 (it got
        # F2 alone when the relay was placed right after the posting)
        assert (0, 3, 1) in leads


@PROPERTY
@given(configs)
def test_weipipe_properties(config):
    s = weipipe(*config)
    validate(s)
    _check_compute_counts(s, config[4])
    P = s.n_chunks
    assert s.owners == tuple(ring_owner(c, P) for c in range(P))


def test_weipipe_with_user_barriers_small_rings_and_eval():
    # rings of 1-2 ranks, and every forward-only (validation) ring, survive mid-pipeline world collectives
    for n_microbatches in (1, 2, 3):
        validate(with_user_barriers(weipipe(1, 2, n_microbatches)))
        validate(with_user_barriers(weipipe(2, 1, n_microbatches, prefetch=2)))
    for n_groups, group_size in [(1, 3), (3, 1), (2, 2), (1, 5), (2, 4)]:
        validate(with_user_barriers(weipipe(n_groups, group_size, 1, train=False)))


@pytest.mark.parametrize(("n_groups", "group_size", "prefetch"), [(1, 3, 1), (3, 1, 1), (2, 2, 1), (2, 2, 2)])
def test_weipipe_training_is_not_safe_for_user_collectives(n_groups, group_size, prefetch):
    """A documented limitation of the ring baseline, kept honest by the validator.

    WeiPipe couples ranks across micro-batch boundaries: on 3+ ranks, rank 0 reaches its loss (and a user collective
    such as ``self.log(..., sync_dist=True)``) before posting the backward-ring receive that rank P-1 needs to free a
    buffer and reach the same collective. Surviving it would take ~P ring buffers (a full model copy). TawPipe's
    schedule does survive it (see the property tests), and the strategy warns when weipipe runs on 3+ ranks.
    """
    schedule = weipipe(n_groups, group_size, 1, prefetch=prefetch)
    validate(schedule)
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(with_user_barriers(schedule))


def test_gradient_buffers_default_by_node_count_and_every_default_schedule_validates():
    """Two buffers on one or two nodes, three from three nodes on (where backward otherwise waits on the sends of
    more remote-owned chunks); an explicit count always wins; TawPipe groups count as nodes."""
    from lightning_tawpipe.schedule.tawpipe import default_grad_buffers

    for topo, expected in ((Topology(1, 2), 2), (Topology(2, 2), 2), (Topology(3, 2), 3), (Topology(4, 1), 3),
                           (Topology(2, 4), 2), (Topology(3, 1), 3)):
        schedule = build_tawpipe(topo, 2, prefetch=2)
        assert schedule.n_grad_buffers == default_grad_buffers(topo, None) == expected, topo
        validate(schedule)
        validate(with_user_barriers(schedule))
    assert build_tawpipe(Topology(3, 2), 1, grad_buffers=2).n_grad_buffers == 2
    assert default_grad_buffers(Topology(2, 2), 4) == 4


@pytest.mark.parametrize(("n_groups", "group_size", "n_microbatches", "prefetch"),
                         [(2, 2, 1, 1), (2, 2, 3, 2), (3, 2, 2, 1), (4, 1, 2, 3), (2, 3, 1, 2), (1, 4, 2, 1)])
@pytest.mark.parametrize("mirrored_chunks", [True, 2])
def test_mirrored_chunks_stay_inside_every_node(n_groups, group_size, n_microbatches, prefetch, mirrored_chunks):
    """With ``replicate_first_chunk`` (chunk 0, or the first ``k`` chunks) a mirrored chunk never crosses nodes (no
    weights out, no gradients in): each node copies it from its own holder, the rank of the owner's local index, and
    accumulates its gradient there; every other chunk moves exactly as before. In an iteration that ends an
    optimizer step (``exchange``) each holder adds its last gradient right behind the reduce and exchanges the sum
    at once (``XG``), so chunk 1's overlaps B0. The validator checks every case."""
    topo = Topology(n_groups, group_size)
    k = int(mirrored_chunks)
    plain = build_tawpipe(topo, n_microbatches, prefetch=prefetch)
    expected = tuple(tuple(topo.rank(n, topo.local_index(plain.owners[c])) for n in range(n_groups)
                           if n != topo.group_of(plain.owners[c])) for c in range(k)) if n_groups > 1 else ()
    for exchange in (False, True):
        mirrored = build_tawpipe(topo, n_microbatches, prefetch=prefetch, replicate_first_chunk=mirrored_chunks,
                                 exchange=exchange)
        assert mirrored.mirrors == expected and mirrored.exchanges == (exchange and n_groups > 1)
        assert all(mirrored.holders(c) == (plain.owners[c],) + m for c, m in enumerate(expected))
        assert mirrored.holders(k) == (plain.owners[k],)
        for schedule in (mirrored, with_user_barriers(mirrored),
                         build_tawpipe(topo, n_microbatches, prefetch=prefetch, train=False,
                                       replicate_first_chunk=mirrored_chunks, exchange=exchange)):
            validate(schedule)
        remote = {Op.SEND_W, Op.RECV_W, Op.SEND_G, Op.RECV_G}
        for rank in range(topo.world_size):
            program = mirrored.program(rank)
            # the rest of the program is the plain one
            assert [a for a in program if a.chunk >= len(expected)] == [
                a for a in plain.program(rank) if a.chunk >= len(expected)]
            for c in range(len(expected)):
                assert not [a for a in program if a.chunk == c and a.op in remote], rank
                copies = sum(a.op is Op.COPY_W and a.chunk == c for a in program)
                adds = [i for i, a in enumerate(program) if a.op is Op.ACC_G and a.chunk == c]
                sums = [i for i, a in enumerate(program) if a.op is Op.EXCHANGE_G and a.chunk == c]
                if rank not in mirrored.holders(c):
                    assert copies == len(adds) == len(sums) == 0
                    continue
                assert copies > 0 and len(adds) == n_microbatches
                if exchange:  # right behind the last add (chunk 0's: after the last compute)
                    assert sums == [adds[-1] + 1], (rank, c)
                    computes_after = [a for a in program[sums[0]:] if a.op in (Op.FORWARD, Op.BACKWARD)]
                    assert bool(computes_after) == (c > 0), (rank, c)
                else:
                    assert sums == []


def test_validator_checks_mirrored_accumulators():
    """A mirror that drops its node's chunk-0 gradient, a non-holder that copies chunk 0, a gradient added after the
    holders exchanged it, or holders of a rail exchanging chunks in different orders, are caught."""
    mirrored = build_tawpipe(Topology(2, 2), 1, replicate_first_chunk=True)
    programs = list(mirrored.programs)
    programs[2] = tuple(a for a in programs[2] if not (a.op is Op.ACC_G and a.chunk == 0))
    with pytest.raises(ScheduleError, match=r"holders \(0, 2\) of chunk 0 accumulated the wrong gradients"):
        validate(replace(mirrored, programs=tuple(programs)))
    plain = build_tawpipe(Topology(2, 2), 1)
    with pytest.raises(ScheduleError, match="copies a chunk it does not own"):  # rank 2 is no holder without the knob
        validate(replace(plain, programs=mirrored.programs))
    exchanging = build_tawpipe(Topology(2, 2), 1, replicate_first_chunk=2, exchange=True)
    late = list(exchanging.programs[0])
    i = next(i for i, a in enumerate(late) if a.op is Op.EXCHANGE_G and a.chunk == 1)
    late.insert(i - 1, late.pop(i))  # exchanged before its own last gradient was added
    with pytest.raises(ScheduleError, match="adds a gradient after the holders exchanged it"):
        validate(replace(exchanging, programs=(tuple(late), *exchanging.programs[1:])))
    swapped = list(exchanging.programs[0])
    swapped.append(swapped.pop(i))  # chunk 1's exchange after chunk 0's on rank 0 only
    with pytest.raises(ScheduleError, match="exchange mismatch on the rail"):
        validate(replace(exchanging, programs=(tuple(swapped), *exchanging.programs[1:])))


@pytest.mark.parametrize(("n_groups", "group_size", "n_microbatches", "prefetch"),
                         [(2, 2, 1, 1), (2, 2, 2, 2), (3, 2, 2, 2), (2, 4, 1, 3), (4, 2, 2, 1), (3, 3, 1, 2)])
@pytest.mark.parametrize("mirrored_chunks", [0, 1])
def test_striped_transfers_use_every_rail(n_groups, group_size, n_microbatches, prefetch, mirrored_chunks):
    """With ``stripe`` a remote chunk enters a node on all of its rails: every rank of the owner's node sends its
    stripe (scattered from the owner at the head) to the rank of its local index, which receives it where the relay
    received the whole chunk, and the node all-gathers where the relay broadcast. Its gradient goes back the same way:
    the node reduce-scatters it, every rank sends its stripe to its peer in the owner's node, and that node gathers
    the stripes onto the owner, which adds them. The same chunks cross nodes as without it, as often; compute,
    mirrored chunks and a node's own chunks are unchanged. The validator checks every case."""
    topo = Topology(n_groups, group_size)
    G = group_size
    remote = lambda a, node: topo.group_of(plain.owners[a.chunk]) != node and a.chunk >= mirrored_chunks  # noqa: E731
    for train in (True, False):
        plain = build_tawpipe(topo, n_microbatches, prefetch=prefetch, train=train,
                              replicate_first_chunk=mirrored_chunks, exchange=train)
        striped = build_tawpipe(topo, n_microbatches, prefetch=prefetch, train=train,
                                replicate_first_chunk=mirrored_chunks, exchange=train, stripe=True)
        assert striped.striped and striped.n_stripe_buffers == (G * max(1, n_groups - 1) if train else 0)
        for schedule in (striped, with_user_barriers(striped)):
            validate(schedule)
        for rank in range(topo.world_size):
            program, before = striped.program(rank), plain.program(rank)
            node = topo.group_of(rank)
            node_plain = [a for r in topo.group_ranks(node) for a in plain.program(r)]
            same_rail = lambda a: topo.local_index(a.peer) == topo.local_index(rank)  # noqa: E731
            # weights: one stripe receive per whole-chunk receive of the node, on every rank, from its own rail
            stripe_in = [a for a in program if a.op is Op.RECV_STRIPE_W]
            assert sorted(a.chunk for a in stripe_in) == sorted(a.chunk for a in node_plain if a.op is Op.RECV_W)
            assert all(same_rail(a) and remote(a, node) for a in stripe_in)
            assert [a.chunk for a in program if a.op is Op.GATHER_W] == [a.chunk for a in stripe_in]
            sends = [a for a in program if a.op is Op.SEND_W]
            assert all(a.buf == f"t{a.chunk}" and same_rail(a) for a in sends)
            assert sorted(a.chunk for a in sends) == sorted(a.chunk for a in node_plain if a.op is Op.SEND_W)
            owned_here = [c for c in range(mirrored_chunks, topo.world_size)
                          if topo.group_of(striped.owners[c]) == node]
            assert [a.chunk for a in program if a.op is Op.SCATTER_W] == owned_here
            # gradients: a reduce-scatter and a stripe send per whole sum the node sent, in the same order
            whole_out = [a.chunk for a in node_plain if a.op is Op.SEND_G]
            assert [a.chunk for a in program if a.op is Op.REDUCE_SCATTER_G] == \
                   [a.chunk for a in before if a.op is Op.REDUCE_G and remote(a, node)]
            stripes_out = [a for a in program if a.op is Op.SEND_STRIPE_G]
            assert sorted(a.chunk for a in stripes_out) == sorted(whole_out)
            assert all(same_rail(a) and topo.group_of(a.peer) == topo.group_of(plain.owners[a.chunk])
                       for a in stripes_out)
            # ... and the owner's node receives a stripe per whole sum its owners received, gathers it onto the owner
            whole_in = sorted(a.chunk for a in node_plain if a.op is Op.RECV_G)
            assert sorted(a.chunk for a in program if a.op is Op.RECV_STRIPE_G) == whole_in
            gathers = [a for a in program if a.op is Op.GATHER_G]
            assert sorted(a.chunk for a in gathers) == whole_in
            assert all(a.peer == plain.owners[a.chunk] for a in gathers)
            assert sum(a.op is Op.ACC_G and a.buf == "q0" for a in program) == sum(a.op is Op.RECV_G for a in before)
            # compute, and the node's own and mirrored chunks' weights and gradients, are the plain program's
            kept = lambda a: a.op in (Op.FORWARD, Op.BACKWARD, Op.RELEASE, Op.COPY_W, Op.EXCHANGE_G) or (  # noqa
                a.op in (Op.BCAST_W, Op.REDUCE_G) and not remote(a, node)) or (a.op is Op.ACC_G and a.buf[0] == "g")
            assert [a for a in program if kept(a)] == [a for a in before if kept(a)]
    # one node, or one rank per node: nothing to stripe
    for topo in (Topology(1, 4), Topology(3, 1)):
        assert build_tawpipe(topo, 1, stripe=True) == build_tawpipe(topo, 1)


def test_validator_checks_stripes():
    """A stripe received from another local index, a forward before the all-gather, a whole chunk sent to a stripe
    receive, and an all-gather where a rank's part is missing, are caught."""
    striped = build_tawpipe(Topology(2, 2), 1, stripe=True)
    programs = list(striped.programs)

    def crossed(send: Op, receive: Op, chunk: int) -> tuple:
        """Node 0's ranks send ``chunk``'s stripes to node 1's ranks crossed over (each to the other local index)."""
        return (*[tuple(replace(a, peer=5 - a.peer) if a.op is send and a.chunk == chunk else a for a in p)
                  for p in programs[:2]],
                *[tuple(replace(a, peer=1 - a.peer) if a.op is receive and a.chunk == chunk else a for a in p)
                  for p in programs[2:]])

    with pytest.raises(ScheduleError, match="receives stripe 1 of chunk 0 in the part of local index 0"):
        validate(replace(striped, programs=crossed(Op.SEND_W, Op.RECV_STRIPE_W, 0)))
    early = list(programs[2])
    i = index_of(early, lambda a: a.op is Op.GATHER_W and a.chunk == 0)
    j = index_of(early, lambda a: a.op is Op.FORWARD and a.chunk == 0)
    early.insert(j, early.pop(i))  # the forward now comes first
    with pytest.raises(ScheduleError, match=r"F0\.0@s0: slot s0 holds \('WS', 0, 0\)"):
        validate(replace(striped, programs=(*programs[:2], tuple(early), *programs[3:])))
    whole = [tuple(replace(a, buf="own") if a.op is Op.SEND_W and a.chunk == 0 else a for a in programs[0]),
             *programs[1:]]
    with pytest.raises(ScheduleError, match="receives \\('W', 0\\) from rank 0's own"):
        validate(replace(striped, programs=tuple(whole)))
    without = tuple(a for a in programs[2] if not (a.op is Op.RECV_STRIPE_W and a.chunk == 0))
    missing = [programs[0], programs[1], without, *programs[3:]]
    with pytest.raises(ScheduleError, match="all-gathers chunk 0 but its part of s0 holds None"):
        validate(replace(striped, programs=tuple(missing)))
    # gradients: chunk 1 is owned by rank 2, on node 1
    with pytest.raises(ScheduleError, match="receives stripe (0|1) of chunk 1 in the part of local index (1|0)"):
        validate(replace(striped, programs=crossed(Op.SEND_STRIPE_G, Op.RECV_STRIPE_G, 1)))
    # the owner adds before the gather
    owner = list(programs[2])
    g = index_of(owner, lambda a: a.op is Op.GATHER_G and a.chunk == 1)
    a = index_of(owner, lambda a: a.op is Op.ACC_G and a.chunk == 1 and a.buf == "q0")
    owner.insert(g, owner.pop(a))
    with pytest.raises(ScheduleError, match=r"AG1@q0: accumulates None, not chunk 1's gradient"):
        validate(replace(striped, programs=(*programs[:2], tuple(owner), programs[3])))
    # a whole sum sent where a stripe is expected
    whole_sum = [tuple(replace(a, op=Op.SEND_G) if a.op is Op.SEND_STRIPE_G and a.chunk == 1 else a for a in p)
                 for p in programs[:2]]
    with pytest.raises(ScheduleError, match=r"SG1>[23]@g0: sends .* as a stripe"):
        validate(replace(striped, programs=(*whole_sum, *programs[2:])))
    # rank 3 receives a stripe of another micro-batch's... here: of another node's sum in place of its own (3 nodes)
    three = build_tawpipe(Topology(3, 2), 1, stripe=True)
    p3 = list(three.programs)
    i = index_of(p3[1], lambda a: a.op is Op.RECV_STRIPE_G)
    j = index_of(p3[1], lambda a: a.op is Op.RECV_STRIPE_G and a.peer != p3[1][i].peer)
    swapped = list(p3[1])
    swapped[i], swapped[j] = replace(swapped[i], buf=swapped[j].buf), replace(swapped[j], buf=swapped[i].buf)
    with pytest.raises(ScheduleError, match="gathers stripes|deadlock"):
        validate(replace(three, programs=(p3[0], tuple(swapped), *p3[2:])))


def test_builders_reject_bad_knobs():
    with pytest.raises(ValueError, match="prefetch"):
        build_tawpipe(Topology(2, 2), 1, prefetch=0)
    with pytest.raises(ValueError, match="n_microbatches"):
        build_tawpipe(Topology(2, 2), 0)
    with pytest.raises(ValueError, match="grad_buffers must be >= 2"):  # one buffer would be overwritten in flight
        build_tawpipe(Topology(2, 2), 1, grad_buffers=1)
    with pytest.raises(ValueError, match="recv_buffers >= 1"):
        build_tawpipe(Topology(2, 2), 1, recv_buffers=-1)
    with pytest.raises(ValueError, match=r"number of leading chunks from 0 to 4 \(one chunk per rank\), got 5"):
        build_tawpipe(Topology(2, 2), 1, replicate_first_chunk=5)
    with pytest.raises(ValueError):
        build_weipipe(Topology(2, 2), 1, prefetch=0)
    with pytest.raises(ValueError):
        build_weipipe(Topology(2, 2), 0)


# -- the validator catches broken schedules -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good():
    s = tawpipe(2, 2, 2)
    validate(s)
    return s


def test_mutation_dropped_weight_send(good):
    def drop(p):
        del p[index_of(p, lambda a: a.op is Op.SEND_W)]
        return p

    with pytest.raises(ScheduleError, match="deadlock|never matched"):
        validate(mutate(good, 0, drop))


def test_mutation_dropped_weight_receive(good):
    def drop(p):
        del p[index_of(p, lambda a: a.op is Op.RECV_W, last=True)]
        return p

    with pytest.raises(ScheduleError):
        validate(mutate(good, 0, drop))


def test_mutation_forward_reads_wrong_slot(good):
    def wrong_slot(p):
        i = index_of(p, lambda a: a.op is Op.FORWARD and a.chunk == 1)
        assert p[i].buf == "s1"
        p[i] = replace(p[i], buf="s0")
        return p

    with pytest.raises(ScheduleError, match=r"F1\.0@s0: slot s0 holds .*not chunk 1's weights"):
        validate(mutate(good, 0, wrong_slot))


def test_mutation_backward_reads_wrong_slot(good):
    def wrong_slot(p):
        i = index_of(p, lambda a: a.op is Op.BACKWARD and a.chunk == 2)
        p[i] = replace(p[i], buf="s1")
        return p

    with pytest.raises(ScheduleError, match="slot s1 holds"):
        validate(mutate(good, 3, wrong_slot))


@pytest.mark.parametrize("last", [False, True], ids=["local-add", "remote-add"])
def test_mutation_missing_gradient_accumulation(good, last):
    def drop(p):
        del p[index_of(p, lambda a: a.op is Op.ACC_G, last=last)]
        return p

    with pytest.raises(ScheduleError, match=r"owner rank 0 of chunk 0 accumulated the wrong gradients \(missing"):
        validate(mutate(good, 0, drop))


def test_mutation_duplicated_gradient_accumulation(good):
    # re-adding a reduced sum must be caught too (here the buffer is already consumed, so the add sees nothing)
    def dup(p):
        i = index_of(p, lambda a: a.op is Op.ACC_G)
        p.insert(i + 1, p[i])
        return p

    with pytest.raises(ScheduleError, match="accumulates"):
        validate(mutate(good, 0, dup))


def test_mutation_swapped_collectives(good):
    def swap(p):
        bcasts = [i for i, a in enumerate(p) if a.op is Op.BCAST_W]
        i, j = bcasts[1], bcasts[2]
        assert (p[i].peer, p[i].chunk) != (p[j].peer, p[j].chunk)  # different roots / chunks
        p[i], p[j] = p[j], p[i]
        return p

    with pytest.raises(ScheduleError, match="collective mismatch"):
        validate(mutate(good, 0, swap))


def test_mutation_swapped_ring_receives():
    # WeiPipe relays chunks of different owners over one pair: swapping two receives breaks the P2P order
    s = weipipe(1, 3, 1)
    validate(s)

    def swap(p):
        recvs = [i for i, a in enumerate(p) if a.op is Op.RECV_W and a.peer == 2]
        i = recvs[0]
        j = next(j for j in recvs if p[j].chunk != p[i].chunk)
        assert s.owners[p[i].chunk] != s.owners[p[j].chunk]
        p[i], p[j] = p[j], p[i]
        return p

    with pytest.raises(ScheduleError, match="matched with SW"):
        validate(mutate(s, 0, swap))


def test_mutation_wrong_send_chunk(good):
    def wrong(p):
        i = index_of(p, lambda a: a.op is Op.SEND_W)
        p[i] = replace(p[i], chunk=2)
        return p

    with pytest.raises(ScheduleError):
        validate(mutate(good, 0, wrong))


@pytest.mark.parametrize(
    ("last", "match"),
    [(False, r"overwrites s0 while it still holds \('W', 0\) \(not released\)"), (True, "unreleased slots")],
    ids=["mid", "end"],
)
def test_mutation_missing_release(good, last, match):
    def drop(p):
        del p[index_of(p, lambda a: a.op is Op.RELEASE, last=last)]
        return p

    with pytest.raises(ScheduleError, match=match):
        validate(mutate(good, 0, drop))


def test_mutation_copy_of_foreign_chunk(good):
    def wrong(p):
        i = index_of(p, lambda a: a.op is Op.COPY_W)
        p[i] = replace(p[i], chunk=3)
        return p

    with pytest.raises(ScheduleError, match="does not own"):
        validate(mutate(good, 0, wrong))


def test_mutation_unknown_buffer_and_peer(good):
    # names and ranks the schedule never declared: the validator widens its tables, or refuses a peer outside the world
    def new_buffer(p):
        i = index_of(p, lambda a: a.op is Op.RELEASE)
        p[i] = replace(p[i], buf="x9")
        return p

    with pytest.raises(ScheduleError, match="releases x9 but it holds None"):
        validate(mutate(good, 1, new_buffer))

    def far_peer(p):
        i = index_of(p, lambda a: a.op is Op.RECV_W)
        p[i] = replace(p[i], peer=99)
        return p

    with pytest.raises(ScheduleError, match="peer 99 is not a rank"):
        validate(mutate(good, 0, far_peer))


# -- shared action objects ------------------------------------------------------------------------------------------


def test_actions_are_shared_between_ranks_and_sharing_changes_nothing():
    """A node's ranks run the very same compute, release, broadcast and reduce objects (built once); the validator
    caches its decoding on them. Private copies of every action validate, and fail, exactly the same way."""
    s = tawpipe(2, 4, 2)
    node0 = [[a for a in p if a.op in (Op.FORWARD, Op.BACKWARD, Op.RELEASE, Op.BCAST_W, Op.REDUCE_G)]
             for p in s.programs[:4]]
    assert all(len(p) == len(node0[0]) and all(x is y for x, y in zip(p, node0[0])) for p in node0[1:])
    assert len({id(a) for p in s.programs for a in p}) < sum(map(len, s.programs)) / 2
    copies = replace(s, programs=tuple(tuple(parse_program(format_program(list(p)))) for p in s.programs))
    assert copies.programs == s.programs and copies.programs[1][-1] is not s.programs[1][-1]
    validate(s)
    validate(copies)
    cached = s.programs[0][0]  # the decoding is process-local: pickles and copies carry the value only
    assert cached._sim is not None and pickle.loads(pickle.dumps(cached))._sim is None
    assert pickle.loads(pickle.dumps(cached)) == cached

    def drop_release(p):
        del p[index_of(p, lambda a: a.op is Op.RELEASE)]
        return p

    messages = []
    for schedule in (s, copies):
        with pytest.raises(ScheduleError) as err:
            validate(mutate(schedule, 2, drop_release))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "overwrites" in messages[0]

    pool = ActionPool()
    a = pool(Op.SEND_W, 3, peer=5, buf="own")
    assert a is pool(Op.SEND_W, 3, peer=5, buf="own") and a == Action(Op.SEND_W, 3, peer=5, buf="own")
    assert pool(Op.SEND_W, 3, peer=6, buf="own") is not a


# -- grid printer ---------------------------------------------------------------------------------------------------


def _grid_rows(text: str) -> list[list[str]]:
    return [[c for c in line.split() if c != "|"] for line in text.splitlines()]


def test_grid_golden_2x2():
    rows = _grid_rows(format_grid(tawpipe(2, 2, 1)))
    assert rows[0] == ["tick", "r0", "r1", "r2", "r3"]
    body = rows[1:]
    assert len(body) == 8 + 1  # 8 compute steps, node 1 one tick behind
    assert body[0] == ["0", "F0.0", "F0.0", "--", "--"]
    assert body[1] == ["1", "F1.0", "F1.0", "F0.0", "F0.0"]
    assert body[4] == ["4", "B3.0", "B3.0", "F3.0", "F3.0"]
    assert body[8] == ["8", "--", "--", "B0.0", "B0.0"]
    # at every tick node 1 runs what node 0 ran one tick earlier
    for t in range(1, len(body)):
        assert body[t][3:5] == body[t - 1][1:3]
    assert "|" in format_grid(tawpipe(2, 2, 1)).splitlines()[1]  # nodes are visibly separated


def test_grid_with_comm_2x2():
    text = format_grid(tawpipe(2, 2, 1), comm=True)
    lines = text.splitlines()
    assert lines[1].split()[0] == "pre"
    assert "[SW0>2@own SW0>2@own QG0<2@q0 CW0@s0 BW0^0@s0 RW1<2@s1]" in lines[1]
    assert "F0.0 [X0@s0 BW1^0@s1 BW2^1@s0]" in lines[2]
    assert "B1.0 [X1@s1 RG1^0@g0 SG1>2@g0]" in lines[2 + 6]  # the send right behind its reduce (deferred)
    assert "B0.0 [X0@s0 RG0^0@g1 AG0@g1 AG0@q0]" in lines[2 + 7]
    # every communication action of every rank appears in the grid, as often as in the programs
    expected = Counter(str(a) for p in tawpipe(2, 2, 1).programs for a in p if a.op not in (Op.FORWARD, Op.BACKWARD))
    assert {a: text.count(a) for a in expected} == dict(expected)


def test_grid_weipipe_slots():
    s = weipipe(1, 3, 2)
    ticks = compute_ticks(s)
    assert ticks[0][:4] == [0, 1, 2, 3]
    rows = _grid_rows(format_grid(s))
    assert rows[1] == ["0", "F0.0", "--", "--"]
    assert rows[4] == ["3", "F0.1/B2.0", "F2.0", "F1.0"]  # a ring slot can hold a forward and a backward
    assert rows[-1] == ["10", "--", "--", "B0.1"]
    for rank in range(3):  # WeiPipe's own order of compute never runs back in time
        assert ticks[rank] == sorted(ticks[rank])


@PROPERTY
@given(configs)
def test_grid_places_every_compute_once(config):
    for s in (tawpipe(*config), weipipe(*config)):
        ticks = compute_ticks(s)
        rows = _grid_rows(format_grid(s))[1:]
        assert len(rows) == 1 + max(max(t) for t in ticks)
        for rank in range(s.n_chunks):
            labels = [f"{a.op.value}{a.chunk}.{a.mb}" for a in s.compute_steps(rank)]
            in_grid = [lab for row in rows for lab in row[1 + rank].split("/") if lab != "--"]
            assert in_grid == labels
            if s.name == "tawpipe":  # one compute per tick, node n starts n ticks late
                assert ticks[rank] == [j + s.topology.group_of(rank) for j in range(len(labels))]
            else:
                assert ticks[rank] == sorted(ticks[rank])


# -- chunk-major micro-batch order ------------------------------------------------------------------------------------


def test_chunk_major_steps_and_gradient_runs():
    steps = chunk_major_steps(3, 2, train=True)
    assert [f"{s.op.value}{s.chunk}.{s.mb}" for s in steps] == [
        "F0.0", "F0.1", "F1.0", "F1.1", "F2.0", "B2.0", "F2.1", "B2.1", "B1.0", "B1.1", "B0.0", "B0.1"]
    assert chunk_major_steps(3, 1, train=True) == sample_major_steps(3, 1, train=True)
    assert [s.op for s in chunk_major_steps(3, 2, train=False)] == [Op.FORWARD] * 6
    # the last chunk's backward steps with its own forward between them are one run, like the others
    runs = [r for s, r in zip(steps, gradient_runs(steps)) if s.op is Op.BACKWARD]
    assert runs == [(0, True, False), (0, False, True), (1, True, False), (1, False, True), (2, True, False),
                    (2, False, True)]
    # sample-major: every backward step is its own run, except with one chunk, where nothing else comes between
    sample = sample_major_steps(2, 2, train=True)
    assert [r for s, r in zip(sample, gradient_runs(sample)) if s.op is Op.BACKWARD] == [
        (0, True, True), (1, True, True), (2, True, True), (3, True, True)]
    one = sample_major_steps(1, 3, train=True)
    assert [r for s, r in zip(one, gradient_runs(one)) if s.op is Op.BACKWARD] == [
        (0, True, False), (0, False, False), (0, False, True)]


def _inter_node_transfers(s) -> Counter:
    """Per op, the weight and gradient transfers that cross nodes in one iteration, over all ranks."""
    topo = s.topology
    return Counter(a.op for r in range(topo.world_size) for a in s.program(r)
                   if a.op in P2P_OPS and a.op.value[0] != "Q" and not topo.same_group(r, a.peer))


@pytest.mark.parametrize(
    ("nodes", "ranks", "mbs", "prefetch", "knobs"),
    [(2, 2, 4, 2, {}), (3, 2, 2, 1, {}), (2, 3, 3, 2, {"stripe": True}), (3, 2, 3, 3, {"replicate_first_chunk": 2}),
     (2, 2, 2, 2, {"replicate_first_chunk": True, "exchange": True, "stripe": True}), (1, 4, 3, 1, {}),
     (4, 1, 2, 2, {"reuse": 1})],
)
def test_chunk_major_moves_the_bytes_of_one_microbatch(nodes, ranks, mbs, prefetch, knobs):
    """Every micro-batch passes through a chunk while it is resident, and a chunk's backward steps add into one
    gradient buffer: the inter-node transfers and node collectives of ``mbs`` micro-batches are those of one, and
    the schedule survives user collectives at every point where user code runs."""
    topo = Topology(nodes, ranks)
    chunk = build_tawpipe(topo, mbs, prefetch=prefetch, order="chunk", **knobs)
    one = build_tawpipe(topo, 1, prefetch=prefetch, **knobs)
    sample = build_tawpipe(topo, mbs, prefetch=prefetch, **knobs)
    assert chunk.order == "chunk" and sample.order == "sample"
    validate(chunk)
    validate(with_user_barriers(chunk))
    steps = chunk_major_steps(topo.world_size, mbs, train=True)
    collectives = (Op.BCAST_W, Op.REDUCE_G, Op.GATHER_W, Op.REDUCE_SCATTER_G, Op.GATHER_G, Op.EXCHANGE_G)
    for rank in range(topo.world_size):
        computed = chunk.compute_steps(rank)
        assert [(a.op, a.chunk, a.mb) for a in computed] == [(s.op, s.chunk, s.mb) for s in steps]
        # a backward adds into its buffer exactly when the step before it in the run was the same chunk's backward
        assert [a.acc for a in computed if a.op is Op.BACKWARD] == [
            not first for s, (_, first, _) in zip(steps, gradient_runs(steps)) if s.op is Op.BACKWARD]
        node_ops = Counter(a.op for a in chunk.program(rank) if a.op in collectives)
        assert node_ops == Counter(a.op for a in one.program(rank) if a.op in collectives), rank
    assert _inter_node_transfers(chunk) == _inter_node_transfers(one)
    if nodes > 1:
        assert sum(_inter_node_transfers(sample).values()) > sum(_inter_node_transfers(chunk).values())


def test_validator_checks_gradient_runs():
    """A backward that adds into a buffer holding another chunk's gradient, or one that overwrites the earlier
    micro-batches of its run, is caught."""
    good = build_tawpipe(Topology(2, 2), 2, prefetch=2, order="chunk")
    validate(good)

    def overwrite(p):
        i = index_of(p, lambda a: a.op is Op.BACKWARD and a.acc and a.chunk == 1)
        p[i] = replace(p[i], acc=False)
        return p

    with pytest.raises(ScheduleError, match=r"accumulated the wrong gradients \(missing"):
        validate(mutate(good, 1, overwrite))

    def other_buffer(p):
        i = index_of(p, lambda a: a.op is Op.BACKWARD and a.acc and a.chunk == 1)
        p[i] = replace(p[i], buf2="g1" if p[i].buf2 == "g0" else "g0")
        return p

    with pytest.raises(ScheduleError, match=r"adds its gradients to .*not chunk 1's"):
        validate(mutate(good, 1, other_buffer))


def test_user_barriers_sit_where_each_microbatch_starts_in_chunk_major_order():
    s = with_user_barriers(build_tawpipe(Topology(2, 2), 3, prefetch=1, order="chunk"))
    compute_and_barriers = [str(a) if a.op is Op.BARRIER else f"{a.op.value}{a.chunk}.{a.mb}"
                            for a in s.program(0) if a.op in (Op.FORWARD, Op.BACKWARD, Op.BARRIER)]
    assert compute_and_barriers[:6] == ["F0.0", "BAR", "F0.1", "BAR", "F0.2", "F1.0"]
    assert compute_and_barriers[6:14] == ["F1.1", "F1.2", "F2.0", "F2.1", "F2.2", "F3.0", "BAR", "B3.0"]  # the loss
    assert compute_and_barriers[-4:] == ["B0.1", "BAR", "B0.2", "BAR"]


def test_user_code_runs_after_the_loss_and_before_each_microbatch_only():
    """The engine posts everything deferred before a forward step after which user code runs. In chunk-major order
    the next micro-batch's thread resumes inside its forward, so only the loss and each micro-batch's start count."""
    from lightning_tawpipe.schedule.actions import user_code_follows

    def points(s):
        program = s.program(0)
        return [f"{a.chunk}.{a.mb}" for j, a in enumerate(program)
                if a.op is Op.FORWARD and user_code_follows(program, j)]

    assert points(tawpipe(2, 2, 2)) == ["3.0", "3.1"]  # sample-major: the loss of each micro-batch
    assert points(tawpipe(2, 2, 2, train=False)) == ["3.0", "3.1"]  # eval: each micro-batch's end
    chunk = build_tawpipe(Topology(2, 2), 3, order="chunk")
    assert points(chunk) == ["0.0", "0.1", "3.0", "3.1", "3.2"]  # before micro-batches 1 and 2 start; each loss
