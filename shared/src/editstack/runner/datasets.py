"""Benchmark datasets: the item type, readers that report bad items, and category selection.

Every reader returns ``(items, problems)``. An invalid item is skipped and reported as a
`Problem` naming the file, line, item, field and cause, and the item's category when the record
names one; ``strict=True`` raises a `DatasetError` carrying every problem instead. A source that
cannot be read at all (no such path, unknown file type, unreadable JSON document or parquet, a
Hugging Face dataset without GEdit-Bench's columns) raises `DatasetError` whatever `strict` says.
Every image is opened with Pillow and verified, so a run never starts on a missing or corrupt file.

An `Item` carries everything its benchmark judges with: the source images in the benchmark's order,
the references (an expected image, a reference answer, the knowledge explanation), the rest of the
record as metadata, the category and groups (their other names, Chinese ones included, come from
`editstack.runner.categories`), and which reader produced it (`benchmark`).

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
    sources           required  list of one or more image paths, relative to the manifest's folder
                                (or absolute), in the order the editor receives them
    source                      the one-image form of sources (a line has one of the two)
    language          optional  one of LANGUAGES ("en", "zh", ...) or null
    references        optional  list of {"kind": "image" | "text" | "explanation", "value": ...}; an
                                image value is a path like a source, any other value is the text
    reference                   the older form: one reference image path, or null (a line has
                                references or reference, not both)
    category_aliases  optional  list of other names `select` matches, e.g. ["物理"]
    groups            optional  list of group names `select` matches, e.g. ["natural_science"]
    metadata          optional  object, carried through to the results untouched

    {"id": "physics-1-en", "category": "physics", "instruction": "...", "sources": ["images/p1.png"]}

Any other field is reported, so a misspelt "refrence" cannot vanish unnoticed.

``kris`` -- a KRIS-Bench folder (``KRIS_Bench/``): ``<root>/<category>/annotation.json``, an object
keyed by item key ("1", "2", ...), the images beside it. Read from github.com/mercurystraw/Kris_Bench:
the data files at commit 800662d (``physics``, ``viewpoint_change``, ``temporal_prediction`` and
``multi-element_composition`` annotation.json read whole; the 20 folders listed) and the eval
scripts at commit 2114fec (``metrics_common.py``, ``metrics_view_change.py``,
``metrics_knowledge.py``, ``metrics_multi_element.py``, ``metrics_temporal_prediction.py``), which
join every file name onto ``KRIS_Bench/<category>/``::

    ori_img     the sources: one file name, or a list in the file's order (multi-element_composition:
                2 to 5 images to combine; temporal_prediction: three of a sequence's four frames)
    gt_img      an image reference ("" or absent: none); viewpoint_change's expected view and
                temporal_prediction's missing frame
    ins_en      the instruction, language "en" (``instruction`` in older files, which the scripts
                at 2114fec read)
    explain_en  an explanation reference: the knowledge hint the judge reads ("" or absent: none;
                ``explain`` in older files)

The item id is ``<category>-<key>`` (keys restart at "1" in every category) and the key is
``metadata["key"]`` (upstream edits live at ``results/<model>/<category>/<key>.jpg``). ``groups`` is
the category's knowledge type and dimension from `categories.KRIS_GROUPS` (physics: conceptual,
natural_science); a temporal_prediction item also gets its task (reverse, intermediate or
forward_prediction) and ``metadata["target_frame"]``, the frame to draw, taken from gt_img's
``<n>-<frame>`` name or else as the one of frames 1-4 that ori_img lacks
(metrics_temporal_prediction.py's rule).

``gedit`` -- GEdit-Bench rows: JSON lines (images in files, paths relative to the file's folder), a
parquet file, or a folder of parquet shards as the Hugging Face snapshot of stepfun-ai/GEdit-Bench
holds them (``data/train-00000-of-0000n.parquet``; give the snapshot folder or its ``data/``). A
shard missing from an ``-of-n`` series is reported: the download is incomplete. Read from
github.com/stepfun-ai/Step1X-Edit at commit 570eba6, ``GEdit-Bench/generate_image_example.py`` (its
comment lists the columns), ``test_gedit_score.py`` and ``calculate_statistics.py``: rows hold
``task_type``, ``key``, ``instruction``, ``instruction_language`` ("en" or "cn"), ``input_image``,
``input_image_raw`` and ``Intersection_exist`` (marks the rows of the "intersection" subset, which
calculate_statistics.py also scores on its own); the judge compares the edit with ``input_image``, and results live at
``fullset/<task_type>/<language>/<key>.png``, one per key and language. So: category =
``task_type``; source = ``input_image``; language "cn" reads as "zh"; id = ``<key>-<language>``;
every other column except the images goes to ``metadata`` (``Intersection_exist`` included). In
parquet, as the datasets library writes it, an image is a struct ``{"bytes", "path"}``: its bytes
are verified and written once to ``<cache_dir>/gedit/<file stem>-<fingerprint>/<task_type>/<id>.<format>``
(the fingerprint covers the file's path, size and mtime), so items always point at plain files.
A parquet file without GEdit-Bench's columns is refused whole.

``rise`` -- RISEBench's ``data_total.json`` (or the folder holding it), a JSON array of items, image
paths relative to its folder. Read from github.com/PhoenixZ810/RISEBench at commit 5f22651:
``data/data_total.json`` (RISEBench-64) and ``gpt_eval.py``, which joins image paths onto its
``--input`` folder (default ``data``) and judges with these fields::

    index           the id (also the output file name upstream: images/<category>/<index>.png)
    category        temporal_reasoning, causal_reasoning, spatial_reasoning or logical_reasoning
    instruction     the instruction, language "en"
    image           the source image
    reference       a text reference: the expected outcome, described
    reference_txt   a text reference: the answer a logical item must show
    reference_img   an image reference: the expected image
    subtask         RISEBench-360's sub-task ("Life Progression", ...): a group, in snake_case

null, absent or "" means none. Every other field goes to ``metadata``: ``subtask``, and
``reasoning_img``, ``consistency_free`` and ``reasoning_wo_ins``, switches of the upstream judge.
``subtask`` and those switches are read by gpt_eval.py but absent from RISEBench-64; they belong to
RISEBench-360 (Hugging Face PhoenixZ/RISEBench), whose files were not available to check.

``imgedit`` -- ImgEdit's Basic suite: ``basic_edit.json`` (github.com/PKU-YuanGroup/ImgEdit,
``Benchmark/Basic/``, commit 547185d), an object keyed by item key, each ``{"id", "prompt",
"edit_type"}``; ``basic_bench.py`` opens ``<origin_img_root>/<id>``, where ``id`` is a path such as
``animal/000342021.jpg``, and ``step2_typescore.py`` averages by ``edit_type``. The images come in
the Hugging Face repository sysuyy/ImgEdit's ``Benchmark.tar``, unpacked as ``Benchmark/singleturn/``
(the root PenghaoYin/ImageEvalKit's ``eval/imgedit.sh`` passes, commit d81d743), which also holds
``singleturn.json`` in the same shape (the default path of an lmms-eval ImgEdit preparation script
found in the code index: ``ImgEdit/Benchmark/singleturn/singleturn.json``).
Image ids resolve against the JSON file's folder (`load_imgedit` takes another ``image_root``): give
``Benchmark/singleturn/``, or put ``basic_edit.json`` there. Item id = the key (upstream edits are
``<key>.png``), category = ``edit_type``, instruction = ``prompt`` ("en"); ``metadata`` keeps the key and
the image id.

``hf`` -- a Hugging Face dataset with GEdit-Bench's columns: ``hf:ORG/NAME[@REVISION]`` is loaded
with ``datasets.load_dataset`` (so its cache and offline variables apply: ``HF_HOME``,
``HF_DATASETS_CACHE``, ``HF_HUB_CACHE``, ``HF_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE``; offline, the
library reuses the latest cached copy and cannot check ``@REVISION``), or a folder written by
``save_to_disk`` with ``datasets.load_from_disk``. Every split is read, in order. Rows map as GEdit-Bench
rows do, their images unpacked to ``<cache_dir>/hf/<name>-<split>-<fingerprint>/``; a dataset without
those columns is refused with a message naming the columns it needs.

``sample`` -- the built-in synthetic benchmark (`editstack.runner.sample`), written under
``<cache_dir>/sample`` and read as a manifest.

Detection (``load_dataset``; an explicit ``format`` overrides it): the spec ``"sample"`` is the
sample (name a folder called sample ``./sample``); ``hf:...`` is a Hugging Face dataset. A folder is
a manifest when it holds ``manifest.jsonl``, KRIS-Bench when it holds ``*/annotation.json``,
RISEBench when it holds ``data_total.json``, ImgEdit when it holds ``basic_edit.json`` or
``singleturn.json``, a saved Hugging Face dataset when it holds ``state.json`` or
``dataset_dict.json``, and GEdit-Bench when it holds ``*.parquet`` or ``data/*.parquet``. A
``.parquet`` file is GEdit-Bench; a ``.jsonl`` file is GEdit-Bench when its first record has
``key``, ``task_type`` and ``instruction_language``, otherwise a manifest; a ``.json`` file is
RISEBench or ImgEdit by its name, else by the shape of its first record.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, get_args

import msgspec
from PIL import Image

from editstack.errors import DatasetError
from editstack.runner.categories import KRIS_GROUPS, KRIS_TEMPORAL_TASKS, aliases, names_of
from editstack.runner.sample import write_sample

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
FORMATS = ("manifest", "sample", "kris", "gedit", "rise", "imgedit", "hf")
HF_PREFIX = "hf:"
# ISO 639-1 codes; a closed list so that a typo or "cn" is caught instead of splitting results.
LANGUAGES = frozenset({"ar", "de", "en", "es", "fr", "it", "ja", "ko", "pt", "ru", "zh"})

ReferenceKind = Literal["image", "text", "explanation"]
REFERENCE_KINDS: tuple[str, ...] = get_args(ReferenceKind)

_MANIFEST_FIELDS = ("id", "category", "instruction", "sources", "source", "language", "references",
                    "reference", "category_aliases", "groups", "metadata")
_GEDIT_LANGUAGES = {"en": "en", "cn": "zh"}
_GEDIT_COLUMNS = ("task_type", "key", "instruction", "instruction_language", "input_image")
_GEDIT_IMAGE_COLUMNS = ("input_image", "input_image_raw")
_KRIS_FIELDS = ("ori_img", "gt_img", "ins_en", "instruction", "explain_en", "explain")
_RISE_NAME = "data_total.json"
_RISE_FIELDS = ("index", "category", "instruction", "image", "reference", "reference_txt", "reference_img")
_IMGEDIT_NAMES = ("basic_edit.json", "singleturn.json")
_SHARD = re.compile(r"-(\d+)-of-(\d+)\.parquet$")  # Hugging Face's <split>-00000-of-00002.parquet
_KRIS_FRAME = re.compile(r"(\d+)-(\d+)")  # temporal_prediction's "<n>-<frame>.jpg"
_MAX_NAME_BYTES = 200  # leaves room for a suffix within the usual 255-byte file-name limit


class Reference(msgspec.Struct, frozen=True, kw_only=True):
    """What an edit is judged against besides its instruction."""

    kind: ReferenceKind
    value: str  # an absolute image path, or the text


@dataclass(frozen=True, slots=True)
class Item:
    """One benchmark item: edit `sources` as `instruction` says; judge against `references`."""

    id: str
    category: str
    instruction: str
    sources: tuple[Path, ...]            # one or more source images, in the benchmark's order
    language: str | None = None
    references: tuple[Reference, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    category_aliases: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()          # e.g. KRIS knowledge group and sub-group; selectable like categories
    benchmark: str = "manifest"           # the reader: manifest, sample, kris, gedit, rise, imgedit, hf

    def __post_init__(self) -> None:
        for name, value in (("id", self.id), ("category", self.category)):
            cause = _unsafe_name(value)
            if cause:
                raise ValueError(f"item {name} {value!r} {cause}")
        if self.language is not None and self.language not in LANGUAGES:
            raise ValueError(f"item {self.id!r} language {self.language!r} is not one of {sorted(LANGUAGES)}")
        if not self.instruction.strip():
            raise ValueError(f"item {self.id!r} has an empty instruction")
        if not self.sources:
            raise ValueError(f"item {self.id!r} has no source image")
        for reference in self.references:
            if reference.kind not in REFERENCE_KINDS:
                raise ValueError(f"item {self.id!r} reference kind {reference.kind!r} is not one of {REFERENCE_KINDS}")


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one item (or one file) was skipped; ``str()`` gives ``file:line item 'x' field 'y': cause``."""

    where: Path
    line: int | None  # 1-based line (JSON lines), row (parquet, a Hugging Face split) or position
    #                   in a JSON array; None for an entry of a JSON object, or a whole file
    item_id: str | None
    field: str | None
    cause: str
    category: str | None = None  # the rejected item's category, when its record names one

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


