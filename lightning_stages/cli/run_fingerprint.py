"""The fingerprint of a ``compare`` run: what its result depends on, so that a changed input is never reused.

:func:`config_fingerprint` hashes the config (and ``--stages`` file) as parsed YAML, so comments do not count; the
content of every file they name (a teacher checkpoint), relative to the working directory or to the config's folder;
what a named YAML file (a nested config, ``model: model.yaml``) names in turn; and the source of your own classes:
a config names its model, data module and callbacks by ``class_path``, and where the module a ``class_path`` names
lies in the working directory (your project, not an installed package), that module's source file counts, so editing
the model's code makes the finished runs of that config stale, as editing the config does. So do the modules of the
working directory that it imports, read from their source (``import``/``from ... import`` statements, relative ones
resolved, in functions too), and theirs in turn, and the packages they lie in: a helper module the model imports
counts like the model's own. Installed packages never count (their versions are saved with each result).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import yaml

__all__ = ["config_fingerprint", "config_fingerprints", "run_fingerprints", "source_digests"]

_FORMAT = 1

_INSTALLED = ("site-packages", "dist-packages")


#: keys whose value LightningCLI also takes as a bare class path (``model: my_models.Net``, ``callbacks: [a.B]``)
_CLASS_KEYS = ("model", "data", "callbacks", "logger", "optimizer", "lr_scheduler", "plugins")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _class_paths(value: Any, key: Any = None) -> Iterator[str]:
    if isinstance(value, dict):
        for name, item in value.items():
            if name == "class_path" and isinstance(item, str):
                yield item
            else:
                yield from _class_paths(item, name)
    elif isinstance(value, list):
        for item in value:
            yield from _class_paths(item, key)
    elif (key in _CLASS_KEYS and isinstance(value, str) and _DOTTED.fullmatch(value)
          and not value.lower().endswith(_NESTED)):  # model: model.yaml is a nested config, not a class
        yield value


@functools.lru_cache(maxsize=1)  # read for every module followed
def _python_paths() -> list[Path]:
    """Where this Python's standard library and installed packages lie (a conda env inside the project, too)."""
    paths = sysconfig.get_paths()
    return [Path(paths[key]).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]


def _project_spec(module: str, project: Path) -> tuple[Optional[Path], bool]:
    """The source file of ``module`` if it lies in ``project`` (not in an installed package there, a venv, nor in
    this Python's own library), and whether it is a package of the project (a folder without ``__init__.py`` too),
    whose submodules a ``from package import name`` may name."""
    try:
        spec = importlib.util.find_spec(module)
    except (Exception, SystemExit):  # a parent package that cannot be imported (any error, sys.exit): the run says
        return None, False
    if spec is None:
        return None, False
    places = [spec.origin] if spec.origin and spec.origin.endswith(".py") else []
    places += list(spec.submodule_search_locations or [])
    local = []
    for place in places:
        named = Path(os.path.abspath(place))  # a module linked into the project from elsewhere lies in it too
        path = named.resolve()
        if not (path.is_relative_to(project) or named.is_relative_to(project) or named.is_relative_to(Path.cwd())):
            continue
        if any(part in _INSTALLED for part in (*path.parts, *named.parts)):
            continue
        if any(path.is_relative_to(python) for python in _python_paths()):
            continue
        local.append(place)
    source = Path(os.path.abspath(spec.origin)).resolve() if spec.origin in local else None
    return source, bool(spec.submodule_search_locations) and any(p != spec.origin for p in local)


_MAX_MODULES = 2000  # project modules followed through their imports, at most


def _imports(source: Path, module: str) -> list[str]:
    """The modules the source file of ``module`` imports, as absolute names (relative imports resolved); ``from a
    import b`` gives ``a`` and ``a.b`` (``b`` may be a submodule). A file that does not parse imports nothing."""
    try:
        stat = source.stat()
        return list(_parsed_imports(str(source), module, stat.st_mtime_ns, stat.st_size))
    except OSError:
        return []


