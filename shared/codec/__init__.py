"""Sparse weight-diff codec, wire format ``diff/sparse-v1`` (spec: docs/diff-format.md).

DPU (thesis Ch. 5) sends each device only the k*I weights that changed most. This package
turns two state dicts into a :class:`SparseUpdate` (the exact state an agent will hold, plus
the error-feedback residual), serialises it in close to the thesis's ideal size
S_w*k*I + H(k)*I, and decodes it on the device with numpy-only, bit-exact arithmetic.
Importing the package registers the decoder with :mod:`shared.artefacts`.
"""

from shared.artefacts import register_decoder
from shared.codec.accounting import binary_entropy, ideal_paper_bits
from shared.codec.decode import (
    DiffHeader,
    TensorInfo,
    apply_chain,
    decode_diff,
    read_header,
    size_breakdown,
    sniff_diff,
)
from shared.codec.encode import encode_update
from shared.codec.errors import (
    BadIndicesError,
    BadMagicError,
    BadTableError,
    BadValuesError,
    ChecksumError,
    DiffError,
    LimitError,
    TargetHashError,
    TrailingDataError,
    TruncatedDiffError,
    UnknownEncodingError,
    UnsupportedVersionError,
    WrongBaseError,
)
from shared.codec.update import VALUE_FORMATS, AlqParams, SparseUpdate, TensorDelta, make_update
from shared.codec.wire import DIFF_ENCODING

register_decoder(DIFF_ENCODING, decode_diff, sniff_diff)

__all__ = [
    "DIFF_ENCODING",
    "AlqParams",
    "VALUE_FORMATS",
    "BadIndicesError",
    "BadMagicError",
    "BadTableError",
    "BadValuesError",
    "ChecksumError",
    "DiffError",
    "DiffHeader",
    "LimitError",
    "SparseUpdate",
    "TargetHashError",
    "TensorDelta",
    "TensorInfo",
    "TrailingDataError",
    "TruncatedDiffError",
    "UnknownEncodingError",
    "UnsupportedVersionError",
    "WrongBaseError",
    "apply_chain",
    "binary_entropy",
    "decode_diff",
    "encode_update",
    "ideal_paper_bits",
    "make_update",
    "read_header",
    "size_breakdown",
]
