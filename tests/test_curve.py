"""Authenticated, encrypted tcp: `editstack keys`, a service that refuses plain tcp unless told
insecure, a CURVE round trip, an unknown key refused by name (and a greeting cut once not taken
for a refusal), keys kept out of logs and run folders, and services found through a rendezvous
folder."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from editstack.errors import AuthenticationRefused, ConfigError, ServiceNotReady, SettingsError
from editstack.runner.cli import main as cli_main
from editstack.runner.config import load_config
from editstack.runner.pipeline import run, wait_ready
from editstack.runner.runfolder import RESULTS_NAME, Journal, read_manifest
from editstack.wire.codec import Blobs, Limits, read_image
from editstack.wire.curve import ClientKeys, ServerSecurity, make_key_set, read_public_key
from editstack.wire.protocol import EditItem, EditRequest
from editstack.wire.rendezvous import publish, read_published, wait_published
from editstack.wire.transport import Client, Server

from conftest import ServiceProcess
from fakes import FakeScorerWorker, fake_scorer_status, serving

IMAGE = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)


@pytest.fixture
def keys(tmp_path) -> Path:
    assert cli_main(["keys", str(tmp_path / "keys")]) == 0
    return tmp_path / "keys"


@pytest.fixture
def other_keys(tmp_path) -> Path:
    make_key_set(tmp_path / "other")
    return tmp_path / "other"


def _security(keys: Path) -> ServerSecurity:
    return ServerSecurity(str(keys / "server.key_secret"), str(keys / "clients"))


def _client_keys(keys: Path, server: Path | None = None) -> ClientKeys:
    return ClientKeys.load(keys / "client.key_secret", read_public_key((server or keys) / "server.key"))


def _echo(tmp_path: Path, *args: str, wait: bool = True) -> ServiceProcess:
    """The echo service as a process on a free loopback port, its log in tmp_path; the bound endpoint
    comes from its log line ("serving tcp://127.0.0.1:PORT")."""
    log = tmp_path / f"echo-{time.monotonic_ns()}.log"
    service = ServiceProcess([sys.executable, "-m", "editstack.service.echo", "tcp://127.0.0.1:*", *args], "", log=log)
    service.start()
    if wait:
        deadline = time.monotonic() + 30
        while "serving tcp://" not in service.tail():
            assert service.proc.poll() is None and time.monotonic() < deadline, service.tail()
            time.sleep(0.05)
        service.endpoint = service.tail().split("serving ")[1].split()[0]
    return service


@contextmanager
def _serving(server: Server, worker: FakeScorerWorker) -> Iterator[Server]:
    """`server` bound (its endpoint known) and serving `worker` in a thread until the block ends."""
    server.bind()
    with serving(server, worker):
        yield server


def _edit(client: Client) -> np.ndarray:
    blobs = Blobs()
    request = EditRequest([EditItem(id="a", instruction="keep", images=[blobs.add(IMAGE)])])
    reply, received = client.edit(request, blobs)
    return read_image(reply.items[0].image, received, Limits())


def test_keys_makes_owner_only_secret_files_and_never_overwrites(keys, capsys) -> None:
    for name in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert (keys / "clients" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    assert read_public_key(keys / "server.key") == read_public_key(keys / "server.key_secret")
    before = (keys / "server.key_secret").read_bytes()
    assert cli_main(["keys", str(keys)]) == 2
    assert "never overwritten" in capsys.readouterr().err and (keys / "server.key_secret").read_bytes() == before


def test_a_tcp_service_without_keys_refuses_to_start_unless_told_insecure(tmp_path) -> None:
    refused = _echo(tmp_path, wait=False)
    assert refused.proc.wait(30) == 2
    assert "needs CURVE keys" in refused.tail() and "INSECURE_TCP" in refused.tail()

    insecure = _echo(tmp_path, "--insecure-tcp")
    try:
        assert "INSECURE" in insecure.tail() and "without authentication or encryption" in insecure.tail()
        with Client(insecure.endpoint, timeout_s=10) as client:
            assert np.array_equal(_edit(client), IMAGE)
    finally:
        insecure.stop()


def test_a_secret_key_readable_by_others_is_refused(keys) -> None:
    (keys / "server.key_secret").chmod(0o644)
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        with pytest.raises(SettingsError, match="readable by others"):
            _security(keys).apply(socket, "tcp://127.0.0.1:1")
    finally:
        socket.close(linger=0)


def test_a_known_key_round_trips_and_an_unknown_one_is_refused_by_name(tmp_path, keys, other_keys) -> None:
    service = _echo(tmp_path, "--curve-secret-key", str(keys / "server.key_secret"),
                    "--curve-clients", str(keys / "clients"))
    try:
        with Client(service.endpoint, timeout_s=10, curve=_client_keys(keys)) as client:
            assert np.array_equal(_edit(client), IMAGE)
        started = time.monotonic()
        # a client whose key is not in the allow-list, and one with no keys at all: refused at once, by name
        for curve in (_client_keys(other_keys, server=keys), None):
            with Client(service.endpoint, timeout_s=10, retries=2, curve=curve) as client, \
                    pytest.raises(AuthenticationRefused, match=f"authentication refused by {service.endpoint}"):
                client.ping()
        assert time.monotonic() - started < 5, "a refusal waited for the reply timeout"
        with Client(service.endpoint, timeout_s=10, curve=_client_keys(keys)) as client:
            assert client.ping().state == "ready"  # the service kept serving
        log = service.tail()
        assert "refused a client" in log and "1 client key(s) admitted" in log
        for key_file in ("server.key_secret", "client.key_secret"):  # no key, public or secret, in the log
            for line in (keys / key_file).read_text().splitlines():
                if "key =" in line:
                    assert line.split('"')[1] not in log
    finally:
        service.stop()


class _CutFirstGreeting:
    """A fake network in front of a tcp service: a relay that closes the first connection as soon as
    the client's greeting arrives (how a service dying mid-greeting looks) and relays every later one."""

    def __init__(self, target: str) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                client, _ = self.listener.accept()
                self.connections += 1
                if self.connections == 1:
                    client.recv(64)
                    client.close()
                    continue
                service = socket.create_connection(self.target)
                for source, sink in ((client, service), (service, client)):
                    threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def test_a_plain_tcp_greeting_cut_once_is_a_drop_the_client_gets_past_not_a_refusal() -> None:
    server = Server("tcp://127.0.0.1:*", lambda: fake_scorer_status(server), Limits(),
                    security=ServerSecurity(insecure_tcp=True))
    with _serving(server, FakeScorerWorker()):
        relay = _CutFirstGreeting(server.endpoint)
        try:
            with Client(relay.endpoint, timeout_s=5, retries=0) as client:  # no resend: the cut request gets through
                assert client.ping().service == "scorer"
        finally:
            relay.close()
    assert relay.connections >= 2


