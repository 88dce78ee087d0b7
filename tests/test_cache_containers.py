"""The teacher cache gives back the containers it stored (issue 9, item 2) and can store outputs without the hooked
features, which are then computed live when read (item 6: dynamic padding).

The models are transformers BERTs built from tiny configs with random weights (``conftest.tiny_bert``)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import OrderedDict, namedtuple

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import ddp_env, tiny_bert, token_loader, trainer
from torch.utils.data import DataLoader

from lightning_stages import DistillationModule, StageScheduleCallback, TeacherCache
from lightning_stages.errors import DistillationStepError

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

TEACHER_LAYER = "bert.encoder:last_hidden_state"  # (N, L, 32): its length follows the batch's padding


class CachedBert(DistillationModule, pl.LightningModule):
    """A BERT student reading ``outputs["teacher"].logits`` at every step; reads the teacher's hooked encoder output
    in stages named ``"features"``."""

    def __init__(self, cache: TeacherCache, hooks: bool = False) -> None:
        super().__init__()
        self.model = tiny_bert(hidden=16, seed=1)
        self.teacher_cache = cache
        self.loss_weights = {"ce": 1.0}
        self.hooks = {"teacher": [TEACHER_LAYER]} if hooks else {}
        self.seen: list[dict] = []  # per step: epoch, batch, the teacher's output type and logits, features read
        self.teacher_forwards = 0

    def configure_teachers(self):
        teacher = tiny_bert(hidden=32, seed=2)
        teacher.register_forward_hook(lambda *_: setattr(self, "teacher_forwards", self.teacher_forwards + 1))
        return {"teacher": teacher}

    def configure_feature_hooks(self):
        return self.hooks

    def training_step(self, batch, batch_idx):
        ids, mask, y, index = batch
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        out = self.run_teachers(input_ids=ids, attention_mask=mask, sample_index=index)
        features = dict(self.captured_features("teacher")) if self.stage_name == "features" else None
        self.seen.append({"epoch": self.current_epoch, "batch": (ids, mask), "type": type(out["teacher"]),
                          "logits": out["teacher"].logits.clone(), "features": features})
        kd = F.mse_loss(logits, out["teacher"].logits)
        return self.weighted_loss({"ce": F.cross_entropy(logits, y)}, {"kd": kd})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def distilling(*names: str) -> StageScheduleCallback:
    """One distilling stage per epoch, named ``names``."""
    return StageScheduleCallback(stage_schedule=[
        {"name": name, "start_epoch": epoch, "end_epoch": epoch + 1, "distillation": True}
        for epoch, name in enumerate(names)])


def reference(batch) -> transformers.utils.ModelOutput:
    """The teacher's output computed by the test itself."""
    ids, mask = batch
    with torch.no_grad():
        return tiny_bert(hidden=32, seed=2).eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True)


# ---------------------------------------------------------------------------------------------- item 2: containers


@pytest.mark.parametrize("where", ["memory", "files"])
def test_a_cached_epoch_reads_model_output_logits_as_the_live_epoch_did(tmp_path, where):
    cache = TeacherCache() if where == "memory" else TeacherCache(directory=tmp_path / "cache")
    model = CachedBert(cache)
    trainer(tmp_path, max_epochs=2, callbacks=[distilling("kd", "kd")]).fit(model, token_loader())
    live, cached = model.seen[:2], model.seen[2:]
    assert model.teacher_forwards == 2  # epoch 1 read every batch from the cache
    assert [s["type"] for s in model.seen] == [SequenceClassifierOutput] * 4
    for first, second in zip(live, cached, strict=True):
        assert torch.equal(second["logits"], first["logits"])
        torch.testing.assert_close(first["logits"], reference(first["batch"]).logits)
    if where == "files":  # a new run on the same directory rebuilds the ModelOutput from the files' layout
        again = CachedBert(TeacherCache(directory=tmp_path / "cache"))
        trainer(tmp_path, max_epochs=1, callbacks=[distilling("kd")]).fit(again, token_loader())
        assert again.teacher_forwards == 0
        assert [s["type"] for s in again.seen] == [SequenceClassifierOutput] * 2
        assert all(torch.equal(a["logits"], b["logits"]) for a, b in zip(again.seen, live, strict=True))


Pair = namedtuple("Pair", ["low", "high"])


@dataclasses.dataclass
class Heads:
    main: torch.Tensor
    aux: tuple


