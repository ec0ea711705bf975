"""Policy state carried between rounds, kept in the blob store so a restart loses nothing.

DPU carries a re-initialised "shadow" chain (§5.5.3: a whole state dict trained beside the
deployed model) and the quantisation residual of error feedback. Both are tensors, written as
one safetensors blob whose hash the round records (``metrics["carry_sha256"]``); the worker
reloads the newest one per method at start-up.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.dpu import ShadowChain

_RESIDUAL, _SHADOW = "residual/", "shadow/"


def encode_carry(carry: dict[str, Any]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for key, value in carry.items():
        if key == "residual" and value:
            tensors.update({_RESIDUAL + n: t.detach().cpu().contiguous() for n, t in value.items()})
        elif key == "shadow" and value is not None:
            tensors.update({_SHADOW + n: t.detach().cpu().contiguous() for n, t in value.state.items()})
            meta["shadow"] = {"seed": value.seed, "rounds": value.rounds}
        elif value is not None and key not in ("residual", "shadow"):
            meta[key] = value  # must be JSON-able
    return st_save(tensors, metadata={"edgeloop.carry": json.dumps(meta, sort_keys=True)})


def decode_carry(data: bytes) -> dict[str, Any]:
    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + header_len]).get("__metadata__", {}).get("edgeloop.carry", "{}"))
    carry: dict[str, Any] = {k: v for k, v in meta.items() if k != "shadow"}
    residual = {n[len(_RESIDUAL):]: t for n, t in tensors.items() if n.startswith(_RESIDUAL)}
    if residual:
        carry["residual"] = residual
    if "shadow" in meta:
        state = {n[len(_SHADOW):]: t for n, t in tensors.items() if n.startswith(_SHADOW)}
        carry["shadow"] = ShadowChain(int(meta["shadow"]["seed"]), state, int(meta["shadow"]["rounds"]))
    return carry