# ---- the entry points ---------------------------------------------------------------------------

def load_dataset(spec: str | Path, *, format: str | None = None, strict: bool = False,
                 cache_dir: Path | None = None) -> LoadResult:
    """Load ``"sample"``, ``hf:ORG/NAME[@REVISION]``, or a manifest, KRIS-Bench, GEdit-Bench,
    RISEBench, ImgEdit or saved Hugging Face dataset path (the module docstring gives the detection
    rule); `cache_dir` holds the sample and unpacked embedded images (default
    ``$XDG_CACHE_HOME/editstack``)."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {FORMATS}")
    cache = _cache_root(cache_dir)
    text = str(spec)
    if format == "sample" or (format is None and text == "sample"):
        format = "sample"
        items, problems = _load_manifest(write_sample(cache / "sample", MANIFEST_NAME), strict, "sample")
    elif text.startswith(HF_PREFIX) and format in (None, "hf"):
        format = "hf"
        items, problems = load_hf(text, strict=strict, cache_dir=cache)
    else:
        path = Path(spec)
        format = format or _detect_format(path)
        readers: dict[str, Callable[..., LoadResult]] = {
            "manifest": load_manifest, "kris": load_kris, "gedit": partial(load_gedit, cache_dir=cache),
            "rise": load_rise, "imgedit": load_imgedit, "hf": partial(load_hf, cache_dir=cache)}
        if format == "manifest" and path.is_dir():
            path = path / MANIFEST_NAME
        items, problems = readers[format](path, strict=strict)
    logger.info("dataset %s (%s): %d item(s), %d problem(s)", text, format, len(items), len(problems))
    return items, problems


def select(items: Sequence[Item], categories: Sequence[str] | None = None, limit: int | None = None,
           limit_per_category: int | None = None, *, problems: Sequence[Problem] = ()) -> list[Item]:
    """Items whose category, group, or one of their other names matches one of `categories`
    (case-insensitive), in dataset order; then the first `limit_per_category` of every category;
    then the first `limit` overall. A name that selects nothing raises ValueError, which, given the
    loader's `problems`, says when the name's category exists but every item of it was rejected."""
    for name, value in (("limit", limit), ("limit_per_category", limit_per_category)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    chosen = list(items)
    if categories:
        wanted = {name.strip().casefold() for name in categories}
        matched: set[str] = set()
        chosen = []
        for item in items:
            hits = wanted & _names(item)
            if hits:
                chosen.append(item)
                matched |= hits
        if wanted - matched:
            raise ValueError(_nothing_selected(wanted - matched, items, problems))
    if limit_per_category is not None:
        seen: Counter[str] = Counter()
        kept = []
        for item in chosen:
            seen[item.category] += 1
            if seen[item.category] <= limit_per_category:
                kept.append(item)
        chosen = kept
    return chosen if limit is None else chosen[:limit]


def select_problems(problems: Sequence[Problem], categories: Sequence[str] | None = None) -> list[Problem]:
    """The problems that concern a selection by `categories` (names as `select` takes them): those
    whose category one of the names selects, and those of unknown category (a malformed line may
    be anything). All of them when `categories` is empty."""
    if not categories:
        return list(problems)
    wanted = {name.strip().casefold() for name in categories}
    return [p for p in problems if p.category is None or wanted & names_of(p.category)]


# ---- readers ------------------------------------------------------------------------------------

def load_manifest(path: Path, *, strict: bool = False) -> LoadResult:
    """Read an editstack JSON-lines manifest (schema in the module docstring)."""
    return _load_manifest(Path(path), strict, "manifest")


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
            problems.append(Problem(annotation, None, None, None, f"malformed JSON: {exc}", category))
            continue
        except _Invalid as bad:
            problems.append(Problem(annotation, None, None, bad.field, bad.cause, category))
            continue
        folder = annotation.parent.absolute()
        records = ((None, f"{category}-{key}", category, (key, entry)) for key, entry in entries.items())
        found, bad_items = _collect(annotation, records, partial(_kris_item, category, folder), first_seen)
        items += found
        problems += bad_items
    return _finish((items, problems), strict)


def load_gedit(path: Path, *, strict: bool = False, cache_dir: Path | None = None) -> LoadResult:
    """Read GEdit-Bench rows from a ``.jsonl`` export, a ``.parquet`` file, or a folder of parquet
    shards (a Hugging Face snapshot, or its ``data/`` folder)."""
    path = Path(path)
    cache = _cache_root(cache_dir)
    if path.is_dir():
        files, problems = _parquet_shards(path)
    else:
        _require(path, "file")
        files, problems = [path], []
    items: list[Item] = []
    first_seen: dict[str, tuple[Path, int | None]] = {}
    for file in files:
        if file.suffix == ".parquet":
            rows = _parquet_rows(file)
            images: Path | None = cache / "gedit" / f"{file.stem}-{_fingerprint([file])}"
        else:
            rows, images = _json_lines(file), None
        base = file.parent.absolute()
        records = ((line, _label(r, "key"), _label(r, "task_type"), r) for line, r in rows)
        found, bad = _collect(file, records, partial(_gedit_item, base=base, images=images), first_seen)
        items += found
        problems += bad
    return _finish((items, problems), strict)


def load_rise(path: Path, *, strict: bool = False) -> LoadResult:
    """Read RISEBench's ``data_total.json`` (or the folder holding it), images beside it."""
    path = Path(path)
    file = path / _RISE_NAME if path.is_dir() else path
    entries = _json_document(file, list, "a JSON array of items")
    base = file.parent.absolute()
    records = ((n, _label(e, "index"), _label(e, "category"), e) for n, e in enumerate(entries, 1))
    return _finish(_collect(file, records, partial(_rise_item, base)), strict)


