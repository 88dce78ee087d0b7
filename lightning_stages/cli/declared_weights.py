"""What the model of a LightningCLI config declares (``loss_weights``, ``use_distillation``, ``lambda_coef``), read the
way training reads it: from the module built from the config, without running ``configure_teachers``.

``__init__`` is where a module declares its task losses (``self.loss_weights = {...}``), so the module is built with
the config's ``init_args`` (through jsonargparse, as ``LightningCLI`` builds it, or by a plain call without it).
Building never calls ``configure_teachers``: the callback calls it at fit time. When the module cannot be built,
the declaration is read from the config's ``init_args`` and the ``__init__`` defaults alone, and a warning says so.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Optional

from lightning_stages.distillation.distillation_module import DistillationModule
from lightning_stages.errors import StageConfigError, StageProblem
from lightning_stages.schedule.bind import declared_settings

__all__ = ["DeclaredWeightsWarning", "as_the_parser_reads", "declared_by_model", "import_class_path"]

_KEYS = ("loss_weights", "use_distillation", "lambda_coef")


class DeclaredWeightsWarning(UserWarning):
    """The module's declared loss weights could not be read the way training reads them; the rest was checked."""


def import_class_path(class_path: str, field: str) -> tuple[Optional[Any], list[StageProblem]]:
    """The object a ``class_path`` names, or the problem of importing it (naming the class_path and the error).

    Example::

        >>> import_class_path("collections.OrderedDict", "model.class_path")[0].__name__
        'OrderedDict'
        >>> import_class_path("Model", "model.class_path")[1][0].message
        'is not an importable class path (`package.module.Class`)'
    """
    import importlib

    module, _, name = class_path.rpartition(".")
    if not module:
        return None, [StageProblem("is not an importable class path (`package.module.Class`)", name="config",
                                   field=field, value=class_path)]
    try:
        return getattr(importlib.import_module(module), name), []
    except (Exception, SystemExit) as err:  # whatever importing the user's module raises (sys.exit too) is reported
        reason = f"{type(err).__name__}: {err}"
        return None, [StageProblem(f"cannot be imported ({reason})", name="config", field=field, value=class_path)]


def _build(cls: type, init_args: Mapping[str, Any]) -> Any:
    """``cls`` built from ``init_args`` as LightningCLI builds it (jsonargparse: nested ``class_path``s, types)."""
    try:
        from jsonargparse import ArgumentParser
    except ImportError:  # the `cli` extra is not installed: a plain call
        return cls(**init_args)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model", fail_untyped=False)
    config = parser.parse_object({"model": dict(init_args)})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return instantiate(config).model


def _static(cls: Optional[type], init_args: Mapping[str, Any]) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    if isinstance(cls, type):
        with contextlib.suppress(TypeError, ValueError):
            for name, parameter in inspect.signature(cls).parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    defaults[name] = parameter.default
    loss_weights, distillation, lambda_coef = (init_args.get(k, defaults.get(k)) for k in _KEYS)
    return {"loss_weights": loss_weights, "distillation": distillation, "lambda_coef": lambda_coef}


