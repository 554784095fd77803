"""Transport benchmark: a batch of 4 RGB 1024×1024 images, round trip through a real server process.

Measured side by side, interleaved, in one run (medians of several repetitions):
  inproc      the echo service's work as a plain function call (no transport)
  ipc, tcp    the same request through the echo service process (editstack codec + server loop)
  floor       a bare pyzmq REQ/REP echo of the same raw frames between two processes over ipc
  subprocess  the practice editstack replaces: a fresh Python process per batch, the images as
              base64 PNG inside JSON on stdin/stdout
Per-image figures are the time beyond the in-process call (the floor does no work, so it is its
whole round trip). The last line is the summary the README and BENCHMARKS.md quote.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq
from PIL import Image

from editstack.codec import Blobs, Limits, read_image
from editstack.echo import EchoWorker
from editstack.protocol import EditItem, EditRequest
from editstack.transport import Client

BATCH, SIDE = 4, 1024

FLOOR_SERVER = """
import sys, zmq
s = zmq.Context().socket(zmq.REP)
s.bind(sys.argv[1])
while True:
    s.send_multipart(s.recv_multipart(copy=False), copy=False)
"""

SUBPROCESS_JUDGE = """
import base64, io, json, sys
import numpy as np
from PIL import Image
batch = json.load(sys.stdin)
out = []
for b64 in batch["images"]:
    array = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    out.append(base64.b64encode(buf.getvalue()).decode())
json.dump({"images": out}, sys.stdout)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(endpoint: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, timeout_s=1, retries=0) as client:
        while time.monotonic() < deadline:
            try:
                if client.ping().state == "ready":
                    return
            except Exception:
                time.sleep(0.1)
    raise TimeoutError(f"{endpoint} not ready in {timeout_s}s")


def _request(images: list[np.ndarray]) -> tuple[EditRequest, Blobs]:
    blobs = Blobs()
    items = [EditItem(id=str(k), instruction="keep", image=blobs.add(im)) for k, im in enumerate(images)]
    return EditRequest(items), blobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--subprocess-repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(BATCH)]
    limits = Limits()
    worker = EchoWorker(limits)
    tmp = Path(tempfile.mkdtemp(prefix="es-bench-", dir="/tmp"))
    ipc, tcp, floor = f"ipc://{tmp}/echo.sock", f"tcp://127.0.0.1:{_free_port()}", f"ipc://{tmp}/floor.sock"
    procs = [subprocess.Popen([sys.executable, "-m", "editstack.echo", endpoint], stderr=subprocess.DEVNULL)
             for endpoint in (ipc, tcp)]
    procs.append(subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, floor]))
    try:
        for endpoint in (ipc, tcp):
            _wait_ready(endpoint)
        ipc_client, tcp_client = Client(ipc, timeout_s=60), Client(tcp, timeout_s=60)
        floor_socket = zmq.Context.instance().socket(zmq.REQ)
        floor_socket.connect(floor)
        raw_frames = [np.ascontiguousarray(im) for im in images]

        def inproc() -> None:
            request, blobs = _request(images)
            reply, out = worker.handle(request, [memoryview(f).cast("B") for f in blobs.frames])
            assert all(r.error is None for r in reply.items)

        def through(client: Client) -> Callable[[], None]:
            def call() -> None:
                reply, received = client.edit(*_request(images))
                assert all(read_image(r.image, received, limits).shape == (SIDE, SIDE, 3) for r in reply.items)
            return call

        def bare_floor() -> None:
            floor_socket.send_multipart(raw_frames, copy=False)
            assert len(floor_socket.recv_multipart(copy=False)) == BATCH

        def per_batch_subprocess() -> None:
            encoded = []
            for im in images:
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                encoded.append(base64.b64encode(buf.getvalue()).decode())
            done = subprocess.run([sys.executable, "-c", SUBPROCESS_JUDGE], input=json.dumps({"images": encoded}),
                                  capture_output=True, text=True, check=True, timeout=300)
            back = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in json.loads(done.stdout)["images"]]
            assert all(b.shape == (SIDE, SIDE, 3) for b in back)

        cases = {"inproc": inproc, "ipc": through(ipc_client), "tcp": through(tcp_client), "floor": bare_floor,
                 "subprocess": per_batch_subprocess}
        for call in cases.values():  # warm-up: connections, caches, imports
            call()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for rep in range(args.repeats):
            for name, call in cases.items():
                if name == "subprocess" and rep >= args.subprocess_repeats:
                    continue
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(ts) for name, ts in times.items()}
        for name, ts in times.items():
            print(f"{name:>10}: median {median[name] * 1000:8.2f} ms per batch of {BATCH} "
                  f"(min {min(ts) * 1000:.2f}, max {max(ts) * 1000:.2f}, n={len(ts)})")
        per_image = {name: (median[name] - (0 if name == "floor" else median["inproc"])) / BATCH * 1000
                     for name in ("ipc", "tcp", "floor", "subprocess")}
        print(f"machine: {os.cpu_count()} CPUs, {sys.platform}, python {sys.version.split()[0]}, pyzmq {zmq.__version__}")
        print(f"transport: ipc_ms_per_image={per_image['ipc']:.3f} tcp_ms_per_image={per_image['tcp']:.3f} "
              f"floor_ms_per_image={per_image['floor']:.3f} subprocess_ms_per_image={per_image['subprocess']:.1f} "
              f"overhead_vs_floor={per_image['ipc'] / per_image['floor']:.2f} "
              f"speedup_vs_subprocess={per_image['subprocess'] / per_image['ipc']:.0f}")
        ipc_client.close()
        tcp_client.close()
        floor_socket.close(linger=0)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