def load_imgedit(path: Path, *, strict: bool = False, image_root: Path | None = None) -> LoadResult:
    """Read ImgEdit's ``basic_edit.json`` (or ``singleturn.json``, or the folder holding one); image
    ids resolve against `image_root`, by default the JSON file's folder."""
    path = Path(path)
    file = next((path / name for name in _IMGEDIT_NAMES if (path / name).is_file()), path) if path.is_dir() else path
    entries = _json_document(file, dict, "a JSON object keyed by item")
    base = Path(image_root).absolute() if image_root is not None else file.parent.absolute()
    records = ((None, key, _label(entry, "edit_type"), (key, entry)) for key, entry in entries.items())
    return _finish(_collect(file, records, partial(_imgedit_item, base)), strict)


def load_hf(spec: str | Path, *, strict: bool = False, cache_dir: Path | None = None) -> LoadResult:
    """Read a Hugging Face dataset with GEdit-Bench's columns: ``hf:ORG/NAME[@REVISION]`` through
    ``datasets.load_dataset`` (offline, it reuses the datasets cache), or a ``save_to_disk`` folder."""
    text = str(spec)
    where = Path(text)
    datasets = _optional_module("datasets", where)
    cache = _cache_root(cache_dir)
    if text.startswith(HF_PREFIX):
        name, _, revision = text[len(HF_PREFIX):].partition("@")
        if name.count("/") != 1 or not all(name.split("/")):
            raise DatasetError([Problem(where, None, None, None, "expected hf:ORG/NAME or hf:ORG/NAME@REVISION")])
        base = None
        label = f"{name}@{revision}" if revision else name
        load: Callable[[], Any] = partial(datasets.load_dataset, name, revision=revision or None)
    else:
        _require(where, "folder")
        base, label = where.absolute(), where.name
        load = partial(datasets.load_from_disk, str(where))
    try:
        loaded = load()
    except Exception as exc:  # the library raises many kinds (ConnectionError offline, DatasetNotFoundError, ...)
        raise DatasetError([Problem(where, None, None, None, f"cannot load: {type(exc).__name__}: {exc}")]) from None
    splits = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    items: list[Item] = []
    problems: list[Problem] = []
    first_seen: dict[str, tuple[Path, int | None]] = {}
    for split, data in splits:
        split_where = where / split if split else where
        _require_gedit_columns(split_where, data.column_names)
        for column in _GEDIT_IMAGE_COLUMNS:
            if isinstance(data.features.get(column), datasets.Image):
                data = data.cast_column(column, datasets.Image(decode=False))  # rows give {"bytes", "path"}
        files = [Path(f["filename"]) for f in data.cache_files]
        fingerprint = _fingerprint(files) if files else data._fingerprint  # in memory: the library's own
        images = cache / "hf" / re.sub(r"[^\w.@-]+", "--", f"{label}-{split or 'all'}-{fingerprint}")
        records = ((n, _label(r, "key"), _label(r, "task_type"), r) for n, r in enumerate(data, 1))
        found, bad = _collect(split_where, records, partial(_gedit_item, base=base, images=images), first_seen)
        items += found
        problems += bad
    return _finish((items, problems), strict)


