"""What a rank's program says it sends, in bytes: the reference the engine's measured accounting is checked against
(``tests/test_parity.py``, ``tests/test_precision.py``)."""

from lightning_tawpipe.schedule import Op
from lightning_tawpipe.schedule.actions import is_stripe, stripe_numel

GRADIENT_SENDS = (Op.SEND_G, Op.REDUCE_G, Op.SEND_STRIPE_G, Op.REDUCE_SCATTER_G, Op.GATHER_G)


def program_bytes(schedule, rank: int, numel: list[int], trainable: list[int], itemsize: int) -> tuple[int, int, int]:
    """(inter-node, intra-node, gradient) bytes ``rank``'s program sends, for chunks of ``numel`` parameters of which
    ``trainable`` have gradients (a gradient covers a chunk's trainable prefix):

    * a P2P send: its buffer (a stripe: ``1 / G`` of the chunk, rounded up);
    * a broadcast's root: one copy per other member; a reduce's member other than the root: its buffer;
    * a scatter's root, and every member of an all-gather or reduce-scatter: one stripe per other member;
    * a gather's member other than the root: its stripe.
    """
    topo = schedule.topology
    G = topo.group_size
    inter = intra = grad = 0
    for a in schedule.program(rank):
        gradient = a.op in GRADIENT_SENDS
        n = trainable[a.chunk] if gradient else numel[a.chunk]
        stripe = stripe_numel(n, G) * itemsize
        if a.op in (Op.SEND_W, Op.SEND_G, Op.SEND_STRIPE_G):
            nbytes = stripe if is_stripe(a) else n * itemsize
            if topo.same_group(rank, a.peer):
                intra += nbytes
            else:
                inter += nbytes
        elif a.op is Op.BCAST_W and a.peer == rank:
            nbytes = n * itemsize * (G - 1)
            intra += nbytes
        elif a.op is Op.REDUCE_G and a.peer != rank:
            nbytes = n * itemsize
            intra += nbytes
        elif (a.op is Op.SCATTER_W and a.peer == rank) or a.op in (Op.GATHER_W, Op.REDUCE_SCATTER_G):
            nbytes = stripe * (G - 1)
            intra += nbytes
        elif a.op is Op.GATHER_G and a.peer != rank:
            nbytes = stripe
            intra += nbytes
        else:
            continue
        grad += nbytes if gradient else 0
    return inter, intra, grad
