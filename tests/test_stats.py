"""Intervals and paired tests for accuracies measured on a few hundred samples."""

from __future__ import annotations

import math

import pytest
import torch

from edgeq.checks.stats import interval, mcnemar_p, paired, paired_proportion_interval, verdict, wilson
from edgeq.recipe import top1_accuracy


def _logits(labels: torch.Tensor, classes: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).float()


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson(50, 100)
    assert (round(low, 2), round(high, 2)) == (40.38, 59.62)
    low, high = wilson(250, 250)  # every photo right: the interval still admits errors
    assert high == pytest.approx(100.0) and 98.0 < low < 98.6


def test_mcnemar_exact_p_value():
    assert mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0


def test_top1_interval_and_paired_test_on_the_same_samples():
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 10, (250,), generator=gen)
    a = targets.clone()
    b = targets.clone()
    b[:12] = (b[:12] + 1) % 10  # b is wrong on 12 samples a gets right
    a[200:203] = (a[200:203] + 1) % 10  # and right on 3 that a gets wrong
    one = interval(top1_accuracy, _logits(a), targets)
    assert one.value == pytest.approx(100 * 247 / 250) and one.low < one.value < one.high
    test = paired(top1_accuracy, _logits(a), _logits(b), targets)
    assert test.discordant == (12, 3)
    assert test.difference == pytest.approx(100 * 9 / 250, abs=1e-4)  # float32 accuracies
    assert test.p_value == pytest.approx(mcnemar_p(12, 3)) and test.significant
    assert test.low <= test.difference <= test.high


def test_the_paired_top1_interval_keeps_its_width_when_no_sample_flips():
    # no discordant sample in 250: the score interval is +-z^2/(n+z^2) (Tango 1998), not [0, 0]
    low, high = paired_proportion_interval(0, 0, 250)
    z2 = 1.959963984540054**2
    assert high == pytest.approx(100 * z2 / (250 + z2), rel=1e-4) and low == pytest.approx(-high)
    # many discordant samples: close to the Wald interval of a paired difference
    b, c, n = 60, 100, 1000
    d, se = (b - c) / n, math.sqrt((b + c) / n**2 - (b - c) ** 2 / n**3)
    wald = (100 * (d - 1.96 * se), 100 * (d + 1.96 * se))
    assert paired_proportion_interval(b, c, n) == pytest.approx(wald, abs=0.15)
    # swapping the two models mirrors the interval
    low, high = paired_proportion_interval(0, 2, 250)
    assert paired_proportion_interval(2, 0, 250) == pytest.approx((-high, -low))


def test_the_paired_top1_interval_covers_the_true_difference_with_few_flips():
    """250 samples where the two models disagree on about 1%: the interval must hold the true difference
    in about 95% of repeated samples (a paired bootstrap holds it in far fewer: zero width when none flips)."""
    n, p_a_only, p_b_only = 250, 0.008, 0.002  # true difference +0.6 points
    truth = 100 * (p_a_only - p_b_only)
    trials = 2000
    torch.manual_seed(0)
    counts = torch.distributions.Multinomial(n, torch.tensor([p_a_only, p_b_only, 1 - p_a_only - p_b_only]))
    b, c = counts.sample((trials,))[:, :2].T
    pairs = list(zip(b.long().tolist(), c.long().tolist()))
    intervals = {pair: paired_proportion_interval(*pair, n) for pair in set(pairs)}
    covered = sum(intervals[pair][0] <= truth <= intervals[pair][1] for pair in pairs)
    # the paired bootstrap of the same data (400 resamples each): resampled discordant counts
    b_star = torch.distributions.Binomial(n, (b / n).expand(400, trials)).sample()
    rest = (c / (n - b).clamp(min=1)).clamp(max=1).expand(400, trials)
    c_star = torch.distributions.Binomial(n - b_star, rest).sample()
    diffs = 100 * (b_star - c_star) / n
    low, high = diffs.quantile(0.025, dim=0), diffs.quantile(0.975, dim=0)
    bootstrap_covered = int(((low <= truth) & (truth <= high)).sum())
    assert covered / trials >= 0.93, covered / trials
    assert bootstrap_covered / trials < 0.9, bootstrap_covered / trials