# ---- one record -> one Item ----------------------------------------------------------------------

def _load_manifest(path: Path, strict: bool, benchmark: str) -> LoadResult:
    _require(path, "file")
    base = path.parent.absolute()
    records = ((line, _label(r, "id"), _label(r, "category"), r) for line, r in _json_lines(path))
    return _finish(_collect(path, records, partial(_manifest_item, base=base, benchmark=benchmark)), strict)


def _manifest_item(record: object, base: Path, benchmark: str) -> Item:
    record = _object(record)
    unknown = [name for name in record if name not in _MANIFEST_FIELDS]
    if unknown:
        also = f" (also {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""
        raise _Invalid(unknown[0], f"unknown field{also}; a manifest line has {', '.join(_MANIFEST_FIELDS)}")
    for one, many in (("source", "sources"), ("reference", "references")):
        if one in record and many in record:
            raise _Invalid(one, f"a line has {many!r} or {one!r}, not both")
    item_id = _safe(_text(record, "id"), "id")
    category = _safe(_text(record, "category"), "category")
    instruction = _text(record, "instruction")
    language = _language(_optional_text(record, "language"), "language")
    category_aliases = _names_list(record, "category_aliases")
    groups = _names_list(record, "groups")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _Invalid("metadata", f"expected an object, got {_json_type(metadata)}")
    if "source" in record:
        sources: tuple[Path, ...] = (_image(base, _text(record, "source"), "source"),)
    else:
        paths = record.get("sources")
        if paths is None:
            raise _Invalid("sources", "missing required field (sources, or source for one image)")
        if not isinstance(paths, list) or not paths:
            raise _Invalid("sources", f"expected a non-empty list of image paths, got {_json_type(paths)}")
        sources = tuple(_image(base, _nonblank(path, "sources"), "sources") for path in paths)
    reference = _optional_text(record, "reference")
    if reference is not None:
        references: tuple[Reference, ...] = (Reference(kind="image", value=str(_image(base, reference, "reference"))),)
    else:
        references = _manifest_references(record.get("references"), base)
    return Item(item_id, category, instruction, sources, language, references, metadata, category_aliases,
                groups, benchmark)


