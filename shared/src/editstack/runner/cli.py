"""The `editstack` command line.

    editstack ping  ENDPOINT [--json] [--timeout S]
    editstack edit  ENDPOINT --image IN.png --instruction TEXT [--seed N] [--steps N] ... --out OUT.png
    editstack score ENDPOINT --source A.png --edited B.png --instruction TEXT [--mode logits|generate]
    editstack run   [--config BENCH.yaml] [--categories C ...] [--limit N] [--run-dir DIR]
                    [--only edit|score] [--edits DIR] [--dataset SPEC] [--strict] [--protocol NAME]
                    [--editor ENDPOINT ...] [--scorer ENDPOINT ...] [--connect-timeout S] [--set KEY=VALUE ...]
    editstack export RUN --layout gedit|kris|rise|imgedit OUT [--overwrite]
    editstack compare RUN RUN [RUN ...] --out DIR [--allow-different-judges]
    editstack judgecheck ENDPOINT --out DIR [--mode M] [--rubric ID] [--cases-per-type N] [--seed N]
    editstack keys  DIR
    editstack --version

Exit status: 0 success (for ping: the service is ready); 1 the service is still loading, an item
failed, or a run finished with failures; 2 usage or configuration error (also: the run folder is
in use or not writable); 3 a service is unreachable, failed to load its model, or refused the
request; for compare: 0 the leaderboard was written, 2 a folder is not a run folder or the
comparison was refused; for export: 0 every item's edit was written, 1 an item was left out (each is
listed), 2 the run folder, the layout or OUT was refused. Container healthchecks call `ping`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import msgspec

from editstack.wire.codec import Blobs, Limits, encode_png, read_image, read_image_file
import editstack
from editstack.errors import ConfigError, EditstackError, RemoteError, ServiceNotReady, ServiceUnavailable
from editstack.wire.protocol import EditItem, EditParams, EditRequest, ScoreItem, ScoreRequest
from editstack.wire.transport import Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _client(endpoint: str, timeout_s: float, retries: int) -> Client:
    try:
        return Client(endpoint, timeout_s=timeout_s, retries=retries)
    except ValueError as exc:
        raise SystemExit(f"editstack: {exc}") from None


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=2))


def _ping(args: argparse.Namespace) -> int:
    with _client(args.endpoint, args.timeout, retries=0) as client:
        status = client.ping()
    if args.json:
        print(json.dumps(msgspec.to_builtins(status)))
    else:
        versions = " ".join(f"{k}={v}" for k, v in status.versions.items())
        served = f" ({status.backend}, {status.dtype})" if status.backend else ""
        print(f"{status.service} {status.state}: {status.model}@{status.revision or '-'}{served} on "
              f"{','.join(status.devices) or '-'} ({status.workers} worker(s)) {versions}".rstrip())
    if status.state == "failed":
        print(f"{status.service} failed: {status.error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK if status.state == "ready" else EXIT_FAILED


def _edit(args: argparse.Namespace) -> int:
    image, note = read_image_file(args.image)
    blobs = Blobs()
    item = EditItem(id=Path(args.image).stem, instruction=args.instruction, images=[blobs.add(image)], seed=args.seed,
                    width=args.width, height=args.height)
    request = EditRequest([item], EditParams(steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt))
    with _client(args.endpoint, args.timeout, retries=1) as client:
        reply, received = client.edit(request, blobs)
    result = reply.items[0]
    out = msgspec.to_builtins(result)
    out["notes"] = ([f"client: {note}"] if note else []) + out.get("notes", [])
    if result.error is None:
        Path(args.out).write_bytes(encode_png(read_image(result.image, received, Limits())))
        out["image"] = args.out
    _print_json(out)
    if result.error is not None:
        print(f"editstack: edit failed: {result.error.message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _score(args: argparse.Namespace) -> int:
    blobs = Blobs()
    source, edited = read_image_file(args.source)[0], read_image_file(args.edited)[0]
    item = ScoreItem(id=Path(args.edited).stem, instruction=args.instruction, sources=[blobs.add(source)],
                     edited=blobs.add(edited))
    with _client(args.endpoint, args.timeout, retries=1) as client:
        reply = client.score(ScoreRequest([item], mode=args.mode, rubric=args.rubric), blobs)
    result = reply.items[0]
    _print_json(msgspec.to_builtins(result))
    if result.error is not None:
        print(f"editstack: scoring failed: {result.error.message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    # the runner's extras (yaml, tqdm) are not installed in the service images: import on use
    from editstack.runner.config import load_config
    from editstack.runner.pipeline import run

    import yaml
    from tqdm.contrib.logging import logging_redirect_tqdm

    overrides = {}
    for assignment in args.set or []:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. scorer.mode=generate")
        overrides[key.strip()] = yaml.safe_load(text)  # a YAML value, as the file would hold it
    overrides |= {key: value for key, value in {
        "dataset": args.dataset, "categories": args.categories, "limit": args.limit,
        "limit_per_category": args.limit_per_category, "run_dir": args.run_dir,
        "only": args.only, "edits": args.edits, "strict": True if args.strict else None,
        "editor.endpoints": args.editor, "connect_timeout_s": args.connect_timeout,
        # the scorers named here replace the file's, its single scorer.endpoint included
        "scorer.endpoints": args.scorer, "scorer.endpoint": args.scorer[0] if args.scorer else None,
        "scorer.judge_repeats": args.judge_repeats, "scorer.protocol": args.protocol,
    }.items() if value is not None}
    logging.getLogger().setLevel(logging.INFO)
    config = load_config(args.config, overrides)
    with logging_redirect_tqdm():  # log lines go above the progress bars instead of through them
        return run(config)


def _export(args: argparse.Namespace) -> int:
    from editstack.runner.layouts import export_run  # the run folder schema needs yaml: import on use

    summary = export_run(args.run, args.layout, args.out, overwrite=args.overwrite)
    print(f"exported {len(summary.exported)} item(s) to {summary.out_dir} in the {summary.layout} layout")
    for label, skipped in (("without an edit (their edit failed)", summary.no_edit),
                           ("that cannot be read", summary.unreadable)):
        if skipped:
            print(f"left out {len(skipped)} item(s) {label}:", *skipped, sep="\n  ", file=sys.stderr)
    return EXIT_FAILED if summary.no_edit or summary.unreadable else EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from editstack.runner.compare import write_leaderboard  # the run folder schema needs yaml: import on use

    for path in write_leaderboard(args.runs, args.out, allow_different_judges=args.allow_different_judges):
        print(path)
    return EXIT_OK


def _judgecheck(args: argparse.Namespace) -> int:
    from editstack.runner.judgecheck import run_judgecheck  # the runner's modules need its extras: import on use
    from editstack.runner.pipeline import wait_ready

    logging.getLogger().setLevel(logging.INFO)
    wait_ready({args.endpoint: "scorer"}, args.connect_timeout, load_timeout_s=3600.0)
    print(run_judgecheck(args.endpoint, args.out, mode=args.mode, rubric=args.rubric, timeout_s=args.timeout,
                         cases_per_type=args.cases_per_type, seed=args.seed))
    return EXIT_OK


def _keys(args: argparse.Namespace) -> int:
    from editstack.wire.curve import make_key_set

    try:
        made = make_key_set(args.folder)
    except FileExistsError as exc:
        raise ConfigError(str(exc)) from None
    for path in made:
        print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editstack", description="Benchmark image editors with a VLM judge.")
    parser.add_argument("--version", action="version", version=f"editstack {editstack.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    ping = commands.add_parser("ping", help="print a service's state; exit 0 only when it is ready")
    ping.add_argument("endpoint", help="ipc:///path/to.sock or tcp://host:port")
    ping.add_argument("--json", action="store_true", help="print the full status as JSON")
    ping.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    ping.set_defaults(func=_ping)

    edit = commands.add_parser("edit", help="edit one image through an editor service")
    edit.add_argument("endpoint", help="the editor: ipc:///path/to.sock or tcp://host:port")
    edit.add_argument("--image", required=True, help="the source image file")
    edit.add_argument("--instruction", required=True, help="what to change")
    edit.add_argument("--out", required=True, help="where to write the edited PNG")
    edit.add_argument("--seed", type=int, default=0, help="the edit's seed (same seed and inputs: same bytes)")
    edit.add_argument("--steps", type=int, help="sampling steps (default: the editor's)")
    edit.add_argument("--guidance", type=float, help="true_cfg_scale; <= 1 disables CFG (default: the editor's)")
    edit.add_argument("--negative-prompt", help="the negative prompt (default: the editor's)")
    edit.add_argument("--width", type=int, help="output width (default: the editor's, else the source's)")
    edit.add_argument("--height", type=int, help="output height (default: the editor's, else the source's)")
    edit.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the reply")
    edit.set_defaults(func=_edit)

    score = commands.add_parser("score", help="score one edit through a scorer service")
    score.add_argument("endpoint", help="the scorer: ipc:///path/to.sock or tcp://host:port")
    score.add_argument("--source", required=True, help="the source image file")
    score.add_argument("--edited", required=True, help="the edited image file")
    score.add_argument("--instruction", required=True, help="the instruction the edit followed")
    score.add_argument("--mode", choices=["logits", "generate"], help="judge mode (default: the scorer's)")
    score.add_argument("--rubric", help="rubric id (default: the scorer's)")
    score.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the reply")
    score.set_defaults(func=_score)

    run = commands.add_parser("run", help="run a benchmark through the editor and scorer services")
    run.add_argument("--config", type=Path, help="benchmark YAML (flags override it; it overrides defaults)")
    run.add_argument("--dataset", help='"sample", a manifest .jsonl, a KRIS-Bench folder or a GEdit-Bench export')
    run.add_argument("--categories", nargs="+", help="only these categories (names or aliases, e.g. 物理)")
    run.add_argument("--limit", type=int, help="only the first N selected items")
    run.add_argument("--limit-per-category", type=int, metavar="N", help="only the first N items of every category")
    run.add_argument("--run-dir", help="the run folder; an existing one is resumed")
    run.add_argument("--only", choices=["edit", "score"], help="run one stage only")
    run.add_argument("--edits", help="with --only score: a run folder, a <category>/<id>.png folder, or a "
                                     "benchmark's own layout (as `editstack export` writes it)")
    run.add_argument("--strict", action="store_true", help="invalid dataset items are fatal")
    run.add_argument("--editor", action="append", metavar="ENDPOINT", help="editor endpoint (repeat for several)")
    run.add_argument("--scorer", action="append", metavar="ENDPOINT", help="scorer endpoint (repeat for several)")
    run.add_argument("--protocol", metavar="NAME", help="judge and report as this benchmark does: gedit, kris, rise, "
                                                         "imgedit or viescore (default: the dataset's own)")
    run.add_argument("--judge-repeats", type=int, metavar="K",
                     help="generate mode: ask the judge K times per item (sampled, seeded) and report its spread")
    run.add_argument("--connect-timeout", type=float, metavar="S",
                     help="stop (exit 3) when a service has not answered within S seconds (default 60)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override any config key, dotted, with a YAML value (e.g. scorer.mode=generate)")
    run.set_defaults(func=_run)

    export = commands.add_parser("export", help="write a run's edits where a benchmark's own evaluation scripts "
                                                "read them")
    export.add_argument("run", type=Path, metavar="RUN", help="the run folder")
    # layouts.LAYOUTS' names, spelt out: the runner's modules need its extras, so they are imported on use
    export.add_argument("--layout", required=True, choices=["gedit", "kris", "rise", "imgedit"],
                        help="the benchmark whose layout to write (the run's items must come from it)")
    export.add_argument("out", type=Path, metavar="OUT", help="the folder the benchmark's scripts take for one model")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUT, replacing the exported items' files (nothing is removed)")
    export.set_defaults(func=_export)

    compare = commands.add_parser("compare", help="a leaderboard of run folders over the items they all scored")
    compare.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="two or more run folders")
    compare.add_argument("--out", required=True, type=Path, help="the folder for leaderboard.md, .html and .csv")
    compare.add_argument("--allow-different-judges", action="store_true",
                         help="compare runs judged differently (model, revision, rubric, mode, aggregation); flagged")
    compare.set_defaults(func=_compare)

    check = commands.add_parser("judgecheck", help="how often the judge ranks a pixel-checked right edit above a wrong one")
    check.add_argument("endpoint", help="the scorer: ipc:///path/to.sock or tcp://host:port")
    check.add_argument("--out", required=True, type=Path, help="the folder for judgecheck.md and judgecheck.json")
    check.add_argument("--mode", choices=["logits", "generate"], help="judge mode (default: the scorer's)")
    check.add_argument("--rubric", help="rubric id (default: the scorer's)")
    check.add_argument("--cases-per-type", type=int, default=4, help="cases of each edit type (default 4)")
    check.add_argument("--seed", type=int, default=0, help="the cases' seed")
    check.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one reply")
    check.add_argument("--connect-timeout", type=float, default=60.0, metavar="S",
                       help="stop (exit 3) when the scorer has not answered within S seconds")
    check.set_defaults(func=_judgecheck)

    keys = commands.add_parser("keys", help="make CURVE key pairs for tcp services and their runner (secret files 0600)",
                               description="DIR/server.key_secret and DIR/clients/ are the services' CURVE_SECRET_KEY "
                                           "and CURVE_CLIENTS; DIR/client.key_secret and DIR/server.key the runner's "
                                           "curve.client_key and curve.server_key")
    keys.add_argument("folder", type=Path, metavar="DIR", help="where to write them (created 0700; never overwritten)")
    keys.set_defaults(func=_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EditstackError as exc:
        print(f"editstack: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(exc, ServiceUnavailable | RemoteError | ServiceNotReady) else EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
