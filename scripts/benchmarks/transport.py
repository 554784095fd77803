"""Transport benchmark: a batch of 4 RGB 1024×1024 images, round trip through a real server process.

Measured side by side, interleaved, in one run (medians of several repetitions):
  inproc      the echo service's work as a plain function call (no transport)
  ipc, tcp    the same request through the echo service process (editstack codec + server loop)
  curve       the same over tcp with CURVE (authenticated, encrypted: what a tcp service requires)
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
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
import zmq
from PIL import Image

from editstack.wire.codec import Blobs, Limits, read_image
from editstack.service.echo import EchoWorker
from editstack.wire.curve import ClientKeys, make_key_set, read_public_key
from editstack.wire.protocol import EditItem, EditRequest
from editstack.wire.transport import Client

from harness import Service, free_port, load_average, machine, measure, print_times, short_dir

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


def _request(images: list[np.ndarray]) -> tuple[EditRequest, Blobs]:
    blobs = Blobs()
    items = [EditItem(id=str(k), instruction="keep", images=[blobs.add(im)]) for k, im in enumerate(images)]
    return EditRequest(items), blobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--subprocess-repeats", type=int, default=5)
    args = parser.parse_args()
    load_at_start = load_average()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(BATCH)]
    limits = Limits()
    worker = EchoWorker(limits)
    tmp = short_dir()
    ipc, tcp, floor = f"ipc://{tmp}/echo.sock", f"tcp://127.0.0.1:{free_port()}", f"ipc://{tmp}/floor.sock"
    curve = f"tcp://127.0.0.1:{free_port()}"
    make_key_set(tmp / "keys")
    echo_args = {ipc: [], tcp: ["--insecure-tcp"],
                 curve: ["--curve-secret-key", str(tmp / "keys/server.key_secret"), "--curve-clients", str(tmp / "keys/clients")]}
    keys = ClientKeys.load(tmp / "keys/client.key_secret", read_public_key(tmp / "keys/server.key"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        for endpoint, extra in echo_args.items():
            service = stack.enter_context(Service([sys.executable, "-m", "editstack.service.echo", endpoint, *extra],
                                                  endpoint))
            if endpoint != curve:  # the harness pings without keys; the CURVE one is waited for below
                service.wait_ready(60)
        stack.enter_context(Service([sys.executable, "-c", FLOOR_SERVER, floor], floor))  # no ping: a bare echo
        ipc_client = stack.enter_context(Client(ipc, timeout_s=60))
        tcp_client = stack.enter_context(Client(tcp, timeout_s=60))
        curve_client = stack.enter_context(Client(curve, timeout_s=60, curve=keys))
        deadline = time.monotonic() + 60
        while curve_client.ping().state != "ready" and time.monotonic() < deadline:
            time.sleep(0.05)
        floor_socket = zmq.Context.instance().socket(zmq.REQ)
        stack.callback(floor_socket.close, linger=0)
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

        cases = {"inproc": inproc, "ipc": through(ipc_client), "tcp": through(tcp_client),
                 "curve": through(curve_client), "floor": bare_floor, "subprocess": per_batch_subprocess}
        times = measure(cases, args.repeats, max_repeats={"subprocess": args.subprocess_repeats})
    median = print_times(times, f"batch of {BATCH}")
    per_image = {name: (median[name] - (0 if name == "floor" else median["inproc"])) / BATCH * 1000
                 for name in ("ipc", "tcp", "curve", "floor", "subprocess")}
    print(f"machine: {machine()}, pyzmq {zmq.__version__}; "
          f"load average at start {load_at_start}, at end {load_average()}")
    print(f"transport: ipc_ms_per_image={per_image['ipc']:.3f} tcp_ms_per_image={per_image['tcp']:.3f} "
          f"curve_ms_per_image={per_image['curve']:.3f} "
          f"floor_ms_per_image={per_image['floor']:.3f} subprocess_ms_per_image={per_image['subprocess']:.1f} "
          f"overhead_vs_floor={per_image['ipc'] / per_image['floor']:.2f} "
          f"speedup_vs_subprocess={per_image['subprocess'] / per_image['ipc']:.0f}")


if __name__ == "__main__":
    main()
