from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("enrollment_token", "hardware_id", "name", "tags", "hardware", "agent_version", "client_csr")
    class HardwareEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CSR_FIELD_NUMBER: _ClassVar[int]
    enrollment_token: str
    hardware_id: str
    name: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    hardware: _containers.ScalarMap[str, str]
    agent_version: str
    client_csr: bytes
    def __init__(self, enrollment_token: _Optional[str] = ..., hardware_id: _Optional[str] = ..., name: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., hardware: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., client_csr: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id", "device_credential", "target_model_hash", "heartbeat_interval_s", "signing_public_keys", "client_certificate", "mtls_port")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    MTLS_PORT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_credential: str
    target_model_hash: str
    heartbeat_interval_s: float
    signing_public_keys: _containers.RepeatedScalarFieldContainer[bytes]
    client_certificate: bytes
    mtls_port: int
    def __init__(self, device_id: _Optional[str] = ..., device_credential: _Optional[str] = ..., target_model_hash: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., signing_public_keys: _Optional[_Iterable[bytes]] = ..., client_certificate: _Optional[bytes] = ..., mtls_port: _Optional[int] = ...) -> None: ...

class RenewClientCertificateRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class RenewClientCertificateResponse(_message.Message):
    __slots__ = ("client_certificate",)
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    client_certificate: bytes
    def __init__(self, client_certificate: _Optional[bytes] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("latency_ms", "memory_mb", "energy_mj")
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MJ_FIELD_NUMBER: _ClassVar[int]
    latency_ms: float
    memory_mb: float
    energy_mj: float
    def __init__(self, latency_ms: _Optional[float] = ..., memory_mb: _Optional[float] = ..., energy_mj: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("model_hash", "active_subnet", "budget", "metrics", "state", "last_error", "samples_pending", "rollbacks")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SUBNET_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PENDING_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    active_subnet: int
    budget: Budget
    metrics: _containers.ScalarMap[str, float]
    state: str
    last_error: str
    samples_pending: int
    rollbacks: _containers.RepeatedCompositeFieldContainer[UpdateReport]
    def __init__(self, model_hash: _Optional[str] = ..., active_subnet: _Optional[int] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., state: _Optional[str] = ..., last_error: _Optional[str] = ..., samples_pending: _Optional[int] = ..., rollbacks: _Optional[_Iterable[_Union[UpdateReport, _Mapping]]] = ...) -> None: ...

class UpdateReport(_message.Message):
    __slots__ = ("model_hash", "reason", "at_ms")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    reason: str
    at_ms: int
    def __init__(self, model_hash: _Optional[str] = ..., reason: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("target_model_hash", "heartbeat_interval_s", "server_time_unix_ms", "target_subnet_accuracy")
    TARGET_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_SUBNET_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    target_model_hash: str
    heartbeat_interval_s: float
    server_time_unix_ms: int
    target_subnet_accuracy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, target_model_hash: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., server_time_unix_ms: _Optional[int] = ..., target_subnet_accuracy: _Optional[_Iterable[float]] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("sample_id", "payload", "label", "metadata", "captured_at_unix_ms")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    payload: bytes
    label: int
    metadata: _containers.ScalarMap[str, str]
    captured_at_unix_ms: int
    def __init__(self, sample_id: _Optional[str] = ..., payload: _Optional[bytes] = ..., label: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., captured_at_unix_ms: _Optional[int] = ...) -> None: ...

class UploadSamplesRequest(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class RejectedSample(_message.Message):
    __slots__ = ("sample_id", "reason")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    reason: str
    def __init__(self, sample_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UploadSamplesResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "committed_ids", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_IDS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    committed_ids: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedSample]
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., committed_ids: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[_Union[RejectedSample, _Mapping]]] = ...) -> None: ...

class GetUpdateRequest(_message.Message):
    __slots__ = ("target_model_hash", "have_model_hash", "artefact_sha256", "offset", "max_chunk_bytes")
    TARGET_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    HAVE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    ARTEFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    target_model_hash: str
    have_model_hash: str
    artefact_sha256: str
    offset: int
    max_chunk_bytes: int
    def __init__(self, target_model_hash: _Optional[str] = ..., have_model_hash: _Optional[str] = ..., artefact_sha256: _Optional[str] = ..., offset: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class UpdateInfo(_message.Message):
    __slots__ = ("artefact_sha256", "artefact_size", "encoding", "base_model_hash", "target_model_hash", "final_model_hash", "offset", "signatures", "key_announcements")
    ARTEFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    ARTEFACT_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    FINAL_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    KEY_ANNOUNCEMENTS_FIELD_NUMBER: _ClassVar[int]
    artefact_sha256: str
    artefact_size: int
    encoding: str
    base_model_hash: str
    target_model_hash: str
    final_model_hash: str
    offset: int
    signatures: _containers.RepeatedCompositeFieldContainer[ArtefactSignature]
    key_announcements: _containers.RepeatedCompositeFieldContainer[KeyAnnouncement]
    def __init__(self, artefact_sha256: _Optional[str] = ..., artefact_size: _Optional[int] = ..., encoding: _Optional[str] = ..., base_model_hash: _Optional[str] = ..., target_model_hash: _Optional[str] = ..., final_model_hash: _Optional[str] = ..., offset: _Optional[int] = ..., signatures: _Optional[_Iterable[_Union[ArtefactSignature, _Mapping]]] = ..., key_announcements: _Optional[_Iterable[_Union[KeyAnnouncement, _Mapping]]] = ...) -> None: ...

class ArtefactSignature(_message.Message):
    __slots__ = ("key_id", "signature")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    signature: bytes
    def __init__(self, key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class KeyAnnouncement(_message.Message):
    __slots__ = ("statement", "signature")
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    statement: bytes
    signature: bytes
    def __init__(self, statement: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetUpdateResponse(_message.Message):
    __slots__ = ("info", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: UpdateInfo
    chunk: Chunk
    def __init__(self, info: _Optional[_Union[UpdateInfo, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class WatchUpdatesRequest(_message.Message):
    __slots__ = ("model_hash", "max_seconds")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    max_seconds: int
    def __init__(self, model_hash: _Optional[str] = ..., max_seconds: _Optional[int] = ...) -> None: ...

class WatchUpdatesResponse(_message.Message):
    __slots__ = ("target_model_hash", "keepalive", "round_id")
    TARGET_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    target_model_hash: str
    keepalive: bool
    round_id: str
    def __init__(self, target_model_hash: _Optional[str] = ..., keepalive: _Optional[bool] = ..., round_id: _Optional[str] = ...) -> None: ...
