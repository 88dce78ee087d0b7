"""The sentences of a paired verdict (:mod:`~lightning_stages.cli.stats`): a winner's, an undecided one's (how small a
difference the spread could detect, how many seeds would detect the observed gap), too few paired seeds, runs left
out as not finite, and every schedule behind another on the seeds each pair finished.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_stages.cli.stats import PairedComparison

__all__ = ["POWER", "ahead_text", "fmt", "left_out_text", "undecided_text"]

POWER = 0.8  # of the detectable difference and the seeds needed


def fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "unknown"


def _seeds_text(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"


def _few_pairs_text(metric: str, best: str, closest: PairedComparison, scores: Mapping[str, Mapping[int, float]],
                    seeds_run: Sequence[int]) -> str:
    """Why fewer than two paired seeds name no winner: one seed was run, or runs failed (or were not finite)."""
    if len(seeds_run) < 2:
        return (f"With one seed per schedule the spread across seeds is unknown, so no winner is named on {metric} "
                "(run with --seeds 3 or more).")
    missing = [f"{name} {_seeds_text(lost)}" for name in (best, closest.other)
               if (lost := [s for s in seeds_run if s not in scores[name]])]
    return (f"Only {closest.seeds} of the {len(seeds_run)} seeds run {'has' if closest.seeds == 1 else 'have'} a "
            f"finite result for both {best} and {closest.other} (none for {'; '.join(missing)}: failed, or not "
            f"finite), so the spread of their paired differences is unknown and no winner is named on {metric}. A "
            "rerun into the same --out trains the failed runs again.")


def left_out_text(left_out: Sequence[tuple[str, int, float]]) -> str:
    runs = ", ".join(f"{name} seed {seed} ({value})" for name, seed, value in left_out)
    return f" Left out as not finite: {runs}."


def undecided_text(metric: str, best: str, comparisons: list[PairedComparison], tied: list[str],
                    scores: Mapping[str, Mapping[int, float]], seeds_run: Sequence[int]) -> str:
    open_ = [c for c in comparisons if not c.separated]
    names = ", ".join(f"**{c.other}**" for c in open_)
    closest = min(open_, key=lambda c: c.difference if math.isfinite(c.difference) else math.inf)
    text = (f"No winner on {metric}: the data cannot separate {names} from the best mean (**{best}**), so the "
            f"schedules {', '.join(tied)} are indistinguishable on this budget")
    if closest.seeds < 2:
        return _few_pairs_text(metric, best, closest, scores, seeds_run)
    if closest.spread == 0 and closest.difference == 0:
        return text + f". {closest.other} gave the same value as {best} on each of the {closest.seeds} seeds."
    needed = (f"about {closest.seeds_needed} seeds would detect it" if closest.seeds_needed is not None
              else "no number of seeds up to 1000 would detect it")
    return (text + f". Closest: {closest.other}, {fmt(closest.difference)} behind (interval {fmt(closest.low)} to "
            f"{fmt(closest.high)}). At {closest.seeds} seeds the observed paired spread ({fmt(closest.spread)}) "
            f"detects differences of {fmt(closest.detectable)} or more with {POWER:.0%} power; for the observed gap "
            f"of {fmt(closest.difference)}, {needed}.")


def ahead_text(metric: str, best: str, ahead: list[PairedComparison], alpha: float) -> str:
    parts = "; ".join(f"{c.other} is {fmt(-c.difference)} ahead of it (interval {fmt(-c.high)} to {fmt(-c.low)} "
                      f"over {c.seeds} seed{'s' * (c.seeds != 1)}, Holm-adjusted p = {c.p_holm:.3g}, "
                      f"{'' if c.seeds > 1 and c.p_holm < alpha else 'not '}separated)" for c in ahead)
    return (f"No winner on {metric}: the schedules finished different seeds (failed or not finite runs), and on the "
            "seeds each pair finished every schedule is behind another, so the paired differences rank none first. "
            f"Compared with **{best}**, the one with the smallest such deficit: {parts}.")
