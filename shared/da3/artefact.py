"""``da3/adaptor-v1``: one domain's DA³ adaptor, shipped against the backbone a device runs.

A domain's result is its adaptor tensors plus its classifier head
(:func:`shared.da3.adaptor_tensor_names`); the frozen backbone is what the device already runs.
So the artefact is a safetensors file of exactly those tensors whose ``__metadata__`` names the
base model (the model the device holds, by its model hash) and the adapted model it produces::

    edgeloop.encoding    da3/adaptor-v1
    edgeloop.arch        the adapted ArchSpec, canonical JSON (ArchSpec.to_json()), kind resnet
                         with an extra "da3" section
    edgeloop.base_hash   model hash of the base the adaptor applies to
    edgeloop.model_hash  model hash of the adapted model (architecture + every tensor)

Decoding takes the base state and architecture (like a diff: ``decode_artefact(data,
base=..., base_arch=...)``): the adapted model is every non-adaptor tensor of the base (the
backbone, bit for bit) plus the file's tensors, and its model hash must be the claimed one. The
base may be the plain backbone or an earlier adaptation of the same backbone (its adaptor
tensors are then replaced). Everything is checked before a tensor is used: exact metadata
keys, canonical arch within the caller's ``max_parameters``, tensor names, shapes and dtypes
exactly the family's, the base's backbone spec equal to the arch's. Every refusal is an
:class:`AdaptorFormatError` (an :class:`~shared.artefacts.ArtefactError`). Byte-level spec:
docs/diff-format.md, "DA³ adaptor artefacts".
"""

from __future__ import annotations

import json
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.artefacts import ArtefactError, DecodedArtefact, check_arch_bounds, register_decoder
from shared.models import ArchSpec, build_model, model_hash
from shared.tensors import StateDict

ADAPTOR_ENCODING = "da3/adaptor-v1"
FAMILY = "da3"
MAX_ADAPTOR_BYTES = 1 << 28  # 256 MiB: far above any adaptor set of an edge model
MAX_HEADER_BYTES = 1 << 20  # the JSON header: names, shapes, offsets, four strings
_KEYS = frozenset({"edgeloop.encoding", "edgeloop.arch", "edgeloop.base_hash", "edgeloop.model_hash"})
_HASH = re.compile(r"[0-9a-f]{64}\Z")


class AdaptorFormatError(ArtefactError):
    """An adaptor artefact is malformed, corrupt, or does not apply to the given base."""


def backbone_spec(arch: ArchSpec) -> ArchSpec:
    """``arch`` without its DA³ section: the frozen backbone it adapts."""
    extra = {k: v for k, v in arch.extra.items() if k != FAMILY}
    return ArchSpec(kind=arch.kind, input_shape=arch.input_shape, num_classes=arch.num_classes,
                    hidden=arch.hidden, channels=arch.channels, extra=extra)


def backbone_key(arch: ArchSpec) -> str:
    """What must match between a base and an adaptor: the backbone spec, class count aside
    (the head is the domain's own and may have other classes)."""
    body = json.loads(backbone_spec(arch).to_json())
    del body["num_classes"]
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def adaptor_names(arch: ArchSpec) -> list[str]:
    """The tensors a domain owns for ``arch`` (``shared.da3.adaptor_tensor_names``), sorted."""
    from shared.da3 import adaptor_tensor_names  # the algorithm package decides the split

    return sorted(adaptor_tensor_names(arch))


def _layout(arch: ArchSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):  # shapes and dtypes only
        return {k: (tuple(v.shape), v.dtype) for k, v in build_model(arch).state_dict().items()}


def _check_adapted_arch(arch: ArchSpec) -> None:
    if arch.kind != "resnet" or FAMILY not in arch.extra:
        raise AdaptorFormatError(f"an adaptor's architecture must be a resnet with a {FAMILY!r} "
                                 f"section, got kind {arch.kind!r} with {sorted(arch.extra)}")


def encode_adaptor(arch: ArchSpec, state: StateDict, base_hash: str) -> tuple[bytes, str]:
    """``(artefact bytes, adapted model hash)`` of the adapted model ``state`` (all of its
    tensors; only the adaptor's are written) for a device that runs ``base_hash``."""
    _check_adapted_arch(arch)
    if not _HASH.match(base_hash):
        raise AdaptorFormatError(f"base_hash must be 64 lowercase hex digits, got {base_hash!r:.80}")
    full = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    digest = model_hash(arch, full)
    names = adaptor_names(arch)
    missing = [n for n in names if n not in full]
    if missing:
        raise AdaptorFormatError(f"the adapted state lacks adaptor tensors {missing[:4]}")
    meta = {"edgeloop.encoding": ADAPTOR_ENCODING, "edgeloop.arch": arch.to_json(),
            "edgeloop.base_hash": base_hash, "edgeloop.model_hash": digest}
    return st_save({n: full[n] for n in names}, metadata=meta), digest