def _manifest_references(value: object, base: Path) -> tuple[Reference, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Invalid("references", f"expected a list, got {_json_type(value)}")
    references = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"kind", "value"}:
            raise _Invalid("references", 'expected objects {"kind": ..., "value": ...} and nothing else')
        kind, text = entry["kind"], entry["value"]
        if kind not in REFERENCE_KINDS:
            raise _Invalid("references", f"unknown kind {kind!r}; expected one of {', '.join(REFERENCE_KINDS)}")
        text = _nonblank(text, "references")
        value = str(_image(base, text, "references")) if kind == "image" else text
        references.append(Reference(kind=kind, value=value))
    return tuple(references)


def _kris_item(category: str, folder: Path, record: tuple[str, object]) -> Item:
    key, entry = record[0], _object(record[1])
    item_id = _safe(f"{category}-{key}", "id")
    instruction = _text(entry, "ins_en" if "ins_en" in entry or "instruction" not in entry else "instruction")
    names = entry.get("ori_img")
    if isinstance(names, list):
        if not names:
            raise _Invalid("ori_img", "is an empty list")
        sources = tuple(_image(folder, _nonblank(name, "ori_img"), "ori_img") for name in names)
    else:
        sources = (_image(folder, _text(entry, "ori_img"), "ori_img"),)
    references = []
    gt = _present_text(entry, "gt_img")  # KRIS writes "" for "no ground truth"
    if gt is not None:
        references.append(Reference(kind="image", value=str(_image(folder, gt, "gt_img"))))
    explain = _present_text(entry, "explain_en" if "explain_en" in entry else "explain")
    if explain is not None:
        references.append(Reference(kind="explanation", value=explain))
    metadata: dict[str, Any] = {"key": key, **{k: v for k, v in entry.items() if k not in _KRIS_FIELDS}}
    groups = KRIS_GROUPS.get(category, ())
    if category == "temporal_prediction":
        frame = _kris_target_frame(gt, names if isinstance(names, list) else [])
        if frame is not None:
            metadata["target_frame"] = frame
            groups += (KRIS_TEMPORAL_TASKS[frame],)
    return Item(item_id, category, instruction, sources, "en", tuple(references), metadata,
                aliases("kris", category), groups, "kris")


