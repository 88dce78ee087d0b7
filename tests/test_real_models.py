"""Real model families (issue 9): a transformers BERT teacher and student, ResNet BasicBlocks with in-place ops,
token features, two teachers with their own inputs. Every model is built from a config with random weights."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyResNet, tiny_bert, token_loader, trainer
from torch import nn

from lightning_stages import DistillationModule, StageScheduleCallback
from lightning_stages.errors import DistillationStepError, StageConfigError
from lightning_stages.losses import FeatureAdapter, feature_pair_name, logit_kd, paired_feature_losses

pytest.importorskip("transformers")

# the student pairs the output of its last attention block (a tuple) with the teacher's encoder output (a ModelOutput)
STUDENT_LAYER = "bert.encoder.layer.1.attention[0]"
TEACHER_LAYER = "bert.encoder:last_hidden_state"


class BertStudent(DistillationModule, pl.LightningModule):
    """A 16-wide BERT student of a 32-wide BERT teacher: logit KD and feature KD through selectors."""

    def __init__(self, hooks: dict | None = None) -> None:
        super().__init__()
        self.model = tiny_bert(hidden=16, seed=1)
        self.adapter = FeatureAdapter(16, 32, channels_last=True)  # token features (N, L, C)
        self.loss_weights = {"ce": 1.0}
        self.hooks = {"student": ["model." + STUDENT_LAYER], "teacher": [TEACHER_LAYER]} if hooks is None else hooks
        self.steps: list[dict] = []

    def configure_teachers(self):
        return {"teacher": tiny_bert(hidden=32, seed=2)}

    def configure_feature_hooks(self):
        return self.hooks

    def training_step(self, batch, batch_idx):
        ids, mask, y, _ = batch
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        distill = {}
        if teachers := self.run_teachers(input_ids=ids, attention_mask=mask):
            distill["kd"] = logit_kd(logits, teachers["teacher"].logits, temperature=2.0)
            distill.update(self.feature_losses(adapters={"model." + STUDENT_LAYER: self.adapter}))
        self.steps.append({"batch": (ids, mask), "logits": logits.detach().clone(),
                           "distill": {k: v.detach().clone() for k, v in distill.items()}})
        return self.weighted_loss({"ce": F.cross_entropy(logits, y)}, distill)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay put: each step is checked afterwards


def distill_then_finetune(epochs: int = 2) -> StageScheduleCallback:
    return StageScheduleCallback(stage_schedule=[{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True},
                                                 {"name": "ft", "start_epoch": 1, "distillation": False}])


def test_bert_logit_and_feature_kd_through_selectors_match_a_hand_computation(tmp_path):
    model = BertStudent()
    trainer(tmp_path, max_epochs=2, callbacks=[distill_then_finetune()]).fit(model, token_loader())
    kd_steps, ft_steps = model.steps[:2], model.steps[2:]
    assert [sorted(s["distill"]) for s in kd_steps] == [["kd", "model.bert.encoder.layer.1.attention.0__teacher.bert."
                                                         "encoder.last_hidden_state"]] * 2
    assert all(s["distill"] == {} for s in ft_steps)
    teacher = tiny_bert(hidden=32, seed=2).eval()
    seen = {}  # an independent capture: a plain forward hook of the test's own
    model.model.bert.encoder.layer[1].attention.register_forward_hook(lambda m, i, o: seen.update(s=o[0]))
    with torch.no_grad():
        for step in kd_steps:
            ids, mask = step["batch"]
            t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            model.model(input_ids=ids, attention_mask=mask)
            t_prob = F.softmax(t_out.logits / 2.0, dim=1)
            kd = (t_prob * (t_prob.log() - F.log_softmax(step["logits"] / 2.0, dim=1))).sum(1).mean() * 4.0
            feature = ((seen["s"] @ model.adapter.proj.weight.T + model.adapter.proj.bias - t_out.hidden_states[-1])
                       ** 2).mean()
            got = list(step["distill"].values())
            assert got[0].item() == pytest.approx(kd.item(), rel=1e-3, abs=1e-7)  # a KD of about 1.5e-4
            assert got[1].item() == pytest.approx(feature.item(), rel=1e-5)


@pytest.mark.parametrize(("side", "path", "type_name", "selector"), [
    ("teacher", "bert.encoder", "BaseModelOutputWithPastAndCrossAttentions", "`bert.encoder:last_hidden_state`"),
    ("student", "model.bert.encoder.layer.1.attention", "tuple", "`model.bert.encoder.layer.1.attention[0]`"),
])
def test_a_capture_that_is_not_a_tensor_is_refused_at_the_first_distilling_step_with_the_selectors(
        tmp_path, side, path, type_name, selector):
    hooks = {"student": ["model." + STUDENT_LAYER], "teacher": [TEACHER_LAYER], side: [path]}
    model = BertStudent(hooks)
    with pytest.raises(DistillationStepError) as err:
        trainer(tmp_path, max_epochs=2, callbacks=[distill_then_finetune()]).fit(model, token_loader())
    message = str(err.value)
    assert model.steps == []  # refused at the first distilling step
    assert f"`configure_feature_hooks.{side}` = '{path}': captured a {type_name}, not a tensor" in message
    assert f"select a tensor: {selector}" in message and "stage 'kd'" in message


def test_a_selector_that_does_not_apply_names_itself_and_the_ones_that_would():
    model = BertStudent({"student": ["model." + STUDENT_LAYER], "teacher": ["bert.encoder:hidden"]})
    model.prepare_teachers()
    model.use_distillation = True
    ids = torch.randint(1, 50, (2, 5))
    model.run_teachers(input_ids=ids)
    with pytest.raises(DistillationStepError, match=re.escape(
            "`configure_feature_hooks.teacher` = 'bert.encoder:hidden': the selector `:hidden` is not a key of the "
            "BaseModelOutputWithPastAndCrossAttentions (keys: last_hidden_state); select a tensor: "
            "`bert.encoder:last_hidden_state`")):
        model.captured_features("teacher")


def test_a_selector_on_a_module_that_returns_a_tensor_names_the_bare_path():
    # BertEmbeddings returns a tensor: the selector `[0]` does not apply, and the tensor is the module's own output
    model = BertStudent({"student": ["model." + STUDENT_LAYER], "teacher": ["bert.embeddings[0]"]})
    model.prepare_teachers()
    model.use_distillation = True
    model.run_teachers(input_ids=torch.randint(1, 50, (2, 5)))
    with pytest.raises(DistillationStepError, match=re.escape(
            "`configure_feature_hooks.teacher` = 'bert.embeddings[0]': the selector `[0]` needs a tuple or list, not "
            "Tensor; select a tensor: `bert.embeddings`")):
        model.captured_features("teacher")


def test_a_malformed_selector_is_refused_at_setup():
    model = BertStudent({"student": ["model.bert.encoder[first]"], "teacher": [TEACHER_LAYER]})
    with pytest.raises(StageConfigError, match=re.escape("`configure_feature_hooks.student` = "
                                                         "'model.bert.encoder[first]': `[first]` is not a selector")):
        model.prepare_teachers()


# ------------------------------------------------------------------------------------------------ in-place ResNet blocks


class ResNetStudent(DistillationModule, pl.LightningModule):
    def __init__(self, student_layer: str, teacher_layer: str, copy: bool = False) -> None:
        super().__init__()
        self.net = TinyResNet(seed=0)
        self.layers = (student_layer, teacher_layer)
        self.copy_features = copy
        self.loss_weights = {"ce": 1.0}
        self.distill_steps = 0

    def configure_teachers(self):
        return {"teacher": TinyResNet(seed=1)}

    def configure_feature_hooks(self):
        return {"student": [self.layers[0]], "teacher": [self.layers[1]]}

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.run_teachers(x)
        distill = self.feature_losses()
        self.distill_steps += bool(distill)
        return self.weighted_loss({"ce": F.cross_entropy(logits, y)}, distill)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def images(n: int = 4) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 2, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=2)


@pytest.mark.parametrize(("student_layer", "teacher_layer", "side"), [
    ("net.layer.1.bn2", "layer.1", "student"),
    ("net.layer.1", "layer.1.bn2", "teacher"),
])
def test_a_feature_changed_in_place_after_capture_is_refused_naming_the_path_and_the_fixes(
        tmp_path, student_layer, teacher_layer, side):
    model = ResNetStudent(student_layer, teacher_layer)
    schedule = StageScheduleCallback(stage_schedule=[{"name": "hint", "start_epoch": 0, "distillation": True}])
    with pytest.raises(DistillationStepError) as err:
        trainer(tmp_path, max_epochs=1, callbacks=[schedule]).fit(model, images())
    path = student_layer if side == "student" else teacher_layer
    enclosing = path.rpartition(".")[0]
    message = str(err.value)
    assert model.distill_steps == 0
    assert f"stage 'hint': `configure_feature_hooks.{side}` = '{path}': its output was modified in place after " \
           "capture" in message
    assert f"hook the enclosing `{enclosing}`" in message and "`copy_features = True`" in message


def test_copy_features_captures_the_batch_norm_output_on_both_sides():
    model = ResNetStudent("net.layer.1.bn2", "layer.1.bn2", copy=True)
    model.prepare_teachers()
    model.use_distillation = True
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    model.eval()
    model.net(x)
    model.run_teachers(x)

    def bn2_output(net: TinyResNet) -> torch.Tensor:  # the block's forward by hand, up to bn2
        block = net.layer[1]
        h = net.layer[0](net.stem(x))
        return block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(h)))))

    with torch.no_grad():
        student, teacher = bn2_output(model.net), bn2_output(model.teachers["teacher"])
        after_block = model.net.layer(model.net.stem(x))
    assert torch.allclose(model.captured_features()["net.layer.1.bn2"], student, atol=1e-6)
    assert torch.allclose(model.captured_features("teacher")["layer.1.bn2"], teacher, atol=1e-6)
    assert not torch.allclose(student, after_block)  # what a reference would have held: relu(bn2 + identity)
    got = model.feature_losses()["net.layer.1.bn2__teacher.layer.1.bn2"]
    assert got.item() == pytest.approx(((student - teacher) ** 2).mean().item(), rel=1e-5)


def test_the_teacher_cache_never_stores_a_feature_changed_in_place():
    from lightning_stages import TeacherCache

    model = ResNetStudent("net.layer.1", "layer.1.bn2")
    model.teacher_cache = TeacherCache()
    model.prepare_teachers()
    model.use_distillation = True
    with pytest.raises(DistillationStepError, match=re.escape("`configure_feature_hooks.teacher` = 'layer.1.bn2': "
                                                              "its output was modified in place after capture")):
        model.run_teachers(torch.randn(2, 3, 6, 6), sample_index=torch.arange(2))
    assert len(model.teacher_cache) == 0


def test_features_captured_under_inference_mode_are_read_without_a_version():
    model = ResNetStudent("net.layer.1", "layer.1")
    model.prepare_teachers()
    model.use_distillation = True
    with torch.inference_mode():
        x = torch.randn(2, 3, 6, 6)
        model.net(x)
        model.run_teachers(x)
        assert model.feature_losses()["net.layer.1__teacher.layer.1"].is_inference()


# ----------------------------------------------------------------------------------------------------- token features


def test_feature_adapter_on_token_features_is_a_linear_map_of_the_last_dimension():
    adapter = FeatureAdapter(16, 32, channels_last=True)
    x = torch.randn(3, 7, 16)
    expected = torch.einsum("nlc,oc->nlo", x, adapter.proj.weight) + adapter.proj.bias
    assert torch.allclose(adapter(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match=re.escape("FeatureAdapter(16, 32) expects 16 channels, channels first "
                                                   "(dimension 1), but got features of shape (3, 7, 16); check the "
                                                   "channels or pass channels_last=True")):
        FeatureAdapter(16, 32)(x)


def test_a_channels_first_adapter_on_tokens_is_named_with_its_pair_and_both_shapes():
    with pytest.raises(ValueError, match=re.escape("s -> teacher.t: the adapter of 's' failed on student features "
                                                   "(2, 7, 16) (teacher features (2, 7, 32))")):
        paired_feature_losses({"s": torch.zeros(2, 7, 16)}, {"t": torch.zeros(2, 7, 32)}, ["s"], ["t"],
                              adapters={"s": FeatureAdapter(16, 32)})


@pytest.mark.parametrize(("student", "teacher", "hint"), [
    ((2, 8, 4, 4), (2, 8, 2, 2), "only the spatial size differs: pool or interpolate"),
    ((2, 7, 16), (2, 7, 32), "FeatureAdapter(student_channels, teacher_channels, channels_last=True)"),
    ((2, 8, 4, 4), (2, 16, 4, 4), "the channels differ; pass `adapters={'s': FeatureAdapter("),
])
def test_a_shape_mismatch_names_the_pair_both_shapes_and_what_fixes_it(student, teacher, hint):
    with pytest.raises(ValueError) as err:
        paired_feature_losses({"s": torch.zeros(student)}, {"t": torch.zeros(teacher)}, ["s"], ["t"])
    assert str(err.value).startswith(f"s -> teacher.t: student features {student} do not match teacher features "
                                     f"{teacher}")
    assert hint in str(err.value)
    assert ("a FeatureAdapter maps channels only" in str(err.value)) == ("spatial" in hint)


# ---------------------------------------------------------------------------------------- two teachers, own inputs


class TwoTeachers(DistillationModule, pl.LightningModule):
    """A BERT teacher that reads token ids and a bag-of-words MLP teacher that reads counts."""

    def __init__(self, hooks: dict | None = None) -> None:
        super().__init__()
        self.model = tiny_bert(hidden=16, seed=1)
        self.hooks = hooks or {}
        self.loss_weights = {"ce": 1.0}

    def configure_teachers(self):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return {"bert": tiny_bert(hidden=32, seed=2), "bow": nn.Sequential(nn.Linear(50, 16), nn.ReLU(),
                                                                               nn.Linear(16, 3))}

    def configure_feature_hooks(self):
        return self.hooks


def bag_of_words(ids: torch.Tensor) -> torch.Tensor:
    return F.one_hot(ids, 50).float().sum(dim=1)


def test_run_teachers_gives_each_teacher_its_own_inputs_and_pairs_layers_per_teacher():
    hooks = {"student": {"bert": ["model.bert.encoder.layer.1"], "bow": ["model.classifier"]},
             "bert": ["bert.encoder.layer.1"], "bow": ["2"]}
    model = TwoTeachers(hooks)
    model.prepare_teachers()
    model.use_distillation = True
    model.eval()
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    student_logits = model.model(input_ids=ids).logits
    outputs = model.run_teachers(inputs={"bert": {"input_ids": ids}, "bow": (bag_of_words(ids),)})
    with torch.no_grad():
        bert_out = model.teachers["bert"](input_ids=ids, output_hidden_states=True)
        bow_out = model.teachers["bow"](bag_of_words(ids))
        student_hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(outputs["bert"].logits, bert_out.logits) and torch.equal(outputs["bow"], bow_out)
    adapters = {"model.bert.encoder.layer.1": FeatureAdapter(16, 32, channels_last=True)}
    losses = model.feature_losses(adapters=adapters)
    bert_key = feature_pair_name("model.bert.encoder.layer.1", "bert", "bert.encoder.layer.1")
    assert sorted(losses) == sorted([bert_key, "model.classifier__bow.2"])
    with torch.no_grad():
        expected_bert = ((adapters["model.bert.encoder.layer.1"](student_hidden) - bert_out.hidden_states[-1]) ** 2)
    assert losses[bert_key].item() == pytest.approx(expected_bert.mean().item(), rel=1e-5)
    assert losses["model.classifier__bow.2"].item() == pytest.approx(((student_logits - bow_out) ** 2).mean().item(),
                                                                      rel=1e-5)


def test_an_error_inside_a_teachers_forward_names_the_teacher():
    model = TwoTeachers()
    model.prepare_teachers()
    model.use_distillation = True
    ids = torch.randint(1, 50, (2, 5))
    with pytest.raises(DistillationStepError) as err:
        model.run_teachers(ids)  # token ids for both: the bag-of-words teacher cannot take them
    message = str(err.value)
    assert "`teachers.bow` = 'Sequential': teacher 'bow' raised RuntimeError in its forward" in message
    assert "give each teacher its own inputs: run_teachers(inputs=" in message


def test_a_dict_given_positionally_to_a_transformers_teacher_names_the_teacher():
    model = TwoTeachers()
    model.prepare_teachers()
    model.use_distillation = True
    batch = {"input_ids": torch.randint(1, 50, (2, 5))}
    with pytest.raises(DistillationStepError) as err:
        model.run_teachers(batch)  # the BERT teacher reads input_ids.size(): an AttributeError of the dict
    assert "teacher 'bert' raised AttributeError in its forward" in str(err.value)


def test_per_teacher_inputs_must_name_every_teacher():
    model = TwoTeachers()
    model.prepare_teachers()
    model.use_distillation = True
    ids = torch.randint(1, 50, (2, 5))
    with pytest.raises(DistillationStepError) as err:
        model.run_teachers(inputs={"bret": (ids,)})
    assert "`run_teachers.inputs` = 'bret': is not a teacher; did you mean `bert`?" in str(err.value)
    assert "`run_teachers.inputs` = 'bow': has no inputs" in str(err.value)


def test_per_teacher_inputs_work_with_the_teacher_cache():
    from lightning_stages import TeacherCache

    model = TwoTeachers()
    model.teacher_cache = TeacherCache()
    model.prepare_teachers()
    model.use_distillation = True
    model.train()
    calls = []
    for teacher in model.teachers.values():
        teacher.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    ids = torch.randint(1, 50, (4, 5), generator=torch.Generator().manual_seed(0))
    inputs = {"bert": {"input_ids": ids}, "bow": (bag_of_words(ids),)}
    first = model.run_teachers(inputs=inputs, sample_index=torch.arange(4))
    second = model.run_teachers(inputs=inputs, sample_index=torch.arange(4))
    assert calls == ["BertForSequenceClassification", "Sequential"]  # the second step read the cache
    assert torch.equal(second["bert"]["logits"], first["bert"]["logits"])
    assert torch.equal(second["bow"], first["bow"])


# ---------------------------------------------------------------------------------------------- loggers and resume

# MLflow's own check (mlflow/utils/validation.py, validate_param_and_metric_name, Windows variant: no colon) and the
# renaming Lightning's MLFlowLogger does before it (lightning/pytorch/loggers/mlflow.py), mirrored: mlflow is not a
# dependency here
MLFLOW_NAME = re.compile(r"^[/\w.\- ]*$")
LIGHTNING_MLFLOW_RENAME = re.compile(r"[^a-zA-Z0-9_/. -]+")


@pytest.mark.parametrize(("student", "teacher", "layer"), [
    ("net.1", "teacher", "3"),
    ("model.bert.encoder.layer.1.attention[0]", "teacher", "bert.encoder:last_hidden_state"),
    ("body", "big-teacher", ""),
    ("encoder:hidden_states[-1]", "t", "layers.0[1]:attn"),
])
def test_feature_loss_names_are_accepted_by_mlflow_unchanged(student, teacher, layer):
    import posixpath

    name = paired_feature_losses({student: torch.zeros(1)}, {layer: torch.zeros(1)}, [student], [layer],
                                 teacher=teacher).popitem()[0]
    assert name == feature_pair_name(student, teacher, layer)
    assert MLFLOW_NAME.match(name) and not LIGHTNING_MLFLOW_RENAME.search(name)
    assert posixpath.normpath(name) == name  # MLflow refuses names that resolve to another path


def test_the_stage_name_reaches_the_csv_logger(tmp_path):
    import csv

    from conftest import TinyNet, loader

    from lightning_stages import StageScheduleCallback

    class Net(TinyNet):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch[0][:, :4], batch[1]), batch_idx)

    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    schedule = StageScheduleCallback(stage_schedule=[
        {"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True},
        {"name": "ft", "start_epoch": 1, "distillation": False}], verbose=False)
    trainer(tmp_path, max_epochs=3, callbacks=[schedule], logger=logger).fit(Net(classes=2), loader())
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("stage/name")]
    assert [(r["stage/name"], float(r["stage/number"])) for r in rows] == [("kd", 1.0), ("ft", 2.0), ("ft", 2.0)]


def test_the_stage_name_is_an_mlflow_run_tag():
    class Experiment:  # MLflow's client, as far as the tags go
        def __init__(self):
            self.tags = {}

        def set_tag(self, run_id, key, value):
            self.tags[(run_id, key)] = value

    class Recording(pl.loggers.MLFlowLogger):  # mlflow itself is not installed: the logger's API, recorded
        def __init__(self):
            pl.loggers.logger.Logger.__init__(self)
            self.client, self.metrics = Experiment(), []

        experiment = property(lambda self: self.client)
        run_id = property(lambda self: "run-1")

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

    logger = Recording()
    schedule = StageScheduleCallback(stage_schedule=[{"name": "kd", "start_epoch": 0, "end_epoch": 1},
                                                     {"name": "ft", "start_epoch": 1}], verbose=False)
    run = pl.Trainer(max_epochs=2, logger=logger, enable_checkpointing=False, enable_progress_bar=False)
    schedule.setup(run, pl.LightningModule(), "fit")
    for epoch in range(2):
        run.fit_loop.epoch_progress.current.completed = epoch
        schedule.on_train_epoch_start(run, pl.LightningModule())
        assert logger.client.tags[("run-1", "stage/name")] == ["kd", "ft"][epoch]
    assert logger.client.tags[("run-1", "stage/1")] == "kd (1/2)" and logger.client.tags[("run-1", "stage/2")] == \
        "ft (2/2)"
    assert all(isinstance(v, float) for m in logger.metrics for v in m.values())  # MLflow drops text metrics


def test_a_run_resumed_into_a_finetune_only_tail_never_builds_the_teacher(tmp_path):
    from conftest import TinyNet, loader
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Net(TinyNet):
        def training_step(self, batch, batch_idx):
            self.epochs_trained = {*getattr(self, "epochs_trained", set()), self.current_epoch}
            return super().training_step((batch[0][:, :4], batch[1]), batch_idx)

    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True},
              {"name": "ft", "start_epoch": 2, "distillation": False}]
    first = Net(classes=2)
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1)
    trainer(tmp_path, max_epochs=4, callbacks=[StageScheduleCallback(stage_schedule=stages), checkpoints],
            enable_checkpointing=True).fit(first, loader())
    assert first.teacher_builds == 1
    resumed = Net(classes=2)
    trainer(tmp_path, max_epochs=4, callbacks=[StageScheduleCallback(stage_schedule=stages)]).fit(
        resumed, loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1-step=4.ckpt")
    assert resumed.epochs_trained == {2, 3} and resumed.teacher_builds == 0 and not resumed.teachers_prepared
    into_kd = Net(classes=2)  # resumed at epoch 1, which distills: the teacher is built
    trainer(tmp_path, max_epochs=4, callbacks=[StageScheduleCallback(stage_schedule=stages)]).fit(
        into_kd, loader(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert into_kd.epochs_trained == {1, 2, 3} and into_kd.teacher_builds == 1
