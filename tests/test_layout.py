"""The layout's rules, read from the source (not by importing it), and the public surface a user relies on.

- ``lightning_stages/schedule/`` imports neither torch nor lightning, not even through the package modules it imports.
- ``lightning_stages/distillation/`` imports nothing from ``schedule/``, ``cli/`` or the callback, directly or not.
- No module in ``lightning_stages/`` is longer than 350 lines.
- Every name in ``lightning_stages.__all__``, the imports the README shows and the console script resolve.
- A test that starts a DDP worker script gives it the checkout on ``PYTHONPATH`` (``conftest.ddp_env``).

Imports are found with ``ast`` anywhere in a module (inside functions and ``if TYPE_CHECKING:`` too) and followed
through the package's own modules. The parents of an imported module are not followed: importing
``lightning_stages.schedule.stage`` runs ``lightning_stages/__init__.py``, which gathers every wing's public names,
so a wing that imports the top-level package itself (``from lightning_stages import X``) is caught, one that imports
a sibling module is not.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import lightning_stages
from lightning_stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_stages"
MAX_LINES = 350
TORCH_OR_LIGHTNING = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")
NOT_FROM_DISTILLATION = ("lightning_stages.schedule", "lightning_stages.cli", "lightning_stages.stage_schedule_callback")


# ---------------------------------------------------------------------------------------------- reading imports


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``package`` (a package is its ``__init__.py``)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``path`` (module ``name``) imports, absolute: ``from a import b`` gives ``a``, and ``a.b`` when that
    is a module of the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from .. import y
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known)
    return found


def import_chains(start: str, known: dict[str, Path]) -> Iterator[list[str]]:
    """Every import reachable from module ``start`` with the chain that reaches it: ``[start, ..., imported]``, each
    module of the package followed once."""
    seen = {start}
    todo = [[start]]
    while todo:
        chain = todo.pop()
        for imported in sorted(imported_modules(chain[-1], known[chain[-1]], known)):
            yield [*chain, imported]
            if imported in known and imported not in seen:
                seen.add(imported)
                todo.append([*chain, imported])


def _is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def forbidden_chains(wing: str, forbidden: tuple[str, ...], known: dict[str, Path]) -> list[str]:
    """``"a -> b -> torch"`` for every module of ``wing`` that reaches a ``forbidden`` module (up to the first one)."""
    return sorted(
        " -> ".join(chain)
        for name in known if _is_under(name, (wing,))
        for chain in import_chains(name, known)
        if _is_under(chain[-1], forbidden) and not any(_is_under(m, forbidden) for m in chain[:-1])
    )


def test_the_import_reader_sees_relative_lazy_and_indirect_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "wing").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("def f():\n    import torch.nn as nn\n")
    (pkg / "wing" / "__init__.py").write_text("from .a import x\n")
    (pkg / "wing" / "a.py").write_text("from .. import helper\nfrom ..wing import b\nx = 1\n")
    (pkg / "wing" / "b.py").write_text("import json\n")
    known = module_files(pkg)
    assert set(known) == {"pkg", "pkg.helper", "pkg.wing", "pkg.wing.a", "pkg.wing.b"}
    assert imported_modules("pkg.wing.a", known["pkg.wing.a"], known) == {"pkg", "pkg.helper", "pkg.wing", "pkg.wing.b"}
    assert forbidden_chains("pkg.wing", ("torch",), known) == [
        "pkg.wing -> pkg.wing.a -> pkg.helper -> torch.nn",
        "pkg.wing.a -> pkg.helper -> torch.nn",
    ]
    assert forbidden_chains("pkg.wing", ("json",), known) == [
        "pkg.wing -> pkg.wing.a -> pkg.wing.b -> json", "pkg.wing.a -> pkg.wing.b -> json", "pkg.wing.b -> json",
    ]


# ---------------------------------------------------------------------------------------------- the rules


def test_the_schedule_wing_imports_neither_torch_nor_lightning():
    known = module_files()
    assert any(_is_under(name, ("lightning_stages.schedule",)) for name in known)
    chains = forbidden_chains("lightning_stages.schedule", TORCH_OR_LIGHTNING, known)
    assert chains == [], "\n".join(chains)


def test_the_distillation_wing_imports_nothing_of_the_schedule_the_cli_or_the_callback():
    known = module_files()
    assert any(_is_under(name, ("lightning_stages.distillation",)) for name in known)
    chains = forbidden_chains("lightning_stages.distillation", NOT_FROM_DISTILLATION, known)
    assert chains == [], "\n".join(chains)


@pytest.mark.parametrize(
    "path", [pytest.param(path, id=str(path.relative_to(PACKAGE))) for path in sorted(PACKAGE.rglob("*.py"))]
)
def test_no_module_is_longer_than_350_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it by concept"


# ---------------------------------------------------------------------------------------------- the public surface


def test_every_name_in_all_imports():
    assert lightning_stages.__all__, "lightning_stages.__all__ is empty"
    for name in lightning_stages.__all__:
        namespace: dict = {}
        exec(f"from lightning_stages import {name}", namespace)
        assert namespace[name] is getattr(lightning_stages, name)


@pytest.mark.parametrize(
    "statement",
    [
        "from lightning_stages import DistillationModule, StageScheduleCallback, StageSchedule, Stage, ResolvedStage, "
        "StageConfigError, StageProblem, DistillationStepError, TeacherCache, IndexedDataset, load_teacher_checkpoint",
        "from lightning_stages.losses import FeatureAdapter, feature_mse, logit_kd, mask_kd",
        "from lightning_stages.cli import main, StagesLightningCLI",
    ],
)
def test_the_public_imports_work(statement):
    namespace: dict = {}
    exec(statement, namespace)
    names = statement.split(" import ")[1].split(", ")
    assert all(namespace[name] is not None for name in names)


def _readme_imports() -> list[str]:
    pattern = re.compile(r"^\s*(from lightning_stages[\w.]* import [\w, ]+|import lightning_stages[\w.]*)\s*$", re.M)
    return sorted(set(pattern.findall((ROOT / "README.md").read_text())))


def test_every_import_the_readme_shows_works():
    statements = _readme_imports()
    assert "from lightning_stages import DistillationModule, StageScheduleCallback" in statements
    for statement in statements:
        exec(statement, {})


def test_the_console_script_resolves_to_the_cli_main():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lightning-stages": "lightning_stages.cli:main"}
    module, _, attr = scripts["lightning-stages"].partition(":")
    entry = getattr(importlib.import_module(module), attr)
    assert entry is main
    with pytest.raises(SystemExit) as exit_info:
        entry(["--help"])
    assert exit_info.value.code == 0


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Project layout"):]
    layout = layout[: layout.index("\n```\n", layout.index("```") + 3)]
    missing = [
        str(path.relative_to(ROOT)) for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.name)}\b", layout)
    ] + [f"{wing}/" for wing in ("schedule", "distillation", "cli") if f"  {wing}/" not in layout]
    assert missing == [], f"README.md's project layout does not name {missing}"


def test_every_worker_script_started_by_a_test_gets_the_checkout_on_its_path():
    """A test that starts a Python subprocess with its own environment builds it with ``conftest.ddp_env`` (or passes
    ``PYTHONPATH`` itself): CI installs the package but not ``examples``/``tests``, so a worker that inherits only
    ``os.environ`` cannot import them."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text()
        if path.name != "conftest.py" and "MASTER_PORT" in text and "PYTHONPATH" not in text:
            offenders.append(path.name)
    assert not offenders, f"build the worker's environment with conftest.ddp_env(): {offenders}"
