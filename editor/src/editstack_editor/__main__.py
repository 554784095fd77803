"""The editor service: `python -m editstack_editor`, configured by EDITOR_* variables (settings.py).

Binds EDITOR_ENDPOINT at once (ping answers `loading`), loads one model copy per device in
EDITOR_DEVICES, then serves edit batches until SIGTERM.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from editstack.errors import SettingsError
from editstack.service.process import embedded_model, is_tiny_model, package_versions, run_service
from editstack.service.settings import settings_from_env
from editstack.wire.protocol import EditDefaults, Status
from editstack.wire.transport import Server

from editstack_editor.settings import EMBEDDED_MODEL, IDENTITY_MODEL, EditorSettings
from editstack_editor.worker import EditorWorker, IdentityBackend


def _loader(settings: EditorSettings, device: str, loaded: list[EditorWorker]) -> Callable[[], EditorWorker]:
    def load() -> EditorWorker:
        if settings.model == IDENTITY_MODEL:
            worker = EditorWorker(IdentityBackend(), settings)
        else:
            from editstack_editor import tiny
            from editstack_editor.pipeline import DiffusersEditor  # the one module that imports torch

            model = embedded_model(settings.tiny_dir, tiny.build) if settings.model == EMBEDDED_MODEL else settings.model
            backend = DiffusersEditor(model, settings.revision or None, device, settings.dtype,
                                      settings.condition_cap_px, batch_size=settings.batch_size,
                                      threads=settings.threads)
            worker = EditorWorker(backend, settings)
        loaded.append(worker)
        return worker

    return load


def main() -> int:
    try:
        settings = settings_from_env(EditorSettings, "EDITOR_")
    except SettingsError as exc:
        print(f"editor: {exc}", file=sys.stderr)
        return 2
    devices = settings.device_list
    versions = package_versions("torch", "diffusers", "transformers")
    defaults = EditDefaults(steps=settings.steps, guidance=settings.guidance, negative_prompt=settings.negative_prompt,
                            width=settings.width or None, height=settings.height or None,
                            condition_max_px=settings.condition_cap_px, batch_size=settings.batch_size,
                            limits=dataclasses.asdict(settings.limits))
    loaded: list[EditorWorker] = []

    def status(server: Server) -> Status:
        return Status(service="editor", state="ready" if server.workers == len(devices) else "loading",
                      model=settings.model, revision=settings.revision, dtype=settings.dtype,
                      backend=loaded[0].backend.backend if loaded else "",
                      embedded_tiny=is_tiny_model(settings.model_folder), devices=devices, versions=versions,
                      workers=server.workers, edit_defaults=defaults)

    return run_service(settings.endpoint, settings.limits, status,
                       [_loader(settings, device, loaded) for device in devices])


if __name__ == "__main__":
    raise SystemExit(main())
