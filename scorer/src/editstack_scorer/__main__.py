"""The scorer service: `python -m editstack_scorer`, configured by SCORER_* variables (settings.py).

Binds SCORER_ENDPOINT at once (ping answers `loading`), loads the judge on SCORER_DEVICE, then
serves score batches until SIGTERM.
"""

from __future__ import annotations

from editstack.protocol import Status
from editstack.service import embedded_model, package_versions, run_service, settings_from_env
from editstack.transport import Server

from editstack_scorer.rubric import MODES, load_rubric
from editstack_scorer.settings import EMBEDDED_MODEL, ScorerSettings
from editstack_scorer.worker import ScorerWorker


def main() -> int:
    settings = settings_from_env(ScorerSettings, "SCORER_")
    if settings.mode not in MODES:
        raise SystemExit(f"SCORER_MODE={settings.mode!r} is not one of {', '.join(MODES)}")
    rubric = load_rubric(settings.rubric)  # an unknown rubric stops the service here, with the known ones listed
    versions = package_versions("torch", "transformers")
    details = {
        "rubric_id": rubric.id,
        "rubric_version": rubric.version,
        "aggregation": rubric.aggregation,
        "mode": settings.mode,
        "dtype": settings.dtype,
        "batch_size": str(settings.batch_size),
        "embedded_tiny": str(settings.model == EMBEDDED_MODEL).lower(),
    }

    def load() -> ScorerWorker:
        from editstack_scorer import tiny
        from editstack_scorer.judge import Judge, ScoreJob  # the one module that imports torch

        model = embedded_model(settings.tiny_dir, tiny.build) if settings.model == EMBEDDED_MODEL else settings.model
        judge = Judge(model, settings.revision or None, settings.device, settings.dtype,
                      max_new_tokens=settings.max_new_tokens, generate_retries=settings.generate_retries,
                      threads=settings.threads)
        return ScorerWorker(judge, ScoreJob, settings)

    def status(server: Server) -> Status:
        return Status(service="scorer", state="ready" if server.workers else "loading", model=settings.model,
                      revision=settings.revision, device=settings.device, versions=versions, workers=server.workers,
                      details=details)

    return run_service(settings.endpoint, settings.limits, status, [load])


if __name__ == "__main__":
    raise SystemExit(main())