def _header(data: bytes) -> dict | None:
    """The safetensors JSON header, or None if ``data`` is not one (no exception)."""
    if len(data) < 10:
        return None
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= min(len(data) - 8, MAX_HEADER_BYTES) or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        return None
    return header if isinstance(header, dict) else None


def is_adaptor(data: bytes) -> bool:
    header = _header(data)
    meta = header.get("__metadata__") if header else None
    return isinstance(meta, dict) and meta.get("edgeloop.encoding") == ADAPTOR_ENCODING


def read_adaptor(data: bytes, max_parameters: int) -> tuple[ArchSpec, str, str, dict[str, torch.Tensor]]:
    """``(arch, base_hash, model_hash, adaptor tensors)`` after every check that needs no base."""
    if len(data) > MAX_ADAPTOR_BYTES:
        raise AdaptorFormatError(f"adaptor artefact of {len(data)} bytes exceeds {MAX_ADAPTOR_BYTES}")
    header = _header(data)
    if header is None:
        raise AdaptorFormatError("not a safetensors adaptor artefact (bad header length or JSON)")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdaptorFormatError("adaptor artefact __metadata__ is not an object of strings")
    if set(meta) != _KEYS:
        raise AdaptorFormatError(f"adaptor artefact metadata keys must be exactly {sorted(_KEYS)}")
    if meta["edgeloop.encoding"] != ADAPTOR_ENCODING:
        raise AdaptorFormatError(f"adaptor artefact has encoding {meta['edgeloop.encoding']!r:.80}")
    for key in ("edgeloop.base_hash", "edgeloop.model_hash"):
        if not _HASH.match(meta[key]):
            raise AdaptorFormatError(f"{key} must be 64 lowercase hex digits")
    text = meta["edgeloop.arch"]
    try:
        arch = ArchSpec.from_json(text)
    except ValueError as exc:  # a family refusing its section is a ValueError too
        raise AdaptorFormatError(f"adaptor artefact has a bad architecture spec: {exc}") from exc
    if text != arch.to_json():  # the model hash covers these bytes: hash them verbatim
        raise AdaptorFormatError("adaptor artefact: edgeloop.arch is not the canonical JSON of its spec")
    _check_adapted_arch(arch)
    check_arch_bounds(arch, max_parameters)  # before anything is built or read
    try:
        names = adaptor_names(arch)
    except ValueError as exc:
        raise AdaptorFormatError(f"adaptor artefact: {exc}") from exc
    declared = sorted(k for k in header if k != "__metadata__")
    if declared != names:
        extra, lacking = sorted(set(declared) - set(names)), sorted(set(names) - set(declared))
        raise AdaptorFormatError(f"adaptor artefact tensors are not the family's: extra {extra[:4]}, "
                                 f"missing {lacking[:4]}")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdaptorFormatError(f"adaptor artefact is corrupt or truncated: {exc}") from exc
    layout = _layout(arch)
    bad = sorted(n for n in names if (tuple(tensors[n].shape), tensors[n].dtype) != layout.get(n))
    if bad:
        raise AdaptorFormatError(f"adaptor tensors {bad[:4]} do not have the family's shape or dtype")
    return arch, meta["edgeloop.base_hash"], meta["edgeloop.model_hash"], tensors


def decode_adaptor(
    data: bytes,
    base: StateDict | None = None,
    *,
    base_arch: ArchSpec | None = None,
    max_parameters: int = 64 << 20,
) -> DecodedArtefact:
    """The adapted model: ``base``'s backbone tensors plus the artefact's adaptor tensors,
    verified against the claimed model hash. ``base`` must be the model ``base_hash`` names."""
    arch, base_hash, claimed, tensors = read_adaptor(data, max_parameters)
    if base is None or base_arch is None:
        raise AdaptorFormatError("an adaptor artefact needs the base model it applies to")
    if backbone_key(base_arch) != backbone_key(arch):
        raise AdaptorFormatError("the adaptor's backbone architecture is not the base's: "
                                 f"{backbone_key(arch)[:120]} vs {backbone_key(base_arch)[:120]}")
    try:
        have = model_hash(base_arch, base)
    except ValueError as exc:
        raise AdaptorFormatError(f"base model: {exc}") from exc
    if have != base_hash:
        raise AdaptorFormatError(f"adaptor applies to {base_hash[:12]}, the base is {have[:12]}")
    layout = _layout(arch)
    state: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in layout.items():
        if name in tensors:
            state[name] = tensors[name]
            continue
        t = base.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            raise AdaptorFormatError(f"the base has no backbone tensor {name!r} of shape {list(shape)}")
        state[name] = t
    actual = model_hash(arch, state)
    if actual != claimed:
        raise AdaptorFormatError(f"model hash mismatch: adaptor claims {claimed[:16]}, base and "
                                 f"adaptor give {actual[:16]}")
    return DecodedArtefact(ADAPTOR_ENCODING, state, actual, base_hash=base_hash, arch=arch,
                           parent_hash=base_hash)


# Before the full-model sniffer: both are safetensors files, told apart by edgeloop.encoding.
register_decoder(ADAPTOR_ENCODING, decode_adaptor, is_adaptor, first=True)