def _kris_target_frame(gt: str | None, names: list[str]) -> int | None:
    """The frame (1-4) a temporal_prediction item asks for: gt_img's ``<n>-<frame>``, else the one
    frame ori_img lacks; None when neither tells."""
    found = _KRIS_FRAME.search(Path(gt).name) if gt is not None else None
    if found and int(found.group(2)) in KRIS_TEMPORAL_TASKS:
        return int(found.group(2))
    given = {int(found.group(2)) for name in names if (found := _KRIS_FRAME.search(Path(name).name))}
    missing = KRIS_TEMPORAL_TASKS.keys() - given
    return missing.pop() if len(missing) == 1 else None


def _gedit_item(record: object, base: Path | None, images: Path | None) -> Item:
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
            raise _Invalid("input_image", "embedded image bytes are only read from parquet or a Hugging Face dataset")
        source = _cached_image(images / category / item_id, value["bytes"], "input_image")
    else:
        # A struct without bytes still names its file, relative to the export's folder.
        path = value.get("path") if isinstance(value, dict) else value
        if path is None:
            raise _Invalid("input_image", "missing required field")
        if not isinstance(path, str) or not path.strip():
            raise _Invalid("input_image", f"expected an image path, got {_json_type(path)}")
        if base is None and not Path(path).is_absolute():
            raise _Invalid("input_image", f"no embedded bytes, and the path {path!r} is relative to no folder")
        source = _image(base or Path("/"), path, "input_image")
    skip = {"task_type", "instruction", *_GEDIT_IMAGE_COLUMNS}
    metadata = {name: value for name, value in record.items() if name not in skip}
    return Item(item_id, category, instruction, (source,), _GEDIT_LANGUAGES[raw_language], (), metadata,
                aliases("gedit", category), (), "gedit")


def _rise_item(base: Path, record: object) -> Item:
    entry = _object(record)
    item_id = _safe(_text(entry, "index"), "index")
    category = _safe(_text(entry, "category"), "category")
    instruction = _text(entry, "instruction")
    source = _image(base, _text(entry, "image"), "image")
    references = [Reference(kind="text", value=text) for name in ("reference", "reference_txt")
                  if (text := _present_text(entry, name)) is not None]
    reference_image = _present_text(entry, "reference_img")
    if reference_image is not None:
        references.append(Reference(kind="image", value=str(_image(base, reference_image, "reference_img"))))
    subtask = _present_text(entry, "subtask")
    groups = (re.sub(r"\W+", "_", subtask.strip().casefold()).strip("_"),) if subtask is not None else ()
    metadata = {name: value for name, value in entry.items() if name not in _RISE_FIELDS}
    return Item(item_id, category, instruction, (source,), "en", tuple(references), metadata,
                aliases("rise", category), groups, "rise")


