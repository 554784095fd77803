"""The run folder and its results journal. The runner is the folder's only writer.

    runs/<name>/
      config.yaml        the resolved config
      manifest.json      what produced the run: services' ping info, versions, seeds, times
      edits/<category>/<id>.png
      results.jsonl      one record per item, appended and flushed as each item finishes
      report.md, report.html, summary.json, summary.csv

Every file but the journal is written atomically (temp file + rename). The journal is
append-only; a crash can only tear its last line, which `load` drops.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from editstack.files import write_atomic

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"


@dataclass
class JournalContents:
    """What `Journal.load` read."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    torn_last_line: bool = False


class Journal:
    """results.jsonl: one JSON record per item, keyed by its "id"; thread-safe appends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> JournalContents:
        """Records by id (a later record of an id wins). A torn last line is dropped with a warning;
        any other unreadable line is listed in `problems`."""
        contents = JournalContents()
        if not self.path.exists():
            return contents
        # split on b"\n" only: str.splitlines would also split at U+2028 inside a JSON string
        lines = self.path.read_bytes().split(b"\n")
        last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                contents.records[record["id"]] = record
            except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError too
                if number == last:
                    contents.torn_last_line = True
                    log.warning("%s: dropped its last line %d (torn by a crash?): %s", self.path, number, exc)
                else:
                    contents.problems.append(f"{self.path.name} line {number}: not a JSON record: {exc}")
        return contents

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the journal with exactly `records` (atomically): how resume drops failed items."""
        with self._lock:
            write_atomic(self.path, "".join(_line(r) for r in records))

    def append(self, record: dict[str, Any]) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(_line(record))
            out.flush()
            os.fsync(out.fileno())


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
