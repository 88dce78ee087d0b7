"""The best schedule of the paired verdict when runs failed or were not finite: the schedules' own means are then over
different seeds, and the best must still be one that the paired test puts no other schedule ahead of.

References are computed here: ``scipy.stats.ttest_rel`` on the shared seeds, the t interval, Holm by hand."""

from __future__ import annotations

import math
import random
import re
import statistics

import pytest
from scipy import stats

from lightning_stages.cli.compare_report import RunOutcome, _verdict_lines, metric_verdict, verdict
from lightning_stages.cli.stats import paired_verdict

ALPHA = 0.05
#: the probe's case: b beats a by 0.04 to 0.06 on seeds 0-3; a's seed 4 diverged, b's seed 4 is b's worst
PROBE_A = [0.50, 0.60, 0.70, 0.80, math.nan]
PROBE_B = [0.55, 0.66, 0.74, 0.86, 0.10]
NEGATIVE_GAP = re.compile(r"-\d+\.\d+ behind")


def t_interval(diffs: list[float], level: float) -> tuple[float, float]:
    n = len(diffs)
    half = stats.t.ppf(1 - (1 - level) / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return statistics.mean(diffs) - half, statistics.mean(diffs) + half


def holm(raw: list[float]) -> list[float]:
    """Holm-adjusted p-values, by the textbook: sorted ascending, times (m - k), running maximum, capped at 1."""
    m = len(raw)
    adjusted = [1.0] * m
    running = 0.0
    for k, i in enumerate(sorted(range(m), key=lambda i: raw[i])):
        running = max(running, min(1.0, (m - k) * raw[i]))
        adjusted[i] = running
    return adjusted


def shared(x: dict[int, float], y: dict[int, float]) -> list[int]:
    return sorted(set(x) & set(y))


def paired_mean(x: dict[int, float], y: dict[int, float], sign: float) -> float:
    seeds = shared(x, y)
    return sign * (sum(x[s] for s in seeds) - sum(y[s] for s in seeds)) / len(seeds)


def finite(values: dict[int, float]) -> dict[int, float]:
    return {s: v for s, v in values.items() if math.isfinite(v)}


# ------------------------------------------------------------------------------------------------ the probe's case


def test_a_schedule_missing_its_worst_seed_is_not_named_best_over_one_the_paired_test_puts_ahead() -> None:
    a, b = dict(enumerate(PROBE_A)), dict(enumerate(PROBE_B))
    both = [0, 1, 2, 3]
    assert statistics.mean(a[s] for s in both) > statistics.mean(PROBE_B)  # a's own mean is the higher one
    reference = stats.ttest_rel([b[s] for s in both], [a[s] for s in both])
    assert reference.statistic > 0 and reference.pvalue < 0.002  # ... but b is ahead on every shared seed

    result = paired_verdict({"a": a, "b": b})  # before: a "best", b "indistinguishable", "-0.053 behind"
    (comparison,) = result.comparisons
    diffs = [b[s] - a[s] for s in both]
    assert result.ranking[0][0] == "b" and result.winner == "b" and result.tied == []
    assert comparison.other == "a" and comparison.seeds == 4 and comparison.separated
    assert comparison.difference == pytest.approx(statistics.mean(diffs)) and comparison.difference > 0
    assert (comparison.low, comparison.high) == tuple(pytest.approx(x) for x in t_interval(diffs, 0.95))
    assert comparison.p_holm == pytest.approx(reference.pvalue)  # one comparison: Holm leaves p as it is
    # the ranking keeps each schedule's own mean, std and number of runs
    own = {"b": PROBE_B, "a": PROBE_A[:4]}
    assert result.ranking == [(name, pytest.approx(statistics.mean(own[name])),
                               pytest.approx(statistics.stdev(own[name])), len(own[name])) for name in ("b", "a")]
    assert result.text.startswith("**b** is best on test IoU: every paired interval excludes 0; the closest, a, is "
                                  f"{statistics.mean(diffs):.3f} behind")
    assert "indistinguishable" not in result.text and not NEGATIVE_GAP.search(result.text)
    assert result.text.endswith("Left out as not finite: a seed 4 (nan).")


def test_the_report_of_the_probes_runs_names_b_best_and_separated() -> None:
    runs = {name: [RunOutcome(name, seed, metrics={"test/iou": value}) for seed, value in enumerate(values)]
            for name, values in (("a", PROBE_A), ("b", PROBE_B))}
    result = metric_verdict(runs, "test/iou", "test IoU")
    assert result.winner == "b"
    lines = _verdict_lines(runs, ["test/iou"])
    p = stats.ttest_rel(PROBE_B[:4], PROBE_A[:4]).pvalue
    low, high = t_interval([y - x for x, y in zip(PROBE_A[:4], PROBE_B[:4])], 0.95)
    # before: | test IoU | a | b | 4 | -0.0525 | -0.068 to -0.037 (95.0%) | 0.00162 | no |
    assert f"| test IoU | b | a | 4 | 0.0525 | {low:.3f} to {high:.3f} (95.0%) | {p:.3g} | yes |" in lines
    assert any(line.startswith("- **test IoU** (primary, higher is better): **b** is best on test IoU")
               for line in lines)


def test_a_failed_run_is_treated_like_a_left_out_one_and_lower_is_better_too() -> None:
    # the same runs as the probe's, as a loss (1 - IoU), and a's seed 4 failed instead of diverging
    runs = {"a": [RunOutcome("a", s, metrics={"test/loss": 1 - v}) for s, v in enumerate(PROBE_A[:4])]
            + [RunOutcome("a", 4, error="RuntimeError: out of memory")],
            "b": [RunOutcome("b", s, metrics={"test/loss": 1 - v}) for s, v in enumerate(PROBE_B)]}
    result = metric_verdict(runs, "test/loss")
    (comparison,) = result.comparisons
    assert result.winner == "b" and comparison.other == "a" and comparison.seeds == 4 and result.left_out == ()
    assert comparison.difference == pytest.approx(statistics.mean(y - x for x, y in zip(PROBE_A[:4], PROBE_B[:4])))
    assert comparison.p_holm == pytest.approx(stats.ttest_rel(PROBE_A[:4], PROBE_B[:4]).pvalue)


def test_a_third_schedule_ranks_by_the_seeds_each_pair_shares() -> None:
    # c finished every seed and is far behind both; a (seed 4 missing) is still behind b on their shared seeds
    a, b = dict(enumerate(PROBE_A)), dict(enumerate(PROBE_B))
    c = {s: v - 0.2 - 0.01 * s for s, v in enumerate(PROBE_B)}
    result = paired_verdict({"c": c, "a": a, "b": b})
    assert [r[0] for r in result.ranking] == ["b", "a", "c"] and result.winner == "b"
    by_name = {comp.other: comp for comp in result.comparisons}
    raw = [stats.ttest_rel([b[s] for s in range(4)], [a[s] for s in range(4)]).pvalue,
           stats.ttest_rel(PROBE_B, list(c.values())).pvalue]
    assert [by_name["a"].p_holm, by_name["c"].p_holm] == [pytest.approx(p) for p in holm(raw)]
    assert by_name["c"].difference == pytest.approx(0.22) and by_name["c"].separated and by_name["a"].separated


# ---------------------------------------------------------------------------------------- every run finished


def test_with_every_run_finished_the_ranking_is_by_mean_as_before() -> None:
    base = [0.70, 0.74, 0.78, 0.72, 0.76]
    scores = {"b": {s: v - d for s, (v, d) in enumerate(zip(base, [0.020, 0.025, 0.018, 0.022, 0.021]))},
              "a": dict(enumerate(base)),
              "c": {s: v - d for s, (v, d) in enumerate(zip(base, [0.030, -0.004, 0.025, 0.015, -0.006]))}}
    result = paired_verdict(scores)
    means = {name: statistics.mean(values.values()) for name, values in scores.items()}
    assert [r[0] for r in result.ranking] == sorted(scores, key=means.get, reverse=True) == ["a", "c", "b"]
    assert [(r[1], r[2], r[3]) for r in result.ranking] == [
        (pytest.approx(means[n]), pytest.approx(statistics.stdev(scores[n].values())), 5) for n in ("a", "c", "b")]
    raw = [stats.ttest_rel(list(scores["a"].values()), list(scores[n].values())).pvalue for n in ("c", "b")]
    assert [c.other for c in result.comparisons] == ["c", "b"]
    assert [c.p_holm for c in result.comparisons] == [pytest.approx(p) for p in holm(raw)]
    assert result.winner is None and result.tied == ["a", "c"]  # c's interval holds 0, b's does not
    # the same sentence as before the fix (its numbers from the references above)
    closest = result.comparisons[0]
    diffs = [scores["a"][s] - scores["c"][s] for s in range(5)]
    low, high = t_interval(diffs, 0.95)  # Holm tests the larger p of two at alpha: a 95% interval
    assert (closest.low, closest.high) == (pytest.approx(low), pytest.approx(high))
    assert result.text.startswith(
        "No winner on test IoU: the data cannot separate **c** from the best mean (**a**), so the schedules a, c are "
        f"indistinguishable on this budget. Closest: c, {statistics.mean(diffs):.3f} behind (interval {low:.3f} to "
        f"{high:.3f}). At 5 seeds")
    assert verdict({n: list(v.values()) for n, v in scores.items()}) == result.text


def test_with_every_run_finished_equal_means_keep_the_order_given() -> None:
    # two schedules of one mean whose paired differences, summed in floating point, need not come out exactly 0
    result = paired_verdict({"x": {0: 0.1, 1: 0.7, 2: 0.2}, "y": {0: 0.7, 1: 0.2, 2: 0.1},
                             "z": {0: 0.0, 1: 0.1, 2: 0.0}})
    assert [r[0] for r in result.ranking] == ["x", "y", "z"]


# --------------------------------------------------------------------------------------- random seeds left out


def random_case(rng: random.Random) -> tuple[dict[str, dict[int, float]], bool]:
    k, n = rng.randint(2, 4), rng.randint(3, 7)
    seed_effect = [rng.gauss(0, 0.1) for _ in range(n)]  # large: unpaired means over different seeds mislead
    effect = {f"s{i}": rng.gauss(0, 0.02) for i in range(k)}
    scores = {name: {s: 0.6 + seed_effect[s] + e + rng.gauss(0, 0.01) for s in range(n)} for name, e in effect.items()}
    for values in scores.values():
        for s in range(n):
            if rng.random() < 0.25:
                values[s] = math.nan if rng.random() < 0.5 else values.pop(s)  # diverged, or failed
    return scores, rng.random() < 0.5


@pytest.mark.parametrize("case", range(60))
def test_no_schedule_is_ahead_of_the_best_on_the_seeds_they_share(case: int) -> None:
    scores, higher = random_case(random.Random(case))
    sign = 1.0 if higher else -1.0
    clean = {name: finite(values) for name, values in scores.items() if finite(values)}
    result = paired_verdict(scores, higher_is_better=higher)
    if len(clean) < 2:
        return
    best = result.ranking[0][0]
    others = [r[0] for r in result.ranking[1:]]
    # the references: the paired means and ttest_rel over the seeds each pair shares, Holm over the comparisons
    pairs = {o: shared(clean[best], clean[o]) for o in others}
    raw = [stats.ttest_rel([clean[best][s] for s in pairs[o]], [clean[o][s] for s in pairs[o]]).pvalue
           if len(pairs[o]) > 1 else 1.0 for o in others]
    for comparison, other, p in zip(result.comparisons, others, holm(raw)):
        assert comparison.other == other and comparison.seeds == len(pairs[other])
        if comparison.seeds > 1:
            assert comparison.difference == pytest.approx(paired_mean(clean[best], clean[other], sign))
            assert comparison.p_holm == pytest.approx(p)
    unbeaten = [x for x in clean if all(paired_mean(clean[x], clean[y], sign) >= -1e-12
                                        for y in clean if y != x and shared(clean[x], clean[y]))]
    ahead = [c for c in result.comparisons if c.seeds and c.difference < 0]
    if unbeaten:  # some schedule is behind no other: the best is one of them
        assert best in unbeaten and not ahead
        assert not NEGATIVE_GAP.search(result.text)
    else:  # every schedule is behind another on some pair's seeds: said so, never a tie
        assert ahead and result.winner is None and result.text.startswith("No winner on test IoU: the schedules")
    for c in result.comparisons:
        if c.seeds > 1 and c.p_holm < ALPHA and c.difference < 0:  # significantly ahead of the best: no tie
            assert c.other not in result.tied and "indistinguishable" not in result.text
    if len({frozenset(v) for v in clean.values()}) == 1:  # the same seeds everywhere: ranked by mean, as before
        means = {name: statistics.fmean(v.values()) for name, v in clean.items()}
        assert [r[0] for r in result.ranking] == sorted(clean, key=lambda name: sign * means[name], reverse=True)


def test_when_every_schedule_is_behind_another_the_verdict_says_so() -> None:
    # a beats b on seeds 0-2, b beats c on 3-5, c beats a on 6-8: each pair finished only its three seeds
    base = [0.70, 0.74, 0.78, 0.72, 0.76, 0.71, 0.73, 0.75, 0.77]
    a = {s: base[s] + (0.10 + 0.001 * s if s < 3 else 0.0) for s in (0, 1, 2, 6, 7, 8)}
    b = {s: base[s] + (0.10 + 0.002 * s if s >= 3 else 0.0) for s in range(6)}
    c = {s: base[s] + (0.10 + 0.001 * s if s >= 6 else 0.0) for s in range(3, 9)}
    scores = {"a": a, "b": b, "c": c}
    for x, y in (("a", "b"), ("b", "c"), ("c", "a")):  # x ahead of y on every seed both finished
        assert all(scores[x][s] > scores[y][s] for s in shared(scores[x], scores[y]))
    result = paired_verdict(scores)  # before: "indistinguishable", with a negative gap "behind"
    assert result.winner is None and not result.decided
    best = result.ranking[0][0]
    ahead = [comp for comp in result.comparisons if comp.difference < 0]
    assert len(ahead) == 1
    (other,) = ahead
    seeds = shared(scores[best], scores[other.other])
    reference = stats.ttest_rel([scores[other.other][s] for s in seeds], [scores[best][s] for s in seeds])
    (third,) = [comp for comp in result.comparisons if comp is not other]
    seeds_third = shared(scores[best], scores[third.other])
    raw_third = stats.ttest_rel([scores[best][s] for s in seeds_third], [scores[third.other][s] for s in seeds_third])
    assert raw_third.statistic > 0 and third.separated  # the best is ahead of the third on their shared seeds
    assert [other.p_holm, third.p_holm] == [pytest.approx(p) for p in holm([reference.pvalue, raw_third.pvalue])]
    assert reference.statistic > 0 and other.p_holm < ALPHA and other.other not in result.tied
    assert "indistinguishable" not in result.text and not NEGATIVE_GAP.search(result.text)
    assert result.text.startswith("No winner on test IoU: the schedules finished different seeds")
    assert f"{other.other} is {-other.difference:.3f} ahead of it" in result.text and "separated)" in result.text


def test_equal_means_over_the_same_seeds_are_a_tie_not_every_schedule_behind_another():
    # the same values in another seed order: equal means, and a mean paired difference of about -1e-17 (rounding)
    result = paired_verdict({"x": {0: 0.1, 1: 0.7, 2: 0.2}, "y": {0: 0.7, 1: 0.2, 2: 0.1}}, "test IoU")
    assert result.winner is None and "finished different seeds" not in result.text, result.text
    assert result.text.startswith("No winner on test IoU: the data cannot separate **y** from the best mean (**x**)")


def test_a_best_by_shared_seeds_is_not_called_the_best_mean():
    nan = float("nan")
    a = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.8, 4: nan}  # a's own mean (0.65) is over seeds 0-3 only
    b = {0: 0.51, 1: 0.58, 2: 0.72, 3: 0.81, 4: 0.10}  # ahead of a by 0.005 on the seeds both finished
    result = paired_verdict({"a": a, "b": b}, "test IoU")
    assert [r[0] for r in result.ranking] == ["b", "a"] and result.winner is None
    assert "the best on the seeds each pair finished (**b**)" in result.text and "best mean" not in result.text
