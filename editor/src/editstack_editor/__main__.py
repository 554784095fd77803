"""The editor service: `python -m editstack_editor`, configured by EDITOR_* variables (settings.py).

Binds EDITOR_ENDPOINT at once (ping answers `loading`), loads one model copy per device in
EDITOR_DEVICES, then serves edit batches until SIGTERM.
"""

from __future__ import annotations

from collections.abc import Callable

from editstack.protocol import Status
from editstack.service import embedded_model, package_versions, run_service, settings_from_env, tiny_details
from editstack.transport import Server

from editstack_editor.settings import EMBEDDED_MODEL, IDENTITY_MODEL, EditorSettings
from editstack_editor.worker import EditorWorker, IdentityBackend


def _loader(settings: EditorSettings, device: str) -> Callable[[], EditorWorker]:
    def load() -> EditorWorker:
        if settings.model == IDENTITY_MODEL:
            return EditorWorker(IdentityBackend(), settings)
        from editstack_editor import tiny
        from editstack_editor.pipeline import DiffusersEditor  # the one module that imports torch

        model = embedded_model(settings.tiny_dir, tiny.build) if settings.model == EMBEDDED_MODEL else settings.model
        backend = DiffusersEditor(model, settings.revision or None, device, settings.dtype,
                                  settings.condition_cap_px, batch_size=settings.batch_size, threads=settings.threads)
        return EditorWorker(backend, settings)

    return load


def main() -> int:
    settings = settings_from_env(EditorSettings, "EDITOR_")
    devices = settings.device_list
    versions = package_versions("torch", "diffusers", "transformers")
    details = {
        "dtype": settings.dtype,
        "steps": str(settings.steps),
        "guidance": str(settings.guidance),
        "condition_max_px": str(settings.condition_cap_px or "pipeline default"),
        "batch_size": str(settings.batch_size),
        "embedded_tiny": str(settings.model == EMBEDDED_MODEL).lower(),
    }

    def status(server: Server) -> Status:
        state = "ready" if server.workers == len(devices) else "loading"
        if settings.model == EMBEDDED_MODEL and state == "ready":
            details["pipeline_class"] = tiny_details(settings.tiny_dir).get("pipeline_class", "")
        return Status(service="editor", state=state, model=settings.model, revision=settings.revision,
                      device=",".join(devices), versions=versions, workers=server.workers, details=details)

    return run_service(settings.endpoint, settings.limits, status, [_loader(settings, d) for d in devices])


if __name__ == "__main__":
    raise SystemExit(main())
