"""The README's "Use it in 20 lines" block, run as written with small stand-ins for the user's own code."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _twenty_lines() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it in 20 lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_twenty_line_example_trains_as_written(tmp_path, monkeypatch):
    code = _twenty_lines()
    # the Trainer of the block, quiet and in tmp_path, kept under a name; the student too
    fit = "pl.Trainer(max_epochs=30, callbacks=[StageScheduleCallback(stage_schedule=stages)]).fit(Student(), loaders)"
    assert fit in code
    code = code.replace(fit, "trainer = pl.Trainer(max_epochs=30, callbacks=[StageScheduleCallback(stage_schedule="
                             "stages)], logger=False, enable_checkpointing=False, enable_progress_bar=False, "
                             "enable_model_summary=False)\ntrainer.fit(student := Student(), loaders)")
    monkeypatch.chdir(tmp_path)
    built: list[str] = []
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=generator),
                                          torch.randint(0, 3, (16,), generator=generator))
    namespace = {
        "make_small_net": lambda: nn.Linear(8, 3),
        "load_big_net": lambda path: built.append(path) or nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
        "loaders": torch.utils.data.DataLoader(data, batch_size=8),
    }
    exec(compile(code, "README.md (Use it in 20 lines)", "exec"), namespace)
    trainer, student = namespace["trainer"], namespace["student"]
    assert trainer.current_epoch == 30 and trainer.global_step == 60
    assert built == ["teacher.ckpt"]  # one teacher build, for the distilling stage
    assert (student.stage_name, student.use_distillation, student.loss_weights) == ("finetune", False, {"cls": 1.0})
