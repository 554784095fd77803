"""The built-in sample benchmark: synthetic scenes drawn with Pillow, written as a manifest.

Twelve 256×256 scenes (a sky gradient over the ground, with balls, boxes, trees, houses, a sun,
clouds, a seesaw) in six categories: color, add, remove, replace, background and physics. Each
scene is drawn twice, as it is and as the instruction should leave it (the reference), and is
asked for in English and in Chinese: 24 items, ids ``<category>-<scene>-<en|zh>``, each with its
expected image as an image reference. Every category carries its aliases from
`editstack.runner.categories` (``physics`` also answers to ``物理``) for ``--categories``.

Everything is drawn from constants with fixed PNG settings, so a given Pillow build writes the
same bytes every time. `write_sample` skips the work when the folder already holds this
`SAMPLE_VERSION`; change the version whenever a scene or instruction changes, so results from
different sample data never share a version.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from editstack.runner.categories import aliases
from editstack.runner.files import write_atomic

logger = logging.getLogger(__name__)

SAMPLE_VERSION = "1"
SIZE_PX = 256
_MARKER_NAME = ".editstack-sample"

RGB = tuple[int, int, int]
_DAY_SKY: tuple[RGB, RGB] = ((95, 160, 230), (200, 225, 250))
_NIGHT_SKY: tuple[RGB, RGB] = ((8, 12, 40), (45, 55, 100))
_GRASS: RGB = (90, 160, 70)
_SAND: RGB = (215, 195, 145)
_SNOW: RGB = (238, 242, 248)
_RED: RGB = (205, 40, 40)
_BLUE: RGB = (45, 85, 205)
_GREEN: RGB = (35, 150, 75)
_YELLOW: RGB = (240, 205, 40)
_HORIZON_Y = 150


@dataclass(frozen=True)
class _Shape:
    """One filled shape: `points` are the bounding box corners, or a polygon's vertices."""

    kind: str  # the ImageDraw method: "ellipse", "rectangle" or "polygon"
    points: tuple[tuple[int, int], ...]
    fill: RGB


@dataclass(frozen=True)
class _Scene:
    shapes: tuple[_Shape, ...]
    sky: tuple[RGB, RGB] = _DAY_SKY  # top colour, horizon colour
    ground: RGB = _GRASS


@dataclass(frozen=True)
class _Case:
    category: str
    number: int
    before: _Scene
    after: _Scene
    en: str
    zh: str


# ---- objects, each a few shapes standing on (or centred at) the given point ---------------------

def _ball(cx: int, cy: int, r: int, fill: RGB) -> tuple[_Shape, ...]:
    return (_Shape("ellipse", ((cx - r, cy - r), (cx + r, cy + r)), fill),)


