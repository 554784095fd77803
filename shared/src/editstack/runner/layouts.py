"""Edits laid out as each benchmark's own evaluation scripts read them: `export_run` writes a run's
edits in one of these layouts, and `find_edit` finds an item's edit in any of them, so that
``editstack run --only score --edits DIR`` scores another model's published outputs.

    layout   where an item's edit goes (and what else the scripts read)      read by
    gedit    fullset/<task_type>/<en|cn>/<key>.png, and the source image     github.com/stepfun-ai/Step1X-Edit
             beside it as <key>_SRCIMG.png                                   @570eba6 GEdit-Bench/test_gedit_score.py
    kris     <category>/<key>.jpg                                            github.com/mercurystraw/Kris_Bench
                                                                             @2114fec, 9502ee3 metrics_*.py
    rise     images/<category>/<index>.png (.jpg and .jpeg are read too)     github.com/PhoenixZ810/RISEBench
                                                                             @5f22651 gpt_eval.py
    imgedit  <key>.png                                                       github.com/PKU-YuanGroup/ImgEdit
                                                                             @547185d Benchmark/Basic/basic_bench.py

A layout's folder is the one its scripts take for one model: GEdit-Bench's ``<save_path>/<model_name>``,
KRIS-Bench's ``results/<model>``, RISEBench's ``outputs/<model>`` (``--output``), ImgEdit's
``--result_img_folder``. A layout is named after the benchmark whose items it holds (`Item.benchmark`).

Finding an item's edit in an ``--edits`` folder: a run folder is read through its ``edits/`` (editstack's
own ``<category>/<id>.png``); another folder is read in the item's benchmark's layout when it has
that layout's mark (GEdit-Bench ``fullset/``, RISEBench ``images/``, KRIS-Bench ``<folder>/*.jpg``,
ImgEdit ``*.png`` at the top), else as editstack's tree. A file that is not there is named by the
item's failure.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image

from editstack.errors import ConfigError
from editstack.runner.datasets import Item
from editstack.runner.files import write_atomic
from editstack.runner.runfolder import RESULTS_NAME, ItemRecord, Journal, read_manifest

Keyed = Item | ItemRecord  # an item, or the record a run wrote of it: both carry id, category and metadata

_PILLOW_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_JPEG_QUALITY = 95  # KRIS-Bench's scripts read JPEG only; a high quality keeps the re-encoding close to the PNG


class Layout:
    """editstack's own tree, ``<category>/<id>.png``: a run folder's ``edits/``, and the base the
    benchmarks' layouts change."""

    name = "editstack"
    # export writes the first; a lookup takes the first that exists, in this order (else names the first)
    suffixes: tuple[str, ...] = (".png",)

    def stem(self, item: Keyed) -> str:
        """The edit's path in the layout, without its suffix."""
        return f"{item.category}/{item.id}"

    def source_stem(self, item: Keyed) -> str | None:
        """Where the benchmark's scripts read the source image from the same tree (without suffix), if
        they do."""
        return None

    def marks(self, root: Path) -> bool:
        """Whether the folder `root` holds edits in this layout rather than in editstack's (which has no
        mark: it is what a folder without one is read as)."""
        return False

    def edit_path(self, root: Path, item: Keyed) -> Path:
        candidates = [root / f"{self.stem(item)}{suffix}" for suffix in self.suffixes]
        return next((path for path in candidates if path.is_file()), candidates[0])


class GEditLayout(Layout):
    """Step1X-Edit's GEdit-Bench/EVAL.md tree; test_gedit_score.py opens
    ``{save_path}/fullset/{task_type}/{instruction_language}/{key}.png`` and, as the source,
    ``{key}_SRCIMG.png`` beside it (generate_image_example.py writes both); lmms-eval's
    lmms_eval/tasks/gedit_bench/utils.py (commit 75571cf) names the same tree. The language folder is
    the row's own ``instruction_language`` ("en" or "cn")."""

    name = "gedit"

    def stem(self, item: Keyed) -> str:
        return f"fullset/{item.category}/{item.metadata['instruction_language']}/{item.metadata['key']}"

    def source_stem(self, item: Keyed) -> str | None:
        return f"{self.stem(item)}_SRCIMG"

    def marks(self, root: Path) -> bool:
        return (root / "fullset").is_dir()


class KrisLayout(Layout):
    """KRIS-Bench's scripts (metrics_common.py, metrics_knowledge.py, metrics_view_change.py,
    metrics_multi_element.py, metrics_temporal_prediction.py) open
    ``os.path.join(RESULTS_DIR, model_name, category, f"{image_id}.jpg")``, the image id being the
    annotation.json key; its README.md: "named as {image_id}.jpg"."""

    name = "kris"
    suffixes = (".jpg",)

    def stem(self, item: Keyed) -> str:
        return f"{item.category}/{item.metadata['key']}"

    def marks(self, root: Path) -> bool:
        return any(path.is_file() for path in root.glob("*/*.jpg"))  # editstack's tree holds .png files only


