"""CURVE on tcp endpoints: key files, the server's side (its keys and allow-list), the client's keys.

A service listening on tcp requires CURVE (ZeroMQ RFC 26: Curve25519 authentication and encryption
of every frame): its secret key comes from a file, and `zmq.auth`'s authenticator (ZAP, RFC 27)
admits only clients whose public keys are in an allow-list folder. Plain tcp needs an explicit
insecure setting, warned about at every start; ipc endpoints keep their file permissions and never
use CURVE. Key files are `zmq.auth` certificates: NAME.key holds the public key, NAME.key_secret
both keys (owner-only). Keys are never logged, and nothing here puts one in a repr.

    editstack keys DIR  ->  DIR/server.key, DIR/server.key_secret   the services' pair
                            DIR/client.key, DIR/client.key_secret   the runner's pair
                            DIR/clients/client.key                  the services' allow-list
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from editstack.errors import SettingsError

log = logging.getLogger(__name__)

SERVER_NAME, CLIENT_NAME, CLIENTS_FOLDER = "server", "client", "clients"


def make_key_set(folder: Path) -> list[Path]:
    """A server pair, a client pair and an allow-list holding the client's public key, in `folder`
    (created 0700; secret files 0600); FileExistsError when it already holds a key set."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = [folder / f"{name}.key{suffix}" for name in (SERVER_NAME, CLIENT_NAME) for suffix in ("", "_secret")]
    if taken := [path for path in made if path.exists()]:
        raise FileExistsError(f"{taken[0]} exists: keys are never overwritten (remove the old set first)")
    for name in (SERVER_NAME, CLIENT_NAME):
        _, secret = zmq.auth.create_certificates(folder, name)
        Path(secret).chmod(0o600)  # pyzmq writes it with the umask's mode
    clients = folder / CLIENTS_FOLDER
    clients.mkdir(mode=0o700, exist_ok=True)
    allowed = clients / f"{CLIENT_NAME}.key"
    allowed.write_bytes((folder / f"{CLIENT_NAME}.key").read_bytes())
    return [*made, allowed]


def read_public_key(path: Path) -> bytes:
    """The Z85 public key in a .key (or .key_secret) file; SettingsError naming the file otherwise."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path}: not a readable CURVE key file ({exc})") from None
    return public


def read_key_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from an owner-only .key_secret file; SettingsError naming the file otherwise."""
    try:
        mode = Path(path).stat().st_mode
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path}: not a readable CURVE key file ({exc})") from None
    if secret is None:
        raise SettingsError(f"{path}: holds no secret key (the .key_secret file is needed, not the .key)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SettingsError(f"{path}: a secret key readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 it")
    return public, secret


@dataclass(frozen=True)
class ClientKeys:
    """A client's CURVE key pair and the public key of the server it talks to (repr hides the keys)."""

    public: bytes = field(repr=False)
    secret: bytes = field(repr=False)
    server: bytes = field(repr=False)

    @classmethod
    def load(cls, key_pair: Path, server_key: bytes) -> ClientKeys:
        """The pair in `key_pair` (a .key_secret file), for the server whose public key is `server_key`."""
        return cls(*read_key_pair(key_pair), server_key)

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE client (before it connects)."""
        socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = self.public, self.secret, self.server


@dataclass(frozen=True)
class ServerSecurity:
    """How a service secures a tcp endpoint: its key pair file and the folder of client public keys
    it admits, or plain tcp on purpose (`insecure_tcp`). ipc endpoints ignore it."""

    secret_key_file: str = ""
    clients_folder: str = ""
    insecure_tcp: bool = False

    def apply(self, socket: zmq.Socket, endpoint: str) -> ThreadAuthenticator | None:
        """Make `socket` (not yet bound to the tcp `endpoint`) a CURVE server admitting the allow-list;
        the authenticator to stop with it. None for plain tcp on purpose; SettingsError for a tcp
        endpoint without keys, or unusable key files."""
        if not (self.secret_key_file or self.clients_folder):
            if not self.insecure_tcp:
                raise SettingsError(
                    f"{endpoint}: a tcp endpoint needs CURVE keys, so that only known clients use this service "
                    "and its images travel encrypted: set the service's CURVE_SECRET_KEY (a .key_secret file) and "
                    "CURVE_CLIENTS (a folder of client .key files), made by `editstack keys DIR`; or INSECURE_TCP=true "
                    "to serve plain tcp on purpose")
            log.warning("INSECURE: %s serves plain tcp, without authentication or encryption: anyone who reaches "
                        "the port can use this service and read its images", endpoint)
            return None
        if not (self.secret_key_file and self.clients_folder):
            raise SettingsError(f"{endpoint}: CURVE needs both CURVE_SECRET_KEY and CURVE_CLIENTS")
        public, secret = read_key_pair(Path(self.secret_key_file))
        try:
            allowed = zmq.auth.load_certificates(self.clients_folder)
        except (OSError, ValueError) as exc:
            raise SettingsError(f"CURVE_CLIENTS={self.clients_folder}: {exc}") from None
        if not allowed:
            raise SettingsError(f"CURVE_CLIENTS={self.clients_folder}: no client .key file there, so no client "
                                "could connect")
        # pyzmq logs each client's public key at DEBUG; kept at INFO so that no key reaches a log
        zap_log = logging.getLogger(f"{__name__}.zap")
        zap_log.setLevel(logging.INFO)
        authenticator = ThreadAuthenticator(zmq.Context.instance(), log=zap_log)
        authenticator.start()
        authenticator.configure_curve_callback(domain="*", credentials_provider=_AllowList(set(allowed), endpoint))
        socket.curve_server = True
        socket.curve_publickey, socket.curve_secretkey = public, secret
        log.info("%s requires CURVE: %d client key(s) admitted from %s", endpoint, len(allowed), self.clients_folder)
        return authenticator


class _AllowList:
    """The authenticator's verdict on a client's public key (Z85), with a log line, keyless, per refusal."""

    def __init__(self, keys: set[bytes], endpoint: str) -> None:
        self._keys, self._endpoint = keys, endpoint

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._keys:
            return True
        log.warning("%s refused a client: its public key is not in the allow-list", self._endpoint)
        return False
