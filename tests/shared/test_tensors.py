"""The canonical tensor hash (the tensor records of the model hash) and input scaling both sides
of the fleet agree on."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.tensors import DTYPE_NAMES, clone_state, tensor_bytes, tensors_hash, to_model_input


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    spec = ArchSpec("cnn", (1, 8, 8), 4, hidden=(6,), channels=(3,))
    return clone_state(init_weights_from_seed(build_model(spec), seed).state_dict())


def test_hash_matches_the_documented_layout():
    t = torch.tensor([[1.5, -2.0, 0.25]], dtype=torch.float32)
    expected = hashlib.sha256(
        struct.pack("<I", 1) + b"w" + struct.pack("<B", 3) + b"F32" + struct.pack("<I", 2)
        + struct.pack("<2Q", 1, 3) + np.array([1.5, -2.0, 0.25], "<f4").tobytes()
    ).hexdigest()
    assert tensors_hash({"w": t}) == expected


def test_hash_ignores_insertion_order():
    state = _state()
    reordered = dict(reversed(list(state.items())))
    assert list(reordered) != list(state)
    assert tensors_hash(reordered) == tensors_hash(state)


def test_hash_sees_a_single_bit_flip_anywhere():
    state = _state()
    h0 = tensors_hash(state)
    rng = np.random.default_rng(0)
    for name in ("features.0.weight", "classifier.1.weight", "classifier.4.bias"):
        t = state[name].clone()
        flat = t.view(-1).view(torch.int32)
        i = int(rng.integers(flat.numel()))
        flat[i] ^= 1 << int(rng.integers(32))
        assert tensors_hash({**state, name: t}) != h0


def test_hash_sees_dtype_shape_and_names():
    zeros = torch.zeros(2, 3)
    h = tensors_hash({"a": zeros})
    # Same bytes, different meaning: every one must hash differently.
    assert tensors_hash({"a": zeros.view(torch.int32)}) != h
    assert tensors_hash({"a": zeros.reshape(3, 2)}) != h
    assert tensors_hash({"a": zeros.reshape(6)}) != h
    assert tensors_hash({"b": zeros}) != h
    assert tensors_hash({"a": zeros, "b": torch.zeros(0)}) != h
    # A name/data boundary cannot be shifted: lengths are part of the hash.
    assert tensors_hash({"ab": torch.zeros(1)}) != tensors_hash({"a": torch.zeros(1)})


def test_hash_is_layout_and_device_independent():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensors_hash({"t": t.T}) == tensors_hash({"t": t.T.contiguous()})
    p = torch.nn.Parameter(t.clone())
    assert tensors_hash({"t": p}) == tensors_hash({"t": t})


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES))
def test_every_listed_dtype_hashes(dtype):
    t = torch.ones(3, dtype=dtype)
    assert len(tensors_hash({"t": t})) == 64
    assert len(tensor_bytes(t)) == 3 * t.element_size()


def test_bfloat16_bits_are_hashed_exactly():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = a.clone()
    b.view(torch.int16)[0] ^= 1
    assert tensors_hash({"a": a}) != tensors_hash({"a": b})


def test_unsupported_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="'z'.*complex"):
        tensors_hash({"z": torch.zeros(2, dtype=torch.complex64)})


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.lists(st.floats(width=32, allow_nan=False), max_size=6),
                       min_size=1, max_size=5))
def test_hash_is_a_function_of_content_only(entries):
    state = {k: torch.tensor(v, dtype=torch.float32) for k, v in entries.items()}
    copy = {k: v.clone() for k, v in sorted(state.items(), reverse=True)}
    assert tensors_hash(copy) == tensors_hash(state)


def test_to_model_input_scales_uint8_only():
    x = np.array([[0, 128, 255]], dtype=np.uint8)
    out = to_model_input(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[0.0, 128 / 255, 1.0]]))
    f = np.array([[-3.0, 0.5]], dtype=np.float64)
    assert torch.equal(to_model_input(f), torch.tensor([[-3.0, 0.5]]))
    assert x[0, 1] == 128  # the input is not modified in place


def test_clone_state_is_independent():
    state = _state()
    copy = clone_state(state)
    next(iter(copy.values())).add_(1.0)
    assert tensors_hash(copy) != tensors_hash(state)
