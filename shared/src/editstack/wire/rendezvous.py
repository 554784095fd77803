"""Where services say where they listen: one small JSON file per service in a folder both sides share.

On a cluster a service binds a free tcp port on whatever node it was given, so nobody knows its
endpoint in advance. It publishes FOLDER/<service>-<node>-<pid>.json (written whole: temp file and
rename) with the endpoint it bound, its CURVE public key (public: it lets a client check it talks
to the right service) and the GPUs it was given; the runner waits until the services it expects
are there (`wait_published`). Nothing secret is in these files.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec

from editstack.errors import ServiceNotReady
from editstack.wire.curve import ServerSecurity, read_public_key

log = logging.getLogger(__name__)

_POLL_S = 0.5


class Published(msgspec.Struct, frozen=True, kw_only=True):
    """One service's entry in a rendezvous folder."""

    service: str  # "editor" or "scorer"
    endpoint: str  # reachable from other nodes: a wildcard bind is published with the node's name
    public_key: str = ""  # Z85; "" when the endpoint has no CURVE
    node: str  # Slurm's node name, else the host name
    pid: int
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES as the service got it (Slurm's GRES sets it); None: unset


def publish(folder: Path, service: str, endpoint: str, security: ServerSecurity) -> Path:
    """Write `service`'s entry for its bound `endpoint` into `folder` (created when missing)."""
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if endpoint.startswith("tcp://") and sep and host in ("0.0.0.0", "[::]", "*"):
        endpoint = f"tcp://{socket.getfqdn()}:{port}"  # bound on every interface: the node's name reaches it
    secured = endpoint.startswith("tcp://") and security.secret_key_file
    entry = Published(service=service, endpoint=endpoint,
                      public_key=read_public_key(Path(security.secret_key_file)).decode() if secured else "",
                      node=os.environ.get("SLURMD_NODENAME") or socket.gethostname(), pid=os.getpid(),
                      gpus=os.environ.get("CUDA_VISIBLE_DEVICES"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{service}-{entry.node}-{entry.pid}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(msgspec.json.encode(entry))
    temporary.replace(path)
    log.info("published %s in %s (node %s, CUDA_VISIBLE_DEVICES=%s)", endpoint, folder, entry.node, entry.gpus)
    return path


def read_published(folder: Path) -> list[Published]:
    """The entries in `folder`, oldest first; a file that is no entry is logged and skipped."""
    read = []
    for path in Path(folder).glob("*.json"):
        try:  # an entry may go between the listing and the read (a service's job ended)
            read.append((path.stat().st_mtime, path.name, msgspec.json.decode(path.read_bytes(), type=Published)))
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("rendezvous: skipped %s: %s", path, exc)
    return [entry for _, _, entry in sorted(read, key=lambda r: r[:2])]


def wait_published(folder: Path, wanted: Mapping[str, int], timeout_s: float) -> list[Published]:
    """The entries of `folder` once it holds `wanted[service]` entries of each service (the first
    ones published); ServiceNotReady, one line per service short, after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        entries = read_published(folder) if Path(folder).is_dir() else []
        chosen = {service: [e for e in entries if e.service == service][:count] for service, count in wanted.items()}
        short = {service: count - len(chosen[service]) for service, count in wanted.items() if len(chosen[service]) < count}
        if not short:
            return [entry for service in wanted for entry in chosen[service]]
        if time.monotonic() >= deadline:
            raise ServiceNotReady([f"rendezvous {folder}: {count} {service}(s) of {wanted[service]} never published "
                                   f"an endpoint within {timeout_s:.0f}s" for service, count in short.items()])
        time.sleep(_POLL_S)
