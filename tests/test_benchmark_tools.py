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