@pytest.mark.parametrize("where", ["memory", "files"])
def test_every_supported_container_comes_back_as_its_own_type(tmp_path, where):
    x = torch.arange(12.0).reshape(4, 3)
    outputs = {
        "model_output": SequenceClassifierOutput(logits=x, hidden_states=(x + 1, x + 2)),
        "ordered": OrderedDict([("b", x), ("a", x * 2)]),
        "named": Pair(x, -x),
        "dataclass": Heads(main=x, aux=(x - 1, None)),
        "plain": [{"k": x}, (x,)],
    }
    cache = TeacherCache() if where == "memory" else TeacherCache(directory=tmp_path)
    cache.bind("fingerprint")
    cache.store(torch.arange(4), outputs, {}, inputs=x)
    if where == "files":  # read back by another cache object, from the files alone
        cache.close()
        cache = TeacherCache(directory=tmp_path)
        assert cache.bind("fingerprint")
    got, _ = cache.lookup(torch.tensor([2, 0]), inputs=x[[2, 0]])
    rows = [2, 0]
    assert type(got["model_output"]) is SequenceClassifierOutput
    assert got["model_output"].loss is None and list(got["model_output"].keys()) == ["logits", "hidden_states"]
    assert torch.equal(got["model_output"].logits, x[rows])
    assert torch.equal(got["model_output"].hidden_states[1], x[rows] + 2)
    assert type(got["ordered"]) is OrderedDict and list(got["ordered"]) == ["b", "a"]
    assert torch.equal(got["ordered"]["a"], 2 * x[rows])
    assert type(got["named"]) is Pair and torch.equal(got["named"].high, -x[rows])
    assert type(got["dataclass"]) is Heads and got["dataclass"].aux[1] is None
    assert torch.equal(got["dataclass"].aux[0], x[rows] - 1)
    assert type(got["plain"]) is list and type(got["plain"][1]) is tuple and torch.equal(got["plain"][0]["k"], x[rows])


