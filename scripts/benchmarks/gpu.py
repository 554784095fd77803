"""Real-size figures on a CUDA GPU: random-weight models at the released configurations, timed
through editstack's own services (issue 16).

    scripts/gpu-figures [editor|scorer|both] [ARGS...]    # the GPU machine: carried wheels, PYTHONPATHs
    EDITSTACK_EDITOR_VENV=... EDITSTACK_SCORER_VENV=... python scripts/benchmarks/gpu.py --size tiny --side 256
                                                          # here: the same path, tiny models on the CPU

editor  Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline: a 20.4 B transformer, the 8.3 B Qwen2.5-VL-7B
        text encoder, the VAE) made in bf16 on the GPU by editstack_editor.tiny, saved with
        save_pretrained and served from that folder by `python -m editstack_editor` like a real
        checkpoint. 1024² edits of a 1024² source with true CFG (guidance 4): seconds per 40-step
        edit and peak GPU memory; then the memory options (EDITOR_LAYERWISE_CAST, EDITOR_OFFLOAD),
        each a fresh service: seconds per step, fixed seconds per edit and peak memory.
scorer  Qwen3-VL-8B-Instruct (8.8 B) likewise, served by `python -m editstack_scorer` with
        SCORER_BATCH_SIZE 4: requests of 4 items (a 1024² source and a 1024² edit) in logits and in
        generate mode (no retries: random weights never write a parseable reply): items per second.

Seconds per step come from a 1-step and a 4-step edit after a 1-step warm-up: (t4 - t1) / 3; the
rest of t1 is the fixed cost of an edit (text encoder, VAE, offload moves). Peak GPU memory is
nvidia-smi's memory.used sampled every 0.2 s over a service's whole life, load included: what a
user sizing a GPU sees (CUDA context and allocator cache counted). Progress goes to stdout; the
figures so far are rewritten to OUT/gpu-results.json after each one and the services' logs are
appended to OUT/services.log, so a run cut short still hands back what it measured. The weights
mean nothing: these figures time the stack and the architectures, not a model's output.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np

from editstack.errors import EditstackError
from editstack.wire.codec import Blobs, Limits, read_image
from editstack.wire.protocol import EditItem, EditParams, EditRequest, ScoreItem, ScoreRequest, Status
from editstack.wire.transport import Client

from harness import Service, machine, service_python, short_dir

INSTRUCTION = "make the sky blue and add a red hat to the cat"
GUIDANCE = 4.0  # true_cfg_scale > 1: two transformer passes per step, as Qwen-Image-Edit is run
# The editor services timed, each a fresh process: the plain bf16 one (which alone also times the full
# edit), then the memory options for smaller GPUs, cheapest first.
RUNS = {
    "plain": {},
    "layerwise_fp8": {"EDITOR_LAYERWISE_CAST": "float8_e4m3fn"},
    "offload_model": {"EDITOR_OFFLOAD": "model"},
    "offload_group": {"EDITOR_OFFLOAD": "group"},
}
# Bytes on disk per stored parameter (bf16), and the models' sizes at "real": what the weights
# folder must hold.
REAL_GB = {"editor": 57.7, "scorer": 17.5}
SCORER_RESERVE_S = 150  # of a "both" run's deadline, kept for the scorer phase
OPTION_MIN_S = 90  # a memory option is not started with less than this left before the deadline
GRACE_S = 30  # how far past the deadline a started service may still load or finish an edit
STARTED = time.monotonic()
# what the services log once their model is loaded: pipeline.py "loaded <model> (...) in <s> s",
# judge.py "judge <model> (...) loaded on <device> as <dtype> in <s> s"
MODEL_LOAD_LOG = re.compile(r"loaded .* in ([0-9.]+) s")


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


class Results:
    """The figures so far, rewritten to OUT/gpu-results.json after every change (added to what an
    earlier phase run into the same OUT wrote)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "gpu-results.json"
        self.data: dict[str, object] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def put(self, section: str, **values: object) -> None:
        self.data.setdefault(section, {}).update(values)  # type: ignore[union-attr]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.rename(self.path)


