"""Artefacts as EdgeLoop wrote them under the v1 model hash (tensors only), for upgrade tests.

Byte for byte what ``shared.artefacts.encode_full_model`` produced before the v2 hash: the same
safetensors layout and metadata keys, with ``edgeloop.model_hash`` (and the parent) the
:func:`shared.tensors.tensors_hash` of the tensors.
"""

from __future__ import annotations

from safetensors.torch import save as st_save

from shared.artefacts import FULL_MODEL_ENCODING
from shared.models import ArchSpec
from shared.tensors import StateDict, tensors_hash


def v1_full_artefact(arch: ArchSpec, state: StateDict, parent_v1: str | None = None,
                     extra: dict[str, str] | None = None) -> tuple[bytes, str]:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    digest = tensors_hash(tensors)
    meta = {"edgeloop.encoding": FULL_MODEL_ENCODING, "edgeloop.arch": arch.to_json(),
            "edgeloop.model_hash": digest, "edgeloop.parent": parent_v1 or ""}
    meta.update({f"edgeloop.extra.{k}": str(v) for k, v in (extra or {}).items()})
    return st_save(tensors, metadata=meta), digest