class RiseLayout(Layout):
    """RISEBench's gpt_eval.py looks in ``<--output>/images/<category>/`` for ``<index>.png``, then
    ``.jpg``, then ``.jpeg`` (``find_image``); its README.md gives
    ``outputs/{MODEL_NAME}/images/{CATEGORY}/{INDEX_NAME}.{FORMAT}``."""

    name = "rise"
    suffixes = (".png", ".jpg", ".jpeg")

    def stem(self, item: Keyed) -> str:
        return f"images/{item.category}/{item.id}"

    def marks(self, root: Path) -> bool:
        return (root / "images").is_dir()


class ImgEditLayout(Layout):
    """ImgEdit's Benchmark/Basic/basic_bench.py opens ``os.path.join(result_img_folder, f"{key}.png")``,
    the key being basic_edit.json's (also the item id); basic_bench_readme.md shows the flat folder."""

    name = "imgedit"

    def stem(self, item: Keyed) -> str:
        return item.id

    def marks(self, root: Path) -> bool:
        return any(path.is_file() for path in root.glob("*.png"))  # editstack's tree has folders at the top


EDITSTACK = Layout()
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (GEditLayout(), KrisLayout(), RiseLayout(),
                                                                   ImgEditLayout())}


def find_edit(edits: Path, item: Item) -> Path:
    """Where `item`'s edit is in `edits` (a run folder, an editstack tree or a benchmark's layout; the
    module docstring gives the rule): an absolute path, which may not exist."""
    if (edits / "edits").is_dir():  # a run folder
        return EDITSTACK.edit_path(edits / "edits", item).resolve()
    own = LAYOUTS.get(item.benchmark)
    layout = own if own is not None and _marked(own, edits) else EDITSTACK
    return layout.edit_path(edits, item).resolve()


@cache
def _marked(layout: Layout, root: Path) -> bool:
    """`layout.marks(root)`, looked at once per folder: a score-only run asks it for every item."""
    return layout.marks(root)


@dataclass
class ExportSummary:
    """What `export_run` wrote, and every item it left out with the reason."""

    layout: str
    out_dir: Path
    exported: list[str] = field(default_factory=list)  # item ids
    no_edit: list[str] = field(default_factory=list)  # ids of items whose edit failed: nothing to export
    unreadable: list[str] = field(default_factory=list)  # "<item or journal line>: <cause>"


def export_run(run_dir: Path, layout: str, out_dir: Path, *, overwrite: bool = False) -> ExportSummary:
    """Write the edits of the run folder `run_dir` into `out_dir` in `layout` (one of LAYOUTS): a file
    already in the layout's format is copied, another is re-encoded; each file is written atomically.
    A non-empty `out_dir` is refused unless `overwrite`, which replaces the files of the exported
    items and leaves the rest. A run whose items come from another benchmark is refused."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    target = LAYOUTS[layout]
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    read_manifest(run_dir)  # a RunFolderError naming the file when run_dir is not a run folder
    journal = Journal(run_dir / RESULTS_NAME).load()
    others = sorted({record.benchmark or "(none)" for record in journal.records.values()} - {layout})
    if others:
        raise ConfigError(f"the {layout} layout holds {layout} items; the items of {run_dir} come from "
                          f"{', '.join(others)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; export into a new folder, or pass --overwrite to "
                          "replace the files of the exported items there")
    summary = ExportSummary(layout, out_dir, unreadable=list(journal.problems))
    suffix = target.suffixes[0]
    for record in journal.records.values():
        if record.edit.path is None:
            summary.no_edit.append(record.id)
            continue
        files = {f"{target.stem(record)}{suffix}": run_dir / record.edit.path}  # absolute for an existing edit
        if (source_stem := target.source_stem(record)) is not None:
            files[f"{source_stem}{suffix}"] = Path(record.sources[0])
        try:
            encoded = {name: _encoded(path, suffix) for name, path in files.items()}
        except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error... for damaged files
            summary.unreadable.append(f"{record.id}: {exc}")
            continue
        for name, data in encoded.items():
            write_atomic(out_dir / name, data)
        summary.exported.append(record.id)
    return summary


def _encoded(path: Path, suffix: str) -> bytes:
    """The image at `path` as a `suffix` file: its own bytes when it already has that format, else
    re-encoded as RGB."""
    wanted = _PILLOW_FORMATS[suffix]
    with Image.open(path) as image:
        if image.format == wanted:
            return path.read_bytes()
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, wanted, **({"quality": _JPEG_QUALITY} if wanted == "JPEG" else {}))
        return buffer.getvalue()
