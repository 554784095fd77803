"""Benchmark datasets: the item type, loaders that report bad items, and category selection.

Every loader returns ``(items, problems)``. An invalid item is skipped and reported as a
`Problem` naming the file, line, item, field and cause; ``strict=True`` raises a `DatasetError`
carrying every problem instead. A source that cannot be read at all (no such path, unknown file
type, unreadable parquet) raises `DatasetError` whatever `strict` says. Every image is opened
with Pillow and verified, so a run never starts on a missing or corrupt file.

Item ids are unique across a dataset (results are keyed by id) and, like category names, are
used as file names (edits go to ``edits/<category>/<id>.png``): a name that is empty, ``.`` or
``..``, or holds a path separator, a control character, or surrounding whitespace is rejected,
never rewritten.

Formats
-------
``manifest`` -- editstack's own JSON lines, one item per line; blank lines and lines starting
with ``#`` are skipped::

    id                required  string, unique, safe as a file name
    category          required  string, safe as a file name
    instruction       required  string, not blank
    source            required  image path, relative to the manifest's folder (or absolute)
    language          optional  one of LANGUAGES ("en", "zh", ...) or null
    reference         optional  reference (expected result) image path, like source, or null
    category_aliases  optional  list of other names `select` matches, e.g. ["物理"]
    metadata          optional  object, carried through to the results untouched

    {"id": "physics-1-en", "category": "physics", "instruction": "...", "source": "images/p1.png"}

Any other field is reported, so a misspelt "refrence" cannot vanish unnoticed.

``kris`` -- a KRIS-Bench folder: ``<root>/<category>/annotation.json`` keyed by item key, the
images beside it. Checked against github.com/mercurystraw/Kris_Bench: the data files
(``KRIS_Bench/physics/annotation.json``, ``viewpoint_change/``, ``temporal_prediction/``,
``multi-element_composition/``, commit 800662d) hold ``ori_img``, ``gt_img``, ``ins_en`` and
``explain_en``; its eval scripts (``metrics_common.py``, ``metrics_knowledge.py``,
``metrics_view_change.py``) join ``ori_img`` and ``gt_img`` onto ``KRIS_Bench/<category>/``.
Here ``ori_img`` is the source; ``gt_img`` the reference ("" or absent: none); ``ins_en`` the
instruction (language "en"), or ``instruction`` for older annotation files, which the scripts
at commit 2114fec read; ``explain_en`` (or ``explain``) goes to ``metadata["explain"]``. Keys
restart at "1" in every category, so the item id is ``<category>-<key>``; the key is kept in
``metadata["key"]`` (the upstream layout for edits is ``results/<model>/<category>/<key>.jpg``).
Multi-image categories (``multi-element_composition``, ``temporal_prediction``) list several
``ori_img`` files; editstack edits one source image per item, so those items are reported.

``gedit`` -- GEdit-Bench rows, as JSON lines (images in files, paths relative to the file's
folder) or as a parquet file (needs pyarrow). Checked against github.com/stepfun-ai/Step1X-Edit
``GEdit-Bench/generate_image_example.py`` and ``test_gedit_score.py``: rows hold ``key``,
``task_type``, ``instruction``, ``instruction_language`` ("en" or "cn"), ``input_image``,
``input_image_raw`` and ``Intersection_exist``; the judge compares the edit with
``input_image``, and results live at ``fullset/<task_type>/<language>/<key>.png``, one per key
and language. So: category = ``task_type``; source = ``input_image``; language "cn" reads as
"zh"; id = ``<key>-<instruction_language>``; every other column except the images goes to
``metadata``. In parquet, as Hugging Face datasets exports it, an image is a struct
``{"bytes", "path"}``: its bytes are verified and written once to
``<cache_dir>/gedit/<file stem>-<fingerprint>/<task_type>/<id>.<format>`` (the fingerprint
covers the file's path, size and mtime), so items always point at plain files.

``sample`` -- the built-in synthetic benchmark (`editstack.runner.sample`), written under
``<cache_dir>/sample`` and read as a manifest.

Detection (``load_dataset``; an explicit ``format`` overrides it): the spec ``"sample"`` is
the sample (name a folder called sample ``./sample``); a folder holding ``manifest.jsonl`` is a
manifest; a folder holding ``*/annotation.json`` is KRIS-Bench; ``.parquet`` is GEdit-Bench;
``.jsonl`` is GEdit-Bench when its first record has ``key``, ``task_type`` and
``instruction_language``, otherwise a manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from editstack.errors import DatasetError
from editstack.runner.sample import write_sample

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
FORMATS = ("manifest", "kris", "gedit", "sample")
# ISO 639-1 codes; a closed list so that a typo or "cn" is caught instead of splitting results.
LANGUAGES = frozenset({"ar", "de", "en", "es", "fr", "it", "ja", "ko", "pt", "ru", "zh"})

_MANIFEST_FIELDS = ("id", "category", "instruction", "source", "language", "reference",
                    "category_aliases", "metadata")
_GEDIT_LANGUAGES = {"en": "en", "cn": "zh"}
_GEDIT_IMAGE_COLUMNS = ("input_image", "input_image_raw")
_MAX_NAME_BYTES = 200  # leaves room for a suffix within the usual 255-byte file-name limit


@dataclass(frozen=True, slots=True)
class Item:
    """One benchmark item: edit `source` as `instruction` says; `reference` is the expected result."""

    id: str
    category: str
    instruction: str
    source: Path
    language: str | None = None
    reference: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    category_aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, value in (("id", self.id), ("category", self.category)):
            cause = _unsafe_name(value)
            if cause:
                raise ValueError(f"item {name} {value!r} {cause}")
        if self.language is not None and self.language not in LANGUAGES:
            raise ValueError(f"item {self.id!r} language {self.language!r} is not one of {sorted(LANGUAGES)}")
        if not self.instruction.strip():
            raise ValueError(f"item {self.id!r} has an empty instruction")


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one item (or one file) was skipped; ``str()`` gives ``file:line item 'x' field 'y': cause``."""

    where: Path
    line: int | None  # 1-based line (JSON lines) or row (parquet); None inside a JSON document
    item_id: str | None
    field: str | None
    cause: str

    def __str__(self) -> str:
        text = f"{self.where}:{self.line}" if self.line is not None else str(self.where)
        if self.item_id is not None:
            text += f" item {self.item_id!r}"
        if self.field is not None:
            text += f" field {self.field!r}"
        return f"{text}: {self.cause}"


