"""The teacher cache never serves rows computed by a teacher other than the one running now: replaced weights, a
teacher put in training mode, a hook or a lambda that differs, a sequence-first output that looks batch-first, and
(with ``store_features=False``) inputs the caller rebinds before the features are read."""

from __future__ import annotations

import functools
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import (
    DistillationModule,
    DistillationStepError,
    IndexedDataset,
    StageScheduleCallback,
    TeacherCache,
)
from lightning_stages.distillation.teacher_changes import sequence_first_layers, warn_sequence_first
from lightning_stages.distillation.teacher_fingerprint import teacher_fingerprint

N, BATCH = 8, 4


def make_teacher(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(dropout), nn.ReLU(), nn.Linear(8, 3)).eval()


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g))
    return DataLoader(IndexedDataset(data), batch_size=BATCH)


class Student(DistillationModule, pl.LightningModule):
    """Keeps each step's input and the teacher output it was given."""

    def __init__(self, teacher: nn.Module, cache: TeacherCache | None = None, hooks: dict | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.loss_weights = {"ce": 1.0}
        self.teacher_cache = TeacherCache() if cache is None else cache  # an empty cache is falsy (len 0)
        self.__dict__["teacher"] = teacher
        self.hooks = hooks or {}
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_teachers(self):
        return {"t": self.teacher}

    def configure_feature_hooks(self):
        return self.hooks

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        out = self.run_teachers(x, sample_index=index)["t"]
        self.seen.append((x.clone(), out.detach().clone()))
        logits = self.net(x)
        return self.weighted_loss({"ce": F.cross_entropy(logits, y)}, {"kd": F.mse_loss(logits, out)})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(model: Student, epochs: int = 3, callbacks: list | None = None) -> None:
    pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
               callbacks=[StageScheduleCallback(stage_schedule=[{"name": "kd", "start_epoch": 0, "distillation": True}],
                                                verbose=False), *(callbacks or [])]).fit(model, loader())


class AtEpoch(pl.Callback):
    def __init__(self, epoch: int, action) -> None:
        self.epoch, self.action = epoch, action

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.action(pl_module.teachers["t"])


@pytest.mark.parametrize("how", ["assign", "submodule"])
def test_teacher_weights_replaced_during_a_fit_are_not_served_the_old_rows(how):
    other = make_teacher(seed=1)

    def replace(teacher: nn.Sequential) -> None:
        if how == "assign":  # new Parameter objects: no version counter of the old ones moves
            teacher.load_state_dict(other.state_dict(), assign=True)
        else:
            teacher[3] = other[3]

    reference = make_teacher(seed=1) if how == "assign" else make_teacher()
    if how == "submodule":
        reference[3] = make_teacher(seed=1)[3]
    model = Student(make_teacher())
    fit(model, callbacks=[AtEpoch(2, replace)])
    steps = N // BATCH
    # before: epoch 2 was served the rows of the teacher as it was (max error about 0.5)
    for x, served in model.seen[2 * steps:]:
        with torch.no_grad():
            torch.testing.assert_close(served, reference(x))


def test_a_teacher_put_in_training_mode_with_dropout_is_refused_naming_the_layer():
    model = Student(make_teacher(dropout=0.5))
    with pytest.raises(DistillationStepError, match=r"`teachers\.t\.1` = 'Dropout': is in training mode"):
        fit(model, callbacks=[AtEpoch(1, lambda teacher: teacher.train())])
    # before: every later epoch was served the one dropout draw of epoch 0's rows


def test_a_batch_norm_without_running_statistics_is_refused_in_eval_mode_too():
    # it normalizes by the batch's statistics in eval mode: a stored row is one batch's (0.9 off when reshuffled)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3)).eval()
    model = Student(teacher)
    with pytest.raises(DistillationStepError, match=r"`teachers\.t\.1` = 'BatchNorm1d': keeps no running statistics "
                                                    r"\(track_running_stats=False\).*; give it running statistics"):
        fit(model)
    assert model.seen == []  # refused at the first cached step


def test_two_students_sharing_one_cache_object_are_each_served_their_own_teacher():
    # the class-attribute form, two students trained in turns by hand: the second one's bind re-keyed the shared cache
    # and the first, which did not bind again, was served the other teacher's outputs (1.7 off)
    shared = TeacherCache()
    students = [Student(make_teacher(seed=seed), cache=shared) for seed in (1, 2)]
    x, index = torch.randn(N, 4, generator=torch.Generator().manual_seed(0)), torch.arange(N)
    for student in students:
        student.prepare_teachers()
        student.use_distillation = True
    for _ in range(2):
        for student in students:
            served = student.run_teachers(x, sample_index=index)["t"]
            with torch.no_grad():
                torch.testing.assert_close(served, student.teacher(x), rtol=0, atol=0)


