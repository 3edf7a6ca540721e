"""The statistics behind BENCHMARKS.md's claims: paired differences and their 95% t-intervals."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import paired  # noqa: E402


def test_paired_difference_and_interval():
    p = paired.paired({"0": 0.91, "1": 0.92, "2": 0.93}, {"0": 0.90, "1": 0.90, "2": 0.90, "3": 0.5})
    assert p["n"] == 3 and p["diffs"] == pytest.approx([1.0, 2.0, 3.0])  # pp, seed 3 unpaired
    half = 4.302652729911275 * 1.0 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n)
    assert (p["mean"], p["low"], p["high"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half))


def test_one_seed_has_no_interval():
    p = paired.paired({"0": 0.8}, {"0": 0.7})
    assert p["n"] == 1 and p["low"] is None and paired.fmt(p) == "+10.00 (one seed: illustration)"


def test_strongest_baseline_prefers_the_most_seeds_then_the_smallest_lead():
    three = paired.paired({"0": 0.9, "1": 0.9, "2": 0.9}, {"0": 0.89, "1": 0.88, "2": 0.89})  # A ahead ~1.3 pp
    closer = paired.paired({"0": 0.9, "1": 0.9, "2": 0.9}, {"0": 0.9, "1": 0.895, "2": 0.9})  # A ahead ~0.2 pp
    one = paired.paired({"0": 0.9}, {"0": 0.95})  # one seed, A behind by 5 pp: not the claim's baseline
    assert paired.strongest({"lamp": three, "erk": one, "gm": closer})[0] == "gm"
    assert paired.strongest({"erk": one})[0] == "erk"
    assert paired.strongest({"none": paired.paired({}, {})}) is None
