"""The paired verdict of ``compare``, against references computed here with ``scipy.stats``."""

from __future__ import annotations

import math
import statistics
import sys

import pytest
from scipy import stats

from lightning_stages.cli import main
from lightning_stages.cli.compare import run_compare
from lightning_stages.cli.compare_report import verdict
from lightning_stages.cli.stats import SCIPY_HINT, higher_is_better, paired_verdict, require_scipy

BASE = [0.70, 0.74, 0.78, 0.72, 0.76]


def minus(values: list[float], diffs: list[float]) -> dict[int, float]:
    return {seed: v - d for seed, (v, d) in enumerate(zip(values, diffs))}


def seeds_of(values: list[float]) -> dict[int, float]:
    return dict(enumerate(values))


def unpaired_rule_separates(a: list[float], b: list[float]) -> bool:
    """The rule compare used before: the one-std intervals of the two schedules do not overlap."""
    return abs(statistics.mean(a) - statistics.mean(b)) > statistics.stdev(a) + statistics.stdev(b)


def t_interval(diffs: list[float], level: float) -> tuple[float, float]:
    n = len(diffs)
    half = stats.t.ppf(1 - (1 - level) / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return statistics.mean(diffs) - half, statistics.mean(diffs) + half


def test_pairing_separates_what_the_unpaired_rule_calls_indistinguishable() -> None:
    diffs = [0.020, 0.025, 0.018, 0.022, 0.021]
    a, b = seeds_of(BASE), minus(BASE, diffs)
    assert not unpaired_rule_separates(list(a.values()), list(b.values()))  # seed-to-seed spread hides the gap

    result = paired_verdict({"b": b, "a": a})
    low, high = t_interval(diffs, 0.95)  # one comparison: Holm leaves the level at 95%
    (comparison,) = result.comparisons
    assert result.winner == "a" and result.decided and result.tied == []
    assert comparison.other == "b" and comparison.seeds == 5
    assert comparison.difference == pytest.approx(statistics.mean(diffs))
    assert (comparison.low, comparison.high) == (pytest.approx(low), pytest.approx(high))
    assert low > 0
    assert comparison.p_holm == pytest.approx(stats.ttest_rel(list(a.values()), list(b.values())).pvalue)
    assert result.text.startswith("**a** is best on test IoU")


def test_both_rules_leave_a_noisy_gap_undecided_and_say_what_more_seeds_would_do() -> None:
    a, b = [0.70, 0.80, 0.75], [0.72, 0.76, 0.74]
    assert not unpaired_rule_separates(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd, n = statistics.mean(diffs), statistics.stdev(diffs), len(diffs)

    result = paired_verdict({"a": seeds_of(a), "b": seeds_of(b)}, metric="test IoU")
    (comparison,) = result.comparisons
    low, high = t_interval(diffs, 0.95)
    assert result.winner is None and result.tied == ["a", "b"]
    assert (comparison.low, comparison.high) == (pytest.approx(low), pytest.approx(high)) and low < 0 < high
    # smallest difference detected with 80% power at this spread and number of seeds
    detectable = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    assert comparison.detectable == pytest.approx(detectable)
    needed = next(k for k in range(2, 1000)
                  if (stats.t.ppf(0.975, k - 1) + stats.t.ppf(0.8, k - 1)) * sd / math.sqrt(k) <= mean)
    assert comparison.seeds_needed == needed and needed > n
    assert "indistinguishable" in result.text
    assert f"detects differences of {detectable:.3f} or more with 80% power" in result.text
    assert f"about {needed} seeds would detect it" in result.text


def test_holm_tests_the_smallest_p_at_alpha_over_m_and_the_next_at_alpha() -> None:
    diffs_b = [0.010, 0.020, 0.012, 0.018, 0.015]
    diffs_c = [0.030, 0.004, 0.025, 0.015, 0.006]
    p_b = stats.ttest_rel(BASE, list(minus(BASE, diffs_b).values())).pvalue
    p_c = stats.ttest_rel(BASE, list(minus(BASE, diffs_c).values())).pvalue
    assert p_b < 0.025 < p_c < 0.05  # Bonferroni (0.025 each) would not separate c; Holm tests c at 0.05

    result = paired_verdict({"a": seeds_of(BASE), "b": minus(BASE, diffs_b), "c": minus(BASE, diffs_c)})
    by_name = {c.other: c for c in result.comparisons}
    assert result.winner == "a"
    assert by_name["b"].p_holm == pytest.approx(2 * p_b) and by_name["b"].level == pytest.approx(0.975)
    assert by_name["c"].p_holm == pytest.approx(max(2 * p_b, p_c)) and by_name["c"].level == pytest.approx(0.95)
    assert (by_name["b"].low, by_name["b"].high) == tuple(pytest.approx(x) for x in t_interval(diffs_b, 0.975))
    assert (by_name["c"].low, by_name["c"].high) == tuple(pytest.approx(x) for x in t_interval(diffs_c, 0.95))


def test_holm_stops_at_the_first_comparison_it_cannot_reject() -> None:
    diffs_b = [0.030, 0.004, 0.025, 0.015, 0.006]
    diffs_c = [0.006, 0.030, 0.004, 0.025, 0.015]  # the same differences on other seeds: the same p-value
    p = stats.ttest_rel(BASE, list(minus(BASE, diffs_b).values())).pvalue
    assert 0.025 < p < 0.05  # each alone would pass at 5%

    result = paired_verdict({"a": seeds_of(BASE), "b": minus(BASE, diffs_b), "c": minus(BASE, diffs_c)})
    assert result.winner is None and sorted(result.tied) == ["a", "b", "c"]
    assert [c.p_holm for c in result.comparisons] == [pytest.approx(2 * p)] * 2
    assert not any(c.separated for c in result.comparisons)


def test_lower_is_better_for_losses() -> None:
    assert not higher_is_better("test/loss") and higher_is_better("test/iou")
    low, high = seeds_of([0.30, 0.41, 0.35]), seeds_of([0.40, 0.50, 0.46])
    result = paired_verdict({"high": high, "low": low}, metric="test loss", higher_is_better=False)
    assert result.ranking[0][0] == "low" and result.winner == "low"
    assert result.comparisons[0].difference == pytest.approx(statistics.mean([0.10, 0.09, 0.11]))


def test_one_seed_names_no_winner_and_the_report_wrapper_accepts_lists() -> None:
    assert "no winner" in verdict({"a": [0.9], "b": [0.1]})
    assert paired_verdict({"a": {0: 0.9}, "b": {0: 0.1}}).winner is None


def test_seeds_missing_on_one_side_are_left_out_of_the_pairs() -> None:
    a = {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.75}
    b = {0: 0.70, 1: 0.71, 2: 0.69}  # seed 3 failed for b: a's seed 3 has no partner
    (comparison,) = paired_verdict({"a": a, "b": b}).comparisons
    assert comparison.seeds == 3 and comparison.difference == pytest.approx(statistics.mean([0.10, 0.11, 0.12]))


def test_without_scipy_compare_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-stages\[compare\]'"):
        require_scipy()
    with pytest.raises(ImportError, match=SCIPY_HINT.replace("[", r"\[").replace("]", r"\]")):
        run_compare(["a.yaml"], seeds=2, out=tmp_path / "out")
    config = tmp_path / "a.yaml"
    config.write_text("trainer: {}")
    assert main(["compare", str(config), "--out", str(tmp_path / "out")]) == 1
    assert "lightning-stages[compare]" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained


def test_seeds_zero_is_an_error(tmp_path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "a.yaml"
    config.write_text("trainer: {}")
    assert main(["compare", str(config), "--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--seeds must be a positive number of seeds or 'auto', got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--seeds must be at least 1"):
        run_compare([config], seeds=0, out=tmp_path / "out")
    assert main(["compare", str(config), "--seeds", "3", "--max-seeds", "5"]) == 2
    assert "--max-seeds 5 goes with --seeds auto" in capsys.readouterr().err


@pytest.mark.parametrize(("metric", "higher"), [
    ("test/iou", True), ("test/iou_terrain", True), ("test/acc_ferry", True), ("test/realtime_acc", True),
    ("val/timestep_acc", True), ("test/score", True),
    ("test/loss", False), ("val/bce_loss", False), ("valloss", False), ("top1_err", False), ("mean_abs_error", False),
    ("test/mae", False), ("test/ece", False), ("test/perplexity", False), ("epoch_time_s", False), ("runtime", False),
    # fused and camelCase names, and Lightning's `_epoch` suffix (on_step and on_epoch both logged)
    ("runtime_s", False), ("epochtime_sec", False), ("val/errorRate", False), ("test/errorrate", False),
    ("valloss_epoch", False), ("trainLoss_epoch", False), ("abserr_mean", False), ("valmae_epoch", False),
    ("errD", False), ("lossG", False), ("val_ppl", False), ("test/wer", False),
    ("power_ratio", True), ("test/mAP", True), ("test/terrain", True),
])
def test_which_metrics_are_lower_is_better(metric, higher):
    """Words of the name, not any part of it: a per-class IoU of Cityscapes' "terrain" (t-err-ain) was taken for an
    error, so compare named the worse schedule best; a word that begins or ends with a lower-is-better one counts,
    unless a word names a score."""
    assert higher_is_better(metric) is higher