@functools.lru_cache(maxsize=4096)  # each config of a comparison follows the same modules: each file parsed once
def _parsed_imports(source: str, module: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        tree = ast.parse(Path(source).read_bytes(), filename=source)
    except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
        return ()
    package = module.split(".") if Path(source).name == "__init__.py" else module.split(".")[:-1]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > len(package):  # beyond the top package (`from .. import` in a top module): refused
                continue
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            if target:
                names.append(target)
                names += [f"{target}.{alias.name}" for alias in node.names if alias.name != "*"]
    return tuple(names)


def _in_project(top: str, project: Path) -> bool:
    """Whether the top-level module or package ``top`` lies in ``project`` (found without importing anything)."""
    return any(_project_spec(top, project))  # a project module named like one of the library's (trace.py) counts


def _parents(module: str) -> list[str]:
    """``a``, ``a.b`` for ``a.b.c``: the packages importing it runs."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def source_digests(configs: Iterable[Any], imported: bool = True) -> dict[str, str]:
    """``{module: sha256 of its source}`` of each module in the working directory that a ``class_path`` names and,
    with ``imported``, of the working directory's modules they import, through their imports in turn, and the
    packages those lie in (``imported=False``: the named modules only, the fingerprint of results saved before
    imports counted).

    Example::

        >>> import os, tempfile, pathlib
        >>> here = os.getcwd()
        >>> os.chdir(tempfile.mkdtemp())
        >>> _ = pathlib.Path("my_model_module.py").write_text("class Net: pass")
        >>> import sys; sys.path.insert(0, os.getcwd())
        >>> list(source_digests([{"model": {"class_path": "my_model_module.Net"}},
        ...                      {"trainer": {"callbacks": [{"class_path": "lightning_stages.StageScheduleCallback"}]}}]))
        ['my_model_module']
        >>> _ = sys.path.pop(0); os.chdir(here)
    """
    project = Path.cwd().resolve()
    found: dict[str, str] = {}
    configs = list(configs)
    pending = [class_path.rpartition(".")[0] for config in configs for class_path in _class_paths(config)]
    named = set(pending)
    if imported:  # any value that reads as an import path (LightningCLI turns `fn: my_fns.score` into the function
        # for a Callable argument, whatever the key), followed like an import: only into the project
        pending += [name for config in configs for value in _named(config)
                    if _DOTTED.fullmatch(value) and not value.lower().endswith(_NESTED)
                    for name in (value.rpartition(".")[0], value)]
    local: dict[str, bool] = {}  # top-level name -> whether it lies in the project
    sources: dict[str, Optional[Path]] = {}  # module -> its source file in the project, None: not there
    packages: set[str] = set()  # the project's packages met (a folder without __init__.py too)
    while pending:
        module = pending.pop(0)
        if not module or module in sources:
            continue
        if len(found) >= _MAX_MODULES:
            warnings.warn(f"compare: the configs' classes import more than {_MAX_MODULES} modules of the working "
                          "directory; the others do not count in the runs' fingerprint, so an edit of one of them "
                          "reuses the finished runs: use --fresh after such an edit", UserWarning, stacklevel=2)
            break
        parent = module.rpartition(".")[0]
        if module not in named:  # an import: followed only into the project, so nothing installed is imported
            top = module.partition(".")[0]
            if top not in local:
                local[top] = _in_project(top, project)
            # `from a import b` names a.b, a submodule only if a is a package (else b is a name in a: not looked up)
            if not local[top] or (parent in sources and parent not in packages):
                sources[module] = None
                continue
        source, package = _project_spec(module, project)
        sources[module] = source
        if package:
            packages.add(module)
        if source is None:
            continue
        with contextlib.suppress(OSError):
            found[module] = hashlib.sha256(source.read_bytes()).hexdigest()
        if imported:
            pending += [*_imports(source, module), *_parents(module)]
    return found


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _named(value: Any) -> Iterator[str]:
    """Every string in parsed YAML that could name a file."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _named(item)
    elif isinstance(value, list):
        for item in value:
            yield from _named(item)
    elif isinstance(value, str) and 0 < len(value) < 4096 and "\n" not in value:
        yield value


_NESTED = (".yaml", ".yml", ".json")  # a named file read as a config of its own (``model: model.yaml``)


def _referenced_files(value: Any, base: Optional[Path] = None, seen: Optional[set[Path]] = None,
                      parsed: Optional[list[Any]] = None, contents: bool = True) -> dict[str, str]:
    """``{name: sha256}`` of every string in a config that names an existing file (a teacher checkpoint, say).

    A name counts relative to the working directory and, where it names another file there, relative to ``base``
    (the config's folder, where LightningCLI reads a nested config file ``model: model.yaml`` from); a named YAML or
    JSON file's own names count too, relative to its folder (``model.yaml > teacher.ckpt``); its parsed content is
    added to ``parsed``. Without ``contents`` no file is hashed (``""`` for each): the nested configs alone are read.
    """
    seen = set() if seen is None else seen
    found: dict[str, str] = {}
    for name in _named(value):
        here = Path(name) if Path(name).is_absolute() else Path.cwd() / name
        candidates = [("", here)] + ([("in the config's folder: ", base / name)] if base is not None
                                     and not Path(name).is_absolute() else [])
        for prefix, path in candidates:
            try:
                if not path.is_file() or (prefix and here.is_file() and here.resolve() == path.resolve()):
                    continue
                found[prefix + name] = _file_digest(path) if contents else ""
                resolved = path.resolve()
                if resolved.suffix.lower() in _NESTED and resolved not in seen and path.stat().st_size < 1 << 20:
                    seen.add(resolved)
                    nested = yaml.safe_load(path.read_text(encoding="utf-8"))
                    json.dumps(nested, default=str)  # an alias inside its own anchor (ValueError), too deep: bytes only
                    if parsed is not None:
                        parsed.append(nested)
                    for key, digest in _referenced_files(nested, resolved.parent, seen, parsed).items():
                        found[f"{prefix}{name} > {key}"] = digest
            except (OSError, ValueError, RecursionError, yaml.YAMLError):  # the file counts by its bytes only
                pass
    return found


def config_fingerprint(config: Union[str, os.PathLike], stages: Optional[Union[str, os.PathLike]] = None,
                       code: bool = True) -> str:
    """A hash of what a run of this config depends on: the config, the ``--stages`` file, the files they name and
    (``code``) the source of the modules in the working directory that their ``class_path`` s name and import.

    The YAML is hashed as parsed data, so comments and formatting do not count; a file named in it (such as a
    teacher checkpoint, relative to the working directory or to the config's folder) counts by its content, and a
    YAML or JSON file named in it (a nested config, ``model: model.yaml``) by what it names too.

    Example::

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.yaml").write_text("trainer: {max_epochs: 2}  # two")
        >>> _ = (d / "b.yaml").write_text("trainer:\\n  max_epochs: 2\\n")
        >>> config_fingerprint(d / "a.yaml") == config_fingerprint(d / "b.yaml")
        True
        >>> _ = (d / "b.yaml").write_text("trainer: {max_epochs: 3}")
        >>> config_fingerprint(d / "a.yaml") == config_fingerprint(d / "b.yaml")
        False
    """
    with_code, _, without_code = config_fingerprints(config, stages)
    return with_code if code else without_code


def config_fingerprints(config: Union[str, os.PathLike],
                        stages: Optional[Union[str, os.PathLike]] = None) -> tuple[str, str, str]:
    """:func:`config_fingerprint` with ``code``, with the code of the modules named by ``class_path`` only (what
    results saved before the modules they import counted were saved under), and without ``code``, reading each named
    file once (a teacher checkpoint may be gigabytes).

    Example::

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.yaml").write_text("trainer: {max_epochs: 2}")
        >>> with_code, _, without_code = config_fingerprints(d / "a.yaml")
        >>> (with_code, without_code) == (config_fingerprint(d / "a.yaml"), config_fingerprint(d / "a.yaml", code=False))
        True
    """
    parts: dict[str, Any] = {"format": _FORMAT}
    parsed: list[Any] = []
    for key, path in (("config", config), ("stages", stages)):
        if path is None:
            continue
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        parts[key] = data
        parsed.append(data)
        parts[f"{key}_files"] = _referenced_files(data, Path(path).resolve().parent, {Path(path).resolve()}, parsed)
    without_code = _digest(parts)
    sources, named = source_digests(parsed), source_digests(parsed, imported=False)
    # only with code: a fingerprint without code is the one of results saved before code counted, and one with the
    # named modules only that of results saved before the modules they import counted
    with_code = _digest({**parts, "code": sources}) if sources else without_code
    return with_code, (_digest({**parts, "code": named}) if named else without_code), without_code


def run_fingerprints(config: Path, stages: Optional[str]) -> tuple[str, ...]:
    """:func:`config_fingerprints`, or for a config that cannot be read or parsed a fingerprint of its bytes: its
    runs fail, and are never reused. The first is the fingerprint a run is saved under; the others match only a
    result an earlier version saved (see :func:`~lightning_stages.cli.run_store.load_result`)."""
    try:
        return config_fingerprints(config, stages)
    except (OSError, ValueError, yaml.YAMLError):
        data = config.read_bytes() if config.is_file() else str(config).encode()
        return ("unreadable-" + hashlib.sha256(data).hexdigest()[:16],)


def _str_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    return [_str_keys(v) for v in value] if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    """What JSON has no type for: a set (``!!set``) as its sorted items (its order changes between processes)."""
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


def _digest(parts: dict[str, Any]) -> str:
    try:
        text = json.dumps(parts, sort_keys=True, default=_plain)
    except TypeError:  # keys that do not sort together ({0: 1.0, background: 0.5}): sorted as strings
        text = json.dumps(_str_keys(parts), sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