def _imgedit_item(base: Path, record: tuple[str, object]) -> Item:
    key, entry = _safe(record[0], "key"), _object(record[1])
    category = _safe(_text(entry, "edit_type"), "edit_type")
    instruction = _text(entry, "prompt")
    image_id = _text(entry, "id")
    source = _image(base, image_id, "id")
    metadata = {"key": key, "image_id": image_id,
                **{name: value for name, value in entry.items() if name not in ("id", "prompt", "edit_type")}}
    return Item(key, category, instruction, (source,), "en", (), metadata, aliases("imgedit", category), (), "imgedit")


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


def _json_document(path: Path, kind: type | tuple[type, ...], expected: str) -> Any:
    """A whole JSON file of type `kind`; a file that is not one cannot be read at all."""
    _require(path, "file")
    try:
        document = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DatasetError([Problem(path, None, None, None, f"malformed JSON: {exc}")]) from None
    if not isinstance(document, kind):
        raise DatasetError([Problem(path, None, None, None, f"expected {expected}, got {_json_type(document)}")])
    return document


def _parquet_shards(folder: Path) -> tuple[list[Path], list[Problem]]:
    """The parquet files of a folder (or of its ``data/``), and a problem for each shard missing
    from a ``-of-<n>`` series: a partial download must not pass for the whole benchmark."""
    shards = sorted(folder.glob("*.parquet")) or sorted((folder / "data").glob("*.parquet"))
    if not shards:
        raise DatasetError([Problem(folder, None, None, None, "holds no .parquet file, nor does its data/ folder")])
    series: dict[tuple[str, str], set[int]] = defaultdict(set)  # (prefix, total as written) -> indexes
    for shard in shards:
        if found := _SHARD.search(shard.name):
            series[(shard.name[:found.start()], found.group(2))].add(int(found.group(1)))
    problems = [Problem(shards[0].parent / f"{prefix}-{index:0{len(total)}d}-of-{total}.parquet", None, None, None,
                        f"shard missing: {len(present)} of {int(total)} are here, so the download is incomplete")
                for (prefix, total), present in series.items() for index in range(int(total)) if index not in present]
    return shards, problems


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    pq = _optional_module("pyarrow.parquet", path)
    try:
        data = pq.ParquetFile(path)
        _require_gedit_columns(path, data.schema_arrow.names)
        number = 0
        for batch in data.iter_batches(batch_size=64):  # bounded memory: images are large
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid and ArrowIOError derive from these
        raise DatasetError([Problem(path, None, None, None, f"unreadable parquet: {exc}")]) from None


def _collect(where: Path, records: Iterable[tuple[int | None, str | None, str | None, object]],
             build: Callable[[Any], Item], first_seen: dict[str, tuple[Path, int | None]] | None = None) -> LoadResult:
    """Build an Item from each (line, label and category for reports, record); report invalid and
    repeated ones. `first_seen` (id -> where it was first loaded) is shared when a dataset spans
    several files."""
    items: list[Item] = []
    problems: list[Problem] = []
    first_seen = {} if first_seen is None else first_seen
    for line, label, category, record in records:
        try:
            if isinstance(record, _Invalid):
                raise record
            item = build(record)
            if item.id in first_seen:
                earlier, earlier_line = first_seen[item.id]
                at = f"line {earlier_line}" if earlier == where and earlier_line else str(earlier)
                raise _Invalid("id", f"duplicate id (first at {at})")
        except _Invalid as bad:
            problems.append(Problem(where, line, label, bad.field, bad.cause, category))
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
    return None if value is None else _nonblank(value, name)


def _nonblank(value: object, name: str) -> str:
    """One non-blank string (a field's value, or an element of a list field)."""
    if not isinstance(value, str):
        raise _Invalid(name, f"expected a string, got {_json_type(value)}")
    if not value.strip():
        raise _Invalid(name, "is empty")
    return value


def _present_text(record: dict[str, Any], name: str) -> str | None:
    """A string field where the benchmark writes null, "" or nothing for "none"."""
    value = record.get(name)
    return None if value is None or (isinstance(value, str) and not value.strip()) else _nonblank(value, name)


def _names_list(record: dict[str, Any], name: str) -> tuple[str, ...]:
    value = record.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Invalid(name, "expected a list of non-empty strings")
    return tuple(value)


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
    # The folder is keyed by the source files' fingerprint, so an existing file has these bytes.
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial_path.write_bytes(data)
        os.replace(partial_path, path)
    return path


def _require_gedit_columns(where: Path, columns: Sequence[str]) -> None:
    missing = [name for name in _GEDIT_COLUMNS if name not in columns]
    if missing:
        cause = (f"has columns {', '.join(columns) or '(none)'}; editstack reads GEdit-Bench's columns "
                 f"({', '.join(_GEDIT_COLUMNS)}, optionally input_image_raw and Intersection_exist) "
                 f"and this one lacks {', '.join(missing)}")
        raise DatasetError([Problem(where, None, None, None, cause)])


