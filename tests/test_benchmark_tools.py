"""The speed benchmark's bookkeeping (no processes): how repeated rounds of a point become one table row."""

from __future__ import annotations

import pytest

from benchmarks.speed import merge_rounds


def run(strategy, step, vs_compute, error=None):
    if error:
        return {"strategy": strategy, "error": error}
    return {"strategy": strategy, "step_time_median": step, "step_times": [step], "vs_compute_only": vs_compute,
            "link_tx_bytes_per_step": 8.0, "machine_busy_fraction": None}


def test_one_round_is_passed_through_unchanged():
    rows = [run("compute", 1.0, 1.0), run("tawpipe", 1.2, 1.2)]
    assert merge_rounds([rows]) is rows


def test_rounds_report_medians_of_paired_ratios_and_keep_every_round():
    rounds = [
        [run("compute", 1.0, 1.0), run("tawpipe", 1.3, 1.3)],
        [run("tawpipe", 1.8, 1.2), run("compute", 1.5, 1.0)],  # a slow round: the ratio is paired within it
        [run("compute", 1.1, 1.0), run("tawpipe", 1.21, 1.1)],
    ]
    merged = {r["strategy"]: r for r in merge_rounds(rounds)}
    assert list(merged) == ["compute", "tawpipe"]
    taw = merged["tawpipe"]
    assert taw["rounds"] == 3
    assert taw["step_time_median"] == pytest.approx(1.3)
    assert taw["vs_compute_only"] == pytest.approx(1.2)  # median of 1.3, 1.2, 1.1, not 1.3 / 1.1
    assert taw["vs_compute_only_rounds"] == [1.3, 1.2, 1.1]
    assert sorted(taw["step_times"]) == [1.21, 1.3, 1.8]
    assert "machine_busy_fraction_rounds" not in taw  # a figure no round has stays as it was
    assert taw["link_tx_bytes_per_step"] == 8.0


def test_failed_rounds_are_left_out_and_an_always_failing_strategy_keeps_its_error():
    rounds = [
        [run("compute", 1.0, 1.0), run("tawpipe", 0, 0, error="timed out"), run("fsdp", 0, 0, error="boom")],
        [run("compute", 1.2, 1.0), run("tawpipe", 1.4, 1.25), run("fsdp", 0, 0, error="boom")],
    ]
    merged = {r["strategy"]: r for r in merge_rounds(rounds)}
    assert merged["tawpipe"]["rounds"] == 1 and merged["tawpipe"]["vs_compute_only"] == 1.25
    assert merged["compute"]["step_time_median"] == pytest.approx(1.1)  # the median of an even count: the mean
    assert merged["fsdp"]["error"] == "boom"


