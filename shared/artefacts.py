"""Model artefacts: the bytes a server publishes and an agent installs.

An artefact has an *encoding* (how to turn bytes into tensors). Two kinds exist:

* ``model/safetensors-v1``: a full model, a safetensors file whose ``__metadata__`` carries
  ``edgeloop.encoding``, ``edgeloop.arch`` (the canonical JSON :class:`ArchSpec`),
  ``edgeloop.model_hash`` (:func:`shared.tensors.model_hash` of the tensors) and
  ``edgeloop.parent`` (the parent version's model hash, or empty).
* diffs against a base model (``diff/...``), registered by the diff codec: they need the base
  state to decode, and name the base model hash they apply to.

Every decoder checks the model hash of what it produced against the hash the artefact claims,
so a corrupt artefact fails here rather than being installed. Before anything is built from an
architecture spec (a full model's ``edgeloop.arch``, a seed artefact's ``arch``), its size is
bounded (:func:`check_arch_bounds`, ``max_parameters``), so a few bytes naming a huge network
are refused instead of allocated. Every refusal is an :class:`ArtefactError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.models.spec import ArchSpec, parameter_count
from shared.models.zoo import build_model
from shared.tensors import StateDict, model_hash

FULL_MODEL_ENCODING = "model/safetensors-v1"
MAX_ARTEFACT_BYTES = 1 << 31  # 2 GiB: far above any edge model, bounds what we will parse
# State-dict elements (parameters and buffers) a decoder will build: 64 Mi, 256 MiB as float32,
# far above any edge model; callers pass their own (the agent's max_model_parameters setting).
DEFAULT_MAX_PARAMETERS = 64 << 20


class ArtefactError(ValueError):
    """An artefact is malformed, corrupt, or does not apply to the given base model."""


class ArchLimitError(ArtefactError):
    """An artefact names an architecture larger than the caller's ``max_parameters``."""


@dataclass(frozen=True)
class DecodedArtefact:
    """What decoding produced: a complete state, verified against ``model_hash``."""

    encoding: str
    state: dict[str, torch.Tensor]
    model_hash: str
    base_hash: str | None = None  # set for diffs: the model they were applied to
    arch: ArchSpec | None = None  # set for full models (diffs keep the base's architecture)
    parent_hash: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


# decoder(data, base, max_parameters=...): diffs keep their base's architecture and may ignore it
Decoder = Callable[..., DecodedArtefact]
_DECODERS: dict[str, Decoder] = {}
_SNIFFERS: list[tuple[Callable[[bytes], bool], str]] = []


def register_decoder(encoding: str, decoder: Decoder, sniff: Callable[[bytes], bool]) -> None:
    """Plug in a decoder (the diff codec does this); ``sniff`` recognises its bytes."""
    _DECODERS[encoding] = decoder
    _SNIFFERS.append((sniff, encoding))


def sniff_encoding(data: bytes) -> str:
    for sniff, encoding in _SNIFFERS:
        if sniff(data):
            return encoding
    raise ArtefactError("unrecognised artefact: neither a safetensors model nor a known diff")


