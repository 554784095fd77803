"""Benchmark run configuration: defaults < the YAML file < command-line flags.

Every field has a default (the built-in sample on the embedded tiny models through the local
sockets `scripts/run-local` starts), so an empty file is a valid config. Unknown keys are errors,
reported with their path (`$.scorer.batch_size`), never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from editstack.errors import ConfigError


class EditorConfig(msgspec.Struct, forbid_unknown_fields=True):
    """How the runner uses the editor services; None sampling values take the service's defaults."""

    endpoints: list[str] = msgspec.field(default_factory=lambda: ["ipc:///tmp/editstack/editor.sock"])
    batch_size: int = 4
    timeout_s: float = 300.0  # one request's reply wait before the client resends
    retries: int = 1  # resends per call (Lazy Pirate)
    deadline_s: float = 600.0  # how long a batch keeps trying an unavailable service before it fails
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    seed: int = 0  # base seed; each item's seed is derived from it and the item id
    width: int | None = None
    height: int | None = None


class ScorerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """How the runner uses the scorer service; None mode/rubric take the service's defaults."""

    endpoint: str = "ipc:///tmp/editstack/scorer.sock"
    batch_size: int = 4
    timeout_s: float = 300.0
    retries: int = 1
    deadline_s: float = 600.0
    mode: Literal["logits", "generate"] | None = None
    rubric: str | None = None


class RunConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One benchmark run."""

    dataset: str = "sample"
    categories: list[str] = []
    limit: int | None = None
    strict: bool = False
    run_dir: str = "runs/latest"
    only: Literal["edit", "score"] | None = None
    edits: str | None = None  # with only=score: a run folder or a <category>/<id>.png folder
    queue_batches: int = 2  # edited batches waiting for the scorer (back-pressure)
    editor: EditorConfig = msgspec.field(default_factory=EditorConfig)
    scorer: ScorerConfig = msgspec.field(default_factory=ScorerConfig)


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The file's values over the defaults, then `overrides` (dotted keys, e.g. "editor.batch_size")."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        config = msgspec.convert(data, RunConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config {path or '(defaults)'}: {exc}") from exc
    if config.only == "score" and not config.edits:
        raise ConfigError("only=score needs edits: the folder of existing edits to score")
    if not config.editor.endpoints and config.only != "score":
        raise ConfigError("editor.endpoints is empty")
    return config


def to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (what the run folder records)."""
    return yaml.safe_dump(msgspec.to_builtins(config), sort_keys=False, allow_unicode=True)
