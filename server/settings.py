"""Server settings: environment variables ``EDGELOOP_*`` or CLI flags (which win)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.domain.samples import SAMPLE_VALUE_ABS_MAX
from shared.models import KINDS, ArchSpec, default_spec

DEV_ENROLLMENT_TOKEN = "edgeloop-dev-enrollment"


class ServerSettings(BaseSettings):
    """Every knob of the server. Each field is read from ``EDGELOOP_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    data_dir: Path = Field(Path(".edgeloop/server"), description="Blobs (samples, artefacts) and the default SQLite file live here.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means sqlite:///<data_dir>/edgeloop.db. PostgreSQL: postgresql+psycopg://user@host:5432/db")
    rest_host: str = Field("127.0.0.1", description="Bind address of the REST API (operators).")
    rest_port: int = Field(8000, ge=0, le=65535, description="REST port (0 picks a free one).")
    grpc_host: str = Field("127.0.0.1", description="Bind address of the gRPC API (agents).")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    enrollment_token: str = Field(DEV_ENROLLMENT_TOKEN, min_length=8, description="Shared secret agents present to Register.")
    operator_token: str = Field("", description="If set, REST calls need 'Authorization: Bearer <token>' (except /healthz and /metrics).")
    model_kind: str = Field("mlp", description=f"Fleet model architecture: one of {KINDS}.")
    model_arch_json: str = Field("", description="Full ArchSpec JSON; overrides model_kind/input_shape/num_classes.")
    input_shape: str = Field("1,28,28", description="Model input shape C,H,W (comma separated).")
    num_classes: int = Field(10, ge=2, le=65536)
    dress_sparsities: str = Field("", description="Comma-separated DRESS subnet sparsities, e.g. 0.5,0.8,0.9,0.95: the fleet model becomes a DRESS model (nested sparse subnets) and rounds train the DRESS objective. Empty: a plain model.")
    dress_gamma: float = Field(0.5, gt=0, le=10, description="DRESS subnet loss weighting exponent (Eq. 3.6).")
    init_seed: int = Field(0, ge=0, description="Seed of the initial (untrained) model version.")
    heartbeat_interval_s: float = Field(5.0, gt=0, le=3600)
    max_samples_per_upload: int = Field(4096, ge=1, description="Samples one UploadSamples stream may carry.")
    max_upload_bytes: int = Field(64 << 20, ge=1 << 16, description="Bytes one UploadSamples stream may carry.")
    max_sample_bytes: int = Field(1 << 20, ge=64, description="Largest accepted sample payload.")
    sample_value_abs_max: float = Field(SAMPLE_VALUE_ABS_MAX, gt=0, allow_inf_nan=False, description="Float samples with any value of larger magnitude are refused at ingest (NaN and infinity always are). Float inputs reach the model unscaled, uint8 images as [0, 1].")
    grpc_max_message_bytes: int = Field(8 << 20, ge=1 << 16)
    chunk_bytes: int = Field(256 << 10, ge=1 << 10, le=4 << 20, description="Default GetUpdate chunk size.")
    watch_max_seconds: int = Field(300, ge=1, description="WatchUpdates streams end after this long.")
    watch_keepalive_s: float = Field(15.0, gt=0)
    worker_poll_s: float = Field(0.5, gt=0, description="How often the round worker looks for queued rounds.")
    embedded_worker: bool = Field(True, description="`edgeloop server run` also runs rounds. Turn off when separate `edgeloop server worker` processes (same database and data_dir) run them.")
    worker_heartbeat_s: float = Field(5.0, gt=0, le=600, description="How often a worker marks the round it runs as alive.")
    worker_stale_s: float = Field(60.0, gt=0, description="A running round whose worker sent no heartbeat for this long is failed as interrupted (by any worker), unblocking its lineage. Must exceed 2 x worker_heartbeat_s.")
    fsync: bool = Field(True, description="fsync blobs before acknowledging (turn off only for throwaway tests).")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of labelled samples held out for validation (fixed per sample by its hash).")
    grpc_max_workers: int = Field(256, ge=4, description="gRPC handler threads; each open WatchUpdates stream holds one.")
    migrate_on_start: bool = Field(True, description="Apply Alembic migrations when the server starts (turn off when a separate `edgeloop server migrate` step runs first).")
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
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'edgeloop.db').resolve()}"

    def describe(self) -> str:
        safe = self.model_dump(exclude={"enrollment_token", "operator_token"})
        return json.dumps(safe, default=str, sort_keys=True)
