"""The bit-level coders of the diff codec: Golomb streams, index codings, varints."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import binary_entropy
from shared.codec.bitio import ByteReader, pack_bits, unpack_bits, write_varint
from shared.codec.dtypes import BY_CODE
from shared.codec.errors import BadIndicesError, DiffError, LimitError
from shared.codec.golomb import best_parameter, golomb_cost, golomb_decode, golomb_encode
from shared.codec.sections import decode_index, encode_index
from shared.codec.wire import (
    I_BITMAP,
    I_GOLOMB,
    I_GOLOMB_COMPLEMENT,
    LAYOUT_SPARSE,
    V_RAW,
    Entry,
    Section,
)


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.integers(0, 5000), max_size=200), m=st.integers(1, 3000))
def test_golomb_round_trip_and_cost(values, m):
    v = np.array(values, dtype=np.int64)
    bits = golomb_encode(v, m)
    assert bits.size == golomb_cost(v, m)
    padded = unpack_bits(pack_bits(bits))
    out, end = golomb_decode(padded, 0, v.size, m, 5000, BadIndicesError, "test")
    assert end == bits.size and np.array_equal(out, v)


def test_golomb_refuses_values_above_the_limit():
    bits = golomb_encode(np.array([10, 99]), 7)
    with pytest.raises(BadIndicesError):
        golomb_decode(bits, 0, 2, 7, 50, BadIndicesError, "test")


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(1, 3000),
    k=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
    coding=st.sampled_from([I_GOLOMB, I_GOLOMB_COMPLEMENT, I_BITMAP]),
)
def test_index_codings_round_trip(numel, k, seed, coding):
    rng = np.random.default_rng(seed)
    positions = np.flatnonzero(rng.random(numel) < k)
    raw, m = encode_index(positions, numel, coding)
    e = Entry(
        name="w",
        wd=BY_CODE[0],
        shape=(numel,),
        layout=LAYOUT_SPARSE,
        nnz=positions.size,
        value_coding=V_RAW,
        values=Section(0, 0, 0),
        index_coding=coding,
        index_m=m,
    )
    assert np.array_equal(decode_index(raw, e, "test"), positions)


@pytest.mark.parametrize("numel", [784 * 512, 512 * 512])
def test_golomb_gaps_come_within_one_percent_of_the_shannon_bound(numel):
    rng = np.random.default_rng(0)
    for k in (0.001, 0.005, 0.01, 0.05, 0.1, 0.2):
        positions = np.sort(rng.choice(numel, round(k * numel), replace=False))
        gaps = np.diff(positions, prepend=-1) - 1
        bits = golomb_cost(gaps, best_parameter(gaps))
        assert bits <= 1.01 * binary_entropy(positions.size / numel) * numel, k


@settings(max_examples=60, deadline=None)
@given(value=st.integers(0, (1 << 63) - 1))
def test_varint_round_trip(value):
    data = write_varint(value)
    r = ByteReader(data, 0, len(data), "test")
    assert r.varint("v", 1 << 63) == value and r.remaining() == 0


def test_varint_refusals():
    with pytest.raises(DiffError, match="overlong"):
        ByteReader(b"\x80\x00", 0, 2, "t").varint("v", 10)
    with pytest.raises(LimitError, match="exceeds"):
        ByteReader(write_varint(11), 0, 1, "t").varint("v", 10)
    with pytest.raises(DiffError, match="needs 1 bytes"):
        ByteReader(b"\x80", 0, 1, "t").varint("v", 10)
