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

from lightning_stages.cli.run_fingerprint import _digest, _referenced_files, source_digests

__all__ = ["edit_fingerprint"]


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
        >>> _ = config.write_text("data: {cache_file: other.pt}\\nmodel: model.yaml")
        >>> edit_fingerprint(config, None) == before
        False
        >>> _ = (d / "model.yaml").write_text("init_args: {lr: 0.1}")
        >>> with_model = edit_fingerprint(config, None)
        >>> _ = (d / "model.yaml").write_text("init_args: {lr: 0.3}")  # a nested config edited
        >>> edit_fingerprint(config, None) == with_model
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
        # the config files it names, read into `parsed` (the other files it names: not read)
        _referenced_files(data, Path(path).resolve().parent, {Path(path).resolve()}, parsed, contents=False)
    return _digest({**parts, "nested": parsed, "code": source_digests(parsed)})
