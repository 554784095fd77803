"""Atomic file writes: a reader never sees a half-written file, even after a crash."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_PARTIAL_GLOB = ".*.tmp"


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> Path:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`.
    A write that fails (a full disk) leaves no temporary file behind. `durable=False` skips the
    fsync, for files that are made again from others when lost (thumbnails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return path


def write_if_changed(path: Path, data: bytes | str) -> bool:
    """`write_atomic(path, data)` unless `path` already holds exactly `data`, which then keeps its
    mtime: a rewrite that changes nothing writes nothing. True when it wrote."""
    content = data.encode() if isinstance(data, str) else data
    with contextlib.suppress(FileNotFoundError):
        # the size first: a changed file is usually told apart without reading it
        if path.stat().st_size == len(content) and path.read_bytes() == content:
            return False
    write_atomic(path, content)
    return True


def remove_partials(folder: Path) -> int:
    """Remove the temporary files a killed writer left under `folder` (only its single writer may
    call this); returns how many there were."""
    leftovers = [p for p in Path(folder).rglob(_PARTIAL_GLOB) if p.is_file()]
    for path in leftovers:
        path.unlink()
    return len(leftovers)
