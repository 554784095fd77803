"""Editor service benchmark: edit requests of 4 RGB 64×64 images through real editor processes on CPU.

Measured side by side, interleaved, in one run (medians of several repetitions):
  tiny      the embedded tiny Qwen-Image-Edit pipeline at the editor's defaults (EDITOR_STEPS 4,
            output at the source's 64×64, conditioning image capped at 64², one item per pipeline call)
  identity  EDITOR_MODEL=identity: the same requests with no model, the service's own cost
  1 worker, 2 workers
            the tiny model with EDITOR_THREADS=1 on EDITOR_DEVICES=cpu and on cpu,cpu (one worker
            process per device), each call two clients sending requests at once, interleaved with
            each other only (the tiny case's idle torch threads spin on the cores for a while after
            each request): workers_speedup is the ratio of their medians, how far a second worker
            process scales on two cores
  load      seconds from process start until ping says ready, on the tiny model built beforehand:
            Python start and imports (torch, diffusers) plus the model load; the model load alone
            is the figure the service logs
Its edits are noise: these figures time the stack, not a model worth running. The last line is the
summary BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np

from editstack.wire.codec import Blobs, Limits, read_image
from editstack.wire.protocol import EditItem, EditRequest
from editstack.wire.transport import Client

from harness import (Service, build_tiny, cold_starts, load_average, machine, measure, print_times, short_dir,
                     together, torch_threads)

BATCH, SIDE = 4, 64
CLIENTS = 2  # requests in flight at once in the workers cases: enough to keep two workers busy
REQUESTS = 3  # requests each client sends one after another per call: the slower client's lag evens out
INSTRUCTIONS = ("make the sky blue", "add a red hat to the cat", "remove the dog", "turn it into a watercolor painting")
# pipeline.py logs "loaded <model> (<class>, revision …) on <device> as <dtype> in <s> s"
MODEL_LOAD_LOG = re.compile(r"loaded .* in ([0-9.]+) s")


def _request(images: list[np.ndarray]) -> tuple[EditRequest, Blobs]:
    blobs = Blobs()
    items = [EditItem(id=str(k), instruction=INSTRUCTIONS[k % len(INSTRUCTIONS)], images=[blobs.add(im)], seed=k,
                      width=SIDE, height=SIDE)
             for k, im in enumerate(images)]
    return EditRequest(items), blobs


def _edit_call(client: Client, images: list[np.ndarray], requests: int = 1) -> Callable[[], None]:
    limits = Limits()

    def call() -> None:
        for _ in range(requests):
            reply, received = client.edit(*_request(images))
            assert all(r.error is None for r in reply.items), [r.error for r in reply.items]
            assert all(read_image(r.image, received, limits).shape == (SIDE, SIDE, 3) for r in reply.items)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed requests per case")
    parser.add_argument("--load-repeats", type=int, default=3, help="cold starts of the tiny editor")
    args = parser.parse_args()
    load_at_start = load_average()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(BATCH)]
    tmp = short_dir()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        build_s = build_tiny("editor", tmp / "tiny")
        tiny_env = {"EDITOR_TINY_DIR": str(tmp / "tiny")}

        starts = cold_starts("editor", tmp, tiny_env, args.load_repeats, MODEL_LOAD_LOG)
        tiny = stack.enter_context(Service.of("editor", tmp, "tiny", tiny_env))
        identity = stack.enter_context(Service.of("editor", tmp, "identity", {"EDITOR_MODEL": "identity"}))
        workers = {name: stack.enter_context(Service.of("editor", tmp, log_name,
                                                        {**tiny_env, "EDITOR_THREADS": "1", "EDITOR_DEVICES": devices}))
                   for name, log_name, devices in (("1 worker", "one-worker", "cpu"),
                                                   ("2 workers", "two-workers", "cpu,cpu"))}
        for service in (tiny, identity, *workers.values()):
            service.wait_ready()

        def edit_call(service: Service, requests: int = 1) -> Callable[[], None]:
            client = stack.enter_context(Client(service.endpoint, timeout_s=300, retries=0))
            return _edit_call(client, images, requests)

        times = measure({"tiny": edit_call(tiny), "identity": edit_call(identity)}, args.repeats)
        pool = stack.enter_context(ThreadPoolExecutor(CLIENTS))
        worker_times = measure({name: together(pool, [edit_call(s, REQUESTS) for _ in range(CLIENTS)])
                                for name, s in workers.items()}, args.repeats)
        threads = torch_threads("editor")

    median = print_times(times, f"request of {BATCH} edits")
    median |= print_times(worker_times, f"{CLIENTS} clients x {REQUESTS} requests of {BATCH} edits")
    print(f"tiny model build (once, before the starts; Python start + imports + build): {build_s:.2f} s")
    load = starts.print("torch, diffusers, transformers")
    print(f"machine: {machine()}, {threads}; load average at start {load_at_start}, at end {load_average()}")
    print(f"editor: tiny_edits_per_s={BATCH / median['tiny']:.2f} "
          f"identity_edits_per_s={BATCH / median['identity']:.0f} load_s={load:.2f} "
          f"workers_speedup={median['1 worker'] / median['2 workers']:.2f}")


if __name__ == "__main__":
    main()