def test_trace_timeline_splits_a_step_into_engine_time_and_the_models_own_work(tmp_path):
    """Synthetic Chrome trace: overlapping engine ranges count once, other threads and other ranges are ignored."""
    import gzip
    import json

    from benchmarks.trace_timeline import load_events, rank_files, summarize

    def x(name, ts, dur, tid=1):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid}

    events = [
        x("ProfilerStep", 1000, 100_000),  # the step window on the main thread: 100 ms
        x("TAWPIPE:RW1<2@s1", 1000, 2000),
        x("TAWPIPE:wait-for:F1.0@s1", 40_000, 10_000),  # 10 ms exposed before F1
        x("TAWPIPE:BW1^0@s1", 45_000, 10_000),  # overlaps the wait above by 5 ms
        x("aten::mm", 60_000, 30_000),  # compute: not an engine range
        x("TAWPIPE:SG1>2@g0", 2000, 90_000, tid=7),  # another thread's range is not this rank's timeline
    ]
    with gzip.open(tmp_path / "t.rank0.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    files = rank_files(str(tmp_path / "t"))
    assert list(files) == [0]
    s = summarize(load_events(files[0]))
    assert s["step_ms"] == pytest.approx(100.0)
    assert s["engine_ms"] == pytest.approx(2.0 + 15.0)  # 40..55 ms counted once
    assert s["wait_for_compute_ms"] == pytest.approx(10.0)
    assert s["other_ms"] == pytest.approx(83.0)
    assert [r["name"] for r in s["ranges"]] == ["RW1<2@s1", "wait-for:F1.0@s1", "BW1^0@s1"]
    with pytest.raises(SystemExit, match="no traces"):
        rank_files(str(tmp_path / "missing"))


def test_sleeping_blocks_hold_the_rank_without_computing_and_give_zero_block_gradients(monkeypatch):
    """``--sleep_blocks``: each block is the identity and sleeps; the rest of the model still trains."""
    import time

    import torch
    from litgpt.model import GPT, Block

    from benchmarks.sleep_blocks import install, parse_sleep_blocks
    from lightning_tawpipe.module import tiny_llama_config

    assert parse_sleep_blocks("18.4,36.8") == pytest.approx((0.0184, 0.0368, 0.0))
    assert parse_sleep_blocks("18.4,36.8,0.15") == pytest.approx((0.0184, 0.0368, 0.15))
    for bad in ("18.4", "a,b", "1,2,3,4", "-1,2", "1,2,1.5"):
        with pytest.raises(ValueError, match="--sleep_blocks"):
            parse_sleep_blocks(bad)

    monkeypatch.setattr(Block, "forward", Block.forward)  # undone after the test
    torch.manual_seed(0)
    model = GPT(tiny_llama_config(n_layer=3, n_embd=32, n_head=4, n_query_groups=2, block_size=16))
    idx = torch.randint(0, 256, (2, 16))
    install(0.01, 0.02)
    start = time.perf_counter()
    logits = model(idx)
    forward_s = time.perf_counter() - start
    logits.float().logsumexp(-1).mean().backward()
    total_s = time.perf_counter() - start
    assert forward_s >= 3 * 0.01 and total_s >= 3 * (0.01 + 0.02)
    t = model.transformer
    assert torch.equal(logits, model.lm_head(t.ln_f(t.wte(idx))))  # the blocks passed activations through
    for block in t.h:
        assert all(p.grad is not None and not p.grad.any() for p in block.parameters())
    assert t.wte.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


def test_plan_validate_reads_sleeping_block_runs_as_separate_devices_with_measured_variants():
    """The committed ``sleep-blocks`` set: no CPU floor, every variant measured, the planner within its goal."""
    from benchmarks.plan_validate import GOAL, VARIANT_KNOBS, _pred_meas, validate_dir

    rows = [r for r in validate_dir("sleep-blocks/2x2-variants") if r["strategy"] == "tawpipe"]
    assert {r["rate"] for r in rows} == {"1gbit", "2gbit", "4gbit", "none"}
    for r in rows:
        assert r["floors"]["cores"] == "sleep" and r["floors"]["cpu"] is None
        assert abs(r["error"]) <= GOAL
        assert set(r["variants"]) == set(VARIANT_KNOBS)
        # every variant is predicted, unless its partition is cut for another rank count (None: does not apply)
        fits = {n: len(VARIANT_KNOBS[n].get("partition", [1] * 4)) == 4 for n in VARIANT_KNOBS}
        assert all((v["predicted"] is not None) == fits[n] for n, v in r["variants"].items())
        ran = {name for name, v in r["variants"].items() if v["measured"] is not None}
        assert ran == {"gb3", "light0", "gb3-light0-p1"}  # the set's --strategies
    assert _pred_meas(1.234, None) == "1.23" and _pred_meas(None, 1.5) == "n/a (1.50)"
    assert _pred_meas(1.0, 1.07) == "1.00 (1.07)"


def test_a_variant_runs_the_tawpipe_worker_with_its_knobs_after_the_shared_ones():
    import argparse

    from benchmarks.speed import VARIANTS, worker_args

    a = argparse.Namespace(n_layer=8, n_embd=256, n_head=8, n_query_groups=4, batch_size=1, n_microbatches=1,
                           prefetch=2, reuse=0, steps=6, threads=1, warmup=2, precision="32-true",
                           sleep_blocks=None, free_running=False)
    args = worker_args("tawpipe-gb3-light0-p1", a, 512, "out.json")
    assert args[:2] == ["--strategy", "tawpipe"]
    assert args[-6:] == ["--grad_buffers", "3", "--partition", "2,2,3,3", "--prefetch", "1"]
    assert all(name.startswith("tawpipe-") for name in VARIANTS)
    assert worker_args("ddp", a, 512, "out.json")[:2] == ["--strategy", "ddp"]
    assert worker_args("tawpipe-rep0", a, 512, "out.json")[-1] == "--replicate_first_chunk"  # a switch: bare flag
    assert worker_args("tawpipe-rep01", a, 512, "out.json")[-2:] == ["--replicate_first_chunk", "2"]
    assert "--free_running" not in args
    assert "--free_running" in worker_args("tawpipe", argparse.Namespace(**{**vars(a), "free_running": True}), 512, "o")
    from benchmarks.baselines import make_strategy  # and the worker's strategy keeps the count (not a bool)

    assert make_strategy("tawpipe", (2, 2), replicate_first_chunk=2).replicate_first_chunk == 2
    assert make_strategy("weipipe", (2, 2), replicate_first_chunk=2).replicate_first_chunk is False
