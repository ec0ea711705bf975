"""What the agent's services share about the server: identity, credential, the server's
latest word (target version, heartbeat interval, subnet accuracies), and the last error.

Services never set each other's attributes; they call these methods, each of which takes
the lock it needs, and wait on :attr:`Connection.target_changed` for a new target.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_agent.client import FleetClient, PermanentError, TLSError
from edge_agent.identity import Identity, hardware_id, load_identity, save_identity
from edge_agent.settings import AgentSettings
from protos.edgeloop.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"


def enrollment_token(settings: AgentSettings) -> str:
    """The token to register with: ``enrollment_token_file`` (read now, so a provisioning step
    may write it after the agent started) else ``enrollment_token``. An unreadable file raises
    PermanentError: the reporter reports it and retries with backoff."""
    if settings.enrollment_token_file is None:
        return settings.enrollment_token
    try:
        return settings.enrollment_token_file.read_text().strip()
    except OSError as exc:
        raise PermanentError(f"cannot read enrollment_token_file: {exc}") from exc


class Connection:
    def __init__(self, settings: AgentSettings, client: FleetClient) -> None:
        self.settings = settings
        self.client = client
        self._lock = threading.Lock()
        self._identity: Identity | None = load_identity(settings.data_dir)
        if self._identity is not None:
            client.credential = self._identity.credential
            if self._identity.server != settings.server:
                log.info("identity was issued by %s; keeping it for %s", self._identity.server,
                         settings.server)
        self.connected = False
        self.heartbeat_interval = settings.heartbeat_interval_s or 5.0
        self._target = ""
        # Bumped by every word on the target; a heartbeat answer is applied only if no newer
        # word arrived while it was in flight (see set_target).
        self._target_epoch = 0
        self.target_changed = threading.Event()  # set whenever the server names a new target
        self._subnet_accuracy: dict[str, list[float]] = {}
        self._last_error = ""
        # Called with each Register answer (the daemon pins its signing keys: edge_agent.trust).
        self.on_registered: Callable[[pb.RegisterResponse], None] | None = None

    # --- identity -------------------------------------------------------------------------
    @property
    def identity(self) -> Identity | None:
        return self._identity

    @property
    def registered(self) -> bool:
        return self._identity is not None

    def ensure_identity(self) -> Identity:
        """The device identity, registering first if there is none (raises ClientError)."""
        with self._lock:
            if self._identity is not None:
                return self._identity
            s = self.settings
            resp = self.client.register(enrollment_token=enrollment_token(s),
                                        hardware_id=hardware_id(s.data_dir, s.hardware_id),
                                        name=s.name, tags=s.tag_list, agent_version=AGENT_VERSION)
            if self.on_registered is not None:  # before the identity: a crash re-registers
                self.on_registered(resp)
            identity = Identity(resp.device_id, resp.device_credential, s.server)
            save_identity(s.data_dir, identity)
            self.client.credential = resp.device_credential
            self._identity = identity
            self.suggest_interval(resp.heartbeat_interval_s)
            log.info("registered as device %s", resp.device_id)
            return identity

    def forget_identity(self) -> None:
        """The server rejected the credential: the next ensure_identity registers again."""
        with self._lock:
            if self._identity is None:
                return
            log.warning("server rejected our credential; registering again")
            self._identity = None
            self.client.credential = ""

    # --- link state -----------------------------------------------------------------------
    def online(self) -> None:
        self.connected = True

    def offline(self, exc: Exception) -> None:
        if isinstance(exc, TLSError):
            # Not an outage to wait out quietly: a certificate or the pinned CA needs fixing.
            # Logged once per distinct error (every service backs off and retries it), kept as
            # last_error for the status endpoint; the running model stays.
            if self._last_error != str(exc):
                log.error("server certificate refused, retrying with backoff: %s", exc)
            self.report_error(str(exc))
        elif self.connected:
            log.warning("server unreachable: %s", exc)
        self.connected = False

    def suggest_interval(self, seconds: float) -> None:
        """The server's heartbeat interval, unless the settings fix one."""
        if not self.settings.heartbeat_interval_s and seconds > 0:
            self.heartbeat_interval = seconds

    # --- the server's word ----------------------------------------------------------------
    @property
    def target(self) -> str:
        return self._target

    def target_epoch(self) -> int:
        """Take before a request whose answer names a target; pass it to :meth:`set_target`."""
        with self._lock:
            return self._target_epoch

    def set_target(self, model_hash: str, *, if_epoch: int | None = None) -> bool:
        """Record the server's target. With ``if_epoch`` (from :meth:`target_epoch` before the
        request) the answer is dropped when another word arrived meanwhile: a heartbeat the
        server answered from a snapshot taken before a publish can land after the watch stream
        already named the new version, and must not send the device back to the old one.
        Returns whether the word was taken."""
        with self._lock:
            if if_epoch is not None and if_epoch != self._target_epoch:
                return False
            self._target_epoch += 1
            if not model_hash or model_hash == self._target:
                return True
            self._target = model_hash
        self.target_changed.set()
        return True

    def set_subnet_accuracy(self, model_hash: str, accuracies: list[float]) -> None:
        with self._lock:
            self._subnet_accuracy[model_hash] = list(accuracies)

    def subnet_accuracy(self, model_hash: str) -> list[float] | None:
        with self._lock:
            return self._subnet_accuracy.get(model_hash)

    # --- the operator's view of what went wrong last -------------------------------------
    @property
    def last_error(self) -> str:
        return self._last_error

    def report_error(self, message: str) -> None:
        # Heartbeats carry it; the server refuses more than 4096 characters.
        self._last_error = message if len(message) <= 4096 else message[:4093] + "..."

    def clear_error(self) -> None:
        self._last_error = ""
