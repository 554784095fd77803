"""Slurm benchmark: the sample benchmark through 1, then 2 editor endpoints, each run one job of
scripts/slurm/editstack.sbatch on the local test cluster (scripts/slurm/cluster: two slurmd nodes on
this machine, fake GPUs), the embedded tiny models on CPU, CURVE tcp between the services.

1 endpoint: --nodes=1 (n1: the scorer and one editor); 2 endpoints: --nodes=2 (an editor on each
node). Items per second are the run's items over its pipeline wall time (the manifest's
timings.wall_s: services already loaded). On one machine both "nodes" share its cores, so the ratio
says what the work queue adds when the editors compete for the same CPUs, not what a second GPU
node would. The last line is the summary BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import build_tiny, load_average, machine, short_dir

ROOT = Path(__file__).resolve().parents[2]


def _run(env: dict[str, str], nodes: int, folder: Path, items: int, timeout_s: float) -> tuple[float, dict]:
    """One job on `nodes` nodes; (items per second, the manifest's endpoint shares)."""
    run_dir = folder / f"run-{nodes}"
    job_env = {**env, "RUN_DIR": str(run_dir)}
    job = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}", "--gres=gpu:2", f"--output={folder}/job-{nodes}.out",
                          str(ROOT / "scripts/slurm/editstack.sbatch"), "--limit", str(items),
                          "--set", "editor.items_per_request=1", "--set", "scorer.items_per_request=2",
                          "--set", "connect_timeout_s=300"],
                         env=job_env, capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True, timeout=30).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, timeout=30)
            raise SystemExit(f"job {job} did not finish within {timeout_s:.0f}s: {folder}/job-{nodes}.out")
        time.sleep(1)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if manifest.get("counts", {}).get("scored") != items:
        raise SystemExit(f"job {job} scored {manifest.get('counts')} of {items}: {folder}/job-{nodes}.out")
    shares = {u["endpoint"]: u["items"] for u in manifest["endpoints"] if u["service"] == "editor"}
    return items / manifest["timings"]["wall_s"], shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24, help="sample items per run (the sample has 24)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one job may take")
    args = parser.parse_args()
    load_at_start = load_average()
    folder = short_dir("es-bench-slurm-")
    cluster = folder / "cluster"
    # built once, before the jobs: editors starting together must not race to build it
    for service in ("editor", "scorer"):
        build_tiny(service, folder / f"tiny-{service}")
    up = subprocess.run([ROOT / "scripts/slurm/cluster", "up", cluster], capture_output=True, text=True, timeout=600)
    if up.returncode:
        raise SystemExit(f"the cluster did not come up: {up.stderr[-3000:]}")
    env = {**os.environ, "SLURM_CONF": str(cluster / "slurm.conf"), "EDITSTACK_BIND_HOST": "127.0.0.1",
           "EDITSTACK_SERVICE_DEVICES": "cpu", "EDITSTACK_RUNNER_VENV": str(Path(sys.executable).parent.parent),
           "EDITOR_THREADS": "1", "SCORER_THREADS": "1", "EDITOR_TINY_DIR": str(folder / "tiny-editor"),
           "SCORER_TINY_DIR": str(folder / "tiny-scorer")}
    try:
        rates = {}
        for nodes in (1, 2):
            rates[nodes], shares = _run(env, nodes, folder, args.items, args.timeout)
            print(f"{nodes} editor endpoint(s): {rates[nodes]:.3f} items/s; items per endpoint {sorted(shares.values())}")
    finally:
        subprocess.run([ROOT / "scripts/slurm/cluster", "down", cluster], timeout=120, check=True)
    print(f"machine: {machine()}; load average at start {load_at_start}, at end {load_average()}; runs in {folder}")
    print(f"slurm: one_items_per_s={rates[1]:.3f} two_items_per_s={rates[2]:.3f} ratio={rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
