"""What a user may edit while ``compare`` runs, and a run then reads: :func:`edit_fingerprint`.

``compare`` takes each config's :func:`~lightning_stages.cli.run_fingerprint.run_fingerprints` once, before any run,
and saves every finished run under it. A run reads its config when it starts, so a config edited in between would
be trained and saved under the fingerprint of the config as it was. After each run, ``compare`` takes this
fingerprint again: the config and ``--stages`` file as parsed, the config files they name (``model: model.yaml``),
and the code of the modules they name and import. Not the other files they name: a run may write a file its config
names (a data module's cache, a callback's predictions), which is no edit of the user's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from lightning_stages.cli.run_fingerprint import _NESTED, _digest, _named, source_digests

__all__ = ["edit_fingerprint"]

_MAX_NESTED = 64  # config files named by config files, at most (a file naming itself, or one another, counts once)


def _parsed_configs(data: Any, folder: Path, parsed: list[Any], seen: set[Path]) -> None:
    """Add to ``parsed`` the content of each YAML or JSON file that a string in ``data`` names (relative to the
    working directory, or to ``folder``, the naming file's folder), and of the files those name in turn."""
    for name in _named(data):
        if not name.lower().endswith(_NESTED) or len(seen) >= _MAX_NESTED:
            continue
        for path in (Path(name), folder / name):
            try:
                resolved = path.resolve()
                if resolved in seen or not resolved.is_file() or resolved.stat().st_size >= 1 << 20:
                    continue
                seen.add(resolved)
                nested = yaml.safe_load(resolved.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError, yaml.YAMLError):
                continue
            parsed.append(nested)
            _parsed_configs(nested, resolved.parent, parsed, seen)


def edit_fingerprint(config: Path, stages: Optional[str]) -> str:
    """A hash of what a user edits and a run reads: the config and ``stages`` file as parsed, the config files they
    name, and the code of the modules they name and import (a config that cannot be read: its bytes).

    Example::

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> config = d / "a.yaml"
        >>> _ = config.write_text(f"data: {{cache_file: {d / 'cache.pt'}}}")
        >>> before = edit_fingerprint(config, None)
        >>> _ = (d / "cache.pt").write_bytes(b"written by the run")
        >>> edit_fingerprint(config, None) == before
        True
        >>> _ = config.write_text("data: {cache_file: other.pt}")
        >>> edit_fingerprint(config, None) == before
        False
    """
    parts: dict[str, Any] = {}
    parsed: list[Any] = []
    for key, path in (("config", config), ("stages", stages)):
        if path is None:
            continue
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            parts[key] = repr(Path(path).read_bytes() if Path(path).is_file() else None)
            continue
        parts[key] = data
        parsed.append(data)
        _parsed_configs(data, Path(path).resolve().parent, parsed, {Path(path).resolve()})
    return _digest({**parts, "nested": parsed, "code": source_digests(parsed)})
