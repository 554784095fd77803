"""The editor service: `python -m editstack_editor`, configured by EDITOR_* variables (settings.py).

Binds EDITOR_ENDPOINT at once (ping answers `loading`), starts one worker process per device in
EDITOR_DEVICES, each loading its own model copy (the identity backend too), then serves edit
batches until SIGTERM; a worker process that dies is restarted (editstack.service.workers).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

from editstack.errors import SettingsError
from editstack.service.process import is_tiny_model, package_versions, run_service
from editstack.service.settings import settings_from_env
from editstack.service.workers import WorkerProcess
from editstack.wire.protocol import EditDefaults, Status
from editstack.wire.transport import Server

from editstack_editor.settings import EditorSettings
from editstack_editor.worker import load_worker


def main() -> int:
    try:
        settings = settings_from_env(EditorSettings, "EDITOR_").check()
    except SettingsError as exc:
        print(f"editor: {exc}", file=sys.stderr)
        return 2
    devices = settings.device_list
    versions = package_versions("torch", "diffusers", "transformers")
    defaults = EditDefaults(steps=settings.steps, guidance=settings.guidance, negative_prompt=settings.negative_prompt,
                            width=settings.width or None, height=settings.height or None,
                            condition_max_px=settings.condition_cap_px, batch_size=settings.batch_size,
                            limits=dataclasses.asdict(settings.limits), offload=settings.offload,
                            layerwise_cast=settings.layerwise_cast)
    workers = [WorkerProcess(device, functools.partial(load_worker, settings, device), settings.limits)
               for device in devices]

    def status(server: Server) -> Status:
        return Status(service="editor", state="ready" if server.workers == len(devices) else "loading",
                      model=settings.model, revision=settings.revision, dtype=settings.dtype,
                      backend=next((w.loaded.backend for w in workers if w.loaded), ""),
                      embedded_tiny=is_tiny_model(settings.model_folder), devices=devices, versions=versions,
                      workers=server.workers, edit_defaults=defaults)

    return run_service(settings.endpoint, settings.limits, status, processes=workers, security=settings.security,
                       rendezvous=settings.rendezvous)


if __name__ == "__main__":
    raise SystemExit(main())
