"""Reliability: no hangs, clear errors, every rank stops together (real gloo processes and in-process checks).

The bad-input table in the README lists every refused input with the test that checks it; the multi-rank ones are
here (each run fails within seconds, before or at the step named in its message).
"""

import time

import pytest

from lightning_tawpipe.runtime import health

ARGS = ("--n_layer", "4", "--n_embd", "32", "--seq_length", "32", "--batch_size", "2", "--strategy", "tawpipe",
        "--steps", "4", "--timeout_s", "20")


def _fails(train_job, *args, node_ranks=1) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="failed") as info:
        train_job(*ARGS, *args, node_ranks=node_ranks)
    return str(info.value), time.monotonic() - start


def test_a_killed_rank_stops_every_node_within_the_timeout(train_job, tmp_path):
    """Rank 2 (node 1) is SIGKILLed in the middle of a forward at step 2: every process of both nodes exits non-zero
    well within 2 x the 20 s collective timeout, the survivors name the dead rank and the step, and the checkpoint
    of the last completed step loads and resumes."""
    ckpt_dir = tmp_path / "ckpts"
    log, elapsed = _fails(train_job, "--devices", "2", "--num_nodes", "2", "--group_size", "0", "--fault", "kill",
                          "--fault_rank", "2", "--fault_step", "2", "--checkpoint_dir", str(ckpt_dir),
                          "--every_n_steps", "1", node_ranks=2)
    assert elapsed < 20 + 2 * 20  # start-up (~15 s here) + 2 x timeout
    stopped = [line for line in log.splitlines() if "TawPipe stopped at step 2" in line]
    assert stopped, log[-3000:]
    assert any("rank 2 stopped responding" in line or "rank 0, which failed" in line for line in stopped)
    assert not (ckpt_dir / "epoch=0-step=3.ckpt").exists()
    resumed = train_job(*ARGS, "--devices", "4", "--group_size", "2", "--resume", str(ckpt_dir / "epoch=0-step=2.ckpt"))
    assert len(resumed["losses"]) == 2  # steps 3 and 4 of 4


@pytest.mark.parametrize("fault, message, extra", [
    ("nan", "Non-finite loss at step 1 on rank(s) [2]", ()),
    # rank 2's batch of 3 does not split into the 2 micro-batches: it judges the posted batch-size check at once
    ("ragged", "Step 0: ranks got different batch sizes {0: 2, 1: 2, 2: 3, 3: 2}", ()),
    # one micro-batch: every rank runs the iteration, and all judge the posted check after it, before the step
    ("ragged", "Step 0: ranks got different batch sizes {0: 2, 1: 2, 2: 3, 3: 2}", ("--n_microbatches", "1")),
    ("mismatch", "Rank 2 built a different model than rank 0", ()),
])
def test_every_rank_stops_with_the_same_clear_message(train_job, fault, message, extra):
    log, _ = _fails(train_job, "--devices", "4", "--group_size", "2", "--fault", fault, "--fault_rank", "2",
                    "--fault_step", "1", *extra)
    assert message in log, log[-3000:]
    reporters = {r for r in range(4) if f"[rank{r}]: " in log and any(
        line.startswith(f"[rank{r}]: ") and message in line for line in log.splitlines())}
    assert len(reporters) >= 2, reporters  # not one rank failing while the others hang: they stop together
    if extra:  # judged by every rank itself, not learnt from a failed peer
        assert reporters == {0, 1, 2, 3} and "stopped responding" not in log, reporters


def test_unequal_nodes_are_refused():
    health.check_equal_nodes([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"different numbers of ranks \(\{0: 2, 1: 1\}"):
        health.check_equal_nodes([0, 0, 1])


def test_own_errors_are_recorded_and_comm_errors_diagnosed():
    class Store(dict):
        def set(self, k, v):
            self[k] = v.encode() if isinstance(v, str) else v

        def get(self, k):
            return dict.__getitem__(self, k)

        def check(self, keys):
            return all(k in self for k in keys)

    store = Store()
    rank1 = health.Health(1, 3, store=store, grace_s=0.2)
    rank2 = health.Health(2, 3, store=store, grace_s=0.2)
    for h in (rank1, rank2):
        h.step_started(7)
    err = ValueError("bad batch")
    assert rank2.failure(7, err) is err  # this rank's own error is re-raised unchanged, and recorded
    diagnosis = rank1.failure(7, RuntimeError("Connection closed by peer"))
    assert "rank 2 raised at step 7: ValueError: bad batch" in str(diagnosis)
    store.clear()
    rank1.step_started(3)
    diagnosis = rank1.failure(3, RuntimeError("[gloo] Connection reset by peer"))
    assert "rank 0 stopped responding (last step it started: none)" in str(diagnosis)
    assert "rank 2 stopped responding" in str(diagnosis)