def _box(cx: int, base_y: int, size: int, fill: RGB) -> tuple[_Shape, ...]:
    return (_Shape("rectangle", ((cx - size // 2, base_y - size), (cx + size // 2, base_y)), fill),)


def _tree(x: int, base_y: int) -> tuple[_Shape, ...]:
    return (_Shape("rectangle", ((x - 6, base_y - 30), (x + 6, base_y)), (110, 75, 40)),
            _Shape("polygon", ((x - 30, base_y - 25), (x + 30, base_y - 25), (x, base_y - 95)), (30, 110, 50)))


def _house(x: int, base_y: int) -> tuple[_Shape, ...]:
    return (_Shape("rectangle", ((x - 35, base_y - 55), (x + 35, base_y)), (225, 205, 170)),
            _Shape("polygon", ((x - 43, base_y - 55), (x + 43, base_y - 55), (x, base_y - 95)), (170, 60, 50)),
            _Shape("rectangle", ((x - 9, base_y - 28), (x + 9, base_y)), (100, 70, 50)))


def _sun(cx: int, cy: int) -> tuple[_Shape, ...]:
    return _ball(cx, cy, 22, (250, 215, 60))


def _moon(cx: int, cy: int) -> tuple[_Shape, ...]:
    return _ball(cx, cy, 16, (235, 235, 205))


def _cloud(cx: int, cy: int) -> tuple[_Shape, ...]:
    white = (246, 246, 250)
    return (_Shape("ellipse", ((cx - 38, cy - 10), (cx - 2, cy + 14)), white),
            _Shape("ellipse", ((cx - 20, cy - 22), (cx + 20, cy + 14)), white),
            _Shape("ellipse", ((cx + 2, cy - 10), (cx + 38, cy + 14)), white))


def _seesaw(left_y: int, right_y: int) -> tuple[_Shape, ...]:
    """A plank from x=48 to x=208 whose top edge runs from `left_y` to `right_y`, on a pivot."""
    return (_Shape("polygon", ((128, 196), (110, 228), (146, 228)), (120, 120, 130)),
            _Shape("polygon", ((48, left_y), (208, right_y), (208, right_y + 8), (48, left_y + 8)), (150, 100, 55)))


def _cases() -> tuple[_Case, ...]:
    ground = 210  # where objects stand
    return (
        _Case("color", 1, _Scene(_ball(128, 185, 28, _RED)), _Scene(_ball(128, 185, 28, _BLUE)),
              "Change the red ball to blue.", "把红色的球变成蓝色。"),
        _Case("color", 2, _Scene(_box(128, ground, 60, _GREEN), ground=_SAND),
              _Scene(_box(128, ground, 60, _YELLOW), ground=_SAND),
              "Paint the green box yellow.", "把绿色的箱子涂成黄色。"),
        _Case("add", 1, _Scene(_tree(80, ground)), _Scene(_tree(80, ground) + _sun(196, 48)),
              "Add a yellow sun in the upper right of the sky.", "在天空的右上方添加一个黄色的太阳。"),
        _Case("add", 2, _Scene(_house(160, ground)), _Scene(_tree(60, ground) + _house(160, ground)),
              "Add a tree to the left of the house.", "在房子的左边添加一棵树。"),
        _Case("remove", 1, _Scene(_ball(85, 190, 24, _RED) + _ball(175, 190, 24, _BLUE)),
              _Scene(_ball(85, 190, 24, _RED)),
              "Remove the blue ball.", "移除蓝色的球。"),
        _Case("remove", 2, _Scene(_sun(60, 50) + _cloud(170, 62) + _tree(128, ground)),
              _Scene(_sun(60, 50) + _tree(128, ground)),
              "Remove the cloud from the sky.", "去掉天空中的云。"),
        _Case("replace", 1, _Scene(_ball(128, 185, 25, _RED)), _Scene(_box(128, ground, 50, _RED)),
              "Replace the red ball with a red box.", "把红色的球换成一个红色的箱子。"),
        _Case("replace", 2, _Scene(_tree(128, ground)), _Scene(_house(128, ground)),
              "Replace the tree with a small house.", "把树换成一座小房子。"),
        _Case("background", 1, _Scene(_house(128, ground)),
              _Scene(_moon(200, 45) + _house(128, ground), sky=_NIGHT_SKY),
              "Turn the daytime sky into a night sky with a moon.", "把白天的天空变成有月亮的夜空。"),
        _Case("background", 2, _Scene(_tree(90, ground) + _tree(170, ground)),
              _Scene(_tree(90, ground) + _tree(170, ground), ground=_SNOW),
              "Cover the green ground with snow.", "让绿色的地面被白雪覆盖。"),
        _Case("physics", 1, _Scene(_ball(128, 60, 20, _RED)), _Scene(_ball(128, ground - 20, 20, _RED)),
              "Show the ball after it has fallen to the ground.", "画出这个球落到地面之后的样子。"),
        _Case("physics", 2, _Scene(_seesaw(188, 188)),
              _Scene(_seesaw(212, 164) + (_Shape("rectangle", ((52, 176), (84, 206)), (90, 90, 100)),)),
              "Put a heavy box on the left end of the seesaw.", "在跷跷板的左端放一个很重的箱子。"),
    )


def write_sample(out_dir: Path, manifest_name: str) -> Path:
    """Write the sample's PNGs and its manifest, named `manifest_name`, under `out_dir` (unless this
    version is already there) and return the manifest's path."""
    out_dir = Path(out_dir)
    manifest = out_dir / manifest_name
    marker = out_dir / _MARKER_NAME
    marker_text = f"editstack sample benchmark, version {SAMPLE_VERSION}\n"
    if manifest.is_file() and marker.is_file() and marker.read_text(encoding="utf-8") == marker_text:
        return manifest
    logger.info("writing sample benchmark version %s to %s", SAMPLE_VERSION, out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for case in _cases():
        scene = f"{case.category}-{case.number}"
        source, reference = f"images/{scene}.png", f"images/{scene}-expected.png"
        write_atomic(out_dir / source, _png(case.before))
        write_atomic(out_dir / reference, _png(case.after))
        for language, instruction in (("en", case.en), ("zh", case.zh)):
            record = {"id": f"{scene}-{language}", "category": case.category,
                      "category_aliases": list(aliases("sample", case.category)),
                      "instruction": instruction, "language": language, "sources": [source],
                      "references": [{"kind": "image", "value": reference}],
                      "metadata": {"scene": scene, "sample_version": SAMPLE_VERSION}}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_atomic(manifest, "".join(lines).encode("utf-8"))
    # The marker goes last: a write cut short leaves no marker and is redone next time.
    write_atomic(marker, marker_text.encode("utf-8"))
    return manifest


def _png(scene: _Scene) -> bytes:
    image = Image.new("RGB", (SIZE_PX, SIZE_PX), scene.ground)
    draw = ImageDraw.Draw(image)
    top, horizon = scene.sky
    for y in range(_HORIZON_Y):
        colour = tuple(a + (b - a) * y // (_HORIZON_Y - 1) for a, b in zip(top, horizon, strict=True))
        draw.line(((0, y), (SIZE_PX - 1, y)), fill=colour)
    for shape in scene.shapes:
        getattr(draw, shape.kind)(list(shape.points), fill=shape.fill)
    buffer = io.BytesIO()
    # Fixed encoder settings and no metadata chunks: the same pixels always give the same bytes.
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
