"""The editor service: `python -m editstack_editor`, configured by EDITOR_* variables (settings.py).

Binds EDITOR_ENDPOINT at once (ping answers `loading`), loads one model copy per device in
EDITOR_DEVICES, then serves edit batches until SIGTERM.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path

import editstack
from editstack.protocol import Status
from editstack.service import run_service, settings_from_env
from editstack.transport import Server

from editstack_editor.settings import EMBEDDED_MODEL, IDENTITY_MODEL, EditorSettings
from editstack_editor.worker import EditorWorker, IdentityBackend

log = logging.getLogger("editstack_editor")

TINY_MARKER = "editstack_tiny.json"


def _model_path(settings: EditorSettings) -> str:
    """What from_pretrained loads: the embedded tiny model's folder, built when missing, or the model id."""
    if settings.model != EMBEDDED_MODEL:
        return settings.model
    from editstack_editor import tiny

    folder = Path(settings.tiny_dir).expanduser()
    if not (folder / TINY_MARKER).is_file():
        log.info("building the embedded tiny model in %s", folder)
    return str(tiny.build(folder))


def _loader(settings: EditorSettings, device: str):
    def load() -> EditorWorker:
        if settings.model == IDENTITY_MODEL:
            return EditorWorker(IdentityBackend(), settings)
        from editstack_editor.pipeline import DiffusersEditor  # the one module that imports torch

        backend = DiffusersEditor(_model_path(settings), settings.revision or None, device, settings.dtype,
                                  settings.condition_max_px or None)
        return EditorWorker(backend, settings)

    return load


def _versions() -> dict[str, str]:
    versions = {"editstack": editstack.__version__}
    for package in ("torch", "diffusers", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def main() -> int:
    settings = settings_from_env(EditorSettings, "EDITOR_")
    devices = settings.device_list
    versions = _versions()
    details = {
        "dtype": settings.dtype,
        "steps": str(settings.steps),
        "guidance": str(settings.guidance),
        "condition_max_px": str(settings.condition_max_px),
        "embedded_tiny": str(settings.model == EMBEDDED_MODEL).lower(),
    }
    if settings.model == EMBEDDED_MODEL:
        marker = Path(settings.tiny_dir).expanduser() / TINY_MARKER
        if marker.is_file():
            details["pipeline_class"] = json.loads(marker.read_text())["pipeline_class"]

    def status(server: Server) -> Status:
        state = "ready" if server.workers == len(devices) else "loading"
        return Status(service="editor", state=state, model=settings.model, revision=settings.revision,
                      device=",".join(devices), versions=versions, workers=server.workers, details=details)

    return run_service(settings.endpoint, settings.limits, status, [_loader(settings, d) for d in devices])


if __name__ == "__main__":
    raise SystemExit(main())
