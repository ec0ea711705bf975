"""The ELS1 sample payload: exact round trip, content ids, and every malformed payload refused."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.samples import (
    MAGIC,
    MAX_SAMPLE_ELEMENTS,
    SampleFormatError,
    decode_sample,
    encode_sample,
    sample_id,
)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.float32]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_round_trip_is_exact(x):
    payload = encode_sample(x)
    out = decode_sample(payload)
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, x)
    assert out.dtype.byteorder in ("=", "|")  # native, usable directly by torch


def test_layout_is_the_documented_one():
    x = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    assert encode_sample(x) == MAGIC + bytes([1, 3]) + struct.pack("<3I", 1, 2, 3) + bytes(range(6))
    f = np.array([1.0, -2.5], dtype=np.float32)
    assert encode_sample(f) == MAGIC + bytes([2, 1]) + struct.pack("<I", 2) + np.array([1.0, -2.5], "<f4").tobytes()


def test_non_contiguous_and_big_endian_inputs_encode_their_values():
    x = np.arange(12, dtype=np.uint8).reshape(3, 4).T  # Fortran-ordered view
    np.testing.assert_array_equal(decode_sample(encode_sample(x)), x)


def test_sample_id_is_content_sha256():
    payload = encode_sample(np.zeros((1, 4, 4), np.uint8))
    assert sample_id(payload) == hashlib.sha256(payload).hexdigest()
    other = encode_sample(np.zeros((1, 4, 4), np.float32))
    assert sample_id(other) != sample_id(payload)  # same zeros, different dtype -> different id
    assert sample_id(encode_sample(np.zeros((4, 4), np.uint8))) != sample_id(payload)  # shape too


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros(3, np.int64), "uint8 or float32"),
        (np.zeros(3, np.float64), "uint8 or float32"),
        (np.array(5, np.uint8), "1 to 4 dimensions"),
        (np.zeros((1, 1, 1, 1, 1), np.uint8), "1 to 4 dimensions"),
        (np.zeros(MAX_SAMPLE_ELEMENTS + 1, np.uint8), "exceeds"),
    ],
)
def test_encode_refuses_what_cannot_be_a_sample(x, message):
    with pytest.raises(SampleFormatError, match=message):
        encode_sample(x)


GOOD = encode_sample(np.arange(12, dtype=np.uint8).reshape(3, 4))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "ELS1"),
        (b"ELS", "ELS1"),
        (b"ELS2" + GOOD[4:], "ELS1"),
        (GOOD[:4] + b"\x03" + GOOD[5:], "dtype code 3"),
        (GOOD[:4] + b"\x00" + GOOD[5:], "dtype code 0"),
        (GOOD[:5] + b"\x00" + GOOD[6:], "header"),  # ndim 0
        (GOOD[:5] + b"\x05" + GOOD[6:], "header"),  # ndim 5
        (GOOD[:9], "header"),  # dims cut short
        (GOOD[:-1], "needs 12 bytes, has 11"),
        (GOOD + b"\x00", "needs 12 bytes, has 13"),
        (MAGIC + bytes([1, 2]) + struct.pack("<2I", 1 << 16, 1 << 16), "claims"),  # 4G elements
        (MAGIC + bytes([1, 4]) + struct.pack("<4I", *(0xFFFFFFFF,) * 4), "claims"),
        (MAGIC + bytes([1, 4]) + struct.pack("<4I", *(1 << 16,) * 4), "claims"),  # 2**64: wraps to 0 in int64
    ],
)
def test_malformed_payloads_are_refused(payload, message):
    with pytest.raises(SampleFormatError, match=message):
        decode_sample(payload)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_samples_are_refused(bad):
    x = np.zeros((2, 2), np.float32)
    x[1, 0] = bad
    with pytest.raises(SampleFormatError, match="NaN or infinity"):
        decode_sample(encode_sample(x))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 4), st.integers(0, 6))
def test_arbitrary_bytes_parse_or_raise_sample_format_error_only(tail, code, ndim):
    """Whatever arrives over the network, the parser answers with an array or SampleFormatError."""
    try:
        out = decode_sample(MAGIC + bytes([code, ndim]) + tail)
    except SampleFormatError:
        return
    assert isinstance(out, np.ndarray) and out.ndim == ndim
