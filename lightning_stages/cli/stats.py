"""The paired verdict of ``compare``: the best schedule against each other one, seed by seed.

Runs with the same seed share the student's initialisation and the data order across schedules, so the question
"is the best schedule better than schedule X?" is asked of the per-seed differences ``best - X``: a paired t
interval over the seeds, with the Holm correction across the comparisons of one metric. A winner is named only
when every interval excludes 0. When the answer is open, :func:`paired_verdict` also says how small a difference
the observed spread could detect at this number of seeds, and how many seeds would detect the observed gap.

The quantiles come from ``scipy.stats`` (the optional extra ``[compare]``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lightning_stages.cli.verdict_text import POWER, ahead_text, fmt, left_out_text, undecided_text

__all__ = [
    "SCIPY_HINT",
    "TEST_SENTENCE",
    "MetricVerdict",
    "PairedComparison",
    "higher_is_better",
    "paired_verdict",
    "require_scipy",
]

SCIPY_HINT = "the paired verdict of compare needs scipy: pip install 'lightning-stages[compare]'"
TEST_SENTENCE = (
    "Test: a paired t-test on the per-seed differences (best minus each other schedule, 95% intervals with the Holm "
    "correction across the comparisons), because runs with the same seed share the student's initialisation and data "
    "order, so pairing removes the seed-to-seed spread that an unpaired comparison of mean ± std would count as noise."
)
#: power with which :attr:`PairedComparison.detectable` and :attr:`PairedComparison.seeds_needed` detect a gap
_MAX_SEEDS = 1000
_LOWER_IS_BETTER = ("loss", "err", "mse", "mae", "rmse", "nll", "ece", "perplexity", "time", "seconds")
_LOWER_WORDS = ("ppl", "wer", "cer")  # only as whole words ("power" is no word error rate)
_HIGHER_WORDS = frozenset({"acc", "accuracy", "iou", "miou", "dice", "f1", "auc", "auroc", "ap", "map", "precision",
                           "recall", "score", "bleu", "rouge", "psnr", "ssim"})


def require_scipy() -> Any:
    """``scipy.stats``, or an ImportError that says how to install it.

    Example::

        >>> require_scipy().__name__
        'scipy.stats'
    """
    try:
        import scipy.stats
    except ImportError:
        raise ImportError(SCIPY_HINT) from None
    return scipy.stats


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better: losses, errors and times are lower-is-better.

    The name after its last ``/`` is split into words (at every character that is not a letter, and where camelCase
    turns to a capital). A word that begins or ends with one of :data:`_LOWER_IS_BETTER` (``valloss``, ``errorRate``,
    ``runtime_s``), or is one of :data:`_LOWER_WORDS`, makes it lower-is-better, unless a word names a score
    (:data:`_HIGHER_WORDS`: ``realtime_acc``); a word that only holds one inside does not (``iou_terrain``).

    Example::

        >>> higher_is_better("test/iou"), higher_is_better("test/loss"), higher_is_better("val/bce_loss")
        (True, False, False)
        >>> higher_is_better("test/iou_terrain"), higher_is_better("trainLoss_epoch"), higher_is_better("realtime_acc")
        (True, False, True)
    """
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", metric.rpartition("/")[2])
    words = re.findall(r"[a-z]+", name.lower())
    if any(word in _HIGHER_WORDS for word in words):
        return True
    return not any(word.startswith(_LOWER_IS_BETTER) or word.endswith(_LOWER_IS_BETTER) or word in _LOWER_WORDS
                   for word in words)


@dataclass(frozen=True)
class PairedComparison:
    """The best schedule against one other, on the seeds both finished.

    Attributes:
        other: the other schedule.
        seeds: how many paired seeds.
        difference: mean of the per-seed differences, signed so that a positive value favours the best schedule
            (for a lower-is-better metric, ``other - best``).
        spread: sample standard deviation of the per-seed differences.
        low: lower end of the Holm-corrected 95% interval of ``difference``.
        high: its upper end.
        level: the confidence level of that interval after the Holm correction (e.g. 0.975).
        p_holm: the Holm-adjusted two-sided p-value.
        separated: whether the Holm procedure separates the two at the 5% level, in favour of the best schedule.
        detectable: the smallest difference this spread detects at this number of seeds (with 80% power).
        seeds_needed: how many seeds would detect the observed ``difference`` with 80% power at this spread
            (``None`` when the difference is 0 or more than 1000 seeds would be needed).
    """

    other: str
    seeds: int
    difference: float
    spread: float
    low: float
    high: float
    level: float
    p_holm: float
    separated: bool
    detectable: float
    seeds_needed: Optional[int]


