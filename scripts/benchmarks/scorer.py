"""Scorer service benchmark: score requests of 4 items (RGB 64×64 source and edit) through real scorer
processes running the embedded tiny Qwen3-VL judge on CPU (SCORER_BATCH_SIZE 4: one forward pass per request).

Measured side by side, interleaved, in one run (medians of several repetitions):
  logits               expected score from the answer tokens' probabilities: one forward pass per question
  generate             a JSON reply per question group, SCORER_MAX_NEW_TOKENS tokens at most, with the
                       default SCORER_GENERATE_RETRIES (2): the tiny judge's replies are gibberish, so
                       every item fails after its retries; items/s counts items answered, failed or not
  generate_no_retries  the same with SCORER_GENERATE_RETRIES=0: one generation per item
  logits_1024, _2048   logits mode on a 1024² and a 2048² source and edit, shown to the judge within the
                       default SCORER_JUDGE_IMAGE_PX (768²); without the budget a 2048² pair costs the
                       judge 12x what a 1024² one does
  1 judge, 2 judges    logits mode with SCORER_THREADS=1 on SCORER_DEVICES=cpu and on cpu,cpu (one judge
                       process per device), each call two clients sending requests at once:
                       judges_speedup is the ratio of their medians, how far a second judge process
                       scales on two cores
  load                 seconds from process start until ping says ready, on the judge built beforehand:
                       Python start and imports (torch, transformers) plus the model load; the model
                       load alone is the figure the service logs
Its scores mean nothing: these figures time the stack. The last line is the summary BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np

from editstack.wire.codec import Blobs
from editstack.wire.protocol import ScoreItem, ScoreRequest, ScoreResult
from editstack.wire.transport import Client

from harness import (Service, build_tiny, cold_starts, load_average, machine, measure, print_times, short_dir,
                     together, torch_threads)

BATCH, SIDE = 4, 64
CLIENTS = 2  # requests in flight at once in the judges cases: enough to keep two judge processes busy
REQUESTS = 3  # requests each client sends one after another per call: the slower client's lag evens out
LARGE_SIDES = (1024, 2048)  # edits at the real models' sizes, for the judge's image budget
INSTRUCTIONS = ("make the sky blue", "add a red hat to the cat", "remove the dog", "turn it into a watercolor painting")
# judge.py logs "judge <model> (revision …) loaded on <device> as <dtype> in <s> s"
MODEL_LOAD_LOG = re.compile(r"judge .* loaded on .* in ([0-9.]+) s")


def _request(images: list[np.ndarray], mode: str) -> tuple[ScoreRequest, Blobs]:
    """BATCH items, item k judging images[-1 - k] as an edit of images[k]."""
    blobs = Blobs()
    items = [ScoreItem(id=str(k), instruction=INSTRUCTIONS[k % len(INSTRUCTIONS)], sources=[blobs.add(images[k])],
                       edited=blobs.add(images[-1 - k])) for k in range(BATCH)]
    return ScoreRequest(items, mode=mode), blobs


def _attempts(result: ScoreResult) -> int:
    """Judge generations an item took: a scored item says so; a failed one keeps every reply's raw text."""
    return result.verdict.attempts if result.verdict is not None else len(result.error.raw)


