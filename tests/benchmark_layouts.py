"""Tiny benchmarks in their published layouts, built in the test's folder: images drawn with Pillow,
each benchmark's own file names, fields and nesting (where each layout was checked is written in
`editstack.runner.datasets`' docstring). Nothing here is a copy of benchmark data; no binary file is
committed."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

RGB = tuple[int, int, int]


def image_bytes(colour: RGB = (200, 30, 30), size: int = 16, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=format)
    return buffer.getvalue()


def write_image(path: Path, colour: RGB = (200, 30, 30)) -> Path:
    """A small image in the format its suffix names (.jpg/.jpeg: JPEG, else PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(colour, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"))
    return path


def write_json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


# ---- KRIS-Bench: KRIS_Bench/<category>/annotation.json, images beside it -----------------------

def kris_category(root: Path, category: str, entries: dict[str, dict[str, Any]], *,
                  missing: tuple[str, ...] = ()) -> Path:
    """Write ``<root>/<category>/annotation.json`` and every image its entries name (``ori_img``, a
    name or a list, and a non-empty ``gt_img``), except the names in `missing`."""
    folder = root / category
    for entry in entries.values():
        names = entry.get("ori_img", [])
        for name in ([names] if isinstance(names, str) else names) + ([entry["gt_img"]] if entry.get("gt_img") else []):
            if name not in missing:
                write_image(folder / name)
    return write_json(folder / "annotation.json", entries)


def kris_entry(ori_img: str | list[str], instruction: str = "Edit it", gt_img: str = "",
               explain: str = "") -> dict[str, Any]:
    return {"ori_img": ori_img, "gt_img": gt_img, "ins_en": instruction, "explain_en": explain}


# ---- GEdit-Bench: rows as the datasets library exports them ---------------------------------------

def gedit_row(key: str, language: str = "en", task_type: str = "color_alter", image: object = None) -> dict[str, Any]:
    """One row with GEdit-Bench's columns; `image` is a path or a {"bytes", "path"} struct."""
    image = image if image is not None else f"images/{key}.png"
    return {"task_type": task_type, "key": key, "instruction": "把球变成蓝色" if language == "cn" else "make it blue",
            "instruction_language": language, "input_image": image, "input_image_raw": image,
            "Intersection_exist": True}


def gedit_dataset(rows: list[dict[str, Any]]) -> Any:
    """A `datasets.Dataset` with GEdit-Bench's features (images as datasets.Image)."""
    import datasets

    features = datasets.Features({
        "task_type": datasets.Value("string"), "key": datasets.Value("string"),
        "instruction": datasets.Value("string"), "instruction_language": datasets.Value("string"),
        "input_image": datasets.Image(), "input_image_raw": datasets.Image(),
        "Intersection_exist": datasets.Value("bool"),
    })
    return datasets.Dataset.from_list(rows, features=features)


def gedit_hf_snapshot(root: Path, rows: list[dict[str, Any]], shards: int) -> Path:
    """A Hugging Face snapshot of GEdit-Bench: ``<root>/data/train-0000i-of-0000n.parquet``."""
    data = gedit_dataset(rows)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for index in range(shards):
        data.shard(num_shards=shards, index=index, contiguous=True).to_parquet(
            root / "data" / f"train-{index:05d}-of-{shards:05d}.parquet")
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n", encoding="utf-8")
    return root


def datasets_cache(cache: Path, repo_id: str, data: Any, commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Put `data` where an online ``datasets.load_dataset(repo_id)`` leaves a Hub dataset:
    ``<cache>/<org>___<name>/default/0.0.0/<commit>/`` with its arrow file and dataset_info.json,
    which an offline load (HF_DATASETS_OFFLINE=1) reuses."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo_id.split("/")
    staging = cache.parent / f".{name}-staging"
    data.to_parquet(staging / "train.parquet")
    builder = Parquet(data_files={"train": str(staging / "train.parquet")}, dataset_name=name,
                      config_name="default", hash=commit, cache_dir=str(staging / "cache"))
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / "default" / "0.0.0" / commit
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(staging)
    return target


# ---- RISEBench: data/data_total.json, data/<category>_images/ -------------------------------------

def rise_entry(category: str, number: int, **references: str) -> dict[str, Any]:
    return {"index": f"{category}_{number}", "category": category,
            "instruction": f"Draw what it looks like later ({number}).",
            "image": f"{category}_images/{number}.png", **references}


def rise_data(data: Path, entries: list[dict[str, Any]], *, missing: tuple[str, ...] = ()) -> Path:
    """``<data>/data_total.json`` and every image its entries name (``image``, ``reference_img``)."""
    for entry in entries:
        for name in (entry.get("image"), entry.get("reference_img")):
            if isinstance(name, str) and name and name not in missing:
                write_image(data / name)
    return write_json(data / "data_total.json", entries)


# ---- ImgEdit Basic: basic_edit.json; Benchmark.tar's Benchmark/singleturn/<id> ------------------

def imgedit_singleturn(singleturn: Path, entries: dict[str, dict[str, str]], *, json_name: str = "singleturn.json",
                       missing: tuple[str, ...] = ()) -> Path:
    """``Benchmark/singleturn/``: the images under their ``id`` paths, and the JSON beside them."""
    for entry in entries.values():
        if entry["id"] not in missing:
            write_image(singleturn / entry["id"])
    return write_json(singleturn / json_name, entries)
