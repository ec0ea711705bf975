"""Agent settings: environment variables ``EDGELOOP_AGENT_*`` or CLI flags (which win)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.status_http import is_loopback


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGELOOP_AGENT_", extra="ignore")

    server: str = Field("127.0.0.1:50051", description="gRPC address of the server, host:port.")
    # --- TLS: the CA the agent pins (docs/security.md#tls-on-both-ports) ---------------------
    ca_file: Path | None = Field(None, description="PEM file of the server's CA to pin (the server's <data_dir>/tls/ca.crt). Wins over ca_fingerprint.")
    ca_fingerprint: str = Field("", description="SHA-256 of the server CA's DER encoding, hex (colons and a 'sha256:' prefix allowed; `edgeloop server tls show` prints it). On first contact the agent takes the CA with this fingerprint from the server's TLS chain and keeps it in data_dir/tls/ca.crt.")
    tls_server_name: str = Field("", description="Name to verify in the server certificate instead of the host of `server` (e.g. dialling an address the certificate does not list).")
    insecure: bool = Field(False, description="Plaintext gRPC without TLS (a WARNING at every start). Without it the agent refuses to start unless ca_file or ca_fingerprint is set.")
    data_dir: Path = Field(Path(".edgeloop/agent"), description="Identity, models, upload queue, downloads.")
    enrollment_token: str = Field("", description="Enrollment token an operator created (`edgeloop server enrollment create`), presented once to Register; not needed after the device has an identity. No default: the server has no built-in token.")
    enrollment_token_file: Path | None = Field(None, description="File holding the enrollment token (read at Register; wins over enrollment_token): a token kept out of the environment and process list, e.g. on a volume a provisioning step wrote.")
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
    status_host: str = Field("127.0.0.1", description="Address of the local status endpoint. It has write routes (PUT /budget, PUT /domain, POST /few-shot): an address other than loopback needs status_token.")
    status_token: str = Field("", description="Bearer token every status-endpoint route but /healthz then needs (`Authorization: Bearer <token>`); required when status_host is not a loopback address. No default.")
    status_port: int = Field(8471, ge=-1, le=65535, description="Local status endpoint (-1 disables, 0 picks a free port).")
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    rpc_timeout_s: float = Field(30.0, gt=0)
    max_artefact_bytes: int = Field(512 << 20, ge=1 << 10, description="Refuse larger downloads.")
    max_model_parameters: int = Field(64 << 20, ge=1, description="Refuse an artefact naming an architecture with more state-dict elements (parameters and buffers) than this, before building it (docs/protocol.md).")
    chunk_bytes: int = Field(256 << 10, ge=1 << 10, le=4 << 20)
    trusted_keys_file: Path | None = Field(None, description="Artefact-signing public keys to pin, hex, one per line (`edgeloop server signing show` prints them). Empty: pin the keys the server sends at enrollment (docs/security.md#signed-artefacts).")
    max_data_dir_bytes: int = Field(2 << 30, ge=0, description="Bound on data_dir (0: none): a download is refused if it, or the model its install writes, does not fit beside the models kept, local data and the upload queue counted at queue_max_bytes (docs/protocol.md#downloads-and-disk).")
    log_level: str = Field("INFO")
    # --- DRESS budget governor (docs/governor.md) -------------------------------------------
    budget_latency_ms: float | None = Field(None, ge=0, description="Static latency budget per batch-1 inference call, ms (empty: no limit).")
    budget_memory_mb: float | None = Field(None, ge=0, description="Static peak-memory budget of the active subnet, MB (empty: no limit).")
    budget_energy_mj: float | None = Field(None, ge=0, description="Static energy budget per batch-1 inference call, mJ (empty: no limit).")
    budget_file: Path | None = Field(None, description="JSON budget file re-read when it changes, e.g. {\"latency_ms\": 8} (empty: none).")
    battery: bool = Field(True, description="Energy budget from the battery level under /sys/class/power_supply (no battery: no limit); its measured power prices energy.")
    battery_policy: str = Field("", description="Battery level -> energy budget as 'pct:mJ,...', e.g. '10:0.5,25:2' (empty: those defaults).")
    load_budget: bool = Field(True, description="Tighten the latency budget while the CPU is loaded or hot.")
    governor_interval_s: float = Field(0.5, gt=0, le=3600, description="How often the governor re-reads the budgets and picks a subnet (a PUT /budget also wakes it).")
    governor_hysteresis: float = Field(0.1, ge=0, lt=1, description="Switch up to a denser subnet only if it fits every budget with this margin.")
    governor_min_dwell_s: float = Field(2.0, ge=0, description="Seconds after a switch before switching up again (down-switches are immediate).")
    profile_reps: int = Field(30, ge=1, le=10000, description="Timed batch-1 calls per subnet when profiling a new DRESS model.")
    # --- local learner: personal models, never uploaded (docs/learner.md) --------------------
    learner: str = Field("none", description="Local learner deriving a personal model from the device's labelled inputs: 'none' or a registered learner ('head': fine-tune the classifier; 'pmeta': few-shot learn the classes of data_dir/few-shot with a p-Meta fleet model; 'da3': a DA³ domain adaptor over a frozen resnet fleet model).")
    learner_min_samples: int = Field(64, ge=10, description="Labelled local samples needed before a personal model is derived.")
    learner_retrain_every: int = Field(256, ge=0, description="Re-derive after this many new labelled local samples (0: only when the fleet model changes).")
    learner_epochs: int = Field(5, ge=1, le=1000, description="Training epochs per derivation.")
    learner_lr: float = Field(1e-3, gt=0, le=1, description="Learner step size (Adam).")
    learner_holdout: float = Field(0.2, gt=0, lt=1, description="Fraction of local data held out to check the personal model; it serves only if not worse than the fleet model there.")
    learner_max_samples: int = Field(0, ge=0, description="Learn from at most the newest N local samples (0: all stored).")
    few_shot_min_samples: int = Field(4, ge=2, description="learner=pmeta: support samples (data_dir/few-shot/<class>/ or POST /few-shot) needed before the first adaptation; at least 2 classes are needed too.")
    learner_domain: str = Field("", description="learner=da3: the domain whose adaptor serves (empty: a 'domain-<name>' device tag, else 'default'); PUT /domain on the status endpoint overrides it (docs/learner.md).")
    learner_poll_s: float = Field(2.0, gt=0, le=3600, description="How often the learner checks for new local samples.")
    # --- local labelled data and update probation (docs/protocol.md#update-lifecycle) --------
    local_data_max_items: int = Field(2048, ge=1, description="Labelled local inputs kept in data_dir/local_data.db (oldest dropped first).")
    probation_margin: float = Field(0.05, ge=0, le=1, description="A new version is rolled back if its accuracy on the recent local labels is below the previous version's by more than this.")
    probation_min_samples: int = Field(20, ge=1, description="Fewer local labels than this: commit a new version without judging it.")
    probation_samples: int = Field(256, ge=1, description="Newest local labels a new version is scored on (with the previous one, on the same inputs).")

    @field_validator("server")
    @classmethod
    def _hostport(cls, v: str) -> str:
        if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):\d{1,5}", v):
            raise ValueError(f"server must be host:port, got {v!r}")
        return v

    @field_validator("ca_fingerprint")
    @classmethod
    def _fingerprint(cls, v: str) -> str:
        from edge_agent.tls import normalise_fingerprint

        return normalise_fingerprint(v) if v.strip() else ""

    @field_validator("budget_latency_ms", "budget_memory_mb", "budget_energy_mj", "budget_file", "ca_file",
                     "enrollment_token_file", "trusted_keys_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v  # EDGELOOP_AGENT_BUDGET_X=""

    @field_validator("learner")
    @classmethod
    def _learner(cls, v: str) -> str:
        from shared.personal import learner_names

        if v != "none" and v not in learner_names():
            raise ValueError(f"learner must be 'none' or one of {learner_names()}, got {v!r}")
        return v

    @field_validator("learner_domain")
    @classmethod
    def _learner_domain(cls, v: str) -> str:
        import re

        if v and not re.match(r"^[a-z0-9][a-z0-9_-]{0,31}\Z", v):  # edge_agent.domains.DOMAIN_NAME
            raise ValueError(f"learner_domain must match [a-z0-9][a-z0-9_-]{{0,31}}, got {v!r}")
        return v

    @field_validator("battery_policy")
    @classmethod
    def _battery_policy(cls, v: str) -> str:
        from edge_agent.budget_sources import BatteryPolicy

        BatteryPolicy.parse(v)  # raises BudgetError (a ValueError) naming the bad item
        return v

    @model_validator(mode="after")
    def _shards(self) -> AgentSettings:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        if self.source == "folder" and self.watch_dir is None:
            raise ValueError("source=folder needs watch_dir")
        return self

    @model_validator(mode="after")
    def _data_dir_budget(self) -> AgentSettings:
        need = self.queue_max_bytes + self.max_artefact_bytes
        if self.max_data_dir_bytes and self.max_data_dir_bytes < need:
            raise ValueError(f"max_data_dir_bytes {self.max_data_dir_bytes} must be 0 or at least "
                             f"queue_max_bytes + max_artefact_bytes = {need}")
        return self

    @model_validator(mode="after")
    def _status_exposure(self) -> AgentSettings:
        if self.status_port >= 0 and not self.status_token and not is_loopback(self.status_host):
            raise ValueError(f"status_host {self.status_host!r} is not a loopback address and the status "
                             "endpoint accepts writes: set status_token (EDGELOOP_AGENT_STATUS_TOKEN) or "
                             "bind it to 127.0.0.1")
        return self

    @model_validator(mode="after")
    def _probation(self) -> AgentSettings:
        if self.probation_samples < self.probation_min_samples:
            raise ValueError(f"probation_samples {self.probation_samples} must be >= "
                             f"probation_min_samples {self.probation_min_samples}")
        return self

    @property
    def battery_policy_obj(self):
        """The parsed :class:`~edge_agent.budget_sources.BatteryPolicy` (empty: its defaults)."""
        from edge_agent.budget_sources import BatteryPolicy

        text = self.battery_policy
        return BatteryPolicy.parse(text) if text.strip() else BatteryPolicy()

    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]