class Memory:
    """Peak GPU memory (nvidia-smi, GPU 0, about every 0.2 s) and lowest host MemAvailable since `reset`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gpu_used_mib = 0
        self._peak_mib = 0
        self._min_available_kib = math.inf
        self.has_gpu = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        query = ["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            available = meminfo_kib("MemAvailable")
            used = None
            if self.has_gpu:
                try:
                    out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip()
                    used = int(out) if out.isdigit() else None
                except (OSError, subprocess.TimeoutExpired):
                    pass
            with self._lock:
                self._min_available_kib = min(self._min_available_kib, available)
                if used is not None:
                    self.gpu_used_mib = used
                    self._peak_mib = max(self._peak_mib, used)
            self._stop.wait(0.2)

    def reset(self) -> None:
        with self._lock:
            self._peak_mib = self.gpu_used_mib
            self._min_available_kib = meminfo_kib("MemAvailable")

    def peak_gib(self) -> float | None:
        with self._lock:
            return round(self._peak_mib / 1024, 2) if self.has_gpu else None

    def min_available_gib(self) -> float:
        with self._lock:
            return round(self._min_available_kib / 2**20, 1)

    def wait_freed(self, baseline_mib: int, timeout_s: float = 60.0) -> None:
        """Wait until GPU memory is back near `baseline_mib` (a stopped service's memory is returned)."""
        deadline = time.monotonic() + timeout_s
        while self.has_gpu and self.gpu_used_mib > baseline_mib + 1024 and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.has_gpu and self.gpu_used_mib > baseline_mib + 1024:
            say(f"warning: {self.gpu_used_mib} MiB still in use on the GPU {timeout_s:.0f} s after the service stopped")

    def close(self) -> None:
        self._stop.set()


def meminfo_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(match.group(1)) if match else 0


def host_memory() -> str:
    total, available, shmem = (meminfo_kib(f) / 2**20 for f in ("MemTotal", "MemAvailable", "Shmem"))
    return f"RAM {total:.0f} GiB, {available:.0f} GiB available, {shmem:.1f} GiB in tmpfs/shared"


def gpu_description() -> tuple[str, int]:
    """The GPUs' names, memory and driver as one phrase, and how many there are."""
    if not shutil.which("nvidia-smi"):
        return "no GPU (nvidia-smi not found)", 0
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return "; ".join(lines) or f"nvidia-smi failed: {done.stderr.strip()}", len(lines)


class GroupService(Service):
    """A Service in its own process group: stopping it also ends the model workers it started."""

    def start(self) -> GroupService:
        self.started_at = time.monotonic()
        with open(self.log or os.devnull, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT, process_group=0)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Ping until ready; returns the seconds since `start`. Fails at once when the service says it
        failed, or when a worker died while loading (the host's OOM killer, typically: the service
        would restart it a few times, each a full load, before giving up)."""
        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint, timeout_s=1.0, retries=0, miss_log_level=logging.DEBUG) as client:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"the service exited before it was ready: {self.tail()}")
                died = re.findall(r"the worker process on .*restarting it.*", self.tail(100_000))
                if died:
                    raise RuntimeError(f"a worker died while loading: {died[0]}")
                try:
                    status = client.ping()
                except EditstackError:  # not bound yet, or busy importing: ask again
                    time.sleep(0.2)
                    continue
                if status.state == "ready":
                    return time.monotonic() - self.started_at
                if status.state == "failed":
                    raise RuntimeError(f"the service failed to load: {status.error}")
                time.sleep(0.2)
        raise TimeoutError(f"{self.endpoint} not ready within {timeout_s:.0f}s: {self.tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout_s)
                # the group may outlive its leader: give the workers the same time, then kill them
                deadline = time.monotonic() + timeout_s
                while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not _group_alive(self.proc.pid):
                    break
            except subprocess.TimeoutExpired:
                pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def weights_root(args: argparse.Namespace, need_gb: float, tmp: Path) -> Path:
    """Where to write model folders: /dev/shm (tmpfs: fast to write and to load from) when it holds
    them, else a disk folder that does, else /dev/shm grown to hold them (as root). The real sizes
    only; the others go to `tmp`."""
    if args.weights_dir:
        return Path(args.weights_dir)
    if args.size != "real":
        return tmp
    need = need_gb * 1e9 * 1.03 + 2**30
    shm = Path("/dev/shm")
    candidates = [p for p in (shm, Path(os.environ.get("TMPDIR", "/tmp")), Path.home()) if p.is_dir()]
    chosen = next((p for p in candidates if shutil.disk_usage(p).free >= need), None)
    if chosen is None and shm.is_dir() and os.geteuid() == 0:
        size_gib = math.ceil((shutil.disk_usage(shm).used + need) / 2**30) + 4
        done = subprocess.run(["mount", "-o", f"remount,size={size_gib}G", str(shm)], capture_output=True, text=True)
        say(f"no folder has {need / 2**30:.0f} GiB free: /dev/shm remounted with size={size_gib}G -> rc "
            f"{done.returncode} {done.stderr.strip()}")
        chosen = shm if shutil.disk_usage(shm).free >= need else None
    if chosen is None:
        raise SystemExit(f"no folder with {need / 2**30:.0f} GiB free for the weights: " + ", ".join(
            f"{p}: {shutil.disk_usage(p).free / 2**30:.0f} GiB" for p in candidates))
    say(f"weights go to {chosen} ({shutil.disk_usage(chosen).free / 2**30:.0f} GiB free, "
        f"{need / 2**30:.0f} GiB needed); {host_memory()}")
    return chosen / "editstack-gpu"


def stored_parameters(folder: Path) -> dict[str, dict[str, float]]:
    """Parameters and bytes per component folder, read from the safetensors headers as saved, and
    "pinned_gb": the bytes of a pinned copy made tensor by tensor (diffusers' group offloading with a
    stream), each rounded up to a power of two as PyTorch's CUDA host allocator does."""
    parts: dict[str, dict[str, float]] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        part = parts.setdefault(str(path.parent.relative_to(folder)) if path.parent != folder else "model",
                                {"params": 0, "gb": 0.0, "pinned_gb": 0.0})
        for name, entry in header.items():
            if name != "__metadata__":
                size = entry["data_offsets"][1] - entry["data_offsets"][0]
                part["params"] += math.prod(entry["shape"])
                part["gb"] += size / 1e9
                part["pinned_gb"] += (1 << max(size - 1, 0).bit_length()) / 1e9
    return {name: {"params": part["params"], "gb": round(part["gb"], 3), "pinned_gb": round(part["pinned_gb"], 3)}
            for name, part in parts.items()}


def describe(parts: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{name} {p['params'] / 1e9:.3f} B parameters ({p['gb']:.2f} GB)" for name, p in parts.items())


def host_need(name: str, parts: dict[str, dict[str, float]]) -> str:
    """What a memory option asks of host RAM beyond the weights' files (which the service maps,
    sharing their pages), as a phrase: offloading keeps a private CPU copy of every component."""
    total = sum(p["gb"] for p in parts.values())
    if name == "offload_model":
        return f"a pageable CPU copy of the components it moves back, up to {total:.0f} GB"
    if name == "offload_group":
        pinned = sum(p["pinned_gb"] for p in parts.values())
        return (f"a pinned copy of every weight: {total:.0f} GB, {pinned:.0f} GB if each tensor's block is "
                "rounded up to a power of two")
    return "no copy beyond the float8 transformer"


def build(service: str, folder: Path, args: argparse.Namespace, logs: Path) -> float:
    """Build `service`'s model of args.size into `folder` in a process of the service's environment,
    on args.device in args.dtype; returns the seconds taken (imports, weights made, saved)."""
    say(f"{service}: building the {args.size} model into {folder} on {args.device} as {args.dtype}")
    start = time.monotonic()
    log = logs / f"build-{service}.log"
    with open(log, "wb") as out:
        done = subprocess.run([service_python(service), "-m", f"editstack_{service}.tiny", str(folder),
                               "--size", args.size, "--device", args.device, "--dtype", args.dtype],
                              stdout=out, stderr=subprocess.STDOUT, timeout=900)
    append_log(args.out, log)
    if done.returncode:
        raise RuntimeError(f"building the {service} model failed (rc {done.returncode}): "
                           f"{log.read_text(errors='replace')[-3000:]}")
    return time.monotonic() - start


def append_log(out: Path, log: Path) -> None:
    if log.exists():
        with open(out / "services.log", "a") as f:
            f.write(f"\n===== {log.name} =====\n{log.read_text(errors='replace')[-200_000:]}")


def setting_names(service: str) -> set[str]:
    """The environment variables `service`'s settings read, asked of its own environment (no torch)."""
    code = (f"from editstack_{service}.settings import {service.capitalize()}Settings as S; "
            f"print(' '.join('{service.upper()}_' + n.upper() for n in S.__struct_fields__))")
    done = subprocess.run([service_python(service), "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"reading the {service} settings failed: {done.stderr[-2000:]}")
    return set(done.stdout.split())


def status_json(status: Status) -> str:
    return json.dumps(msgspec.to_builtins(status), default=str)


def random_image(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


# ---- editor ------------------------------------------------------------------------------------

def edit_once(client: Client, image: np.ndarray, steps: int, side: int) -> tuple[float, float]:
    """One edit of `steps` steps at side x side; returns (seconds at the client, the service's own)."""
    blobs = Blobs()
    item = EditItem(id=f"steps-{steps}", instruction=INSTRUCTION, images=[blobs.add(image)], seed=0,
                    width=side, height=side)
    start = time.perf_counter()
    reply, received = client.edit(EditRequest([item], EditParams(steps=steps, guidance=GUIDANCE)), blobs)
    wall = time.perf_counter() - start
    result = reply.items[0]
    if result.error is not None:
        raise RuntimeError(f"{steps}-step edit failed: {result.error.code}: {result.error.message}")
    shape = read_image(result.image, received, Limits()).shape
    if shape != (side, side, 3):
        raise RuntimeError(f"{steps}-step edit came back {shape}, asked {side}x{side}")
    return wall, result.elapsed_s


def run_editor(name: str, env: dict[str, str], args: argparse.Namespace, folder: Path, tmp: Path, memory: Memory,
               results: Results, deadline: float, full_steps: bool) -> dict[str, object]:
    """Start an editor service with `env`, time its edits, stop it; returns (and records) its figures."""
    figures: dict[str, object] = {"env": {k: v for k, v in env.items() if k in ("EDITOR_OFFLOAD",
                                                                                 "EDITOR_LAYERWISE_CAST")}}
    base_env = {"EDITOR_MODEL": str(folder), "EDITOR_DEVICES": args.device, "EDITOR_DTYPE": args.dtype,
                "EDITOR_STEPS": str(args.steps), "EDITOR_GUIDANCE": str(GUIDANCE)}
    if args.condition_max_px:
        base_env["EDITOR_CONDITION_MAX_PX"] = str(args.condition_max_px)
    baseline = memory.gpu_used_mib
    memory.reset()
    service = GroupService.of("editor", tmp, name, {**base_env, **env})
    image = random_image(args.side, 1)
    try:
        service.start()
        say(f"editor[{name}]: starting ({' '.join(f'{k}={v}' for k, v in env.items()) or 'no memory option'})")
        figures["load_s"] = round(service.wait_ready(
            timeout_s=max(GRACE_S, min(args.load_timeout, deadline + GRACE_S - time.monotonic()))), 1)
        with Client(service.endpoint, timeout_s=30, retries=0) as pinger:
            status = pinger.ping()
        figures["edit_defaults"] = msgspec.to_builtins(status.edit_defaults)
        figures["versions"] = status.versions
        say(f"editor[{name}]: ready in {figures['load_s']} s (process start -> ping ready), GPU now "
            f"{memory.gpu_used_mib / 1024:.1f} GiB; {host_memory()}; status {status_json(status)}")
        results.put(f"editor.{name}", **figures)
        timeout = max(GRACE_S, deadline + GRACE_S - time.monotonic())
        with Client(service.endpoint, timeout_s=timeout, retries=0) as client:
            warm, _ = edit_once(client, image, 1, args.side)
            say(f"editor[{name}]: warm-up 1-step edit {warm:.2f} s")
            if full_steps:
                wall, served = edit_once(client, image, args.steps, args.side)
                figures.update(s_per_edit=round(wall, 2), service_s_per_edit=round(served, 2))
                say(f"editor[{name}]: {args.steps}-step edit at {args.side}² with CFG: {wall:.2f} s "
                    f"(service's own {served:.2f} s); peak GPU so far {memory.peak_gib()} GiB")
                results.put(f"editor.{name}", **figures)
            t1, _ = edit_once(client, image, 1, args.side)
            t4, _ = edit_once(client, image, 4, args.side)
        per_step = (t4 - t1) / 3
        figures.update(edit_1_step_s=round(t1, 2), edit_4_step_s=round(t4, 2), s_per_step=round(per_step, 3),
                       fixed_s=round(t1 - per_step, 2))
        say(f"editor[{name}]: 1-step {t1:.2f} s, 4-step {t4:.2f} s -> {per_step:.3f} s per step, "
            f"{t1 - per_step:.2f} s fixed per edit")
    except Exception as exc:  # one option's failure is a row of the table, not the end of the run
        figures["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        exited = service.proc is not None and service.proc.poll() is not None
        # a service that exited says why in its log's last line; the table shows that line
        last = [line for line in service.tail().splitlines() if line.strip()]
        figures["cause"] = (last[-1] if exited and last else figures["error"])[:300]
        say(f"editor[{name}]: FAILED: {figures['error']}")
    finally:
        service.stop()
        figures.update(peak_gpu_gib=memory.peak_gib(), min_ram_available_gib=memory.min_available_gib())
        figures["model_load_s"] = [float(s) for s in MODEL_LOAD_LOG.findall(service.tail(1_000_000))]
        unknown = sorted(set(re.findall(r"(EDITOR_\w+) is not a setting", service.tail(1_000_000))))
        if unknown:
            figures["ignored_settings"] = unknown
        results.put(f"editor.{name}", **figures)
        append_log(args.out, service.log)
        memory.wait_freed(baseline)
    say(f"editor[{name}]: peak GPU {figures['peak_gpu_gib']} GiB, lowest host RAM available "
        f"{figures['min_ram_available_gib']} GiB")
    return figures


def two_workers(devices: str, args: argparse.Namespace, folder: Path, tmp: Path, results: Results) -> str:
    """Edits per second of 4-step edits: one worker (one request at a time) against EDITOR_DEVICES=`devices`
    with as many requests in flight as workers."""
    n = len(devices.split(","))
    env = {"EDITOR_MODEL": str(folder), "EDITOR_DEVICES": devices, "EDITOR_DTYPE": args.dtype}
    if args.condition_max_px:
        env["EDITOR_CONDITION_MAX_PX"] = str(args.condition_max_px)
    service = GroupService.of("editor", tmp, "workers", env)
    image = random_image(args.side, 1)
    try:
        service.start()
        service.wait_ready(timeout_s=args.load_timeout)
        clients = [Client(service.endpoint, timeout_s=600, retries=0) for _ in range(n)]
        for client in clients:  # warms every worker (the service hands requests to idle workers)
            edit_once(client, image, 1, args.side)
        start = time.perf_counter()
        for _ in range(n):
            edit_once(clients[0], image, 4, args.side)
        one = n / (time.perf_counter() - start)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(clients)) as pool:  # .result() raises an edit's failure: no figure then
            for future in [pool.submit(edit_once, c, image, 4, args.side) for c in clients]:
                future.result()
        many = n / (time.perf_counter() - start)
        for client in clients:
            client.close()
        results.put("editor.workers", devices=devices, edits_per_s_1_in_flight=round(one, 3),
                    edits_per_s_n_in_flight=round(many, 3))
        return f"4-step edits per second: {one:.3f} one at a time, {many:.3f} with {n} in flight on {devices}"
    except Exception as exc:
        return f"workers on {devices} failed: {type(exc).__name__}: {exc}"[:1500]
    finally:
        service.stop()
        append_log(args.out, service.log)


def editor_phase(args: argparse.Namespace, results: Results, memory: Memory, deadline: float) -> list[str]:
    tmp = short_dir("es-gpu-")
    root = weights_root(args, REAL_GB["editor"], tmp)
    folder = root / f"qwen-image-edit-2509-{args.size}"
    gpu, n_gpus = gpu_description()
    try:
        build_s = build("editor", folder, args, tmp)
        params = stored_parameters(folder)
        results.put("editor", gpu=gpu, size=args.size, device=args.device, dtype=args.dtype, side=args.side,
                    steps=args.steps, guidance=GUIDANCE, build_s=round(build_s, 1), stored=params)
        say(f"editor: built in {build_s:.1f} s: {describe(params)}; {host_memory()}")
        names = setting_names("editor")
        rows: dict[str, dict[str, object]] = {}
        for name in args.runs:
            env = RUNS[name]
            missing = sorted(set(env) - names)
            left = deadline - time.monotonic()
            if missing:
                rows[name] = {"env": env, "skipped": f"{', '.join(missing)} is not a setting of this editor"}
            elif name != "plain" and left < OPTION_MIN_S:
                rows[name] = {"env": env, "skipped": f"only {left:.0f} s left before the deadline"}
            else:
                if name != "plain":
                    say(f"editor[{name}]: host RAM: {host_need(name, params)}; now {host_memory()}")
                rows[name] = run_editor(name, env, args, folder, tmp, memory, results, deadline,
                                        full_steps=name == "plain")
                continue
            say(f"editor[{name}]: skipped: {rows[name]['skipped']}")
            results.put(f"editor.{name}", **rows[name])
        if args.two_workers or n_gpus >= 2:
            devices = args.two_workers or "cuda:0,cuda:1"
            workers = two_workers(devices, args, folder, tmp, results)
        else:
            workers = (f"this machine has {n_gpus} GPU: edits per second with 1 vs 2 workers need 2 GPUs "
                       "(EDITOR_DEVICES=cuda:0,cuda:1), not measured")
        say(f"editor: workers: {workers}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # frees tmpfs (RAM) for the judge
        shutil.rmtree(tmp, ignore_errors=True)
    plain = rows.get("plain", {})
    lines = [f"gpu-editor: device={gpu.split(',')[0] if n_gpus else args.device} gpus={n_gpus} dtype={args.dtype} "
             f"size={args.side} steps={args.steps} cfg={GUIDANCE:g} s_per_edit={plain.get('s_per_edit', 'n/a')} "
             f"edits_per_s={1 / plain['s_per_edit'] if plain.get('s_per_edit') else 'n/a':.4} "
             f"s_per_step={plain.get('s_per_step', 'n/a')} fixed_s={plain.get('fixed_s', 'n/a')} "
             f"peak_gpu_gib={plain.get('peak_gpu_gib', 'n/a')} load_s={plain.get('load_s', 'n/a')} "
             f"build_s={build_s:.1f}" + (f" error={plain['error'][:200]!r}" if "error" in plain else ""),
             f"gpu-editor workers: {workers}",
             "memory options (fresh service each; 4-step edit at the same size, seconds per step = (t4 - t1)/3; "
             "peak = nvidia-smi memory.used over load and edits):",
             "| option | load s | 4-step edit s | s/step | fixed s/edit | peak GPU GiB | min RAM avail GiB | vs none |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows.values():
        label = (" ".join(f"{k}={v}" for k, v in row.get("env", {}).items())
                 or f"none ({args.dtype}, all on {args.device})")
        if "skipped" in row or "error" in row:
            why = f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row['cause']}"
            lines.append(f"| {label} | {why} | | | | {row.get('peak_gpu_gib', '')} "
                         f"| {row.get('min_ram_available_gib', '')} | |")
            continue
        ratio = " ".join(f"{row[key] / plain[key]:.2f}x {what}" for key, what in (("edit_4_step_s", "edit"),
                                                                                  ("s_per_step", "step"))
                         if plain.get(key, 0) > 0)
        ignored = f" (IGNORED: {', '.join(row['ignored_settings'])})" if row.get("ignored_settings") else ""
        lines.append(f"| {label}{ignored} | {row['load_s']} | {row['edit_4_step_s']} | {row['s_per_step']} "
                     f"| {row['fixed_s']} | {row['peak_gpu_gib']} | {row['min_ram_available_gib']} | {ratio} |")
    return lines


# ---- scorer ------------------------------------------------------------------------------------

def score_request(mode: str, side: int, batch: int) -> tuple[ScoreRequest, Blobs]:
    blobs = Blobs()
    items = [ScoreItem(id=str(k), instruction=INSTRUCTION, sources=[blobs.add(random_image(side, 10 + k))],
                       edited=blobs.add(random_image(side, 20 + k))) for k in range(batch)]
    return ScoreRequest(items, mode=mode), blobs


def scorer_phase(args: argparse.Namespace, results: Results, memory: Memory, deadline: float) -> list[str]:
    tmp = short_dir("es-gpu-")
    root = weights_root(args, REAL_GB["scorer"], tmp)
    folder = root / f"qwen3-vl-8b-{args.size}"
    gpu, n_gpus = gpu_description()
    batch = 4
    rates: dict[str, float] = {}
    figures: dict[str, object] = {}
    service = None
    try:
        build_s = build("scorer", folder, args, tmp)
        params = stored_parameters(folder)
        results.put("scorer", gpu=gpu, size=args.size, device=args.device, dtype=args.dtype, side=args.side,
                    batch=batch, max_new_tokens=args.max_new_tokens, build_s=round(build_s, 1), stored=params)
        say(f"scorer: built in {build_s:.1f} s: {describe(params)}; {host_memory()}")
        env = {"SCORER_MODEL": str(folder), "SCORER_DEVICES": args.device, "SCORER_DTYPE": args.dtype,
               "SCORER_BATCH_SIZE": str(batch), "SCORER_MAX_NEW_TOKENS": str(args.max_new_tokens),
               "SCORER_GENERATE_RETRIES": "0"}
        memory.reset()
        service = GroupService.of("scorer", tmp, "judge", env).start()
        figures["load_s"] = round(service.wait_ready(timeout_s=args.load_timeout), 1)
        with Client(service.endpoint, timeout_s=30, retries=0) as pinger:
            status = pinger.ping()
        defaults = msgspec.to_builtins(status.score_defaults)
        figures.update(score_defaults=defaults, versions=status.versions)
        say(f"scorer: ready in {figures['load_s']} s; GPU now {memory.gpu_used_mib / 1024:.1f} GiB; score defaults "
            f"(left as they are): judge_image_px={defaults.get('judge_image_px')} "
            f"max_image_px={defaults.get('limits', {}).get('max_image_px')}; status {status_json(status)}")
        results.put("scorer", **figures)
        requests = {mode: score_request(mode, args.side, batch) for mode in ("logits", "generate")}
        outcomes: dict[str, Counter[str]] = {mode: Counter() for mode in requests}
        visual_tokens: set[int] = set()
        with Client(service.endpoint, timeout_s=max(60.0, deadline - time.monotonic()), retries=0) as client:
            for mode, repeats in (("logits", args.repeats), ("generate", max(1, args.repeats - 1))):
                times = []
                for k in range(repeats + 1):  # the first is the warm-up
                    start = time.perf_counter()
                    reply = client.score(*requests[mode])
                    elapsed = time.perf_counter() - start
                    for result in reply.items:
                        outcomes[mode][result.error.code if result.error else "scored"] += 1
                        if result.verdict is not None:
                            visual_tokens.add(result.verdict.visual_tokens)
                    if k:
                        times.append(elapsed)
                    say(f"scorer: {mode} request of {batch} items: {elapsed:.2f} s{'' if k else ' (warm-up)'}")
                rates[mode] = batch / statistics.median(times)
                figures.update({f"{mode}_items_per_s": round(rates[mode], 3),
                                f"{mode}_request_s": [round(t, 3) for t in times],
                                f"{mode}_outcomes": dict(outcomes[mode])})
                results.put("scorer", **figures)
        figures["visual_tokens_per_verdict"] = sorted(visual_tokens)
    except Exception as exc:
        figures["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        say(f"scorer: FAILED: {figures['error']}")
    finally:
        if service is not None:
            service.stop()
            append_log(args.out, service.log)
        figures.update(peak_gpu_gib=memory.peak_gib(), min_ram_available_gib=memory.min_available_gib())
        if service is not None:
            figures["model_load_s"] = [float(s) for s in MODEL_LOAD_LOG.findall(service.tail(1_000_000))]
        results.put("scorer", **figures)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return [f"gpu-scorer: device={gpu.split(',')[0] if n_gpus else args.device} dtype={args.dtype} batch={batch} "
            f"image={args.side} logits_items_per_s={rates.get('logits', float('nan')):.3f} "
            f"generate_items_per_s={rates.get('generate', float('nan')):.3f} "
            f"peak_gpu_gib={figures.get('peak_gpu_gib')} load_s={figures.get('load_s', 'n/a')}"
            + (f" error={figures['error'][:200]!r}" if "error" in figures else ""),
            f"gpu-scorer: generate: greedy, at most {args.max_new_tokens} new tokens, no retries; outcomes "
            f"{figures.get('generate_outcomes')}; logits outcomes {figures.get('logits_outcomes')}; visual tokens per "
            f"verdict {figures.get('visual_tokens_per_verdict')}; judge_image_px "
            f"{(figures.get('score_defaults') or {}).get('judge_image_px')} (the default)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", nargs="?", choices=["editor", "scorer", "both"], default="both")
    parser.add_argument("--size", choices=["tiny", "mid", "real"], default="real",
                        help="model size (editstack_*.tiny SIZES); tiny runs the same path on a CPU")
    parser.add_argument("--device", help="default: cuda:0, or cpu for --size tiny")
    parser.add_argument("--dtype", help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--side", type=int, default=1024, help="source, output and judged image side")
    parser.add_argument("--steps", type=int, default=40, help="steps of the timed full edit")
    parser.add_argument("--runs", nargs="*", choices=list(RUNS), default=list(RUNS),
                        help="editor services to time, in this order: plain, then the memory options")
    parser.add_argument("--condition-max-px", type=int, default=0,
                        help="EDITOR_CONDITION_MAX_PX (0: the pipeline's own ~1024²; CPU tests cap it)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="SCORER_MAX_NEW_TOKENS for generate")
    parser.add_argument("--repeats", type=int, default=3, help="timed logits requests (generate: one fewer)")
    parser.add_argument("--two-workers", default="", help="EDITOR_DEVICES of a 2-worker run (default: "
                        "cuda:0,cuda:1 when there are 2 GPUs; e.g. cpu,cpu to test it on a CPU)")
    parser.add_argument("--weights-dir", help="where to build the models (default: /dev/shm when it has room)")
    parser.add_argument("--load-timeout", type=float, default=420.0, help="seconds a service may take to load")
    parser.add_argument("--deadline-s", type=float, default=500.0,
                        help="memory options are skipped rather than started past this; a both-phase run "
                             f"keeps the last {SCORER_RESERVE_S} s of it for the scorer")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"),
                        help="where gpu-results.json and services.log go (default: $OUT)")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.size == "tiny" else "cuda:0")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out)
    gpu, n_gpus = gpu_description()
    say(f"gpu.py {args.phase}: size={args.size} device={args.device} dtype={args.dtype} side={args.side} "
        f"steps={args.steps}; GPU: {gpu}; {machine()}; {host_memory()}; "
        f"/dev/shm free {shutil.disk_usage('/dev/shm').free / 2**30:.0f} GiB, "
        f"/tmp free {shutil.disk_usage('/tmp').free / 2**30:.0f} GiB")
    results.put("machine", gpu=gpu, gpus=n_gpus, host=machine(), python=platform.python_version(), args=vars(args))
    memory = Memory()
    deadline = STARTED + args.deadline_s
    lines: list[str] = []
    phases = {"editor": (editor_phase, deadline - (SCORER_RESERVE_S if args.phase == "both" else 0)),
              "scorer": (scorer_phase, deadline)}
    try:
        for name, (phase, phase_deadline) in phases.items():
            if args.phase not in (name, "both"):
                continue
            try:
                new = phase(args, results, memory, phase_deadline)
            except Exception as exc:  # the other phase still runs
                say(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                new = [f"gpu-{name}: error={f'{type(exc).__name__}: {exc}'[:300]!r}"]
            print("\n".join(new), flush=True)  # now, in case the next phase is cut short
            lines += new
    finally:
        memory.close()
    say("done; summary:")
    print("\n".join(lines), flush=True)
    sys.exit(0 if all("error=" not in line for line in lines if line.startswith("gpu-")) else 1)


if __name__ == "__main__":
    main()
