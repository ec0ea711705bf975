"""Agent settings: environment variables ``EDGELOOP_AGENT_*`` or CLI flags (which win)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGELOOP_AGENT_", extra="ignore")

    server: str = Field("127.0.0.1:50051", description="gRPC address of the server, host:port.")
    data_dir: Path = Field(Path(".edgeloop/agent"), description="Identity, models, upload queue, downloads.")
    enrollment_token: str = Field("edgeloop-dev-enrollment", min_length=8, description="Fleet enrollment token (Register).")
    hardware_id: str = Field("", description="Stable hardware id; empty: a random id kept in data_dir/hardware_id.")
    name: str = Field("", max_length=128, description="Human-readable device name.")
    tags: str = Field("", description="Comma-separated tags, e.g. 'site-a,jetson'.")
    source: Literal["dataset", "folder"] = Field("dataset", description="Where inputs come from.")
    dataset: str = Field("fashion-mnist", description="Dataset name or path (.npz / class folders) for source=dataset.")
    dataset_split: Literal["train", "test"] = Field("train")
    shard_index: int = Field(0, ge=0, description="This agent's shard of the dataset.")
    num_shards: int = Field(1, ge=1, description="Number of shards the dataset is split into (non-iid).")
    shard_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration of the label skew.")
    shard_seed: int = Field(0, ge=0)
    max_samples: int = Field(0, ge=0, description="Use at most this many samples of the shard (0: all).")
    rate_per_s: float = Field(50.0, ge=0, description="Simulated sensor rate (0: as fast as possible).")
    send_labels: bool = Field(True, description="Attach ground-truth labels (simulation only).")
    loop_source: bool = Field(False, description="Restart the shard when exhausted.")
    watch_dir: Path | None = Field(None, description="Folder watched for new inputs when source=folder.")
    upload_mode: Literal["all", "low_confidence", "none"] = Field("all")
    confidence_threshold: float = Field(0.6, ge=0, le=1, description="low_confidence uploads below this.")
    max_uploads_per_minute: float = Field(0, ge=0, description="Upload rate limit (0: unlimited).")
    upload_batch: int = Field(256, ge=1, le=4096, description="Samples per UploadSamples stream.")
    upload_interval_s: float = Field(1.0, gt=0)
    queue_max_items: int = Field(20000, ge=1)
    queue_max_bytes: int = Field(64 << 20, ge=1 << 16)
    inference_batch: int = Field(32, ge=1, le=4096, description="Inputs polled and classified per step.")
    predictions_window: int = Field(1000, ge=1, description="Predictions kept for accuracy reporting.")
    heartbeat_interval_s: float = Field(0, ge=0, description="0: use the interval the server suggests.")
    status_host: str = Field("127.0.0.1")
    status_port: int = Field(8471, ge=-1, le=65535, description="Local status endpoint (-1 disables, 0 picks a free port).")
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    rpc_timeout_s: float = Field(30.0, gt=0)
    max_artefact_bytes: int = Field(512 << 20, ge=1 << 10, description="Refuse larger downloads.")
    chunk_bytes: int = Field(256 << 10, ge=1 << 10, le=4 << 20)
    log_level: str = Field("INFO")

    @field_validator("server")
    @classmethod
    def _hostport(cls, v: str) -> str:
        if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):\d{1,5}", v):
            raise ValueError(f"server must be host:port, got {v!r}")
        return v

    @model_validator(mode="after")
    def _shards(self) -> AgentSettings:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        if self.source == "folder" and self.watch_dir is None:
            raise ValueError("source=folder needs watch_dir")
        return self

    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]
