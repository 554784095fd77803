"""The Slurm batch script on a real Slurm cluster on this machine (scripts/slurm/cluster: munge,
slurmctld and two slurmd nodes with fake GPUs): the job runs the benchmark with the embedded tiny
models over CURVE tcp, both editor nodes serve items, every service got its GPUs, and an editor
step killed mid-run costs nothing: every item is recorded exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from editstack.runner.runfolder import RESULTS_NAME, Journal, read_manifest
from editstack.wire.rendezvous import read_published

ROOT = Path(__file__).resolve().parent.parent
ITEMS = 12


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The environment to reach a two-node cluster started for this module, stopped after it."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the Slurm test needs root (slurmd runs jobs as their users)")
        pytest.skip("the Slurm test needs root (slurmd runs jobs as their users)")
    folder = Path(tempfile.mkdtemp(prefix="es-slurm-", dir="/tmp"))
    try:
        up = subprocess.run([ROOT / "scripts/slurm/cluster", "up", folder], capture_output=True, text=True,
                            timeout=600)
        assert up.returncode == 0, f"the cluster did not come up:\n{up.stdout}\n{up.stderr}"
        yield {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        pids = [int(p.read_text()) for p in folder.glob("*.pid")]
        subprocess.run([ROOT / "scripts/slurm/cluster", "down", folder], timeout=120, check=True)
        shutil.rmtree(folder, ignore_errors=True)
        assert pids and not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "a daemon outlived the cluster"


def _slurm(env: dict[str, str], *args: str) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=30, check=True).stdout


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f}s"
        time.sleep(0.5)


def test_a_slurm_job_runs_on_two_nodes_with_their_gpus_and_survives_a_killed_editor(
        cluster, tmp_path, tiny_editor_dir, tiny_judge_dir) -> None:
    run_dir = tmp_path / "run"
    env = {**cluster, "RUN_DIR": str(run_dir), "EDITSTACK_BIND_HOST": "127.0.0.1", "EDITSTACK_SERVICE_DEVICES": "cpu",
           "EDITSTACK_RUNNER_VENV": str(Path(sys.executable).parent.parent), "EDITOR_THREADS": "1",
           "SCORER_THREADS": "1", "EDITOR_TINY_DIR": str(tiny_editor_dir), "SCORER_TINY_DIR": str(tiny_judge_dir)}
    job = _slurm(env, "sbatch", "--parsable", "--nodes=2", "--gres=gpu:2", f"--output={tmp_path}/job.out",
                 str(ROOT / "scripts/slurm/editstack.sbatch"), "--limit", str(ITEMS),
                 "--set", "editor.items_per_request=1", "--set", "scorer.items_per_request=1",
                 "--set", "connect_timeout_s=180").strip()
    results = run_dir / RESULTS_NAME

    def recorded() -> int:
        return len(results.read_text().splitlines()) if results.exists() else 0

    def running() -> bool:
        return bool(_slurm(env, "squeue", "-h", "-j", job).strip())

    _wait(lambda: recorded() >= 3 or not running(), 300, "three items were not recorded")
    assert running(), f"the job ended early:\n{(tmp_path / 'job.out').read_text()[-3000:]}"
    steps = dict(line.split() for line in _slurm(env, "squeue", "-h", "--steps", "-j", job, "-o", "%i %j").splitlines())
    # 2 CPUs a node (--ntasks-per-node=2): n1's split between its scorer and editor, n2's all its editor's
    cpus = {name: next(word.split("=")[1] for word in _slurm(env, "scontrol", "show", "step", step).split()
                       if word.startswith("CPUs=")) for step, name in steps.items()}
    assert {name: cpus[name] for name in ("scorer", "editor-n1", "editor-n2")} == \
        {"scorer": "1", "editor-n1": "1", "editor-n2": "2"}, cpus
    killed = next(step for step, name in steps.items() if name == "editor-n2")
    assert recorded() < ITEMS - 3, "the run was nearly over before the editor step was killed"
    _slurm(env, "scancel", killed)
    _wait(lambda: not running(), 300, f"job {job} did not finish")

    log = (tmp_path / "job.out").read_text()
    state = _slurm(env, "scontrol", "show", "job", job)
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, f"{state}\n{log[-3000:]}"
    lines = Counter(json.loads(line)["id"] for line in results.read_text().splitlines())
    assert len(lines) == ITEMS and set(lines.values()) == {1}, "an item was lost or recorded twice"
    assert {r.status for r in Journal(results).load().records.values()} == {"scored"}

    published = read_published(run_dir / "rendezvous")
    assert sorted((p.service, p.node) for p in published) == [("editor", "n1"), ("editor", "n2"), ("scorer", "n1")]
    # --gres=gpu:2 per node: the scorer took one of n1's, n1's editor the other, n2's editor both
    gpus = {(p.service, p.node): p.gpus for p in published}
    assert {gpus["scorer", "n1"], gpus["editor", "n1"]} == {"0", "1"} and gpus["editor", "n2"] == "0,1"
    use = {u.endpoint: u for u in read_manifest(run_dir).endpoints}
    editors = {p.node: use[p.endpoint] for p in published if p.service == "editor"}
    assert editors["n1"].items > 0 and editors["n2"].items > 0, "both editor nodes served items"
    assert editors["n1"].items + editors["n2"].items == ITEMS
    assert "CANCELLED" in (run_dir / "slurm" / "editor-n2.log").read_text()
    key = (run_dir / "keys" / "client.key_secret").read_text().split('secret-key = "')[1].split('"')[0]
    assert key not in log and key not in (run_dir / "manifest.json").read_text()


def test_a_job_with_no_gpu_left_for_an_editor_stops_at_once_saying_what_to_ask_for(cluster, tmp_path) -> None:
    env = {**cluster, "RUN_DIR": str(tmp_path / "run"), "EDITSTACK_RUNNER_VENV": str(Path(sys.executable).parent.parent)}
    job = _slurm(env, "sbatch", "--parsable", "--nodes=1", "--gres=gpu:1", f"--output={tmp_path}/job.out",
                 str(ROOT / "scripts/slurm/editstack.sbatch")).strip()
    _wait(lambda: not _slurm(env, "squeue", "-h", "-j", job).strip(), 120, f"job {job} did not end")
    assert "ExitCode=2:0" in _slurm(env, "scontrol", "show", "job", job)
    assert "no GPU is left for an editor" in (tmp_path / "job.out").read_text()
    assert not (tmp_path / "run" / "slurm" / "scorer.log").exists(), "a service was started all the same"