def _score_call(client: Client, images: list[np.ndarray], mode: str, outcomes: Counter[tuple[str, int]],
                requests: int = 1) -> Callable[[], None]:
    """A call that sends `requests` requests one after another and counts their items' (outcome,
    attempts) in `outcomes`."""

    def call() -> None:
        for _ in range(requests):
            reply = client.score(*_request(images, mode))
            assert len(reply.items) == BATCH
            for result in reply.items:
                outcomes[(result.error.code if result.error else "scored", _attempts(result))] += 1

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed requests per case")
    parser.add_argument("--load-repeats", type=int, default=3, help="cold starts of the scorer")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="SCORER_MAX_NEW_TOKENS for generate")
    args = parser.parse_args()
    load_at_start = load_average()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(BATCH)]
    large = {side: [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(BATCH)]
             for side in LARGE_SIDES}
    tmp = short_dir()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        build_s = build_tiny("scorer", tmp / "tiny")
        env = {"SCORER_TINY_DIR": str(tmp / "tiny"), "SCORER_MAX_NEW_TOKENS": str(args.max_new_tokens)}

        starts = cold_starts("scorer", tmp, env, args.load_repeats, MODEL_LOAD_LOG)
        judge = stack.enter_context(Service.of("scorer", tmp, "judge", env))
        no_retries = stack.enter_context(Service.of("scorer", tmp, "no-retries",
                                                    {**env, "SCORER_GENERATE_RETRIES": "0"}))
        judges = {name: stack.enter_context(Service.of("scorer", tmp, log_name,
                                                       {**env, "SCORER_THREADS": "1", "SCORER_DEVICES": devices}))
                  for name, log_name, devices in (("1 judge", "one-judge", "cpu"), ("2 judges", "two-judges", "cpu,cpu"))}
        for service in (judge, no_retries, *judges.values()):
            service.wait_ready()
        outcomes: dict[str, Counter[tuple[str, int]]] = {}
        cases = {}
        for name, service, mode in (("logits", judge, "logits"), ("generate", judge, "generate"),
                                    ("generate_no_retries", no_retries, "generate")):
            outcomes[name] = Counter()
            client = stack.enter_context(Client(service.endpoint, timeout_s=300, retries=0))
            cases[name] = _score_call(client, images, mode, outcomes[name])
        for side in LARGE_SIDES:
            client = stack.enter_context(Client(judge.endpoint, timeout_s=300, retries=0))
            outcomes[f"logits_{side}"] = Counter()
            cases[f"logits_{side}"] = _score_call(client, large[side], "logits", outcomes[f"logits_{side}"])
        times = measure(cases, args.repeats)
        pool = stack.enter_context(ThreadPoolExecutor(CLIENTS))
        for name, service in judges.items():
            outcomes[name] = Counter()
            calls = [_score_call(stack.enter_context(Client(service.endpoint, timeout_s=300, retries=0)), images,
                                 "logits", outcomes[name], REQUESTS) for _ in range(CLIENTS)]
            cases[name] = together(pool, calls)
        judge_times = measure({name: cases[name] for name in judges}, args.repeats)
        threads = torch_threads("scorer")

    median = print_times(times, f"request of {BATCH} items")
    median |= print_times(judge_times, f"{CLIENTS} clients x {REQUESTS} requests of {BATCH} items")
    for name, counted in outcomes.items():
        summary = ", ".join(f"{n} {code} after {attempts} generation(s)" if name.startswith("generate") else f"{n} {code}"
                            for (code, attempts), n in sorted(counted.items()))
        print(f"{name:>19}: items over all calls (warm-up included): {summary}")
    print(f"tiny judge build (once, before the starts; Python start + imports + build): {build_s:.2f} s")
    load = starts.print("torch, transformers")
    print(f"note: generate_items_per_s is the generate case: default retries (2), at most {args.max_new_tokens} new "
          f"tokens per generation, items answered per second whether scored or failed; "
          f"without retries: {BATCH / median['generate_no_retries']:.2f} items/s")
    print(f"machine: {machine()}, {threads}; load average at start {load_at_start}, at end {load_average()}")
    print(f"scorer: logits_items_per_s={BATCH / median['logits']:.2f} "
          f"generate_items_per_s={BATCH / median['generate']:.2f} load_s={load:.2f} "
          + " ".join(f"items_per_s_{side}={BATCH / median[f'logits_{side}']:.2f}" for side in LARGE_SIDES)
          + f" judges_speedup={median['1 judge'] / median['2 judges']:.2f}")


if __name__ == "__main__":
    main()