@dataclass(frozen=True)
class MetricVerdict:
    """The answer for one metric: the ranking by mean, the paired comparisons and the verdict sentence.

    Attributes:
        metric: the metric's label.
        ranking: ``(schedule, mean, std, runs)`` over its own finished seeds, best first by the paired differences
            (:func:`_paired_order`): by ``mean`` when every schedule has the same seeds.
        comparisons: the best against each other schedule, in ranking order.
        winner: the best schedule when every interval excludes 0, else ``None``.
        tied: the schedules the data cannot separate from the best (with the best first), empty with a winner.
        text: the verdict in words.
        left_out: ``(schedule, seed, value)`` of the runs whose value is not finite (nan, inf): they are left out of
            the ranking and the paired tests, and the text says so.
    """

    metric: str
    ranking: list[tuple[str, float, float, int]]
    comparisons: list[PairedComparison]
    winner: Optional[str]
    tied: list[str]
    text: str
    left_out: tuple[tuple[str, int, float], ...] = ()

    @property
    def decided(self) -> bool:
        """Whether a winner is named."""
        return self.winner is not None


def _detectable(stats: Any, spread: float, seeds: int, alpha: float) -> float:
    if seeds < 2:
        return math.inf
    quantile = stats.t.ppf(1 - alpha / 2, seeds - 1) + stats.t.ppf(POWER, seeds - 1)
    return float(quantile * spread / math.sqrt(seeds))


def _seeds_needed(stats: Any, spread: float, gap: float, alpha: float) -> Optional[int]:
    if gap <= 0:
        return None
    if spread == 0:
        return 2
    for seeds in range(2, _MAX_SEEDS + 1):
        if _detectable(stats, spread, seeds, alpha) <= gap:
            return seeds
    return None