def declared_by_model(model: Mapping[str, Any], model_class: Optional[str] = None, import_modules: bool = True,
                      needed_by: Optional[str] = None) -> tuple[dict[str, Any], bool]:
    """What the ``model`` section of a LightningCLI config declares, keyed as ``bind_schedule`` reads it, and whether
    it was read from the module built from the config (``False``: from ``init_args`` and defaults only).

    Args:
        model: the config's ``model`` section: ``class_path`` and ``init_args``, or only the init args (a
            ``LightningCLI(MyModel, MyData)`` config).
        model_class: the model's class path when the section has none (``--model`` of ``validate``/``show``).
        import_modules: ``False`` (``--no-import``): import and build nothing; read ``init_args`` alone.
        needed_by: the first setting of the schedule that distills (``None``: none): the class must then be a
            ``DistillationModule``, as the callback's setup requires.

    Warns:
        DeclaredWeightsWarning: there is no class to build, or building it failed; the declaration is then read
            from ``init_args`` and ``__init__`` defaults alone, so weights set in ``__init__`` are not known.

    Raises:
        StageConfigError: the class path cannot be imported (naming it and the error), ``model_class`` names another
            class than the section's own ``class_path``, or the schedule distills and the class is no
            ``DistillationModule``.

    Example::

        >>> with warnings.catch_warnings(record=True) as caught:
        ...     declared_by_model({"loss_weights": {"bce": 1.0}})  # no class: init args only
        ({'loss_weights': {'bce': 1.0}, 'distillation': None, 'lambda_coef': None}, False)
        >>> caught[0].category.__name__
        'DeclaredWeightsWarning'
    """
    init_args = dict(model.get("init_args") or {}) if isinstance(model.get("init_args"), Mapping) else {}
    for key, value in model.items():  # jsonargparse also accepts init args next to class_path
        if key not in ("class_path", "init_args", "dict_kwargs"):
            init_args.setdefault(key, value)
    if (isinstance(model.get("class_path"), str) and model_class not in (None, model["class_path"])
            and not (import_modules and _same_class(model["class_path"], model_class))):  # else ignored
        raise StageConfigError(StageProblem(f"the config's model.class_path ({model['class_path']}) is the class; "
                                            "`--model` goes with a config that names none", name="config",
                                            field="model", value=str(model_class)))
    class_path = model.get("class_path") if isinstance(model.get("class_path"), str) else model_class
    if not import_modules:  # the caller says so (the CLI prints its --no-import note)
        return _static(None, init_args), False
    if class_path is None:
        warnings.warn("the config names no model class (`model.class_path`), so the loss weights its module sets in "
                      "__init__ are not known; pass `--model package.module.Class` to check them; checked the rest",
                      DeclaredWeightsWarning, stacklevel=2)
        return _static(None, init_args), False
    cls, problems = import_class_path(class_path, "model.class_path" if "class_path" in model else "--model")
    if problems:
        raise StageConfigError(problems)
    if needed_by is not None and isinstance(cls, type) and not issubclass(cls, DistillationModule):  # as fit says
        raise StageConfigError(StageProblem(
            f"distillation is requested but {cls.__name__} is not a DistillationModule; write `class {cls.__name__}"
            "(DistillationModule, LightningModule)` and override configure_teachers()", name=needed_by,
            field="distillation", value=True))
    try:
        module = _build(cls, init_args)  # type: ignore[arg-type]
    except (Exception, SystemExit) as err:  # __init__ may need files, data or a network (or exit): say so, go on
        warnings.warn(f"could not build {class_path} from the config to read the loss weights it declares in "
                      f"__init__ ({type(err).__name__}: {err}); read them from init_args and defaults only; checked "
                      "the rest", DeclaredWeightsWarning, stacklevel=2)
        return _static(cls, init_args), False
    return declared_settings(getattr(module, "loss_weights", None), getattr(module, "use_distillation", None),
                             getattr(module, "lambda_coef", None)), True


def _same_class(path: str, other: Optional[str]) -> bool:
    """Whether the class paths ``path`` and ``other`` import as one class (``pkg.Net`` and ``pkg.models.Net``)."""
    first, first_problems = import_class_path(path, "model.class_path")
    second, second_problems = import_class_path(str(other), "--model")
    return not first_problems and not second_problems and first is second


def as_the_parser_reads(cls: type, init_args: Mapping[str, Any]) -> dict[str, Any]:
    """A callback's ``init_args`` with every value ``LightningCLI``'s parser converts converted as it does (a YAML
    string ``"0.5"`` where a float is typed, ``"true"`` for a bool), argument by argument and stage by stage of
    ``stage_schedule``; a value the parser refuses is kept as given, for the library's checks to name.

    Example::

        >>> from lightning_stages import StageScheduleCallback
        >>> as_the_parser_reads(StageScheduleCallback, {"lambda_coef": "0.5", "distillation": "maybe",
        ...                                             "stage_schedule": [{"start_epoch": "2"}]})
        {'lambda_coef': 0.5, 'distillation': 'maybe', 'stage_schedule': [{'start_epoch': 2}]}
    """
    try:
        from jsonargparse import ArgumentParser
    except ImportError:  # the `cli` extra is not installed: the values as given
        return dict(init_args)
    from lightning_stages.schedule.stage import Stage

    def parser(target: type) -> Any:
        built = ArgumentParser(exit_on_error=False)
        built.add_class_arguments(target, "x", fail_untyped=False)
        return built

    def converted(built: Any, values: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            parsed = built.parse_object({"x": dict(values)}).x.as_dict()
        except Exception:  # the parser refuses it: the library's checks say why, in its words; the other values of
            if len(values) == 1:  # a stage are still read as the parser reads them, each on its own
                return values
            return {key: converted(built, {key: value}).get(key, value) for key, value in values.items()}
        return {key: strings_converted(value, parsed.get(key, value)) for key, value in values.items()}

    def strings_converted(given: Any, parsed: Any) -> Any:  # the rest as given, so a message shows it as written
        if isinstance(given, Mapping) and isinstance(parsed, Mapping):
            return {key: strings_converted(value, parsed.get(key, value)) for key, value in given.items()}
        return parsed if isinstance(given, str) else given

    out = dict(init_args)
    arguments = parser(cls)
    for key, value in init_args.items():
        if key == "stage_schedule" and isinstance(value, list):
            stages = parser(Stage)
            out[key] = [converted(stages, s) if isinstance(s, Mapping) else s for s in value]
        elif isinstance(key, str):
            out[key] = converted(arguments, {key: value}).get(key, value)
    return out