def decode_artefact(
    data: bytes,
    base: StateDict | None = None,
    *,
    encoding: str | None = None,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> DecodedArtefact:
    """Decode and verify any registered artefact. Raises :class:`ArtefactError`.

    ``max_parameters`` bounds the state-dict elements of an architecture the artefact names
    (checked before anything is built: :func:`check_arch_bounds`)."""
    if len(data) > MAX_ARTEFACT_BYTES:
        raise ArtefactError(f"artefact of {len(data)} bytes exceeds the {MAX_ARTEFACT_BYTES} limit")
    encoding = encoding or sniff_encoding(data)
    if encoding not in _DECODERS:
        raise ArtefactError(f"unknown artefact encoding {encoding!r}")
    return _DECODERS[encoding](data, base, max_parameters=max_parameters)


def check_arch_bounds(arch: ArchSpec, max_parameters: int = DEFAULT_MAX_PARAMETERS) -> int:
    """State-dict elements of ``build_model(arch)``; raises :class:`ArchLimitError` above
    ``max_parameters``. Nothing is allocated: the backbone is counted from its widths
    (:func:`shared.models.spec.parameter_count`) and refused before any torch call; only a
    spec with model-family sections is then built on the meta device to count theirs (cheap:
    ArchSpec bounds depth and spec size)."""
    def refuse(n: int, what: str) -> ArchLimitError:
        return ArchLimitError(
            f"architecture {arch.kind} hidden={list(arch.hidden)} channels={list(arch.channels)} "
            f"input_shape={list(arch.input_shape)} has {n} {what}, above the limit "
            f"max_parameters={max_parameters}")

    n = parameter_count(arch)
    if n > max_parameters:
        raise refuse(n, "backbone parameters")
    if not arch.extra:
        return n
    try:
        with torch.device("meta"):
            n = sum(t.numel() for t in build_model(arch).state_dict().values())
    except ValueError as exc:  # a family refusing the spec at build time
        raise ArtefactError(f"architecture spec cannot be built: {exc}") from exc
    if n > max_parameters:
        raise refuse(n, "state-dict elements (with its model families)")
    return n


def _parse_arch(text: str | bytes, what: str) -> ArchSpec:
    try:
        return ArchSpec.from_json(text)
    except ValueError as exc:
        raise ArtefactError(f"{what} has a bad architecture spec: {exc}") from exc


def encode_full_model(
    arch: ArchSpec, state: StateDict, parent_hash: str | None = None, extra: dict[str, str] | None = None
) -> tuple[bytes, str]:
    """Serialise a full model; returns ``(artefact bytes, model hash)``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    digest = model_hash(tensors)
    meta = {
        "edgeloop.encoding": FULL_MODEL_ENCODING,
        "edgeloop.arch": arch.to_json(),
        "edgeloop.model_hash": digest,
        "edgeloop.parent": parent_hash or "",
    }
    for key, value in (extra or {}).items():
        meta[f"edgeloop.extra.{key}"] = str(value)
    return st_save(tensors, metadata=meta), digest


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _read_safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtefactError(f"model artefact header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ArtefactError("model artefact header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtefactError("model artefact __metadata__ is not an object of strings")
    return meta


def _check_fits(arch: ArchSpec, state: StateDict) -> None:
    """The tensors must be exactly those of ``arch`` (names, shapes, dtypes): an agent must
    never install a model that its runner then fails to load."""
    with torch.device("meta"):  # shapes and dtypes only, no memory
        expected = build_model(arch).state_dict()
    got = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    want = {k: (tuple(v.shape), v.dtype) for k, v in expected.items()}
    if got != want:
        bad = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise ArtefactError(f"model artefact tensors do not fit its architecture spec: {bad[:4]}")


def decode_full_model(
    data: bytes, base: StateDict | None = None, *, max_parameters: int = DEFAULT_MAX_PARAMETERS
) -> DecodedArtefact:
    """Decode a ``model/safetensors-v1`` artefact (``base`` is ignored)."""
    del base
    if not _looks_like_safetensors(data):
        raise ArtefactError("not a safetensors model artefact (bad header length)")
    meta = _read_safetensors_metadata(data)
    if meta.get("edgeloop.encoding") != FULL_MODEL_ENCODING:
        raise ArtefactError(f"model artefact has encoding {meta.get('edgeloop.encoding')!r}")
    arch = _parse_arch(meta.get("edgeloop.arch", ""), "model artefact")
    check_arch_bounds(arch, max_parameters)  # before the tensors are read or a model built
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtefactError(f"model artefact is corrupt or truncated: {exc}") from exc
    claimed = meta.get("edgeloop.model_hash", "")
    try:
        actual = model_hash(state)
    except ValueError as exc:  # a dtype the fleet does not use
        raise ArtefactError(f"model artefact: {exc}") from exc
    if actual != claimed:
        raise ArtefactError(f"model hash mismatch: artefact claims {claimed[:16]}, tensors give {actual[:16]}")
    _check_fits(arch, state)
    extra = {k.removeprefix("edgeloop.extra."): v for k, v in meta.items() if k.startswith("edgeloop.extra.")}
    return DecodedArtefact(
        encoding=FULL_MODEL_ENCODING,
        state=state,
        model_hash=actual,
        arch=arch,
        parent_hash=meta.get("edgeloop.parent") or None,
        meta=extra,
    )


register_decoder(FULL_MODEL_ENCODING, decode_full_model, _looks_like_safetensors)


# --- re-initialisation from a seed (DPU §5.4.2) ------------------------------------------------
SEED_MODEL_ENCODING = "model/seed-v1"
_SEED_MAGIC = b"ELSEED1\n"


def encode_seed_model(arch: ArchSpec, seed: int, model_hash_: str) -> bytes:
    """A model shipped as the seed that generates it: ``ELSEED1\\n`` + canonical JSON
    ``{"arch": {...}, "model_hash": "...", "seed": s}``. The receiver regenerates the weights
    with :func:`shared.models.init_weights_from_seed` and must obtain ``model_hash``."""
    body = {"arch": json.loads(arch.to_json()), "model_hash": model_hash_, "seed": int(seed)}
    return _SEED_MAGIC + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


MAX_SEED_ARTEFACT_BYTES = 1 << 16


def decode_seed_model(
    data: bytes, base: StateDict | None = None, *, max_parameters: int = DEFAULT_MAX_PARAMETERS
) -> DecodedArtefact:
    """Regenerate a ``model/seed-v1`` model, after bounding its architecture: the network is
    built only once :func:`check_arch_bounds` accepts it."""
    del base
    from shared.models import init_weights_from_seed

    if not data.startswith(_SEED_MAGIC) or len(data) > MAX_SEED_ARTEFACT_BYTES:
        raise ArtefactError("not a seed artefact")
    try:
        body = json.loads(data[len(_SEED_MAGIC) :])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError included
        raise ArtefactError(f"malformed seed artefact: {exc}") from exc
    if not isinstance(body, dict) or set(body) != {"arch", "model_hash", "seed"}:
        raise ArtefactError('seed artefact must be {"arch": ..., "model_hash": ..., "seed": ...}')
    seed, claimed = body["seed"], body["model_hash"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ArtefactError(f"seed artefact: seed must be an integer in [0, 2**63), got {seed!r}")
    if not isinstance(claimed, str):
        raise ArtefactError(f"seed artefact: model_hash must be a string, got {claimed!r}")
    try:
        arch = ArchSpec.from_dict(body["arch"])
    except ValueError as exc:
        raise ArtefactError(f"seed artefact has a bad architecture spec: {exc}") from exc
    check_arch_bounds(arch, max_parameters)
    try:
        model = init_weights_from_seed(build_model(arch), seed)
    except ValueError as exc:
        raise ArtefactError(f"seed artefact: {exc}") from exc
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    actual = model_hash(state)
    if actual != claimed:
        raise ArtefactError(
            f"seed {seed} generates model {actual[:16]} here, the server expected {claimed[:16]} "
            "(weight generation differs between the two machines)")
    return DecodedArtefact(SEED_MODEL_ENCODING, state, actual, arch=arch, meta={"seed": str(seed)})


register_decoder(SEED_MODEL_ENCODING, decode_seed_model, lambda d: d.startswith(_SEED_MAGIC))
