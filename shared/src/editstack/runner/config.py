"""Benchmark run configuration: defaults < the YAML file < command-line flags.

Every field has a default (the built-in sample on the embedded tiny models through the local
sockets `scripts/run-local` starts), so an empty file is a valid config. Everything is checked
once, here, when the config loads: unknown keys and out-of-range values are errors naming their
path (`$.scorer.items_per_request`), never ignored or clamped later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from editstack.errors import ConfigError
from editstack.wire.protocol import JudgeMode
from editstack.wire.transport import check_endpoint, default_endpoint

# msgspec checks these bounds during `convert`, and its error names the offending path
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class EditorConfig(msgspec.Struct, forbid_unknown_fields=True):
    """How the runner uses the editor services; None sampling values take the service's defaults."""

    endpoints: list[str] = msgspec.field(default_factory=lambda: [default_endpoint("editor")])
    # items the runner puts in one edit request; the editor's EDITOR_BATCH_SIZE is its own,
    # separate per-forward-pass size (how many of those items one pipeline call edits)
    items_per_request: AtLeastOne = 4
    timeout_s: Seconds = 300.0  # one request's reply wait before the client resends
    retries: NonNegativeInt = 1  # resends per call (Lazy Pirate)
    deadline_s: Seconds = 600.0  # how long a batch keeps trying an unavailable service before it fails
    steps: AtLeastOne | None = None
    guidance: NonNegativeFloat | None = None
    negative_prompt: str | None = None
    seed: NonNegativeInt = 0  # base seed; each item's seed is derived from it and the item id
    width: AtLeastOne | None = None  # set both width and height, or neither
    height: AtLeastOne | None = None


# the benchmarks' own ways of judging and reporting (runner/protocols.py)
ProtocolId = Literal["viescore", "gedit", "kris", "rise", "imgedit"]


class ScorerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """How the runner uses the scorer services; None mode takes the service's default; None protocol
    is the dataset's own (viescore for manifests and the sample), and None rubric the protocol's."""

    endpoint: str = msgspec.field(default_factory=lambda: default_endpoint("scorer"))  # one scorer
    endpoints: list[str] = []  # several scorers sharing the items; empty = [endpoint]
    # items the runner puts in one score request; the scorer's SCORER_BATCH_SIZE is its own,
    # separate per-forward-pass size (how many of those items one model call judges)
    items_per_request: AtLeastOne = 4
    timeout_s: Seconds = 300.0
    retries: NonNegativeInt = 1
    deadline_s: Seconds = 600.0
    mode: JudgeMode | None = None
    protocol: ProtocolId | None = None
    rubric: str | None = None  # with the viescore protocol: a rubric other than the scorer's default
    # generate mode: sampled judgements per item (the scorer allows 1..16; more than 1 needs generate mode)
    judge_repeats: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1

    def __post_init__(self) -> None:
        if not self.endpoints:
            self.endpoints = [self.endpoint]
        elif self.endpoint == default_endpoint("scorer"):  # recorded as the first, not a socket nobody uses
            self.endpoint = self.endpoints[0]


class CurveConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The runner's keys for tcp services that require CURVE (`editstack keys DIR` makes both files);
    paths only: no key is ever written into a run folder."""

    client_key: str | None = None  # the runner's key pair, e.g. DIR/client.key_secret
    server_key: str | None = None  # the services' public key, e.g. DIR/server.key (rendezvous entries bring theirs)


class RendezvousConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Services that publish their endpoints in a folder (a Slurm job's): the runner waits for this
    many of each there, up to connect_timeout_s, and uses them instead of the configured endpoints."""

    folder: str | None = None
    editors: AtLeastOne = 1
    scorers: AtLeastOne = 1


class RunConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One benchmark run."""

    dataset: str = "sample"
    categories: list[str] = []
    limit: NonNegativeInt | None = None
    limit_per_category: NonNegativeInt | None = None  # the first N of every category: a small slice of each
    strict: bool = False
    run_dir: str = "runs/latest"
    only: Literal["edit", "score"] | None = None
    edits: str | None = None  # with only=score: a run folder, a <category>/<id>.png folder or a benchmark layout
    queue_batches: AtLeastOne = 2  # edited batches waiting for the scorer (back-pressure)
    # before a run starts: a service that never answered stops it after connect_timeout_s; one that
    # answers "loading" (a real checkpoint downloading) is waited for up to load_timeout_s
    connect_timeout_s: Seconds = 60.0
    load_timeout_s: Seconds = 3600.0
    editor: EditorConfig = msgspec.field(default_factory=EditorConfig)
    scorer: ScorerConfig = msgspec.field(default_factory=ScorerConfig)
    curve: CurveConfig = msgspec.field(default_factory=CurveConfig)
    rendezvous: RendezvousConfig = msgspec.field(default_factory=RendezvousConfig)


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The file's values over the defaults, then `overrides` (dotted keys, e.g. "editor.items_per_request")."""
    source = f"config {path or '(defaults)'}"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping, got {type(loaded).__name__}")
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
        raise ConfigError(f"{source}: {exc}") from exc
    _check_combinations(config, source)
    return config


def _check_combinations(config: RunConfig, source: str) -> None:
    """What msgspec's per-field constraints cannot say: endpoint schemes and rules across keys."""
    endpoints = {f"editor.endpoints[{i}]": endpoint for i, endpoint in enumerate(config.editor.endpoints)}
    endpoints["scorer.endpoint"] = config.scorer.endpoint
    endpoints |= {f"scorer.endpoints[{i}]": endpoint for i, endpoint in enumerate(config.scorer.endpoints)}
    for key, endpoint in endpoints.items():
        try:
            check_endpoint(endpoint)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from exc
    if config.scorer.endpoint not in (default_endpoint("scorer"), *config.scorer.endpoints):
        raise ConfigError(f"{source}: scorer.endpoint {config.scorer.endpoint!r} is not among scorer.endpoints: "
                          "set one of them")
    curve = config.curve
    if curve.server_key and not curve.client_key:
        raise ConfigError(f"{source}: curve.server_key needs curve.client_key (the runner's .key_secret file)")
    if curve.client_key and not (curve.server_key or config.rendezvous.folder):
        raise ConfigError(f"{source}: curve.client_key needs curve.server_key (the services' .key file) or a "
                          "rendezvous.folder whose services publish theirs")
    if (config.editor.width is None) != (config.editor.height is None):
        raise ConfigError(f"{source}: editor.width and editor.height must be set together "
                          f"(got width={config.editor.width}, height={config.editor.height})")
    if config.only == "score" and not config.edits:
        raise ConfigError(f"{source}: only=score needs edits: the folder of existing edits to score")
    if not config.editor.endpoints and config.only != "score":
        raise ConfigError(f"{source}: editor.endpoints is empty")


def to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (what the run folder records)."""
    return yaml.safe_dump(msgspec.to_builtins(config), sort_keys=False, allow_unicode=True)
