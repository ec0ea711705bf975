"""The ``alq`` value format of diff/sparse-v1: round trips bit-exactly, respects its bit
budget, and refuses every malformed value section with a typed DiffError."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from shared.alq.vector import AlqCode, decode_values, encode_values
from shared.codec import (
    AlqParams,
    BadValuesError,
    DiffError,
    LimitError,
    TrailingDataError,
    UnknownEncodingError,
    decode_diff,
    encode_update,
    make_update,
    read_header,
    size_breakdown,
)
from shared.codec.bitio import pack_bits, write_varint
from shared.codec.dtypes import BY_TORCH
from shared.codec.golomb import golomb_encode
from shared.codec.sections import encode_alq
from shared.codec.wire import (
    C_NONE,
    I_GOLOMB,
    LAYOUT_SPARSE,
    MAGIC,
    V_ALQ,
    Entry,
    Section,
    write_entry,
)
from shared.models import ArchSpec, model_hash

ARCH = ArchSpec("mlp", (40,), 40, hidden=(48,))
F32 = BY_TORCH[torch.float32]


@pytest.fixture
def pair() -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(96, 80, generator=gen), "a.bias": torch.zeros(96)}
    target = {k: v.clone() for k, v in base.items()}
    mask = torch.rand(96, 80, generator=gen) < 0.05
    target["a.weight"][mask] += 0.02 * torch.randn(int(mask.sum()), generator=gen)
    target["a.bias"][3] = 0.25
    return base, target


def test_vector_coding_meets_its_budget_and_error_falls_with_bits():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    errs = []
    for bits in (0.5, 1, 2, 4, 6):
        code = encode_values(x, 50, 6, bits)
        assert code is not None and 8 * code.nbytes() <= bits * len(x)
        assert (code.alphas > 0).all() and int(code.widths.max(initial=0)) <= 6
        errs.append(float(((decode_values(code) - x) ** 2).sum()))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))
    assert encode_values(np.array([1.0, np.inf]), 8, 4, 2) is None


def test_alq_diff_round_trips_and_is_smaller_than_int8(pair):
    base, target = pair
    upd = make_update(base, target, "alq", arch=ARCH, alq=AlqParams(avg_bits=2.0, group=32))
    blob = encode_update(upd, model_hash(ARCH, base))
    info = {t.name: t for t in read_header(blob).tensors}
    assert info["a.weight"].value_coding == "alq" and info["a.bias"].value_coding == "raw"
    out = decode_diff(blob, base, base_arch=ARCH)
    assert out.model_hash == upd.target_hash
    assert all(torch.equal(out.state[k], upd.target[k]) for k in base)
    nnz = int((base["a.weight"] != target["a.weight"]).sum())
    assert 8 * size_breakdown(blob)["values"] <= 2.0 * nnz + 64  # + the bias value
    int8 = encode_update(make_update(base, target, "int8", arch=ARCH), model_hash(ARCH, base))
    assert size_breakdown(blob)["values"] < size_breakdown(int8)["values"] / 3
    # Error feedback: the residual is exactly what the coding lost.
    lost = target["a.weight"] - upd.target["a.weight"]
    assert torch.allclose(upd.residual["a.weight"], lost) and lost.abs().max() > 0


# ------------------------------------------------------------------ hand-built sections


def _blob(base: dict, section: bytes, positions: list[int], group: int, target_hash: str = "0" * 64,
          entry_group: int | None = None) -> bytes:  # fmt: skip
    gaps = np.diff(np.asarray(positions), prepend=-1) - 1
    idx = pack_bits(golomb_encode(gaps, 4))
    e = Entry(name="a.weight", wd=F32, shape=(96, 80), layout=LAYOUT_SPARSE, nnz=len(positions),
              value_coding=V_ALQ, values=Section(C_NONE, len(section), len(section)),
              index_coding=I_GOLOMB, index_m=4, index=Section(C_NONE, len(idx), len(idx)),
              alq_group=group if entry_group is None else entry_group)  # fmt: skip
    table = write_entry(e) if e.alq_group else \
        write_entry(replace(e, alq_group=1)).replace(bytes([V_ALQ, 1, C_NONE]), bytes([V_ALQ, 0, C_NONE]))  # fmt: skip
    data = idx + section
    body = (MAGIC + bytes([1, 0]) + bytes.fromhex(model_hash(ARCH, base)) + bytes.fromhex(target_hash)
            + write_varint(1) + write_varint(len(table)) + write_varint(len(data)) + table + data)  # fmt: skip
    return body + struct.pack("<I", zlib.crc32(body))


POS = [1, 5, 9, 200, 1000]  # five values in groups of 2: widths (1, 2, 1)
GOOD = AlqCode(5, 2, np.array([1, 2, 1], np.uint8), np.array([0.5, 0.25, 0.125, 1.0], np.float16),
               np.array([1, 0, 1, 1, 0, 1, 0], bool))  # fmt: skip
# group 0: +0.5, -0.5; group 1: (+0.25 - 0.125), (+0.25 + 0.125); group 2: -1.0
VALUES = [0.5, -0.5, 0.125, 0.375, -1.0]


def _expected_state(base: dict) -> dict:
    state = {k: v.clone() for k, v in base.items()}
    d = np.array(VALUES, np.float32)  # Σ ±α per element
    flat = state["a.weight"].view(-1)
    flat[POS] = flat[POS] + torch.from_numpy(d)
    return state


def test_hand_built_alq_section_decodes_to_the_documented_values(pair):
    base, _ = pair
    assert np.array_equal(decode_values(GOOD), VALUES)
    want = model_hash(ARCH, _expected_state(base))
    out = decode_diff(_blob(base, encode_alq(GOOD), POS, 2, want), base, base_arch=ARCH)
    assert out.model_hash == want
    # widths (1,2)(1,0) | α 0.5 0.25 0.125 1.0 as fp16 LE | sign bits 1011010 + one zero pad bit
    assert encode_alq(GOOD).hex() == "1210" + "0038" + "0034" + "0030" + "003c" + "b4"


@pytest.mark.parametrize("case,error", [
    ("width over 8", BadValuesError), ("odd nibble", TrailingDataError), ("zero alpha", BadValuesError),
    ("negative alpha", BadValuesError), ("nan alpha", BadValuesError), ("short", BadValuesError),
    ("long", BadValuesError), ("stray bit", TrailingDataError), ("group 0", LimitError),
])  # fmt: skip
def test_malformed_alq_sections_are_refused(pair, case, error):
    base, _ = pair
    raw = bytearray(encode_alq(GOOD))
    group, entry_group = 2, None
    if case == "width over 8":
        raw[0] = 0x92
    elif case == "odd nibble":
        raw[1] = 0x13
    elif case in ("zero alpha", "negative alpha", "nan alpha"):
        raw[3:5] = np.array([{"zero alpha": 0.0, "negative alpha": -0.25, "nan alpha": np.nan}[case]],
                            "<f2").tobytes()  # fmt: skip
    elif case == "short":
        raw = raw[:-1]
    elif case == "long":
        raw += b"\0"
    elif case == "stray bit":
        raw[-1] |= 0x01  # the padding bit after the 7 sign bits
    elif case == "group 0":
        entry_group = 0
    with pytest.raises(error):
        decode_diff(_blob(base, bytes(raw), POS, group, entry_group=entry_group), base, base_arch=ARCH)


def test_alq_on_an_integer_tensor_is_refused():
    base = {"a.weight": torch.zeros(96, 80, dtype=torch.int32)}
    blob = bytearray(_blob({"a.weight": torch.zeros(96, 80)}, encode_alq(GOOD), POS, 2))
    blob[blob.index(b"a.weight") + 8] = BY_TORCH[torch.int32].code  # the dtype byte
    body = bytes(blob[:-4])
    blob = body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(DiffError):  # wrong base hash or unknown coding: refused either way
        decode_diff(bytes(blob), base, base_arch=ARCH)
    assert issubclass(UnknownEncodingError, DiffError)


def test_mutated_alq_diffs_raise_only_diff_errors(pair):
    """A little fuzzing: random byte edits behind a recomputed CRC reach the section parser;
    whatever happens, the decoder raises a DiffError or returns the promised target."""
    base, target = pair
    upd = make_update(base, target, "alq", arch=ARCH, alq=AlqParams(avg_bits=2.0, group=16))
    blob = encode_update(upd, model_hash(ARCH, base))
    rng = np.random.default_rng(0)
    body_start = read_header(blob).header_bytes
    for _ in range(300):
        bad = bytearray(blob[:-4])
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(body_start, len(bad)))
            bad[pos] = int(rng.integers(0, 256))
        body = bytes(bad)
        data = body + struct.pack("<I", zlib.crc32(body))
        try:
            out = decode_diff(data, base, base_arch=ARCH)
        except DiffError:
            continue
        assert out.model_hash == upd.target_hash  # only an edit that changed nothing passes
