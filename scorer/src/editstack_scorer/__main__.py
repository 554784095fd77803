"""The scorer service: `python -m editstack_scorer`, configured by SCORER_* variables (settings.py).

Binds SCORER_ENDPOINT at once (ping answers `loading`), then serves score batches until SIGTERM.
The transformers judge loads in one worker process per device in SCORER_DEVICES, each with its own
copy of the model (editstack.service.workers: a process that dies is restarted). With
SCORER_BACKEND=openai the judge is a client of its server, in this process: it waits for the server
to answer, then serves as many batches at once as SCORER_API_CONCURRENCY calls keep busy, so the
concurrency is not capped by one batch's items.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
from collections.abc import Callable

import msgspec

from editstack.errors import SettingsError
from editstack.service.process import is_tiny_model, package_versions, run_service
from editstack.service.settings import settings_from_env
from editstack.service.workers import WorkerProcess
from editstack.wire.protocol import ScoreDefaults, Status
from editstack.wire.transport import Server

from editstack_scorer.rubric import load_rubric
from editstack_scorer.settings import ScorerSettings
from editstack_scorer.worker import ScorerWorker, load_worker


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
    served_workers: list[ScorerWorker] = []  # the first: its judge (the server's one client) and cache are shared
    loaders: list[Callable[[], ScorerWorker]] = []
    processes: list[WorkerProcess] = []
    if served:
        def load() -> ScorerWorker:
            """A worker on the one client of the server: made by the first call, shared by the others."""
            if served_workers:
                first = served_workers[0]
                return ScorerWorker(first.judge, first.job_type, settings, first.cache)
            from editstack_scorer.backend import ScoreJob
            from editstack_scorer.cache import JudgeCache
            from editstack_scorer.openai_judge import OpenAIJudge

            judge = OpenAIJudge(settings.api_base, settings.api_model, api_key,
                                concurrency=settings.api_concurrency, timeout_s=settings.api_timeout_s,
                                retries=settings.api_retries, start_timeout_s=settings.api_start_timeout_s,
                                max_new_tokens=settings.max_new_tokens, generate_retries=settings.generate_retries,
                                image_px=settings.judge_image_px)
            cache = JudgeCache(settings.cache_dir, judge.fingerprint) if settings.cache_dir else None
            served_workers.append(ScorerWorker(judge, ScoreJob, settings, cache))
            return served_workers[0]

        loaders = [load] * math.ceil(settings.api_concurrency / settings.batch_size)
    else:
        processes = [WorkerProcess(device, functools.partial(load_worker, settings, device), settings.limits)
                     for device in settings.device_list]

    def status(server: Server) -> Status:
        if served:
            judge = served_workers[0].judge if served_workers else None
            backend, unavailable = (judge.backend, judge.unavailable_modes) if judge else ("", {})
        else:
            loaded = next((p.loaded for p in processes if p.loaded), None)
            backend, unavailable = (loaded.backend, loaded.unavailable_modes) if loaded else ("", {})
        # a served model is named as its server knows it; a folder name when the server is on this machine
        return Status(service="scorer", state="ready" if server.workers == len(loaders or processes) else "loading",
                      model=settings.api_model if served else settings.model,
                      revision="" if served else settings.revision, dtype="" if served else settings.dtype,
                      backend=backend,
                      embedded_tiny=is_tiny_model(settings.api_model if served else settings.model_folder),
                      devices=[] if served else settings.device_list, versions=versions, workers=server.workers,
                      score_defaults=msgspec.structs.replace(defaults, unavailable_modes=unavailable))

    return run_service(settings.endpoint, settings.limits, status, loaders, processes=processes,
                       security=settings.security, rendezvous=settings.rendezvous)


if __name__ == "__main__":
    raise SystemExit(main())