def test_a_custom_metric_gets_a_seeded_bootstrap(monkeypatch):
    # the resample count is a time budget: on a loaded machine two calls could fit different counts
    monkeypatch.setattr("edgeq.checks.stats.BOOTSTRAP_SECONDS", 1e6)

    def cosine(outputs, targets):
        return 100.0 * float(torch.nn.functional.cosine_similarity(outputs, targets).mean())

    gen = torch.Generator().manual_seed(1)
    targets = torch.randn(200, 16, generator=gen)
    outputs = targets + 0.3 * torch.randn(200, 16, generator=gen)
    first, again = interval(cosine, outputs, targets), interval(cosine, outputs, targets)
    assert first == again and first.low < first.value < first.high and "bootstrap" in first.method
    same = paired(cosine, outputs, outputs, targets)
    assert same.difference == 0 and same.p_value == 1.0 and not same.significant
    worse = paired(cosine, targets, outputs, targets)  # the targets themselves are a perfect model
    assert worse.difference > 0 and worse.significant and worse.low > 0


def test_a_slow_metric_spends_the_seconds_it_is_given_not_the_default():
    """A build shares one budget among its intervals and paired tests (checks.program.UNCERTAINTY_SECONDS):
    a slow metric given little time resamples MIN_RESAMPLES times, where BOOTSTRAP_SECONDS would give 1,000."""
    import time

    from edgeq.checks.stats import MIN_RESAMPLES

    def slow(outputs, targets):
        time.sleep(0.002)
        return float((outputs - targets).abs().mean())

    targets = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    outputs = targets + 0.1
    assert interval(slow, outputs, targets, seconds=0.1).method == f"percentile bootstrap, {MIN_RESAMPLES} resamples"
    assert paired(slow, outputs, targets, targets, seconds=0.1).method == f"paired bootstrap, {MIN_RESAMPLES} resamples"


def test_the_verdict_says_whether_the_drop_is_distinguishable():
    from edgeq.checks.stats import Paired

    clear = Paired(0.2, -0.4, 0.8, 0.6, 250, "m")
    assert "within --max-drop 1 with 95% confidence" in verdict(clear, 1.0)
    assert "not distinguishable from no drop" in verdict(clear, 1.0)
    unsure = Paired(0.8, 0.1, 1.6, 0.02, 250, "m")
    assert "not distinguishable from --max-drop 1" in verdict(unsure, 1.0)
    assert "distinguishable from no drop" in verdict(unsure, 1.0)
    over = Paired(3.0, 2.0, 4.0, 1e-4, 250, "m")
    assert "over --max-drop 1 with 95% confidence" in verdict(over, 1.0)
    assert not math.isnan(over.p_value)


def test_a_build_reports_intervals_paired_tests_and_a_verdict(digits_build):
    import json

    report = json.loads((digits_build.out_dir / "report.json").read_text())
    acc = report["accuracy"]
    for name in ("float", "qat", "reference", "program"):
        i = acc["intervals"][name]
        assert i["low"] <= i["value"] <= i["high"] and i["samples"] == report["samples"]
        assert i["method"] == "Wilson score interval"  # the bundled example scores top-1
    drop = acc["paired"]["float_vs_program"]
    assert drop["difference"] == pytest.approx(acc["float"] - acc["program"], abs=1e-4)
    assert drop["method"].startswith("McNemar") and len(drop["discordant"]) == 2
    assert "ptq_vs_qat" in acc["paired"]  # every pair of candidates, on the same samples
    assert "--max-drop" in acc["verdict"] and "samples" in acc["verdict"]
    assert "How sure these numbers are" in (digits_build.out_dir / "report.html").read_text()
