"""Where the time of a cached distilling step goes: the parts of ``cached_distill_ratio``, measured step by step.

Run it by hand (it is not part of the test suite and has no target)::

    python benchmarks/cached_step.py [--rounds N] [--json PATH]

``run.py``'s ``cached_distill_ratio`` times whole epochs of separate fits; each fit's memory layout and the machine's
bursts move one repetition's ratio by several percent either way. This script removes both: one model (``run.py``'s
``PluginStudent`` with an in-memory ``TeacherCache``, filled and bound by a real two-epoch fit under
``StageScheduleCallback``) and one SGD optimizer run every variant below on ``run.py``'s batches, in turns, one
optimizer step each (zero_grad, the variant's loss, backward, step), in one thread. Each variant's cost is the median
over steps of its step time minus the plain step's on the same batch in the same turn (the "paired difference").

* ``plain``: the student and cross-entropy (the reference).
* ``cached``: ``PluginStudent.training_step``'s losses: ``run_teachers`` reads the cache (input checksum, rows,
  features put into the hooks), then ``logit_kd``, ``feature_losses()`` and ``weighted_loss``.
* ``read``: ``run_teachers`` only (cross-entropy as the loss): what the cache costs.
* ``checksum``: the input checksum only (``input_fingerprints`` of the batch), the part of ``read`` that checks the
  rows are for these inputs.
* ``losses``: cross-entropy + ``logit_kd`` + mean squared error against fixed tensors of the teacher's shapes, no
  plugin: what the distillation losses cost by themselves, whatever stores the teacher's outputs.
* ``offline``: the same losses against the teacher's own logits and neck features, held for every sample in two
  plain tensors and gathered by the batch's sample indices (``index_select``), no plugin: offline distillation as
  one writes it by hand, with no check that a row is for this input. ``cached`` minus ``offline`` is what the
  plugin costs over it: the ``TeacherCache``'s read (the input checksum, the lookup, the features put into the
  hooks) and the loss bookkeeping (``feature_losses()``, ``weighted_loss``). Before measuring, the script checks
  that the cache serves the teacher's own logits and features for every batch.

The forward hooks of the distilling stage stay attached for every variant, and so does this script's own hook on
the same layer for ``losses`` and ``offline`` (the plain step captures the student's feature twice too, a few us);
the Trainer's loop and the callback's per-batch work are not in any variant (``run.py``'s ``off_stage_ratio``, a
plugin epoch that does not distill against a plain one, includes them: 0.99 to 1.01).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import run as bench
import torch
import torch.nn.functional as F

from lightning_stages.distillation.teacher_cache_inputs import input_fingerprints

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def variants(model: bench.PluginStudent, batches: list) -> dict[str, Step]:
    """The variants' losses, each computed on ``model`` (see the module docstring)."""
    rows0 = len(batches[0][2])  # the largest batch
    fixed_logits, fixed_features = torch.randn(rows0, bench.CLASSES), torch.randn(rows0, bench.NECK)
    captured: dict[str, torch.Tensor] = {}
    model.net.neck.register_forward_hook(lambda module, args, output: captured.__setitem__("neck", output))
    all_logits, all_features = bench.teacher_outputs(batches)
    with torch.no_grad():  # the cache serves the teacher's own logits and features, for every batch
        for x, _, index in batches:
            model(x)
            served = model.run_teachers(x, sample_index=index)["teacher"]
            assert torch.allclose(served, all_logits.index_select(0, index), rtol=0, atol=1e-5), "logits differ"
            (mse,) = model.feature_losses().values()  # the student's neck against the teacher's, as served
            expected = F.mse_loss(captured["neck"], all_features.index_select(0, index))
            assert torch.allclose(mse, expected, rtol=1e-6, atol=0), "features differ"

    def plain(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def cached(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return model.training_step((x, y, index), 0)

    def read(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        model.run_teachers(x, sample_index=index)
        return F.cross_entropy(logits, y)

    def checksum(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        input_fingerprints(((x,), {}), x.shape[0])
        return F.cross_entropy(logits, y)

    def losses(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        rows = logits.shape[0]  # the last batch may be smaller
        return (F.cross_entropy(logits, y) + bench.logit_kd(logits, fixed_logits[:rows], temperature=2.0)
                + F.mse_loss(captured["neck"], fixed_features[:rows]))

    def offline(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        teacher_logits, teacher_features = all_logits.index_select(0, index), all_features.index_select(0, index)
        return (F.cross_entropy(logits, y) + bench.logit_kd(logits, teacher_logits, temperature=2.0)
                + F.mse_loss(captured["neck"], teacher_features))

    return {"plain": plain, "cached": cached, "read": read, "checksum": checksum, "losses": losses,
            "offline": offline}


def measure(rounds: int) -> dict[str, Any]:
    """Fill and bind the cache with a real fit, then run ``rounds`` epochs of every variant in turns."""
    batches = bench.make_batches(12, 256)
    callback = bench.StageScheduleCallback(
        stage_schedule=[{"name": "distill", "start_epoch": 0, "end_epoch": 2, "distillation": True}])
    model = bench.PluginStudent(cache=bench.TeacherCache())
    bench.fit(model, batches, 2, [callback])  # epoch 0 fills the cache, epoch 1 reads it
    cache = model.teacher_cache
    assert cache is not None and cache.hits == len(batches), "the cache was not filled"
    steps = variants(model, batches)
    hits_before = cache.hits
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds + 1):  # the first round is a warm-up
        for x, y, index in batches:
            for name, step in steps.items():
                start = time.perf_counter()
                optimizer.zero_grad()
                step(x, y, index).backward()
                optimizer.step()
                if round_:
                    seconds[name].append(time.perf_counter() - start)
    # every batch of the cached and read variants must have been served from the cache, or the times are the teacher's
    assert cache.hits - hits_before == 2 * (rounds + 1) * len(batches), "the cache missed during the measurement"
    plain = seconds["plain"]
    result: dict[str, Any] = {"rounds": rounds, "steps": len(plain), "variants": {}}
    for name, times in seconds.items():
        paired = [t - p for t, p in zip(times, plain)]
        result["variants"][name] = {
            "median_step_ms": statistics.median(times) * 1e3,
            "paired_difference_ms": statistics.median(paired) * 1e3,
            "ratio": statistics.median(times) / statistics.median(plain),
        }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="epochs of steps per variant after a warm-up (20)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bench.quiet()
    result = measure(args.rounds)
    plain_ms = result["variants"]["plain"]["median_step_ms"]
    print(f"{result['steps']} steps per variant, one torch thread; plain step {plain_ms:.2f} ms; "
          f"{bench.machine()['cpu']}")
    print(f"{'variant':10s} {'median ms':>10s} {'paired +ms':>11s} {'% of plain':>11s}")
    for name, row in result["variants"].items():
        print(f"{name:10s} {row['median_step_ms']:10.3f} {row['paired_difference_ms']:+11.3f} "
              f"{100 * row['paired_difference_ms'] / plain_ms:+10.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