def _paired_tests(stats: Any, best: str, others: list[str], scores: Mapping[str, Mapping[int, float]], sign: float,
                  alpha: float) -> list[PairedComparison]:
    raw = []
    for other in others:
        seeds = sorted(set(scores[best]) & set(scores[other]))
        diffs = [sign * (scores[best][s] - scores[other][s]) for s in seeds]
        n = len(diffs)
        mean = statistics.fmean(diffs) if diffs else math.nan
        sd = statistics.stdev(diffs) if n > 1 else math.nan
        if n < 2:
            p = 1.0
        elif sd == 0:
            p = 0.0 if mean != 0 else 1.0
        else:
            p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
        raw.append((other, n, mean, sd, p))
    # Holm: the k-th smallest p-value (k = 0, 1, ...) is tested at alpha / (m - k), and its interval has that level
    m = len(raw)
    order = sorted(range(m), key=lambda i: raw[i][4])
    out: dict[int, PairedComparison] = {}
    running = 0.0
    for k, i in enumerate(order):
        other, n, mean, sd, p = raw[i]
        level_alpha = alpha / (m - k)
        running = max(running, min(1.0, (m - k) * p))
        half = float(stats.t.ppf(1 - level_alpha / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.inf
        out[i] = PairedComparison(
            other=other, seeds=n, difference=mean, spread=sd, low=mean - half, high=mean + half,
            level=1 - level_alpha, p_holm=running, separated=n > 1 and running < alpha and mean > 0,
            detectable=_detectable(stats, sd, n, level_alpha) if n > 1 else math.inf,
            seeds_needed=_seeds_needed(stats, sd, mean, level_alpha) if n > 1 else None,
        )
    return [out[i] for i in range(m)]


def _paired_order(ranking: list[Any], scores: Mapping[str, Mapping[int, float]], sign: float) -> list[Any]:
    """``ranking`` (by own means) reordered by the mean paired differences on each pair's shared seeds: each place goes
    to the first remaining schedule no remaining one is ahead of, else (a cycle: the pairs' seeds differ) to the one
    whose largest deficit is the smallest. With the same seeds everywhere those are the means' differences: no change.
    """
    if len({frozenset(scores[r[0]]) for r in ranking}) <= 1:
        return ranking
    tol = _tolerance(scores)

    def deficit(name: str, rest: list[Any]) -> float:  # how far the furthest other is ahead (as in _paired_tests)
        both = {o: sorted(set(scores[name]) & set(scores[o])) for o, *_ in rest if o != name}
        ahead = [statistics.fmean([sign * (scores[o][s] - scores[name][s]) for s in b]) for o, b in both.items() if b]
        return max([0.0, *(a for a in ahead if a > tol)])  # a rounding difference is no lead

    order: list[Any] = []
    rest = list(ranking)
    while rest:  # min: the first of the smallest deficits, in the order of the own means
        order.append(rest.pop(rest.index(min(rest, key=lambda r: deficit(r[0], rest)))))
    return order


def _tolerance(scores: Mapping[str, Mapping[int, float]]) -> float:
    """A mean difference this small is rounding, not a lead (equal means over other seed orders)."""
    return 1e-12 * max([1.0, *(abs(v) for values in scores.values() for v in values.values())])


def paired_verdict(scores: Mapping[str, Mapping[int, float]], metric: str = "test IoU",
                   higher_is_better: bool = True, alpha: float = 0.05,
                   seeds_run: Optional[Sequence[int]] = None) -> MetricVerdict:
    """Rank the schedules by mean and test the best against each other schedule on the per-seed differences.

    The best is the schedule no other is ahead of on the seeds both finished (:func:`_paired_order`): the one with
    the best mean when every schedule has the same seeds; after failed (or nan) runs the own means compare other seeds.

    For each other schedule, the differences ``best - other`` (``other - best`` when lower is better) on the seeds
    both finished give a mean and a t interval over the seeds. The Holm procedure orders the comparisons by p-value
    and tests the k-th (from 0) at ``alpha / (m - k)``; each interval has that level. The best wins only when the
    procedure separates it from every other schedule, i.e. every interval excludes 0.

    A value that is not finite (a run that diverged to nan or inf) is left out of the ranking and the tests, as if
    that run had not finished; :attr:`MetricVerdict.left_out` lists them and the text names them.

    Args:
        scores: ``{schedule: {seed: value}}``; seeds a schedule did not finish are left out.
        metric: the metric's label, for the text.
        higher_is_better: the metric's direction.
        alpha: the family-wise error rate (0.05: 95% intervals).
        seeds_run: the seeds of the comparison, finished or not (default: the seeds in ``scores``); the text of a
            comparison with fewer than two paired seeds says whether more seeds were run and which runs failed.

    Raises:
        ImportError: scipy is not installed (the message says how to get it).

    Example::

        >>> v = paired_verdict({"a": {0: 0.80, 1: 0.721, 2: 0.90}, "b": {0: 0.78, 1: 0.70, 2: 0.881}})
        >>> v.winner, round(v.comparisons[0].difference, 3), v.comparisons[0].separated
        ('a', 0.02, True)
        >>> paired_verdict({"a": {0: 0.8, 1: 0.7}, "b": {0: 0.75, 1: 0.76}}).tied
        ['b', 'a']
        >>> paired_verdict({"a": {0: 0.8, 1: float("nan")}, "b": {0: 0.7, 1: 0.6}}).left_out
        (('a', 1, nan),)
    """
    left_out = tuple((name, seed, value) for name, values in scores.items() for seed, value in sorted(values.items())
                     if not math.isfinite(value))
    finite = {name: {seed: value for seed, value in values.items() if math.isfinite(value)}
              for name, values in scores.items()}
    seeds = sorted(set().union(*scores.values())) if seeds_run is None else sorted(set(seeds_run))
    result = _paired_verdict(finite, metric, higher_is_better, alpha, seeds)
    return dataclasses.replace(result, left_out=left_out, text=result.text + left_out_text(left_out)) if left_out \
        else result


def _paired_verdict(scores: Mapping[str, Mapping[int, float]], metric: str, higher_is_better: bool, alpha: float,
                    seeds_run: Sequence[int]) -> MetricVerdict:
    stats = require_scipy()
    sign = 1.0 if higher_is_better else -1.0
    ranking = []
    for name, values in scores.items():
        if values:
            vals = list(values.values())
            ranking.append((name, statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)))
    ranking.sort(key=lambda r: sign * r[1], reverse=True)
    ranking = _paired_order(ranking, scores, sign)
    if len(ranking) < 2:
        return MetricVerdict(metric, ranking, [], None, [r[0] for r in ranking],
                             f"Only {len(ranking)} schedule has results on {metric}; nothing to compare.")
    best = ranking[0][0]
    comparisons = _paired_tests(stats, best, [r[0] for r in ranking[1:]], scores, sign, alpha)
    reordered = len({frozenset(scores[r[0]]) for r in ranking}) > 1  # the seeds differ: ranked by shared seeds
    if reordered and (ahead := [c for c in comparisons if c.difference < -_tolerance(scores)]):  # every one is behind
        tied = [best] + [c.other for c in comparisons if not c.separated and not (c.seeds > 1 and c.p_holm < alpha)]
        return MetricVerdict(metric, ranking, comparisons, None, tied, ahead_text(metric, best, ahead, alpha))
    if all(c.separated for c in comparisons):
        worst = max(comparisons, key=lambda c: c.p_holm)
        text = (f"**{best}** is best on {metric}: every paired interval excludes 0; the closest, {worst.other}, is "
                f"{fmt(worst.difference)} behind (interval {fmt(worst.low)} to {fmt(worst.high)} over "
                f"{worst.seeds} seeds, Holm-adjusted p = {worst.p_holm:.3g}).")
        return MetricVerdict(metric, ranking, comparisons, best, [], text)
    tied = [best] + [c.other for c in comparisons if not c.separated]
    text = undecided_text(metric, best, comparisons, tied, scores, seeds_run)
    return MetricVerdict(metric, ranking, comparisons, None, tied, text.replace(
        f"from the best mean (**{best}**)", f"from the best on the seeds each pair finished (**{best}**)", 1)
        if reordered else text)
