"""Topology arithmetic (who owns which chunk) and the unit partitioner."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_tawpipe.partition import PARTITION_METHODS, parse_partition, partition_units
from lightning_tawpipe.topology import Topology, ring_owner, tawpipe_owner

# -- Topology -------------------------------------------------------------------------------------------------------


def test_topology_rank_arithmetic():
    topo = Topology(3, 4)
    assert topo.world_size == 12
    assert topo.group_ranks(1) == [4, 5, 6, 7]
    for r in range(12):
        assert topo.rank(topo.group_of(r), topo.local_index(r)) == r
    assert (topo.group_of(6), topo.local_index(6)) == (1, 2)
    assert topo.same_group(4, 7) and not topo.same_group(3, 4)
    assert "node 2: ranks [8, 9, 10, 11]" in str(topo)


@pytest.mark.parametrize(("n_groups", "group_size"), [(0, 1), (1, 0), (-1, 2)])
def test_topology_rejects_empty(n_groups, group_size):
    with pytest.raises(ValueError, match=f"n_groups={n_groups}, group_size={group_size}"):
        Topology(n_groups, group_size)


@pytest.mark.parametrize(("world", "group_size", "expected"), [(8, 2, (4, 2)), (8, 8, (1, 8)), (6, 1, (6, 1))])
def test_from_world(world, group_size, expected):
    topo = Topology.from_world(world, group_size)
    assert (topo.n_groups, topo.group_size) == expected


@pytest.mark.parametrize(("world", "group_size"), [(6, 4), (2, 3), (5, 2), (4, 0)])
def test_from_world_errors_name_the_numbers(world, group_size):
    with pytest.raises(ValueError, match=rf"group_size={group_size} does not divide the world size {world}"):
        Topology.from_world(world, group_size)


# -- owners ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_groups", "group_size", "owners"),
    [
        (1, 1, [0]),
        (1, 4, [0, 1, 2, 3]),  # one node: chunk k on local rank k
        (4, 1, [0, 1, 2, 3]),  # one rank per node: chunk n on node n
        (2, 2, [0, 2, 1, 3]),
        (3, 2, [0, 2, 4, 1, 3, 5]),
        (2, 3, [0, 3, 1, 4, 2, 5]),
    ],
)
def test_tawpipe_owner_examples(n_groups, group_size, owners):
    topo = Topology(n_groups, group_size)
    assert [tawpipe_owner(c, topo) for c in range(topo.world_size)] == owners


@pytest.mark.parametrize(("n_groups", "group_size"), list(itertools.product(range(1, 6), range(1, 6))))
def test_tawpipe_owner_properties(n_groups, group_size):
    topo = Topology(n_groups, group_size)
    P = topo.world_size
    owners = [tawpipe_owner(c, topo) for c in range(P)]
    assert sorted(owners) == list(range(P))  # a bijection chunks -> ranks
    for c, owner in enumerate(owners):
        # rank n*G + k owns chunk k*N + n
        n, k = topo.group_of(owner), topo.local_index(owner)
        assert c == k * n_groups + n
    if n_groups > 1:
        for c in range(P - 1):
            a, b = owners[c], owners[c + 1]
            assert topo.group_of(a) != topo.group_of(b), f"chunks {c}, {c + 1} both on node {topo.group_of(a)}"
            if (c + 1) % n_groups:  # within a round of nodes the next chunk sits on the same rail
                assert topo.local_index(a) == topo.local_index(b)


@pytest.mark.parametrize("P", range(1, 10))
def test_ring_owner_bijection(P):
    owners = [ring_owner(c, P) for c in range(P)]
    assert sorted(owners) == list(range(P))
    assert owners[0] == 0
    assert owners == [(P - c) % P for c in range(P)]
    for r in range(P):  # rank r owns chunk -r mod P
        assert owners[(-r) % P] == r


# -- partition ------------------------------------------------------------------------------------------------------


def _check_cover(chunks: list[range], n_units: int, n_chunks: int) -> None:
    assert len(chunks) == n_chunks
    assert all(isinstance(r, range) and r.step == 1 and len(r) > 0 for r in chunks)
    assert chunks[0].start == 0 and chunks[-1].stop == n_units
    for a, b in zip(chunks, chunks[1:]):
        assert a.stop == b.start


def _brute_force_min_max(sizes: list[int], n_chunks: int) -> int:
    n = len(sizes)
    best = None
    for cuts in itertools.combinations(range(1, n), n_chunks - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@st.composite
def sizes_and_chunks(draw):
    sizes = draw(st.lists(st.integers(0, 60), min_size=1, max_size=9))
    n_chunks = draw(st.integers(1, len(sizes)))
    return sizes, n_chunks


@settings(max_examples=60, deadline=None)
@given(sizes_and_chunks(), st.sampled_from(PARTITION_METHODS))
def test_partition_is_contiguous_cover(case, method):
    sizes, n_chunks = case
    _check_cover(partition_units(sizes, n_chunks, method), len(sizes), n_chunks)


@settings(max_examples=60, deadline=None)
@given(sizes_and_chunks())
def test_parameters_method_minimises_largest_chunk(case):
    sizes, n_chunks = case
    chunks = partition_units(sizes, n_chunks, "parameters")
    assert max(sum(sizes[u] for u in r) for r in chunks) == _brute_force_min_max(sizes, n_chunks)


@settings(max_examples=60, deadline=None)
@given(sizes_and_chunks())
def test_uniform_method_balances_unit_counts(case):
    sizes, n_chunks = case
    lengths = [len(r) for r in partition_units(sizes, n_chunks, "uniform")]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the first chunks take the remainder


def test_partition_examples():
    # a LitGPT-like model: a big embedding, equal blocks, a big head
    sizes = [100, 10, 10, 10, 10, 100]
    assert partition_units(sizes, 3, "uniform") == [range(0, 2), range(2, 4), range(4, 6)]
    assert partition_units(sizes, 3, "parameters") == [range(0, 1), range(1, 5), range(5, 6)]
    assert partition_units(sizes, 1, "parameters") == [range(0, 6)]
    assert partition_units(sizes, 6, "parameters") == [range(i, i + 1) for i in range(6)]
    assert partition_units([5, 5, 5, 5], 2) == [range(0, 2), range(2, 4)]  # default method is "parameters"


def test_partition_too_few_units():
    with pytest.raises(ValueError, match=r"3 pipeline units .* but 4 ranks .*more layers, or fewer ranks"):
        partition_units([1, 2, 3], 4)
    with pytest.raises(ValueError, match="more layers"):
        partition_units([1, 2, 3], 4, "uniform")


def test_partition_bad_arguments():
    with pytest.raises(ValueError, match=r"partition must be one of .* or a list of units per chunk, got 'x'"):
        partition_units([1, 2, 3], 2, "x")
    with pytest.raises(ValueError, match="at least one chunk"):
        partition_units([1, 2, 3], 0)


def test_explicit_partition_cuts_where_told_and_names_the_counts_when_wrong():
    """``partition=[units per chunk]``: the cut is taken as given, and a list that cannot fit says what would."""
    sizes = [1, 10, 10, 10, 10, 1]
    assert partition_units(sizes, 3, [1, 2, 3]) == [range(0, 1), range(1, 3), range(3, 6)]
    assert partition_units(sizes, 3, (2, 2, 2)) == partition_units(sizes, 3, "uniform")
    with pytest.raises(ValueError, match=r"3 chunk\(s\) of 5 unit\(s\), but this pipeline has 3 rank\(s\) and the "
                                         r"model 6 pipeline units .* summing to 6"):
        partition_units(sizes, 3, [1, 2, 2])
    with pytest.raises(ValueError, match=r"2 chunk\(s\) of 6 unit\(s\), but this pipeline has 3 rank\(s\)"):
        partition_units(sizes, 3, [3, 3])
    for bad in ([], [2, 0, 4], [2.0, 4], [True, 5], "2,2,2", {1: 2}):
        with pytest.raises(ValueError, match="partition"):
            partition_units(sizes, 3, bad)
    assert parse_partition("2, 3,1") == [2, 3, 1] and parse_partition("uniform") == "uniform"
