"""The scorer service: `python -m editstack_scorer`, configured by SCORER_* variables (settings.py).

Binds SCORER_ENDPOINT at once (ping answers `loading`), loads the judge on SCORER_DEVICE (or, with
SCORER_BACKEND=openai, waits for its server to answer), then serves score batches until SIGTERM.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import msgspec

from editstack.errors import SettingsError
from editstack.service.process import embedded_model, is_tiny_model, package_versions, run_service
from editstack.service.settings import settings_from_env
from editstack.wire.protocol import ScoreDefaults, Status
from editstack.wire.transport import Server

from editstack_scorer.rubric import load_rubric
from editstack_scorer.settings import EMBEDDED_MODEL, ScorerSettings
from editstack_scorer.worker import ScorerWorker


def main() -> int:
    try:
        settings = settings_from_env(ScorerSettings, "SCORER_")
        rubric = load_rubric(settings.rubric, settings.rubric_dir)
        if problem := settings.backend_problem():
            raise SettingsError(problem)
        served = settings.backend == "openai"
        api_key = settings.api_key() if served else ""
    except SettingsError as exc:
        print(f"scorer: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # an UnknownRubricError lists the known ones; a bad file names its fault
        print(f"scorer: SCORER_RUBRIC={settings.rubric!r}: {exc}", file=sys.stderr)
        return 2
    # the HTTP client logs every request at INFO: thousands of lines a run; retries and failures are
    # logged by the openai client and the judge
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    versions = package_versions("openai") if served else package_versions("torch", "transformers")
    defaults = ScoreDefaults(mode=settings.mode, rubric_id=rubric.id, rubric_version=rubric.version,
                             rubric_sha256=rubric.sha256, aggregation=rubric.aggregation, batch_size=settings.batch_size,
                             max_new_tokens=settings.max_new_tokens, generate_retries=settings.generate_retries,
                             judge_image_px=settings.judge_image_px, limits=dataclasses.asdict(settings.limits))
    loaded: list[ScorerWorker] = []

    def load() -> ScorerWorker:
        from editstack_scorer.backend import ScoreJob
        from editstack_scorer.cache import JudgeCache

        if served:
            from editstack_scorer.openai_judge import OpenAIJudge

            judge = OpenAIJudge(settings.api_base, settings.api_model, api_key,
                                concurrency=settings.api_concurrency, timeout_s=settings.api_timeout_s,
                                retries=settings.api_retries, start_timeout_s=settings.api_start_timeout_s,
                                max_new_tokens=settings.max_new_tokens, generate_retries=settings.generate_retries,
                                image_px=settings.judge_image_px)
        else:
            from editstack_scorer import tiny
            from editstack_scorer.judge import Judge  # the one module that imports torch

            model = (embedded_model(settings.tiny_dir, tiny.build) if settings.model == EMBEDDED_MODEL
                     else settings.model)
            judge = Judge(model, settings.revision or None, settings.device, settings.dtype,
                          max_new_tokens=settings.max_new_tokens, generate_retries=settings.generate_retries,
                          threads=settings.threads, image_px=settings.judge_image_px)
        cache = JudgeCache(settings.cache_dir, judge.fingerprint) if settings.cache_dir else None
        loaded.append(ScorerWorker(judge, ScoreJob, settings, cache))
        return loaded[-1]

    def status(server: Server) -> Status:
        judge = loaded[0].judge if loaded else None
        # a served model is named as its server knows it; a folder name when the server is on this machine
        return Status(service="scorer", state="ready" if server.workers else "loading",
                      model=settings.api_model if served else settings.model,
                      revision="" if served else settings.revision, dtype="" if served else settings.dtype,
                      backend=judge.backend if judge else "",
                      embedded_tiny=is_tiny_model(settings.api_model if served else settings.model_folder),
                      devices=[] if served else [settings.device], versions=versions, workers=server.workers,
                      score_defaults=msgspec.structs.replace(defaults, unavailable_modes=judge.unavailable_modes)
                      if judge else defaults)

    return run_service(settings.endpoint, settings.limits, status, [load], security=settings.security,
                       rendezvous=settings.rendezvous)


if __name__ == "__main__":
    raise SystemExit(main())
