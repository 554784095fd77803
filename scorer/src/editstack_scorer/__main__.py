"""The scorer service: `python -m editstack_scorer`, configured by SCORER_* variables (settings.py).

Binds SCORER_ENDPOINT at once (ping answers `loading`), loads the judge on SCORER_DEVICE, then
serves score batches until SIGTERM.
"""

from __future__ import annotations

import dataclasses
import sys

from editstack.errors import SettingsError
from editstack.service.process import embedded_model, is_tiny_model, package_versions, run_service
from editstack.service.settings import settings_from_env
from editstack.wire.protocol import ScoreDefaults, Status
from editstack.wire.transport import Server

from editstack_scorer.rubric import UnknownRubricError, load_rubric
from editstack_scorer.settings import EMBEDDED_MODEL, ScorerSettings
from editstack_scorer.worker import ScorerWorker


def main() -> int:
    try:
        settings = settings_from_env(ScorerSettings, "SCORER_")
        rubric = load_rubric(settings.rubric, settings.rubric_dir)
    except SettingsError as exc:
        print(f"scorer: {exc}", file=sys.stderr)
        return 2
    except (UnknownRubricError, ValueError) as exc:  # it lists the known ones, or names the file's fault
        print(f"scorer: SCORER_RUBRIC={settings.rubric!r}: {exc}", file=sys.stderr)
        return 2
    versions = package_versions("torch", "transformers")
    defaults = ScoreDefaults(mode=settings.mode, rubric_id=rubric.id, rubric_version=rubric.version,
                             rubric_sha256=rubric.sha256, aggregation=rubric.aggregation, batch_size=settings.batch_size,
                             max_new_tokens=settings.max_new_tokens, generate_retries=settings.generate_retries,
                             judge_image_px=settings.judge_image_px, limits=dataclasses.asdict(settings.limits))
    loaded: list[ScorerWorker] = []

    def load() -> ScorerWorker:
        from editstack_scorer import tiny
        from editstack_scorer.judge import Judge, ScoreJob  # the one module that imports torch

        model = embedded_model(settings.tiny_dir, tiny.build) if settings.model == EMBEDDED_MODEL else settings.model
        judge = Judge(model, settings.revision or None, settings.device, settings.dtype,
                      max_new_tokens=settings.max_new_tokens, generate_retries=settings.generate_retries,
                      threads=settings.threads, image_px=settings.judge_image_px)
        loaded.append(ScorerWorker(judge, ScoreJob, settings))
        return loaded[-1]

    def status(server: Server) -> Status:
        return Status(service="scorer", state="ready" if server.workers else "loading", model=settings.model,
                      revision=settings.revision, dtype=settings.dtype,
                      backend=loaded[0].judge.backend if loaded else "",
                      embedded_tiny=is_tiny_model(settings.model_folder), devices=[settings.device],
                      versions=versions, workers=server.workers, score_defaults=defaults)

    return run_service(settings.endpoint, settings.limits, status, [load])


if __name__ == "__main__":
    raise SystemExit(main())
