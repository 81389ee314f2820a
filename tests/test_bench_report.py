"""The model benchmark's report: medians over rounds, and ratios taken within a round, never across."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(name: str):
    """The benchmark script ``benchmarks/<name>.py`` as a module (its folder on the path, as when it runs)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def _bench_model():
    return _bench("bench_model")


def _row(method, rep, prefill, rss, decode):
    return dict(method=method, length=16384, dtype="float32", threads=2, new_tokens=64, repeat=rep,
                prefill_s=prefill, peak_rss_mib=rss, decode_tok_s=decode)


def test_report_takes_ratios_within_rounds_and_medians_over_them():
    bm = _bench_model()
    # Round 1 is slow for both methods: a ratio across rounds would read 2.0x, within rounds it is 1.1x.
    rows = [_row("vanilla", 0, 10.0, 100.0, 4.0), _row("self-extend", 0, 11.0, 100.0, 4.0),
            _row("vanilla", 1, 20.0, 100.0, 2.0), _row("self-extend", 1, 22.0, 120.0, 2.0),
            _row("vanilla", 2, 10.0, 100.0, 4.0), _row("self-extend", 2, 11.0, 100.0, 3.6)]
    table = bm.report(rows)
    se = next(line for line in table.splitlines() if "| self-extend |" in line).split("|")
    assert se[4].strip() == "11.0"  # median prefill seconds over the three rounds
    assert se[5].strip() == "1.100x (1.100-1.100)"
    assert se[7].strip() == "1.000x (1.000-1.200)"
    assert se[9].strip() == "1.000x (0.900-1.000)"


def test_rows_without_a_round_are_round_zero():
    bm = _bench_model()
    rows = [_row("vanilla", 0, 10.0, 100.0, 4.0), _row("self-extend", 0, 10.5, 100.0, 4.0)]
    for r in rows:
        del r["repeat"]  # rows written before --repeats existed
    assert bm._key(rows[0])[-1] == 0
    se = next(line for line in bm.report(rows).splitlines() if "| self-extend |" in line).split("|")
    assert se[5].strip() == "1.050x"


def test_decode_ab_alternates_methods_and_takes_ratios_within_rounds():
    """Rounds alternate the methods, ``per_block`` steps each; a slow round (the heap, the machine) slows both
    methods alike and leaves its ratio alone."""
    ab = _bench("bench_decode_ab")
    order = []
    speed = {"vanilla": [0.10, 0.20], "self-extend": [0.11, 0.22]}  # round 1 twice as slow for both

    def step(name):
        def run():
            order.append(name)
            return speed[name][sum(1 for n in order if n == name) > 3]
        return run

    times, rounds = ab.interleaved({"vanilla": step("vanilla"), "self-extend": step("self-extend")}, 2, 3)
    assert order == ["vanilla"] * 3 + ["self-extend"] * 3 + ["vanilla"] * 3 + ["self-extend"] * 3
    assert [round(r, 6) for r in rounds] == [round(0.10 / 0.11, 6), round(0.20 / 0.22, 6)]
    assert len(times["vanilla"]) == len(times["self-extend"]) == 6


def test_decode_ab_length_argument():
    ab = _bench("bench_decode_ab")
    assert ab.parse_length("16k") == 16384 and ab.parse_length("2048") == 2048
    import argparse

    import pytest

    with pytest.raises(argparse.ArgumentTypeError, match="--length takes tokens like 16384 or 16k"):
        ab.parse_length("long")