LoadResult = tuple[list[Item], list[Problem]]


class _Invalid(Exception):
    """One record is invalid; the loop that reads records turns it into a Problem."""

    def __init__(self, field: str | None, cause: str) -> None:
        super().__init__(cause)
        self.field = field
        self.cause = cause


# ---- the entry point ---------------------------------------------------------------------------

def load_dataset(spec: str | Path, *, format: str | None = None, strict: bool = False,
                 cache_dir: Path | None = None) -> LoadResult:
    """Load ``"sample"``, a manifest, a KRIS-Bench folder or a GEdit-Bench export (see the module
    docstring for the detection rule); `cache_dir` holds the sample and images unpacked from
    parquet (default ``$XDG_CACHE_HOME/editstack``)."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {FORMATS}")
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    if format == "sample" or (format is None and str(spec) == "sample"):
        format, path = "sample", write_sample(cache / "sample", MANIFEST_NAME)
    else:
        path = Path(spec)
        format = format or _detect_format(path)
    if format in ("manifest", "sample"):
        items, problems = load_manifest(path / MANIFEST_NAME if path.is_dir() else path, strict=strict)
    elif format == "kris":
        items, problems = load_kris(path, strict=strict)
    else:
        items, problems = load_gedit(path, strict=strict, cache_dir=cache)
    logger.info("dataset %s (%s): %d item(s), %d problem(s)", path, format, len(items), len(problems))
    return items, problems


def select(items: Sequence[Item], categories: Sequence[str] | None = None,
           limit: int | None = None) -> list[Item]:
    """Items whose category or alias matches one of `categories` (case-insensitive), then the
    first `limit` of them overall, in dataset order. A name matching nothing raises ValueError."""
    chosen = list(items)
    if categories:
        wanted = {name.strip().casefold() for name in categories}
        matched: set[str] = set()
        chosen = []
        for item in items:
            hits = wanted & {item.category.casefold(), *(alias.casefold() for alias in item.category_aliases)}
            if hits:
                chosen.append(item)
                matched |= hits
        unknown = wanted - matched
        if unknown:
            known = sorted({_category_label(item) for item in items})
            raise ValueError(f"no category {', '.join(map(repr, sorted(unknown)))} in this dataset; "
                             f"it has: {', '.join(known)}")
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        chosen = chosen[:limit]
    return chosen


# ---- loaders -----------------------------------------------------------------------------------

def load_manifest(path: Path, *, strict: bool = False) -> LoadResult:
    """Read an editstack JSON-lines manifest (schema in the module docstring)."""
    path = Path(path)
    _require(path, "file")
    base = path.parent.absolute()
    records = ((line, _label(record, "id"), record) for line, record in _json_lines(path))
    return _finish(_collect(path, records, lambda record: _manifest_item(record, base)), strict)


def load_kris(root: Path, *, strict: bool = False) -> LoadResult:
    """Read a KRIS-Bench folder: ``<root>/<category>/annotation.json`` plus images beside it."""
    root = Path(root)
    _require(root, "folder")
    items: list[Item] = []
    problems: list[Problem] = []
    first_seen: dict[str, tuple[Path, int | None]] = {}
    for annotation in sorted(root.glob("*/annotation.json")):
        category = annotation.parent.name
        try:
            _safe(category, "category")
            entries = json.loads(annotation.read_bytes())
            if not isinstance(entries, dict):
                raise _Invalid(None, f"expected a JSON object keyed by item, got {_json_type(entries)}")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.append(Problem(annotation, None, None, None, f"malformed JSON: {exc}"))
            continue
        except _Invalid as bad:
            problems.append(Problem(annotation, None, None, bad.field, bad.cause))
            continue
        folder = annotation.parent.absolute()
        records = ((None, f"{category}-{key}", (key, entry)) for key, entry in entries.items())
        found, bad_items = _collect(annotation, records, partial(_kris_item, category, folder), first_seen)
        items += found
        problems += bad_items
    return _finish((items, problems), strict)


def load_gedit(path: Path, *, strict: bool = False, cache_dir: Path | None = None) -> LoadResult:
    """Read GEdit-Bench rows from a ``.jsonl`` export or a ``.parquet`` file (needs pyarrow)."""
    path = Path(path)
    _require(path, "file")
    base = path.parent.absolute()
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
        stat = path.stat()
        fingerprint = hashlib.sha256(f"{path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        images = (cache_dir if cache_dir is not None else _default_cache_dir()) / "gedit" / f"{path.stem}-{fingerprint}"
    else:
        rows = _json_lines(path)
        images = None
    records = ((line, _label(record, "key"), record) for line, record in rows)
    return _finish(_collect(path, records, lambda record: _gedit_item(record, base, images)), strict)


# ---- one record → one Item ---------------------------------------------------------------------

def _manifest_item(record: object, base: Path) -> Item:
    record = _object(record)
    unknown = [name for name in record if name not in _MANIFEST_FIELDS]
    if unknown:
        also = f" (also {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""
        raise _Invalid(unknown[0], f"unknown field{also}; a manifest line has {', '.join(_MANIFEST_FIELDS)}")
    item_id = _safe(_text(record, "id"), "id")
    category = _safe(_text(record, "category"), "category")
    instruction = _text(record, "instruction")
    language = _language(_optional_text(record, "language"), "language")
    aliases = record.get("category_aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise _Invalid("category_aliases", "expected a list of non-empty strings")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _Invalid("metadata", f"expected an object, got {_json_type(metadata)}")
    source = _image(base, _text(record, "source"), "source")
    reference = _optional_text(record, "reference")
    return Item(item_id, category, instruction, source, language,
                _image(base, reference, "reference") if reference is not None else None,
                metadata, tuple(aliases))


def _kris_item(category: str, folder: Path, record: tuple[str, object]) -> Item:
    key, entry = record[0], _object(record[1])
    item_id = _safe(f"{category}-{key}", "id")
    if isinstance(entry.get("ori_img"), list):
        raise _Invalid("ori_img", f"lists {len(entry['ori_img'])} images; editstack edits one source image per item")
    instruction = _text(entry, "ins_en" if "ins_en" in entry or "instruction" not in entry else "instruction")
    explain_field = "explain_en" if "explain_en" in entry else "explain"
    explain = entry.get(explain_field)
    if explain is not None and not isinstance(explain, str):
        raise _Invalid(explain_field, f"expected a string, got {_json_type(explain)}")
    source = _image(folder, _text(entry, "ori_img"), "ori_img")
    gt = entry.get("gt_img")
    if gt is not None and not isinstance(gt, str):
        raise _Invalid("gt_img", f"expected a string, got {_json_type(gt)}")
    reference = _image(folder, gt, "gt_img") if gt else None  # KRIS writes "" for "no ground truth"
    metadata: dict[str, Any] = {"key": key}
    if explain:
        metadata["explain"] = explain
    return Item(item_id, category, instruction, source, "en", reference, metadata)


def _gedit_item(record: object, base: Path, images: Path | None) -> Item:
    record = _object(record)
    key = _safe(_text(record, "key"), "key")
    category = _safe(_text(record, "task_type"), "task_type")
    instruction = _text(record, "instruction")
    raw_language = _text(record, "instruction_language")
    if raw_language not in _GEDIT_LANGUAGES:
        raise _Invalid("instruction_language",
                       f"unknown language {raw_language!r}; GEdit-Bench uses {', '.join(map(repr, _GEDIT_LANGUAGES))}")
    item_id = _safe(f"{key}-{raw_language}", "key")
    value = record.get("input_image")
    if isinstance(value, dict) and value.get("bytes") is not None:
        if images is None:
            raise _Invalid("input_image", "embedded image bytes are only read from parquet")
        source = _cached_image(images / category / item_id, value["bytes"], "input_image")
    else:
        # A struct without bytes still names its file, relative to the export's folder.
        path = value.get("path") if isinstance(value, dict) else value
        if path is None:
            raise _Invalid("input_image", "missing required field")
        if not isinstance(path, str) or not path.strip():
            raise _Invalid("input_image", f"expected an image path, got {_json_type(path)}")
        source = _image(base, path, "input_image")
    skip = {"task_type", "instruction", *_GEDIT_IMAGE_COLUMNS}
    metadata = {name: value for name, value in record.items() if name not in skip}
    return Item(item_id, category, instruction, source, _GEDIT_LANGUAGES[raw_language], None, metadata)


# ---- record sources and the loop that collects items -------------------------------------------

def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON or _Invalid) for every line that is neither blank nor a comment."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            text = raw.strip()
            if not text or text.startswith(b"#"):
                continue
            try:
                yield number, json.loads(text)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                yield number, _Invalid(None, f"malformed JSON: {exc}")


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq  # optional: only GEdit-Bench parquet files need it
    except ImportError:
        cause = "reading parquet needs pyarrow (pip install pyarrow)"
        raise DatasetError([Problem(path, None, None, None, cause)]) from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=64)  # bounded memory: images are large
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid and ArrowIOError derive from these
        raise DatasetError([Problem(path, None, None, None, f"unreadable parquet: {exc}")]) from None


def _collect(where: Path, records: Iterable[tuple[int | None, str | None, object]],
             build: Callable[[Any], Item], first_seen: dict[str, tuple[Path, int | None]] | None = None) -> LoadResult:
    """Build an Item from each (line, label for reports, record); report invalid and repeated ones.
    `first_seen` (id -> where it was first loaded) is shared when a dataset spans several files."""
    items: list[Item] = []
    problems: list[Problem] = []
    first_seen = {} if first_seen is None else first_seen
    for line, label, record in records:
        try:
            if isinstance(record, _Invalid):
                raise record
            item = build(record)
            if item.id in first_seen:
                earlier, earlier_line = first_seen[item.id]
                at = f"line {earlier_line}" if earlier == where and earlier_line else str(earlier)
                raise _Invalid("id", f"duplicate id (first at {at})")
        except _Invalid as bad:
            problems.append(Problem(where, line, label, bad.field, bad.cause))
            continue
        first_seen[item.id] = (where, line)
        items.append(item)
    return items, problems


def _finish(result: LoadResult, strict: bool) -> LoadResult:
    if strict and result[1]:
        raise DatasetError(result[1])
    return result


# ---- field checks (each raises _Invalid naming the field) --------------------------------------

def _object(record: object) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise _Invalid(None, f"expected a JSON object, got {_json_type(record)}")
    return record


def _text(record: dict[str, Any], name: str) -> str:
    value = _optional_text(record, name)
    if value is None:
        raise _Invalid(name, "missing required field")
    return value


def _optional_text(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(name, f"expected a string, got {_json_type(value)}")
    if not value.strip():
        raise _Invalid(name, "is empty")
    return value


def _safe(name: str, field_name: str) -> str:
    cause = _unsafe_name(name)
    if cause:
        raise _Invalid(field_name, f"{name!r} {cause}")
    return name


def _unsafe_name(name: object) -> str | None:
    """Why `name` cannot be used as a file name, or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a relative path component"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "contains a control character"
    if name != name.strip():
        return "has leading or trailing whitespace"
    if len(name.encode()) > _MAX_NAME_BYTES:
        return f"is longer than {_MAX_NAME_BYTES} bytes"
    return None


