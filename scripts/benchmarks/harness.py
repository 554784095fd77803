"""What the benchmarks share: service processes (started from their own venvs on short ipc paths,
waited for with a bound, always stopped), the interleaved timing loop with its medians, and the
description of the machine that measured.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from editstack.errors import EditstackError
from editstack.wire.transport import Client


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_dir(prefix: str = "es-bench-") -> Path:
    """A fresh folder under /tmp: ipc socket paths are limited to ~100 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def service_python(service: str) -> str:
    """The python of a service's own venv, as scripts/bench exports it (EDITSTACK_<SERVICE>_VENV)."""
    venv = os.environ.get(f"EDITSTACK_{service.upper()}_VENV")
    if not venv:
        raise SystemExit(f"EDITSTACK_{service.upper()}_VENV is not set: run this through scripts/bench")
    return str(Path(venv).resolve() / "bin" / "python")


def build_tiny(service: str, out_dir: Path) -> float:
    """Build `service`'s embedded tiny model into `out_dir` in a process of its venv; returns the seconds
    taken (Python start, imports and the build), so that a service started on it only loads."""
    start = time.perf_counter()
    done = subprocess.run([service_python(service), "-m", f"editstack_{service}.tiny", str(out_dir)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"building the tiny {service} model failed: {done.stderr[-3000:]}")
    return time.perf_counter() - start


def torch_threads(service: str, env: Mapping[str, str] | None = None) -> str:
    """`service`'s torch version and the intra-op threads it would use under `env`, as one phrase."""
    code = "import torch; print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s)')"
    done = subprocess.run([service_python(service), "-c", code], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, check=True, timeout=120)
    return done.stdout.strip()


class Service:
    """A service started as a real process, its output in a log file; as a context manager it is
    stopped on leaving, error or not."""

    def __init__(self, argv: list[str], endpoint: str, env: Mapping[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.argv, self.endpoint, self.env, self.log = argv, endpoint, dict(env or {}), log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @classmethod
    def of(cls, service: str, folder: Path, name: str, env: Mapping[str, str] | None = None) -> Service:
        """`python -m editstack_<service>` from its venv on ipc://<folder>/<name>.sock, logging to <name>.log."""
        endpoint = f"ipc://{folder}/{name}.sock"
        return cls([service_python(service), "-m", f"editstack_{service}"], endpoint,
                   {f"{service.upper()}_ENDPOINT": endpoint, **(env or {})}, folder / f"{name}.log")

    def start(self) -> Service:
        self.started_at = time.monotonic()
        with open(self.log or os.devnull, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Ping until the service says ready; returns the seconds since `start`. TimeoutError past
        `timeout_s`, RuntimeError when the process exits first (both quote the log's tail)."""
        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint, timeout_s=1.0, retries=0) as client:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.argv} exited before it was ready: {self.tail()}")
                try:
                    if client.ping().state == "ready":
                        return time.monotonic() - self.started_at
                except EditstackError:
                    pass  # not bound yet, or no answer within the ping's timeout: ask again
                time.sleep(0.05)
        raise TimeoutError(f"{self.endpoint} not ready within {timeout_s:.0f}s: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)

    def __enter__(self) -> Service:
        return self if self.proc else self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class ColdStarts:
    """Process starts of a service, one at a time with nothing else running, on a model built beforehand."""

    load_s: list[float]  # process start → ping ready: Python start, imports and the model load
    model_load_s: list[float]  # the model load alone, as the service logs it

    def print(self, imports: str) -> float:
        """Print both medians; returns the load's."""
        load = statistics.median(self.load_s)
        print(f"load (process start → ping ready): median {load:.2f} s of {', '.join(f'{s:.2f}' for s in self.load_s)}")
        if self.model_load_s:
            print(f"  of which the model load the service logs: median {statistics.median(self.model_load_s):.2f} s; "
                  f"the rest is Python start and imports ({imports})")
        return load


def cold_starts(service: str, folder: Path, env: Mapping[str, str], repeats: int,
                model_load_log: re.Pattern[str]) -> ColdStarts:
    """Start and stop `service` `repeats` times; `model_load_log` finds the model-load seconds in its log."""
    load_s: list[float] = []
    model_load_s: list[float] = []
    for k in range(repeats):
        with Service.of(service, folder, f"cold-start-{k}", env) as started:
            load_s.append(started.wait_ready())
            model_load_s.extend(float(s) for s in model_load_log.findall(started.tail(100_000))[-1:])
    return ColdStarts(load_s, model_load_s)


def measure(cases: Mapping[str, Callable[[], object]], repeats: int,
            max_repeats: Mapping[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case, the cases interleaved round by round (so a change in machine
    load hits them alike), after one untimed warm-up call each. `max_repeats` caps slow cases."""
    for call in cases.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(repeats):
        for name, call in cases.items():
            if rep >= (max_repeats or {}).get(name, repeats):
                continue
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def together(pool: ThreadPoolExecutor, calls: Sequence[Callable[[], None]]) -> Callable[[], None]:
    """One call that makes all `calls` at once (each on its own client and thread) and waits for all:
    what keeps several workers of one service busy."""

    def call() -> None:
        for done in [pool.submit(c) for c in calls]:
            done.result()

    return call


def print_times(times: Mapping[str, list[float]], unit: str) -> dict[str, float]:
    """Print each case's median (min, max, n) in ms per `unit`; returns the medians in seconds."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    width = max(map(len, times))
    for name, ts in times.items():
        print(f"{name:>{width}}: median {medians[name] * 1000:9.2f} ms per {unit} "
              f"(min {min(ts) * 1000:.2f}, max {max(ts) * 1000:.2f}, n={len(ts)})")
    return medians


def machine() -> str:
    """CPU model, cores, RAM and Python of this machine, as one line."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model}, {os.cpu_count()} CPUs, {ram_gib:.0f} GiB RAM, {platform.system()}, "
            f"python {platform.python_version()}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