def test_the_runner_finds_curve_services_in_a_rendezvous_and_keeps_keys_out_of_the_run_folder(tmp_path, keys,
                                                                                              caplog) -> None:
    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "rendezvous"
    editor = _echo(tmp_path, "--curve-secret-key", str(keys / "server.key_secret"), "--curve-clients", str(keys / "clients"))
    try:
        publish(folder, "editor", editor.endpoint, _security(keys))
        scorer = Server("tcp://127.0.0.1:*", lambda: fake_scorer_status(scorer), Limits(), stop_drain_s=0,
                        security=_security(keys))
        with _serving(scorer, FakeScorerWorker()):
            publish(folder, "scorer", scorer.endpoint, _security(keys))
            dataset = tmp_path / "data"
            dataset.mkdir()
            Image.fromarray(IMAGE).save(dataset / "a.png")
            (dataset / "manifest.jsonl").write_text("".join(
                json.dumps({"id": f"i{n}", "category": "c", "instruction": "keep", "source": "a.png"}) + "\n"
                for n in range(3)))
            config = load_config(None, {"dataset": str(dataset / "manifest.jsonl"), "run_dir": str(tmp_path / "run"),
                                        "rendezvous.folder": str(folder), "curve.client_key": str(keys / "client.key_secret"),
                                        "connect_timeout_s": 10})
            assert run(config) == 0
    finally:
        editor.stop()
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    assert sorted(records) == ["i0", "i1", "i2"] and {r.status for r in records.values()} == {"scored"}
    manifest = read_manifest(tmp_path / "run")
    assert manifest.config.editor.endpoints == [editor.endpoint]
    assert {u.endpoint: u.items for u in manifest.endpoints} == {editor.endpoint: 3, scorer.endpoint: 3}
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*") if p.suffix in
                      (".json", ".yaml", ".jsonl", ".md", ".html"))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for key_file in ("server.key_secret", "client.key_secret"):
        for line in (keys / key_file).read_text().splitlines():
            if "key =" in line:
                key = line.split('"')[1]
                assert key not in written and key not in logged


def test_the_runner_stops_at_once_when_a_service_refuses_its_key(tmp_path, keys, other_keys) -> None:
    service = _echo(tmp_path, "--curve-secret-key", str(keys / "server.key_secret"), "--curve-clients", str(keys / "clients"))
    try:
        started = time.monotonic()
        with pytest.raises(ServiceNotReady, match=f"editor authentication refused by {service.endpoint}"):
            wait_ready({service.endpoint: "editor"}, 20, 20, {service.endpoint: _client_keys(other_keys, server=keys)})
        assert time.monotonic() - started < 5
    finally:
        service.stop()


def test_a_rendezvous_publishes_a_reachable_endpoint_and_the_gpus_and_waits_are_bounded(tmp_path, keys,
                                                                                       monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    folder = tmp_path / "rendezvous"
    publish(folder, "editor", "tcp://0.0.0.0:5555", _security(keys))
    publish(folder, "scorer", "ipc:///tmp/s.sock", ServerSecurity())
    entries = read_published(folder)
    assert [(e.service, e.node, e.gpus) for e in entries] == [("editor", "n7", "3"), ("scorer", "n7", "3")]
    assert entries[0].endpoint.endswith(":5555") and "0.0.0.0" not in entries[0].endpoint
    assert entries[0].public_key == read_public_key(keys / "server.key").decode() and entries[1].public_key == ""
    assert not list(folder.glob("*.tmp"))
    assert wait_published(folder, {"editor": 1, "scorer": 1}, 1) == entries
    started = time.monotonic()
    with pytest.raises(ServiceNotReady, match=r"1 editor\(s\) of 2 never published"):
        wait_published(folder, {"editor": 2}, 1.0)
    assert 1.0 <= time.monotonic() - started < 2.0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"curve.server_key": "s.key"}, "curve.server_key needs curve.client_key"),
    ({"curve.client_key": "c.key_secret"}, "curve.client_key needs curve.server_key"),
    ({"scorer.endpoint": "ipc:///tmp/a.sock", "scorer.endpoints": ["ipc:///tmp/b.sock"]}, "is not among scorer.endpoints"),
])
def test_key_and_scorer_settings_that_cannot_work_are_refused_when_the_config_loads(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
