"""Pipeline benchmark: the same sample items through the real runner twice, pipelined and stage after stage.

The editor and the scorer run as processes on their embedded tiny models, one torch thread each
(OMP_NUM_THREADS=1; --threads), so that on a 2-core machine each stage has a core of its own: torch's
OpenMP threads slow down severalfold when another busy process shares their cores. The runner
(`python -m editstack.runner.cli run`, a process of its own) runs, into fresh run folders, round by round:
  pipelined   a normal run: batch k is scored while batch k+1 is edited
  sequential  `--only edit`, then `--only score --edits <that run folder>`
The figures come from each run's manifest.json "timings": wall_s (the runner's edit and score stages,
once both services answered ready) and each stage's busy time (inside its requests). Medians over
the rounds. The defaults (steps, output size, batch sizes) make the two stages cost about the same on
the 2-core machine of BENCHMARKS.md, where overlap matters most: overlap_efficiency =
max(edit busy, score busy) / wall is 1 for a perfect overlap; a pipeline of n batches cannot beat
about n / (n + 1) (the first edit and the last score run alone). The last line is the summary
BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import yaml

from harness import Service, build_tiny, load_average, machine, short_dir, torch_threads


def _runner(config: Path, run_dir: Path, *flags: str) -> dict[str, float]:
    """One `editstack run` into `run_dir`; its manifest's timings. Fails loudly unless every item passed."""
    log = run_dir.with_suffix(".log")
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, "-m", "editstack.runner.cli", "run", "--config", str(config),
                               "--run-dir", str(run_dir), *flags], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "XDG_CACHE_HOME": str(config.parent / "cache")}, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"runner {flags} exited with {done.returncode}: {log.read_text()[-3000:]}")
    return json.loads((run_dir / "manifest.json").read_text())["timings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24, help="sample items per run (the sample has 24)")
    parser.add_argument("--rounds", type=int, default=5, help="pipelined + sequential runs, interleaved")
    parser.add_argument("--side", type=int, default=64, help="edit output width and height (runner config)")
    parser.add_argument("--steps", type=int, default=2, help="editor sampling steps (runner config)")
    parser.add_argument("--edit-batch", type=int, default=1, help="items per edit request")
    parser.add_argument("--score-batch", type=int, default=1, help="items per score request and forward pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per service (OMP_NUM_THREADS)")
    args = parser.parse_args()
    load_at_start = load_average()

    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    tmp = short_dir()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        for name in ("editor", "scorer"):
            build_tiny(name, tmp / f"tiny-{name}")
        editor = stack.enter_context(Service.of("editor", tmp, "editor", {
            **threads, "EDITOR_TINY_DIR": str(tmp / "tiny-editor")}))
        scorer = stack.enter_context(Service.of("scorer", tmp, "scorer", {
            **threads, "SCORER_TINY_DIR": str(tmp / "tiny-scorer"), "SCORER_BATCH_SIZE": str(args.score_batch)}))
        for service in (editor, scorer):
            service.wait_ready()
        config = tmp / "bench.yaml"
        config.write_text(yaml.safe_dump({
            "dataset": "sample", "limit": args.items,
            "editor": {"endpoints": [editor.endpoint], "items_per_request": args.edit_batch, "steps": args.steps,
                       "width": args.side, "height": args.side},
            "scorer": {"endpoint": scorer.endpoint, "items_per_request": args.score_batch, "mode": "logits"},
        }))
        # warm-up: writes the sample and takes both services' first-request costs out of the rounds
        _runner(config, tmp / "warm-up", "--limit", str(args.edit_batch))
        pipelined, sequential = [], []
        for k in range(args.rounds):
            pipelined.append(_runner(config, tmp / f"pipelined-{k}"))
            edited = _runner(config, tmp / f"edit-{k}", "--only", "edit")
            scored = _runner(config, tmp / f"score-{k}", "--only", "score", "--edits", str(tmp / f"edit-{k}"))
            sequential.append({"wall_s": edited["wall_s"] + scored["wall_s"], "edit_busy_s": edited["edit_busy_s"],
                               "score_busy_s": scored["score_busy_s"]})
        torch_info = {name: torch_threads(name, threads) for name in ("editor", "scorer")}

    for name, runs in (("pipelined", pipelined), ("sequential", sequential)):
        for key in ("wall_s", "edit_busy_s", "score_busy_s"):
            values = [r[key] for r in runs]
            print(f"{name:>10} {key:>12}: median {statistics.median(values):7.2f} s of "
                  f"{', '.join(f'{v:.2f}' for v in values)}")
    wall, seq = (statistics.median(r["wall_s"] for r in runs) for runs in (pipelined, sequential))
    edit, score = (statistics.median(r[key] for r in pipelined) for key in ("edit_busy_s", "score_busy_s"))
    batches = -(-args.items // args.edit_batch)
    print(f"setup: {args.items} sample items, edits {args.side}x{args.side} in {args.steps} steps, "
          f"{args.edit_batch} per edit request, {args.score_batch} per score request (logits); "
          f"{args.rounds} rounds")
    print(f"balance: edit busy {edit:.2f} s vs score busy {score:.2f} s in the pipelined run (ratio "
          f"{edit / score:.2f}); with equal stages, {batches} edit batches bound the overlap at about "
          f"{batches / (batches + 1):.2f}")
    print(f"machine: {machine()}; editor {torch_info['editor']}, scorer {torch_info['scorer']}; "
          f"load average at start {load_at_start}, at end {load_average()}")
    print(f"pipeline: wall_s={wall:.2f} sequential_wall_s={seq:.2f} edit_busy_s={edit:.2f} score_busy_s={score:.2f} "
          f"overlap_efficiency={max(edit, score) / wall:.2f} speedup={seq / wall:.2f}")


if __name__ == "__main__":
    main()
