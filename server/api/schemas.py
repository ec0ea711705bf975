"""Request and response bodies of the REST API, kept apart from the ORM tables.

Naming: ``XPublic`` is what a GET returns, ``XsPublic`` a page of them (``data`` + ``count``),
``XCreate`` / ``XUpdate`` request bodies. Request bodies forbid unknown keys, so a typo is a
422 rather than a silently ignored field. Secrets (the device credential hash) have no field
here and so can never be serialised.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
)

from server.domain.devices import MAX_TAGS, TAG
from server.training.registry import DEFAULT_METHOD, POLICIES

HEX64 = r"^[0-9a-f]{64}$"
# pydantic's regex (like JSON Schema's) anchors '$' at the very end; Python's re would let a
# trailing newline through.
TagStr = Annotated[str, StringConstraints(pattern=TAG.pattern)]
MAX_LABELS_PER_REQUEST = 10_000
MAX_COHORT_DEVICES = 10_000


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timestamptz columns; everything stored is UTC.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class BodyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BodyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorPublic(BodyOut):
    detail: str = Field(description="What went wrong, in one sentence.")


# --- health ---------------------------------------------------------------------------------


class HealthPublic(BodyOut):
    status: Literal["ok", "error"] = Field(description="'ok' when the server can serve requests.")
    database: Literal["ok", "unreachable"] = Field(description="Result of a 'SELECT 1' on the database.")


# --- devices --------------------------------------------------------------------------------


class RollbackPublic(BodyOut):
    model_hash: str = Field(description="The version that was rolled back.")
    reason: str = Field(description="Why, as the agent said (e.g. its accuracy on the device's labelled inputs).")
    at_ms: int = Field(description="When the device rolled it back (Unix ms, device clock).")


class DeviceStatusPublic(BodyOut):
    """The live part of a device: what its last heartbeat said."""

    id: str = Field(description="Device id (32 hex characters), assigned at registration.")
    online: bool = Field(description="Not revoked and heard from within 3 heartbeat intervals.")
    revoked: bool = Field(description="Revoked devices are refused by the agent API, re-registration included, until an operator restores them.")
    last_seen_at: UtcDatetime | None = Field(description="Time of the last registration or heartbeat (UTC).")
    state: str = Field(description="Agent state from the last heartbeat (e.g. 'idle', 'downloading').")
    model_hash: str = Field(description="Model hash the device reports running ('' if none).")
    target_model_hash: str = Field(description="Model hash the server wants it to run.")
    up_to_date: bool = Field(description="model_hash equals target_model_hash.")
    active_subnet: int = Field(description="Index of the active nested subnet (-1: unknown).")
    budget: dict[str, Any] = Field(description="Resource budget the agent reported (e.g. latency_ms, memory_mb).")
    metrics: dict[str, float] = Field(description="Metrics from the last heartbeat (e.g. latency, accuracy).")
    last_error: str = Field(description="The agent's last error message ('' if none).")
    samples_pending: int = Field(description="Samples waiting on the device to be uploaded.")
    update_state: str = Field(
        description="Update lifecycle state the agent reported: idle, downloading, verifying, installing, "
        "probation, rolling_back, committed, rolled_back or failed: the heartbeat's state ('registered' before "
        "the first heartbeat).")
    rollbacks: list[RollbackPublic] = Field(
        description="Versions the device rolled back after probation, oldest first "
        "(at most 32); it will not install them again.")


class DevicePublic(DeviceStatusPublic):
    """Everything an operator may see about a device (never its credential)."""

    hardware_id: str = Field(description="Stable hardware identity the agent registered with.")
    name: str = Field(description="Human-readable name (defaults to the hardware id).")
    tags: list[str] = Field(description="Tags, used to pick round cohorts.")
    hardware: dict[str, str] = Field(description="Hardware facts reported at registration.")
    agent_version: str = Field(description="Version of the agent software.")
    created_at: UtcDatetime = Field(description="First registration (UTC).")


class DevicesPublic(BodyOut):
    data: list[DevicePublic] = Field(description="This page of devices, oldest registration first.")
    count: int = Field(description="Devices matching the filter, over all pages.")


class DeviceUpdate(BodyIn):
    name: str | None = Field(None, min_length=1, max_length=128, description="New name; omit to keep.")
    tags: list[TagStr] | None = Field(
        None, max_length=MAX_TAGS,
        description=f"New tag set (replaces the old one); each matches {TAG.pattern}. Omit to keep.",
    )


# --- samples --------------------------------------------------------------------------------


class SamplePublic(BodyOut):
    sample_id: str = Field(description="SHA-256 of the payload (the sample's content id).")
    device_id: str = Field(description="Device that uploaded it.")
    label: int | None = Field(description="Class label, or null if unlabelled.")
    shape: list[int] = Field(description="Tensor shape, e.g. [1, 28, 28].")
    dtype: str = Field(description="Element type: 'uint8' or 'float32'.")
    size: int = Field(description="Payload size in bytes.")
    metadata: dict[str, str] = Field(validation_alias="meta", description="Agent-supplied key/value metadata.")
    captured_at: UtcDatetime | None = Field(description="When the device captured it (UTC), if it said.")
    received_at: UtcDatetime = Field(description="When the server stored it (UTC).")


class SamplesPublic(BodyOut):
    data: list[SamplePublic] = Field(description="This page of samples, oldest first.")
    count: int = Field(description="Samples matching the filter, over all pages.")


class DeviceSampleCounts(BodyOut):
    device_id: str = Field(description="Device id.")
    labelled: int = Field(description="Labelled samples from this device.")
    unlabelled: int = Field(description="Unlabelled samples from this device.")
    by_label: dict[int, int] = Field(description="Labelled samples per class label (JSON keys are strings).")


class SampleCountsPublic(BodyOut):
    devices: list[DeviceSampleCounts] = Field(description="Counts per device (devices with samples only).")
    labelled: int = Field(description="Labelled samples over all devices.")
    unlabelled: int = Field(description="Unlabelled samples over all devices.")
    total: int = Field(description="labelled + unlabelled.")


class LabelIn(BodyIn):
    sample_id: str = Field(pattern=HEX64, description="Content id (SHA-256 hex) of the sample.")
    device_id: str | None = Field(
        None, min_length=1, max_length=32,
        description="Label only this device's copy; omit to label the sample on every device that has it.",
    )
    label: int = Field(ge=0, description="Class label, in [0, num_classes).")


class LabelsUpdate(BodyIn):
    labels: list[LabelIn] = Field(
        min_length=1, max_length=MAX_LABELS_PER_REQUEST,
        description=f"1 to {MAX_LABELS_PER_REQUEST} labels, applied all together or not at all.",
    )


class LabelsUpdated(BodyOut):
    updated: int = Field(description="Sample rows whose label was set.")


# --- models ---------------------------------------------------------------------------------


class ModelVersionPublic(BodyOut):
    number: int = Field(description="0, 1, 2... in publish order.")
    model_hash: str = Field(description="Model hash (v2: SHA-256 over the architecture spec and the tensors, docs/protocol.md): the version's id.")
    parent_hash: str | None = Field(description="Version it was trained from (null for version 0).")
    method: str = Field(description="How it was made: 'init', 'full', 'dpu'...")
    metrics: dict[str, Any] = Field(description="Training metrics recorded by the round.")
    created_at: UtcDatetime = Field(description="Publish time (UTC).")
    round_id: str | None = Field(description="Round that produced it (null for version 0).")
    fleet_default: bool = Field(description="New devices and cohort-'all' rounds run the newest fleet default.")
    lineage: str = Field(description="Lineage of the round that made it ('all' for version 0): each "
                         "cohort's chain of versions is a head of its own.")
    reinit_seed: int | None = Field(description="Seed of the fresh initialisation it started from, if any.")
    full_artefact_sha256: str = Field(description="SHA-256 of the full-model artefact bytes.")
    full_artefact_size: int = Field(description="Size of the full-model artefact in bytes.")
    arch: dict[str, Any] = Field(description="Architecture spec (ArchSpec JSON).")


class ModelVersionsPublic(BodyOut):
    data: list[ModelVersionPublic] = Field(description="This page of versions, newest first.")
    count: int = Field(description="All versions.")


class ArtefactPublic(BodyOut):
    sha256: str = Field(description="SHA-256 of the artefact bytes (its id).")
    kind: Literal["full", "diff"] = Field(description="'full' model or a 'diff' against base_model_hash.")
    encoding: str = Field(description="Wire encoding, e.g. 'model/safetensors-v1' or 'diff/...'.")
    size: int = Field(description="Size in bytes.")
    base_model_hash: str | None = Field(description="Model a diff applies to (null for full models).")
    target_model_hash: str = Field(description="Model the artefact produces.")
    created_at: UtcDatetime = Field(description="When it was stored (UTC).")


class ArtefactsPublic(BodyOut):
    data: list[ArtefactPublic] = Field(description="Artefacts producing this version, full model first.")
    count: int = Field(description="Number of artefacts.")


# --- rounds ---------------------------------------------------------------------------------


class CohortAll(BodyIn):
    all: Literal[True] = Field(description="true: every non-revoked device.")


class CohortDevices(BodyIn):
    device_ids: list[str] = Field(
        min_length=1, max_length=MAX_COHORT_DEVICES, description="These devices (all must exist)."
    )


class CohortTag(BodyIn):
    tag: TagStr = Field(description="Every non-revoked device with this tag.")


COHORT_KEYS = ("all", "device_ids", "tag")
COHORT_NEEDS_ONE = "cohort needs exactly one of 'all', 'device_ids', 'tag'"


def _cohort_kind(value: Any) -> str | None:
    """The union member a cohort is meant to be: the first of its keys that names one (a second
    key is then refused as an extra input). None (no such key) is the one-line error below."""
    if isinstance(value, BaseModel):
        return next(k for k in COHORT_KEYS if k in type(value).model_fields)
    if isinstance(value, dict):
        return next((k for k in COHORT_KEYS if k in value), None)
    return None


# A oneOf in the OpenAPI document, so the schema refuses what the server refuses ({}, two keys).
Cohort = Annotated[
    Annotated[CohortAll, Tag("all")] | Annotated[CohortDevices, Tag("device_ids")] | Annotated[CohortTag, Tag("tag")],
    Discriminator(_cohort_kind, custom_error_type="cohort", custom_error_message=COHORT_NEEDS_ONE),
    Field(description="Exactly one of {\"all\": true}, {\"device_ids\": [...]}, {\"tag\": \"...\"}."),
]


def _method_enum(schema: dict[str, Any]) -> None:
    # Filled when the document is generated, so it lists every policy registered by then; the
    # handler keeps its own check (and its message naming the available methods).
    schema["enum"] = sorted(POLICIES)


class RoundCreate(BodyIn):
    method: str = Field(
        DEFAULT_METHOD, min_length=1, max_length=32,
        description=f"Update policy (GET /api/v1/rounds/methods lists them); default '{DEFAULT_METHOD}'.",
        json_schema_extra=_method_enum,
    )
    cohort: Cohort = Field(default_factory=lambda: CohortAll(all=True), description="Devices the new version targets.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Policy parameters; unknown keys are refused. Stored resolved, defaults filled."
    )
    data_scope: Literal["cohort", "all"] = Field(
        "cohort", description="Train on the cohort's devices' samples ('cohort', default) or on every device's ('all'). "
        "Cohort 'all' always trains on every sample.",
    )


class RoundRollbackPublic(BodyOut):
    device_id: str = Field(description="Device that rolled the round's version back.")
    reason: str = Field(description="Why (the agent's probation verdict or load failure).")
    at_ms: int = Field(description="When (Unix ms, device clock).")


class RoundDevicePublic(BodyOut):
    device_id: str = Field(description="Device in the round's cohort.")
    bytes_sent: int = Field(description="Artefact bytes streamed to it towards the round's version.")
    on_version: bool = Field(description="It reports running the round's version.")
    model_hash: str = Field(description="Model hash it reports running.")
    state: str = Field(description="Its agent state ('unknown' if the device is gone).")


class RoundSummaryPublic(BodyOut):
    id: str = Field(description="Round id (32 hex characters).")
    status: Literal["queued", "training", "publishing", "done", "skipped", "failed"] = Field(
        description="queued -> training -> publishing -> done; or skipped / failed (see reason)."
    )
    reason: str = Field(description="Why it was skipped or failed ('' otherwise).")
    method: str = Field(description="Update policy.")
    cohort: dict[str, Any] = Field(description="Cohort as requested.")
    lineage: str = Field(description="The cohort's lineage: 'all', 'tag:<tag>' or 'devices:<16 hex>'. "
                         "Rounds of one lineage build on each other and run in order.")
    data_scope: Literal["cohort", "all"] = Field(description="'cohort': trained on the cohort's samples; 'all': on every sample.")
    params: dict[str, Any] = Field(description="Resolved policy parameters.")
    progress: float = Field(description="0..1.")
    progress_message: str = Field(description="Latest progress line from the worker.")
    base_model_hash: str | None = Field(description="Version it trained from (set once training starts).")
    model_hash: str | None = Field(description="Version it published (set when done).")
    metrics: dict[str, Any] = Field(description="Training and publishing metrics.")
    created_at: UtcDatetime = Field(description="Creation time (UTC).")
    started_at: UtcDatetime | None = Field(description="Training start (UTC).")
    finished_at: UtcDatetime | None = Field(description="Time it reached done, skipped or failed (UTC).")
    devices_total: int = Field(description="Devices the published version targets.")


class RoundPublic(RoundSummaryPublic):
    devices: list[RoundDevicePublic] = Field(description="Delivery progress per targeted device.")
    devices_on_version: int = Field(
        description="Targeted devices that run the new version and are past probation.")
    devices_on_probation: int = Field(
        description="Targeted devices that run the new version on probation (they may still roll it back).")
    rollbacks: list[RoundRollbackPublic] = Field(
        description="Devices that rolled this round's version back, and why.")


class RoundsPublic(BodyOut):
    data: list[RoundSummaryPublic] = Field(description="This page of rounds, newest first.")
    count: int = Field(description="All rounds.")


class MethodPublic(BodyOut):
    name: str = Field(description="Value for RoundCreate.method.")
    default: bool = Field(description="Used when method is omitted.")
    params_schema: dict[str, Any] = Field(description="JSON schema of the method's params.")


class MethodsPublic(BodyOut):
    data: list[MethodPublic] = Field(description="Every registered update policy.")
    count: int = Field(description="Number of policies.")


# --- operator tokens and audit (issue 9) ----------------------------------------------------

Scope = Literal["read", "operate", "admin"]
MAX_EXPIRES_IN_S = 3650 * 86400


class TokenCreate(BodyIn):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$",
                      description="Who or what uses the token (shown in lists and the audit log).")
    scope: Scope = Field(description="read: GET routes; operate: also rounds and labels; admin: everything.")
    expires_in_s: int | None = Field(None, ge=60, le=MAX_EXPIRES_IN_S,
                                     description="Seconds until the token expires; null: never.")


class TokenPublic(BodyOut):
    id: str = Field(description="The token's id, also its visible part: elop_<id>_<secret>.")
    name: str = Field(description="Who or what uses the token.")
    scope: Scope = Field(description="read < operate < admin (each includes the ones before).")
    created_by: str = Field(description="The token (name) or tool that created it.")
    created_at: UtcDatetime = Field(description="When it was created (UTC).")
    expires_at: UtcDatetime | None = Field(description="When it stops working; null: never.")
    revoked_at: UtcDatetime | None = Field(description="When it was revoked; null: not revoked.")
    last_used_at: UtcDatetime | None = Field(description="Last accepted call (updated at most once a minute).")
    active: bool = Field(description="Neither revoked nor expired.")


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret token, shown only in this response: store it now.")


class TokensPublic(BodyOut):
    data: list[TokenPublic] = Field(description="One page of tokens, oldest first.")
    count: int = Field(description="Number of tokens in all pages.")


class AuditEventPublic(BodyOut):
    id: int = Field(description="Event number, increasing with time.")
    at: UtcDatetime = Field(description="When the call arrived (UTC).")
    token_id: str | None = Field(description="The token used, if the server knew it (revoked and expired ones too).")
    token_name: str = Field(description="Its name, or 'anonymous'.")
    method: str = Field(description="HTTP method.")
    path: str = Field(description="Request path (without the query).")
    action: str = Field(description="The route's operation id (e.g. rounds-create_round); 'unmatched' if none.")
    target: str = Field(description="Path parameters and the created object's id, as k=v,...")
    status: int | None = Field(description="HTTP status of the answer; null: the outcome could not be recorded.")
    detail: str = Field(description="The error detail of a refused call.")


class AuditEventsPublic(BodyOut):
    data: list[AuditEventPublic] = Field(description="One page of events, newest first.")
    count: int = Field(description="Number of matching events in all pages.")
