"""Model artefacts: the bytes a server publishes and an agent installs.

An artefact has an *encoding* (how to turn bytes into tensors). Two kinds exist:

* ``model/safetensors-v1``: a full model, a safetensors file whose ``__metadata__`` carries
  ``edgeloop.encoding``, ``edgeloop.arch`` (the canonical JSON :class:`ArchSpec`, exactly
  ``ArchSpec.to_json()``), ``edgeloop.model_hash`` (:func:`shared.models.model_hash` of the
  architecture and the tensors) and ``edgeloop.parent`` (the parent version's model hash, or
  empty).
* diffs against a base model (``diff/...``), registered by the diff codec: they need the base
  state and architecture to decode, and name the base model hash they apply to.

Every decoder checks the model hash of what it produced against the hash the artefact claims,
so a corrupt artefact fails here rather than being installed. The model hash covers the
architecture (docs/protocol.md, "Model hash"): an edited ``edgeloop.arch`` that still builds the
same tensors (``[1, 28, 28]`` -> ``[784]``) changes the hash and is refused. Before anything is built from an
architecture spec (a full model's ``edgeloop.arch``, a seed artefact's ``arch``), its size is
bounded (:func:`check_arch_bounds`, ``max_parameters``), so a few bytes naming a huge network
are refused instead of allocated. Every refusal is an :class:`ArtefactError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.models.identity import model_hash
from shared.models.spec import ArchSpec, parameter_count
from shared.models.zoo import build_model
from shared.tensors import StateDict, tensors_hash

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


# decoder(data, base, base_arch=..., max_parameters=...): diffs keep their base's architecture
# (``base_arch``, part of every model hash); full models and seeds ignore both.
Decoder = Callable[..., DecodedArtefact]
_DECODERS: dict[str, Decoder] = {}
_SNIFFERS: list[tuple[Callable[[bytes], bool], str]] = []


def register_decoder(encoding: str, decoder: Decoder, sniff: Callable[[bytes], bool], *,
                     first: bool = False) -> None:
    """Plug in a decoder (the diff codec does this); ``sniff`` recognises its bytes. ``first``:
    sniff before the decoders registered so far (a more specific safetensors encoding, e.g.
    ``da3/adaptor-v1``, must be tried before the full model's catch-all sniffer)."""
    _DECODERS[encoding] = decoder
    if first:
        _SNIFFERS.insert(0, (sniff, encoding))
    else:
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
    base_arch: ArchSpec | None = None,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> DecodedArtefact:
    """Decode and verify any registered artefact. Raises :class:`ArtefactError`.

    A diff needs ``base`` and ``base_arch`` (its result keeps the base's architecture, which its
    model hash covers). ``max_parameters`` bounds the state-dict elements of an architecture the
    artefact names (checked before anything is built: :func:`check_arch_bounds`)."""
    if len(data) > MAX_ARTEFACT_BYTES:
        raise ArtefactError(f"artefact of {len(data)} bytes exceeds the {MAX_ARTEFACT_BYTES} limit")
    encoding = encoding or sniff_encoding(data)
    if encoding not in _DECODERS:
        raise ArtefactError(f"unknown artefact encoding {encoding!r}")
    return _DECODERS[encoding](data, base, base_arch=base_arch, max_parameters=max_parameters)


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
    digest = model_hash(arch, tensors)
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


def _read_full_model(data: bytes, max_parameters: int) -> tuple[dict[str, str], ArchSpec, dict[str, torch.Tensor]]:
    """Metadata, architecture and tensors of a full-model artefact, nothing verified yet but
    the encoding, the architecture's bounds and that its JSON is canonical."""
    if not _looks_like_safetensors(data):
        raise ArtefactError("not a safetensors model artefact (bad header length)")
    meta = _read_safetensors_metadata(data)
    if meta.get("edgeloop.encoding") != FULL_MODEL_ENCODING:
        raise ArtefactError(f"model artefact has encoding {meta.get('edgeloop.encoding')!r}")
    text = meta.get("edgeloop.arch", "")
    arch = _parse_arch(text, "model artefact")
    # The hash covers the canonical bytes; requiring them verbatim lets any client hash the
    # metadata string as it stands, without re-serialising JSON its own way.
    if text != arch.to_json():
        raise ArtefactError("model artefact: edgeloop.arch is not the canonical JSON of its spec "
                            "(sorted keys, no whitespace, ArchSpec.to_json())")
    check_arch_bounds(arch, max_parameters)  # before the tensors are read or a model built
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtefactError(f"model artefact is corrupt or truncated: {exc}") from exc
    return meta, arch, state


def _decoded_full(meta: dict[str, str], arch: ArchSpec, state: dict[str, torch.Tensor], digest: str,
                  parent: str | None) -> DecodedArtefact:
    extra = {k.removeprefix("edgeloop.extra."): v for k, v in meta.items() if k.startswith("edgeloop.extra.")}
    return DecodedArtefact(FULL_MODEL_ENCODING, state, digest, arch=arch, parent_hash=parent, meta=extra)


def decode_full_model(
    data: bytes,
    base: StateDict | None = None,
    *,
    base_arch: ArchSpec | None = None,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> DecodedArtefact:
    """Decode a ``model/safetensors-v1`` artefact (``base`` and ``base_arch`` are ignored)."""
    del base, base_arch
    meta, arch, state = _read_full_model(data, max_parameters)
    claimed = meta.get("edgeloop.model_hash", "")
    try:
        actual = model_hash(arch, state)
    except ValueError as exc:  # a dtype the fleet does not use
        raise ArtefactError(f"model artefact: {exc}") from exc
    if actual != claimed:
        if claimed == tensors_hash(state):
            raise ArtefactError(
                f"model artefact carries a v1 model hash {claimed[:16]} (tensors only); this "
                "version needs v2 hashes, which cover the architecture: upgrade the server "
                "(docs/protocol.md, Model hash)")
        raise ArtefactError(
            f"model hash mismatch: artefact claims {claimed[:16]}, its architecture and tensors "
            f"give {actual[:16]}")
    _check_fits(arch, state)
    return _decoded_full(meta, arch, state, actual, meta.get("edgeloop.parent") or None)


@dataclass(frozen=True)
class LegacyFullModel:
    """A full model verified under the v1 identity (tensors only), with its v2 hash."""

    decoded: DecodedArtefact  # model_hash: v2; parent_hash: as stored (a v1 hash)
    v1_hash: str


def decode_v1_full_model(data: bytes, *, max_parameters: int = DEFAULT_MAX_PARAMETERS) -> LegacyFullModel:
    """Upgrade path only (server migration 0003, agent model store): decode a full model whose
    ``edgeloop.model_hash`` is the v1 hash, :func:`shared.tensors.tensors_hash`. The tensors are
    verified against it and must fit the architecture; the architecture itself was never
    covered, so it is trusted as stored (it was installed or published under v1)."""
    meta, arch, state = _read_full_model(data, max_parameters)
    claimed = meta.get("edgeloop.model_hash", "")
    try:
        actual = tensors_hash(state)
    except ValueError as exc:
        raise ArtefactError(f"model artefact: {exc}") from exc
    if actual != claimed:
        raise ArtefactError(f"v1 model hash mismatch: artefact claims {claimed[:16]}, tensors give {actual[:16]}")
    _check_fits(arch, state)
    decoded = _decoded_full(meta, arch, state, model_hash(arch, state), meta.get("edgeloop.parent") or None)
    return LegacyFullModel(decoded, actual)


register_decoder(FULL_MODEL_ENCODING, decode_full_model, _looks_like_safetensors)


# --- re-initialisation from a seed (DPU §5.4.2; docs/seed-format.md) --------------------------
SEED_MODEL_ENCODING = "model/seed-v2"
LEGACY_SEED_ENCODING = "model/seed-v1"  # numpy PCG64 weights: refused, never emitted any more
_SEED_MAGIC = b"ELSEED2\n"
_LEGACY_SEED_MAGIC = b"ELSEED1\n"
_SEED_KEYS = {"arch", "generator", "model_hash", "seed"}
_SEED_TEXT = re.compile(r"(0|[1-9][0-9]{0,18})\Z")  # canonical decimal, no sign or zeros
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
MAX_SEED_ARTEFACT_BYTES = 1 << 16


class SeedGeneratorError(ArtefactError):
    """A seed artefact needs a weight generator this build does not implement (an unknown
    ``generator``, or a ``model/seed-v1`` artefact's numpy PCG64 stream): the client cannot
    rebuild it and needs the full model (docs/protocol.md, "Declining seeds")."""


def encode_seed_model(arch: ArchSpec, seed: int, model_hash_: str) -> bytes:
    """A model shipped as the seed that generates it: ``ELSEED2\\n`` + canonical JSON
    ``{"arch": "<ArchSpec.to_json()>", "generator": "splitmix64-sha256/1", "model_hash": "...",
    "seed": "s"}``. ``arch`` is the canonical JSON *text* (the bytes the model hash covers, so a
    client never re-serialises it) and ``seed`` a decimal string (parsers that read numbers as
    doubles keep all 63 bits). The receiver regenerates the weights with
    :func:`shared.models.init_weights_from_seed` and must obtain ``model_hash``."""
    from shared.models.seedgen import GENERATOR, check_seed

    if not _HEX64.match(model_hash_):
        raise ValueError(f"model_hash must be 64 lowercase hex digits, got {model_hash_!r}")
    body = {"arch": arch.to_json(), "generator": GENERATOR, "model_hash": model_hash_,
            "seed": str(check_seed(seed))}
    return _SEED_MAGIC + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _seed_body(data: bytes) -> tuple[ArchSpec, int, str]:
    """The validated ``(arch, seed, model_hash)`` of a ``model/seed-v2`` artefact."""
    from shared.models.seedgen import GENERATOR, SEED_LIMIT

    if not data.startswith(_SEED_MAGIC) or len(data) > MAX_SEED_ARTEFACT_BYTES:
        raise ArtefactError(f"not a seed artefact (magic ELSEED2, at most {MAX_SEED_ARTEFACT_BYTES} bytes)")
    try:
        body = json.loads(data[len(_SEED_MAGIC) :])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError included
        raise ArtefactError(f"malformed seed artefact: {exc}") from exc
    if not isinstance(body, dict) or set(body) != _SEED_KEYS:
        raise ArtefactError('seed artefact must be {"arch": ..., "generator": ..., "model_hash": ..., "seed": ...}')
    generator, seed, claimed = body["generator"], body["seed"], body["model_hash"]
    if generator != GENERATOR:
        raise SeedGeneratorError(f"seed artefact names generator {str(generator)[:64]!r}; this client "
                                 f"implements only {GENERATOR!r}")
    if not isinstance(seed, str) or not _SEED_TEXT.match(seed) or int(seed) >= SEED_LIMIT:
        raise ArtefactError(f"seed artefact: seed must be a decimal string of an integer in [0, 2**63), "
                            f"got {seed!r:.64}")
    if not isinstance(claimed, str) or not _HEX64.match(claimed):
        raise ArtefactError(f"seed artefact: model_hash must be 64 lowercase hex digits, got {claimed!r:.80}")
    text = body["arch"]
    if not isinstance(text, str):
        raise ArtefactError("seed artefact: arch must be a string holding the canonical JSON spec")
    arch = _parse_arch(text, "seed artefact")
    if text != arch.to_json():  # the hash covers these bytes: any client hashes them verbatim
        raise ArtefactError("seed artefact: arch is not the canonical JSON of its spec "
                            "(sorted keys, no whitespace, ArchSpec.to_json())")
    return arch, int(seed), claimed


def decode_seed_model(
    data: bytes,
    base: StateDict | None = None,
    *,
    base_arch: ArchSpec | None = None,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> DecodedArtefact:
    """Regenerate a ``model/seed-v2`` model, after bounding its architecture: the network is
    built only once :func:`check_arch_bounds` accepts it."""
    del base, base_arch
    from shared.models import init_weights_from_seed

    arch, seed, claimed = _seed_body(data)
    check_arch_bounds(arch, max_parameters)
    try:
        model = init_weights_from_seed(build_model(arch), seed)
    except ValueError as exc:
        raise ArtefactError(f"seed artefact: {exc}") from exc
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    actual = model_hash(arch, state)
    if actual != claimed:
        raise ArtefactError(
            f"seed {seed} generates model {actual[:16]} here, the server expected {claimed[:16]} "
            "(weight generation differs between the two machines)")
    return DecodedArtefact(SEED_MODEL_ENCODING, state, actual, arch=arch, meta={"seed": str(seed)})


def refuse_legacy_seed(data: bytes, base: StateDict | None = None, **_: object) -> DecodedArtefact:
    """``model/seed-v1`` named numpy's PCG64 stream, which no other language implements and
    this build no longer regenerates: refused with a typed error instead of a hash mismatch."""
    raise SeedGeneratorError(
        "model/seed-v1 artefacts (numpy PCG64 weights) are no longer regenerated; the server "
        "sends model/seed-v2, or the full model to a client that sends no have_model_hash")


register_decoder(SEED_MODEL_ENCODING, decode_seed_model, lambda d: d.startswith(_SEED_MAGIC))
register_decoder(LEGACY_SEED_ENCODING, refuse_legacy_seed, lambda d: d.startswith(_LEGACY_SEED_MAGIC))