# ---- small things ------------------------------------------------------------------------------

def _detect_format(path: Path) -> str:
    if not path.exists():
        raise DatasetError([Problem(path, None, None, None, "no such file or folder")])
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return "manifest"
        if any(candidate.is_file() for candidate in path.glob("*/annotation.json")):
            return "kris"
        if (path / _RISE_NAME).is_file():
            return "rise"
        if any((path / name).is_file() for name in _IMGEDIT_NAMES):
            return "imgedit"
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        if any(path.glob("*.parquet")) or any(path.glob("data/*.parquet")):
            return "gedit"
        cause = (f"folder holds none of {MANIFEST_NAME}, <category>/annotation.json (KRIS-Bench), {_RISE_NAME} "
                 f"(RISEBench), {' or '.join(_IMGEDIT_NAMES)} (ImgEdit), a save_to_disk dataset, "
                 "*.parquet or data/*.parquet (GEdit-Bench)")
        raise DatasetError([Problem(path, None, None, None, cause)])
    if path.suffix == ".parquet":
        return "gedit"
    if path.suffix == ".jsonl":
        first = next(_json_lines(path), (None, None))[1]
        gedit_keys = {"key", "task_type", "instruction_language"}
        return "gedit" if isinstance(first, dict) and gedit_keys <= first.keys() else "manifest"
    if path.suffix == ".json":
        if path.name == _RISE_NAME:
            return "rise"
        if path.name in _IMGEDIT_NAMES:
            return "imgedit"
        document = _json_document(path, (list, dict), "a JSON array or object")
        first = next(iter(document.values() if isinstance(document, dict) else document), None)
        if isinstance(document, list) and isinstance(first, dict) and {"index", "image"} <= first.keys():
            return "rise"
        if isinstance(document, dict) and isinstance(first, dict) and "edit_type" in first:
            return "imgedit"
        hint = "; for KRIS-Bench give the folder holding <category>/annotation.json" if (
            isinstance(first, dict) and "ori_img" in first) else ""
        raise DatasetError([Problem(path, None, None, None, "a .json file is read as RISEBench (an array of "
                                    "{index, category, instruction, image, ...}) or ImgEdit (an object of "
                                    f"{{id, prompt, edit_type}}), and this is neither{hint}")])
    raise DatasetError([Problem(path, None, None, None, "unknown dataset type; expected 'sample', 'hf:ORG/NAME', "
                                "a .jsonl, .json or .parquet file, or a folder")])


def _require(path: Path, kind: str) -> None:
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        raise DatasetError([Problem(path, None, None, None, f"{kind} not found")])


def _optional_module(name: str, where: Path) -> ModuleType:
    """Import a reader's heavy dependency when a dataset needs it, so start-up stays quick."""
    try:
        return importlib.import_module(name)
    except ImportError:
        cause = f"reading this needs {name.split('.')[0]} (pip install 'editstack[runner]')"
        raise DatasetError([Problem(where, None, None, None, cause)]) from None


def _fingerprint(files: Sequence[Path]) -> str:
    """Names the cache of one source's unpacked images: a changed file gets a fresh folder."""
    parts = []
    for file in files:
        stat = file.stat()
        parts.append(f"{file.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _label(record: object, name: str) -> str | None:
    value = record.get(name) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _names(item: Item) -> set[str]:
    """Every name that selects `item`, casefolded."""
    names = {item.category, *item.category_aliases}
    for group in item.groups:
        names |= {group, *aliases(item.benchmark, group)}
    return {name.casefold() for name in names}


def _nothing_selected(names: set[str], items: Sequence[Item], problems: Sequence[Problem]) -> str:
    rejected: dict[str, list[Problem]] = defaultdict(list)
    for problem in problems:
        if problem.category is not None:
            for name in names & names_of(problem.category):
                rejected[name].append(problem)
    parts = [f"category {name!r} ({', '.join(sorted({str(p.category) for p in found}))}) exists, but "
             f"every item of it was rejected ({len(found)} problem(s), first: {found[0]})"
             for name, found in sorted(rejected.items())]
    unknown = sorted(names - rejected.keys())
    if unknown:
        categories = sorted({_label_with(item.category, item.category_aliases) for item in items})
        groups = sorted({_label_with(g, aliases(item.benchmark, g)) for item in items for g in item.groups})
        parts.append(f"no category {', '.join(map(repr, unknown))} in this dataset; it has: {', '.join(categories)}"
                     + (f"; groups: {', '.join(groups)}" if groups else ""))
    return "; ".join(parts)


def _label_with(name: str, others: Sequence[str]) -> str:
    return f"{name} ({', '.join(others)})" if others else name


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _cache_root(cache_dir: Path | None) -> Path:
    """Absolute, since items point into it (default ``$XDG_CACHE_HOME/editstack``)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "editstack"
    return Path(cache_dir).absolute()
