"""Server settings: environment variables ``EDGELOOP_*`` or CLI flags (which win)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.domain.samples import SAMPLE_VALUE_ABS_MAX
from shared.models import KINDS, ArchSpec, default_spec


class ServerSettings(BaseSettings):
    """Every knob of the server. Each field is read from ``EDGELOOP_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    data_dir: Path = Field(Path(".edgeloop/server"), description="Blobs (samples, artefacts) and the default SQLite file live here.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means sqlite:///<data_dir>/edgeloop.db. PostgreSQL: postgresql+psycopg://user@host:5432/db")
    database_password_file: Path | None = Field(None, description="File holding the database password (e.g. a Docker secret), set into database_url when connecting: keeps the password out of the URL and the environment.")
    rest_host: str = Field("127.0.0.1", description="Bind address of the REST API (operators).")
    rest_port: int = Field(8000, ge=0, le=65535, description="REST port (0 picks a free one).")
    grpc_host: str = Field("127.0.0.1", description="Bind address of the gRPC API (agents).")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    # --- TLS on both ports (docs/security.md#tls-on-both-ports) -----------------------------
    insecure: bool = Field(False, description="Serve gRPC and REST in plaintext, without TLS (a WARNING at every start). Only behind a TLS-terminating proxy or on a trusted test network.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain to serve (server certificate first; append your CA so agents can enroll by its fingerprint). Empty: a local CA under <data_dir>/tls issues one.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file (both or neither).")
    tls_hostnames: str = Field("", description="Comma-separated DNS names and IP addresses the generated server certificate is valid for; agents must dial one of them. Empty: localhost, 127.0.0.1, ::1 and this machine's host name and FQDN. Specific (non-wildcard) bind addresses are always added.")
    tls_cert_days: int = Field(365, ge=2, le=825, description="Validity of a generated server certificate; it is re-issued (checked at start and hourly while running) when it expires within 30 days or the host names change (the CA, valid 10 years, stays).")
    mtls: bool = Field(False, description="Mutual TLS for agents: serve every call but Register on a second gRPC port (mtls_port) that requires a client certificate issued by the local CA at Register; the first port then answers only Register. Needs TLS (not insecure).")
    mtls_port: int = Field(50052, ge=0, le=65535, description="gRPC port requiring client certificates when mtls is on (0 picks a free one); bound on grpc_host.")
    client_cert_days: int = Field(90, ge=2, le=825, description="Validity of a client certificate issued to an agent when mtls is on; the agent renews it at two thirds of its lifetime.")
    operator_token: str = Field("", description="Optional pre-provisioned admin API token for automation, stored hashed at start (token name env-admin; changing it replaces the old one). Empty: use tokens from `edgeloop server token create` and the first-start file <data_dir>/operator-token.")
    metrics_public: bool = Field(False, description="Serve /metrics without a token (for a Prometheus scraper on a trusted network). False: /metrics needs a read token.")
    model_kind: str = Field("mlp", description=f"Fleet model architecture: one of {KINDS}.")
    model_arch_json: str = Field("", description="Full ArchSpec JSON; overrides model_kind/input_shape/num_classes.")
    input_shape: str = Field("1,28,28", description="Model input shape C,H,W (comma separated).")
    num_classes: int = Field(10, ge=2, le=65536)
    dress_sparsities: str = Field("", description="Comma-separated DRESS subnet sparsities, e.g. 0.5,0.8,0.9,0.95: the fleet model becomes a DRESS model (nested sparse subnets) and rounds train the DRESS objective. Empty: a plain model.")
    dress_gamma: float = Field(0.5, gt=0, le=10, description="DRESS subnet loss weighting exponent (Eq. 3.6).")
    init_seed: int = Field(0, ge=0, description="Seed of the initial (untrained) model version.")
    heartbeat_interval_s: float = Field(5.0, gt=0, le=3600)
    heartbeat_flush_s: float = Field(0.5, ge=0, le=1, description="Heartbeats are answered from memory and written in one transaction per this interval; a crash loses at most this much heartbeat state (docs/scale.md#heartbeat-batching). 0: each heartbeat is written before it is answered.")
    max_samples_per_upload: int = Field(4096, ge=1, description="Samples one UploadSamples stream may carry.")
    max_upload_bytes: int = Field(64 << 20, ge=1 << 16, description="Bytes one UploadSamples stream may carry.")
    max_sample_bytes: int = Field(1 << 20, ge=64, description="Largest accepted sample payload.")
    sample_value_abs_max: float = Field(SAMPLE_VALUE_ABS_MAX, gt=0, allow_inf_nan=False, description="Float samples with any value of larger magnitude are refused at ingest (NaN and infinity always are). Float inputs reach the model unscaled, uint8 images as [0, 1].")
    grpc_max_message_bytes: int = Field(8 << 20, ge=1 << 16)
    register_rate_per_s: float = Field(0.1, ge=0, allow_inf_nan=False, description="Failed Register calls each source address may make per second, refilled continuously (0: no limit). A refused call gets RESOURCE_EXHAUSTED with a retry-after-ms hint; successful registrations are not counted.")
    register_burst: int = Field(10, ge=1, description="Failed Register calls a source may make at once before register_rate_per_s applies.")
    device_rate_per_s: float = Field(5.0, ge=0, allow_inf_nan=False, description="gRPC calls (Heartbeat, UploadSamples, GetUpdate, WatchUpdates) each device may make per second, refilled continuously (0: no limit). Over it: RESOURCE_EXHAUSTED with a retry-after-ms hint the agent honours.")
    device_burst: int = Field(50, ge=1, description="gRPC calls a device may make at once before device_rate_per_s applies.")
    rest_auth_fail_rate_per_s: float = Field(0.2, ge=0, allow_inf_nan=False, description="REST calls answered 401 (no, wrong, expired or revoked operator token) each source address may make per second, refilled continuously; all sources together get 10 times this (0: no limit). Over it: 429 with Retry-After, before the token is checked or the call audited.")
    rest_auth_fail_burst: int = Field(20, ge=1, description="REST calls answered 401 a source may make at once before rest_auth_fail_rate_per_s applies (all sources together: 10 times this).")
    device_max_streams: int = Field(4, ge=0, description="Streaming calls (WatchUpdates, GetUpdate, UploadSamples) one device may hold open at once (0: no limit); the reference agent holds at most 3. Over it: RESOURCE_EXHAUSTED with a retry-after-ms hint of 5 s.")
    rate_limit_max_keys: int = Field(100_000, ge=1, description="Rate-limit buckets kept per limiter (devices, source addresses); the least recently used is dropped first.")
    chunk_bytes: int = Field(256 << 10, ge=1 << 10, le=4 << 20, description="Default GetUpdate chunk size.")
    watch_max_seconds: int = Field(300, ge=1, description="WatchUpdates streams end after this long.")
    watch_keepalive_s: float = Field(15.0, gt=0)
    worker_poll_s: float = Field(0.5, gt=0, description="How often the round worker looks for queued rounds.")
    embedded_worker: bool = Field(True, description="`edgeloop server run` also runs rounds. Turn off when separate `edgeloop server worker` processes (same database and data_dir) run them.")
    worker_mode: Literal["process", "thread"] = Field("process", description="How `edgeloop server run` runs its embedded worker: 'process', a supervised child process (training never shares the serving process's GIL; restarted if it dies), or 'thread', a thread of the server (the old mode; no extra process).")
    event_bus: Literal["auto", "local", "postgres"] = Field("auto", description="How wake-ups (round queued, targets moved, device revoked) reach other processes and replicas: 'postgres', LISTEN/NOTIFY on the database; 'local', this process (and its child worker) only; 'auto', postgres when database_url is PostgreSQL, else local (docs/scale.md#topology).")
    distributed_nproc_per_node: int = Field(1, ge=1, le=256, description="Processes per node a `full` round trains with (torch.distributed DDP, gloo on CPU, launched by torchrun); 1 trains in the worker process.")
    distributed_min_samples: int = Field(0, ge=0, description="With distributed_nproc_per_node > 1, only `full` rounds with at least this many labelled samples train distributed; smaller ones train in the worker process.")
    distributed_torchrun_args: str = Field("", description="Extra torchrun arguments for distributed rounds, e.g. '--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=host:29400' (other nodes run the printed command on the shared data_dir). Empty: one node (--standalone).")
    worker_heartbeat_s: float = Field(5.0, gt=0, le=600, description="How often a worker marks the round it runs as alive.")
    worker_stale_s: float = Field(60.0, gt=0, description="A running round whose worker sent no heartbeat for this long is failed as interrupted (by any worker), unblocking its lineage. Must exceed 2 x worker_heartbeat_s.")
    fsync: bool = Field(True, description="fsync blobs before acknowledging (turn off only for throwaway tests).")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of labelled samples held out for validation (fixed per sample by its hash).")
    grpc_max_workers: int = Field(0, ge=0, description="Threads that run the agent server's blocking work (database transactions, blob reads); calls and open streams themselves hold no thread (one asyncio loop serves them). 0: the database connection pool's size (more threads would only wait for connections).")
    grpc_max_pending: int = Field(0, ge=0, description="Agent calls waiting for those threads beyond which new ones are refused with RESOURCE_EXHAUSTED and a retry-after-ms hint (the time to work off the queue) instead of queueing without bound. 0: 64 per thread.")
    migrate_on_start: bool = Field(True, description="Apply Alembic migrations when the server starts (turn off when a separate `edgeloop server migrate` step runs first).")
    # --- signed artefacts (docs/security.md#signed-artefacts) ---------------------------------
    signing_mode: Literal["local", "external"] = Field("local", description="'local': the server signs every artefact it publishes with its Ed25519 key (signing_key_file). 'external': a separate key holder signs (`edgeloop sign`) and uploads signatures (PUT /api/v1/artefacts/{sha256}/signature); until then agents are not offered the artefact.")
    signing_key_file: Path | None = Field(None, description="PEM Ed25519 private key (mode 0600) used in local signing mode. Empty: <data_dir>/signing/ed25519.key, created at first start.")
    signing_public_key: str = Field("", description="External signing mode: the key holder's Ed25519 public key (64 hex characters, `edgeloop sign keygen` prints it), trusted when the server has no signing key yet.")
    log_level: str = Field("INFO")

    @field_validator("model_kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in KINDS:
            raise ValueError(f"model_kind must be one of {KINDS}, got {v!r}")
        return v

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: str) -> str:
        try:
            dims = [int(p) for p in v.split(",")]
        except ValueError as exc:
            raise ValueError(f"input_shape must be comma-separated integers, got {v!r}") from exc
        if not 1 <= len(dims) <= 3 or min(dims) < 1:
            raise ValueError(f"input_shape must be 1 to 3 positive sizes, got {v!r}")
        return v

    @field_validator("tls_cert_file", "tls_key_file", "database_password_file", mode="before")
    @classmethod
    def _empty_path_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v  # EDGELOOP_TLS_CERT_FILE=""

    @model_validator(mode="after")
    def _tls_files_paired(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither (a local CA issues one)")
        if self.mtls and self.insecure:
            raise ValueError("mtls needs TLS: unset insecure, or mtls")
        return self

    @model_validator(mode="after")
    def _stale_after_heartbeats(self) -> ServerSettings:
        if self.worker_stale_s <= 2 * self.worker_heartbeat_s:
            raise ValueError(f"worker_stale_s ({self.worker_stale_s}) must exceed 2 x worker_heartbeat_s "
                             f"({self.worker_heartbeat_s}): a live worker would be failed as interrupted")
        return self

    @model_validator(mode="after")
    def _arch_valid(self) -> ServerSettings:
        self.arch  # noqa: B018 - build once so a bad spec fails at start-up, not in a round
        return self

    @cached_property
    def arch(self) -> ArchSpec:
        if self.model_arch_json:
            return ArchSpec.from_json(self.model_arch_json)
        shape = tuple(int(p) for p in self.input_shape.split(","))
        spec = default_spec(self.model_kind, shape, self.num_classes)
        if self.dress_sparsities.strip():
            try:
                sparsities = [float(v) for v in self.dress_sparsities.split(",")]
            except ValueError as exc:
                raise ValueError(f"dress_sparsities must be comma-separated numbers, got {self.dress_sparsities!r}") from exc
            spec = ArchSpec(spec.kind, spec.input_shape, spec.num_classes, spec.hidden, spec.channels,
                            {"dress": {"sparsities": sparsities, "gamma": self.dress_gamma}})
        return spec

    @property
    def resolved_database_url(self) -> str:
        if self.database_url and self.database_password_file is not None:
            from sqlalchemy.engine import make_url

            password = self.database_password_file.read_text().strip()
            return make_url(self.database_url).set(password=password).render_as_string(hide_password=False)
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'edgeloop.db').resolve()}"

    def describe(self) -> str:
        safe = self.model_dump(exclude={"operator_token"})
        if self.database_url:  # a URL may carry the database password
            from sqlalchemy.engine import make_url

            safe["database_url"] = make_url(self.database_url).render_as_string(hide_password=True)
        return json.dumps(safe, default=str, sort_keys=True)