def test_a_teacher_in_training_mode_has_another_key():
    class Noisy(nn.Module):  # an output that depends on the mode without dropout or batch norm
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) + (1.0 if self.training else 0.0)

    teacher = Noisy().eval()
    key = teacher_fingerprint({"t": teacher})
    # before: the same key, so an eval-mode run read the rows a training-mode run stored in the directory
    assert teacher_fingerprint({"t": teacher.train()}) != key
    assert teacher_fingerprint({"t": teacher.eval()}) == key


class Acted(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.act = nn.Linear(3, 3), act

    def forward(self, x):
        return self.act(self.lin(x))


def _scale(factor: float):
    return lambda z: z * factor  # a closure: the factor is in its cell


def test_teachers_that_differ_only_in_a_lambda_or_a_hook_have_other_keys():
    double = teacher_fingerprint({"t": Acted(lambda z: z * 2)})
    assert teacher_fingerprint({"t": Acted(lambda z: z * 2)}) == double  # another lambda with the same code
    # before: every lambda was keyed `<lambda>`, so these read each other's rows
    assert teacher_fingerprint({"t": Acted(lambda z: z * 3)}) != double
    assert teacher_fingerprint({"t": Acted(_scale(2.0))}) == teacher_fingerprint({"t": Acted(_scale(2.0))})
    assert teacher_fingerprint({"t": Acted(_scale(2.0))}) != teacher_fingerprint({"t": Acted(_scale(255.0))})

    plain, scaled, other = Acted(torch.tanh), Acted(torch.tanh), Acted(torch.tanh)
    key = teacher_fingerprint({"t": plain})
    scaled.register_forward_pre_hook(lambda module, args: (args[0] / 255,))
    other.register_forward_pre_hook(lambda module, args: (args[0] / 1,))
    # before: hooks were not read, so an input scaled by a pre-hook was served the unscaled rows
    assert len({key, teacher_fingerprint({"t": scaled}), teacher_fingerprint({"t": other})}) == 3


def test_a_hooked_sequence_first_layer_is_warned_of_and_a_batch_first_one_is_not():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2), num_layers=1, enable_nested_tensor=False)
    teacher = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "first": nn.MultiheadAttention(8, 2, batch_first=True),
                             "lstm": nn.LSTM(8, 8, batch_first=True), "conv": nn.Conv2d(3, 64, 3), "enc": encoder})
    layers = {"t": ["attn[0]", "attn[1]", "first[0]", "lstm[0]", "lstm[-2]", "lstm[1][0]", "lstm[-1]", "conv", "enc"]}
    # attention weights (attn[1]) and a batch-first output are batch-first; an LSTM's h_n never is
    assert sequence_first_layers({"t": teacher}, layers) == [
        "t.attn[0] (MultiheadAttention)", "t.lstm[1][0] (LSTM)", "t.lstm[-1] (LSTM)", "t.enc (TransformerEncoder)"]
    with pytest.warns(UserWarning, match=r"t\.attn\[0\] \(MultiheadAttention\) gives its samples in the second "
                                         "dimension"):
        warn_sequence_first({"t": teacher}, layers, stored=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_sequence_first({"t": teacher}, layers, stored=False)  # features not stored: nothing per sample
        warn_sequence_first({"t": teacher}, {"t": ["conv", "first[0]"]}, stored=True)  # (N, 64, H, W): no warning
    # a teacher whose own output is sequence-first: its outputs are stored whatever store_features says
    with pytest.warns(UserWarning, match=r"TeacherCache: t \(LSTM, its output\) gives its samples"):
        warn_sequence_first({"t": nn.LSTM(8, 8)}, {}, stored=False)


def test_a_tensor_without_one_row_per_sample_is_refused_naming_it():
    cache = TeacherCache()
    cache.bind("key")
    with pytest.raises(DistillationStepError, match=r"`output of teacher 'u'` = \(3, 2\): has shape \(3, 2\)"):
        cache.store([4, 5, 6, 7], {"t": torch.zeros(4, 5, 2), "u": torch.zeros(3, 2)}, {})


def test_a_hook_keeping_state_in_a_closure_keeps_the_key():
    """The usual activation grabber: the dict it fills changes at every forward, the key must not (it did, so that a
    stage that distils again recomputed every row, and a directory dropped the rows of the key before)."""
    teacher = Acted(torch.tanh)
    grabbed: dict[str, torch.Tensor] = {}
    teacher.lin.register_forward_hook(lambda module, args, output: grabbed.__setitem__("lin", output.detach()))
    key = teacher_fingerprint({"t": teacher})
    with torch.no_grad():
        teacher(torch.ones(2, 3))
        assert teacher_fingerprint({"t": teacher}) == key
        teacher(torch.zeros(2, 3))
    assert teacher_fingerprint({"t": teacher}) == key


def test_compares_cost_meter_hook_does_not_change_the_key():
    from lightning_stages.cli.training_run import _CostMeter

    teacher = Acted(torch.tanh)
    key = teacher_fingerprint({"t": teacher})
    teacher.register_forward_pre_hook(_CostMeter()._count)
    # before: a bound method of the package's own was counted, so a cache filled outside `compare` missed inside it
    assert teacher_fingerprint({"t": teacher}) == key


def test_settings_whose_keys_read_alike_have_a_key():
    teacher = Acted(torch.tanh)
    teacher.table = {nn.Linear(1, 1): None, nn.Linear(1, 1): torch.ones(1)}  # both keys read as their type
    # before: TypeError ('<' between str and NoneType) at the first cached step
    assert teacher_fingerprint({"t": teacher}) == teacher_fingerprint({"t": teacher})


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def _body_teacher() -> _Body:
    torch.manual_seed(0)
    return _Body().eval()


class _Masking(DistillationModule, pl.LightningModule):
    """Runs the teacher on ``{"x": x}``, then puts a masked copy into that dict for itself; keeps the teacher feature
    it reads and the one of the input the teacher was run on."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.loss_weights = {"ce": 1.0}
        self.teacher_cache = TeacherCache(store_features=False)
        self.read: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_teachers(self):
        return {"t": _body_teacher()}

    def configure_feature_hooks(self):
        return {"student": ["body"], "t": ["body"]}

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        given = {"x": x}
        out = self.run_teachers(inputs={"t": given}, sample_index=index)
        given["x"] = x * (torch.rand_like(x) > 0.5)  # the student trains on a masked copy (x is untouched)
        logits = self.head(torch.relu(self.body(given["x"])))
        feature = self.captured_features("t")["body"]
        with torch.no_grad():
            self.read.append((feature.detach().clone(), _body_teacher().body(x)))
        distill = {"kd": F.mse_loss(logits, out["t"]), **self.feature_losses()}
        return self.weighted_loss({"ce": F.cross_entropy(logits, y)}, distill)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_features_computed_later_read_the_inputs_as_they_were_given():
    """``store_features=False``: a served batch's features are computed when first read. A caller that put another
    tensor into the dict it gave ``run_teachers`` (no tensor changed in place) got the features of that tensor."""
    model = _Masking()
    fit(model)
    assert len(model.read) == 3 * N // BATCH and model.teacher_cache.hits == 2 * N // BATCH
    for feature, expected in model.read:  # before: from epoch 1, errors up to 1.2
        torch.testing.assert_close(feature, expected)


class _Scale:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, module, args):
        return (args[0] * self.factor,)


def _make_hook(factor: float):
    return lambda module, args: (args[0] * factor,)


def _save(store: dict, module, args, output) -> None:
    store["last"] = output.detach()


def _key_with_hook(hook, pre: bool = True) -> str:
    teacher = Acted(torch.tanh)
    (teacher.register_forward_pre_hook if pre else teacher.register_forward_hook)(hook)
    return teacher_fingerprint({"t": teacher})


def test_hooks_count_by_what_they_compute_and_not_by_the_state_they_keep():
    # a callable object by its class and its constant attributes; before: by its class name only
    assert _key_with_hook(_Scale(2.0)) != _key_with_hook(_Scale(3.0))
    # a wrapped closure by the constants of the function it wraps; before: equal keys
    assert _key_with_hook(torch.no_grad()(_make_hook(2.0))) != _key_with_hook(torch.no_grad()(_make_hook(3.0)))
    # a closure over a partial by the partial's arguments; before: by its type
    wrap = lambda p: lambda module, args: p(args)  # noqa: E731
    assert (_key_with_hook(wrap(functools.partial(lambda f, a: (a[0] * f,), 2.0)))
            != _key_with_hook(wrap(functools.partial(lambda f, a: (a[0] * f,), 3.0))))
    # bytes and frozenset constants by their content; before: by their type
    assert _key_with_hook(lambda m, a: (a[0] * len(b"ab"),)) != _key_with_hook(lambda m, a: (a[0] * len(b"abc"),))
    assert (_key_with_hook(lambda m, a: (a[0] * (2 in {1, 2}),))
            != _key_with_hook(lambda m, a: (a[0] * (2 in {1, 3}),)))

    # state a hook keeps does not move the key: a partial over a dict, a tensor buffer written in place
    store: dict[str, torch.Tensor] = {}
    buffer = torch.zeros(2, 3)
    teacher = Acted(torch.tanh)
    teacher.register_forward_hook(functools.partial(_save, store))
    teacher.register_forward_hook(lambda module, args, output: buffer.copy_(output))
    with torch.no_grad():
        teacher(torch.zeros(2, 3))  # the buffer is written once: from then on it counts by its dtype and shape
        key = teacher_fingerprint({"t": teacher})
        teacher(torch.ones(2, 3))
        teacher(torch.full((2, 3), 5.0))
    assert teacher_fingerprint({"t": teacher}) == key  # before: another key after every forward

    class Odd:  # an attribute lookup that fails with KeyError
        def __getattr__(self, name):
            raise KeyError(name)

        def __call__(self, module, args):
            return None

    assert _key_with_hook(Odd()) == _key_with_hook(Odd())  # before: a raw KeyError