@pytest.mark.parametrize("where", ["memory", "files"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
def test_a_leaf_of_no_elements_per_sample_comes_back_with_its_shape_and_dtype(tmp_path, where, dtype):
    """An ``(N, 0)`` output (an empty set of heads) beside an ordinary one: the directory's read viewed its 0 bytes as
    the dtype and raised a raw ``RuntimeError`` from the second epoch on."""
    x = torch.arange(12.0).reshape(4, 3)
    outputs = {"logits": x, "empty": torch.zeros(4, 0, 2, dtype=dtype), "after": -x}
    cache = TeacherCache() if where == "memory" else TeacherCache(directory=tmp_path)
    cache.bind("fingerprint")
    cache.store(torch.arange(4), outputs, {}, inputs=x)
    if where == "files":
        cache.close()
        cache = TeacherCache(directory=tmp_path)
        assert cache.bind("fingerprint")
    got, _ = cache.lookup(torch.tensor([2, 0]), inputs=x[[2, 0]])
    assert got["empty"].shape == (2, 0, 2) and got["empty"].dtype == dtype
    assert torch.equal(got["logits"], x[[2, 0]]) and torch.equal(got["after"], -x[[2, 0]])


class Box(dict):
    """A dict subclass the cache cannot know how to rebuild."""


def test_an_unsupported_container_is_refused_at_the_first_store_naming_teacher_type_and_what_works(tmp_path):
    class BoxedTeacher(CachedBert):
        def configure_teachers(self):
            teachers = super().configure_teachers()
            bert = teachers["teacher"]
            bert.register_forward_hook(lambda m, i, out: Box(logits=out.logits))
            return teachers

    model = BoxedTeacher(TeacherCache())
    with pytest.raises(DistillationStepError) as err:
        trainer(tmp_path, max_epochs=2, callbacks=[distilling("kd", "kd")]).fit(model, token_loader())
    message = str(err.value)
    assert "'kd'" in message  # the stage
    assert "output of teacher 'teacher'" in message and "Box" in message
    assert "namedtuples" in message and "ModelOutputs" in message
    assert model.teacher_forwards == 1 and model.seen == []  # the first step, before any cached epoch


def test_a_dataclass_that_init_cannot_rebuild_is_refused():
    @dataclasses.dataclass
    class Derived:
        logits: torch.Tensor
        probs: torch.Tensor = dataclasses.field(init=False)

    value = Derived(torch.ones(2, 3))
    value.probs = torch.ones(2, 3)
    cache = TeacherCache()
    cache.bind("fingerprint")
    with pytest.raises(Exception, match=r"Derived.*not one of the containers the cache rebuilds"):
        cache.store([0, 1], {"teacher": value}, {})
    assert len(cache) == 0


def test_the_key_holds_the_format_and_store_features(tmp_path):
    full = TeacherCache(directory=tmp_path)
    full.bind("fingerprint")
    full.store([0], {"t": torch.ones(1, 2)}, {"t": {"layer": torch.zeros(1, 3)}})
    full.close()
    outputs_only = TeacherCache(directory=tmp_path, store_features=False)
    assert not outputs_only.bind("fingerprint")  # rows that hold features are another key's
    outputs_only.store([0], {"t": torch.ones(1, 2)}, {"t": {"layer": torch.zeros(1, 3)}})
    assert outputs_only.lookup([0])[1] == {}
    assert len([d for d in os.listdir(tmp_path) if d.startswith("tc2-")]) == 1  # the unused key was deleted
    with pytest.raises(Exception, match="store_features"):
        TeacherCache(store_features="no")


# ---------------------------------------------------------------------------------------------- item 6: no features


def padded_loader(batch_size: int = 4) -> DataLoader:
    """Variable-length samples, padded per batch (HF's dynamic padding): batch 0 is 4 tokens long, batch 1 is 6."""
    g = torch.Generator().manual_seed(3)
    lengths = [3, 4, 2, 4, 6, 5, 6, 3]
    samples = [(torch.randint(1, 50, (n,), generator=g), i % 3, i) for i, n in enumerate(lengths)]

    def collate(items):
        width = max(len(ids) for ids, _, _ in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, (tokens, _, _) in enumerate(items):
            ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
        return ids, mask, torch.tensor([y for _, y, _ in items]), torch.tensor([i for _, _, i in items])

    return DataLoader(samples, batch_size=batch_size, collate_fn=collate)


def test_dynamic_padding_with_hooked_features_is_refused_when_features_are_stored(tmp_path):
    model = CachedBert(TeacherCache(), hooks=True)
    with pytest.raises(DistillationStepError, match="changed between batches"):
        trainer(tmp_path, max_epochs=1, callbacks=[distilling("kd")]).fit(model, padded_loader())


def test_without_stored_features_logits_are_cached_and_features_are_computed_live_only_when_read(tmp_path):
    model = CachedBert(TeacherCache(store_features=False), hooks=True)
    fit = trainer(tmp_path, max_epochs=3, callbacks=[distilling("kd", "kd", "features")])
    counts = []
    model.on_train_epoch_end = lambda: counts.append(model.teacher_forwards)
    fit.fit(model, padded_loader())
    assert counts == [2, 2, 4]  # epoch 0 fills the cache; epoch 1 reads it; epoch 2 reads features, so runs it
    assert [s["type"] for s in model.seen] == [SequenceClassifierOutput] * 6
    for step in model.seen:
        expected = reference(step["batch"])
        torch.testing.assert_close(step["logits"], expected.logits)
        if step["epoch"] == 2:  # this batch's own features, at this batch's length
            torch.testing.assert_close(step["features"][TEACHER_LAYER], expected.hidden_states[-1])
        else:
            assert step["features"] is None
    assert [s["features"][TEACHER_LAYER].shape[1] for s in model.seen[4:]] == [4, 6]


def test_a_cached_batch_never_serves_the_features_of_the_batch_before():
    model = CachedBert(TeacherCache(store_features=False), hooks=True)
    model.prepare_teachers()
    model.use_distillation = True
    model.train()
    (a_ids, a_mask, _, a_index), (b_ids, b_mask, _, b_index) = list(padded_loader())
    model.run_teachers(input_ids=a_ids, attention_mask=a_mask, sample_index=a_index)  # stored
    model.run_teachers(input_ids=b_ids, attention_mask=b_mask, sample_index=b_index)  # stored; hooks hold b's
    assert model.teacher_forwards == 2
    model.run_teachers(input_ids=a_ids, attention_mask=a_mask, sample_index=a_index)  # from the cache
    assert model.teacher_forwards == 2
    features = model.captured_features("teacher")[TEACHER_LAYER]
    model.captured_features("teacher")  # read twice: the teacher ran once
    assert model.teacher_forwards == 3
    torch.testing.assert_close(features, reference((a_ids, a_mask)).hidden_states[-1])


# ---------------------------------------------------------------------------------------------- DDP: this file as worker


def _ddp_main(out: str, cache: str) -> None:
    """Two ranks share ``TeacherCache(directory=cache, store_features=False)``; epoch 1 reads features."""
    model = CachedBert(TeacherCache(directory=cache, store_features=False), hooks=True)
    fit = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[distilling("kd", "features")])
    fit.fit(model, padded_loader(batch_size=2))
    steps = [{"epoch": s["epoch"], "ids": s["batch"][0].tolist(), "mask": s["batch"][1].tolist(),
              "type": s["type"].__name__, "logits": s["logits"].tolist(),
              "features": None if s["features"] is None else s["features"][TEACHER_LAYER].tolist()} for s in model.seen]
    with open(os.path.join(out, f"rank{fit.global_rank}.json"), "w") as handle:
        json.dump({"steps": steps, "teacher_forwards": model.teacher_forwards}, handle)


def test_two_ddp_ranks_cache_model_outputs_without_features_and_compute_features_live(tmp_path):
    env = ddp_env()
    cmd = [sys.executable, __file__, str(tmp_path), str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [s["epoch"] for s in result["steps"]] == [0, 0, 1, 1]
        assert result["teacher_forwards"] == 4  # epoch 0: stored; epoch 1: outputs cached, features computed live
        for step in result["steps"]:
            expected = reference((torch.tensor(step["ids"]), torch.tensor(step["mask"])))
            assert step["type"] == "SequenceClassifierOutput"
            torch.testing.assert_close(torch.tensor(step["logits"]), expected.logits)
            if step["epoch"] == 1:
                torch.testing.assert_close(torch.tensor(step["features"]), expected.hidden_states[-1])


if __name__ == "__main__":
    torch.set_num_threads(1)
    _ddp_main(sys.argv[1], sys.argv[2])