def _language(value: str | None, field_name: str) -> str | None:
    if value is not None and value not in LANGUAGES:
        hint = " (Chinese is 'zh')" if value.lower() in ("cn", "zh-cn", "chinese") else ""
        raise _Invalid(field_name, f"unknown language {value!r}{hint}; expected one of {', '.join(sorted(LANGUAGES))}")
    return value


def _image(base: Path, value: str, field_name: str) -> Path:
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise _Invalid(field_name, f"file not found: {value}")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error... for damaged files
        raise _Invalid(field_name, f"unreadable image {value}: {exc}") from None
    return path


def _cached_image(stem: Path, data: object, field_name: str) -> Path:
    """Verify embedded image bytes and write them once to ``stem.<format>``; return that path."""
    if not isinstance(data, bytes):
        raise _Invalid(field_name, f"expected image bytes, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = (image.format or "bin").lower()
            image.verify()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error... for damaged files
        raise _Invalid(field_name, f"unreadable embedded image: {exc}") from None
    path = stem.with_name(f"{stem.name}.{suffix}")
    # The folder is keyed by the parquet file's fingerprint, so an existing file has these bytes.
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, path)
    return path


# ---- small things ------------------------------------------------------------------------------

def _detect_format(path: Path) -> str:
    if not path.exists():
        raise DatasetError([Problem(path, None, None, None, "no such file or folder")])
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return "manifest"
        if any(candidate.is_file() for candidate in path.glob("*/annotation.json")):
            return "kris"
        cause = f"folder holds neither {MANIFEST_NAME} nor <category>/annotation.json (KRIS-Bench)"
        raise DatasetError([Problem(path, None, None, None, cause)])
    if path.suffix == ".parquet":
        return "gedit"
    if path.suffix == ".jsonl":
        first = next(_json_lines(path), (None, None))[1]
        gedit_keys = {"key", "task_type", "instruction_language"}
        return "gedit" if isinstance(first, dict) and gedit_keys <= first.keys() else "manifest"
    raise DatasetError([Problem(path, None, None, None,
                                "unknown dataset type; expected 'sample', a .jsonl or .parquet file, or a folder")])


def _require(path: Path, kind: str) -> None:
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        raise DatasetError([Problem(path, None, None, None, f"{kind} not found")])


def _label(record: object, name: str) -> str | None:
    value = record.get(name) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _category_label(item: Item) -> str:
    return f"{item.category} ({', '.join(item.category_aliases)})" if item.category_aliases else item.category


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "editstack"
