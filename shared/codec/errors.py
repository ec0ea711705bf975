"""Why a diff was refused. Every class subclasses :class:`shared.artefacts.ArtefactError`."""

from __future__ import annotations

from shared.artefacts import ArtefactError


class DiffError(ArtefactError):
    """A diff artefact is malformed, corrupt, or does not apply to the given base."""


class BadMagicError(DiffError):
    """The bytes do not start with the diff magic."""


class UnsupportedVersionError(DiffError):
    """The diff names a wire-format version (or header flags) this decoder does not know."""


class TruncatedDiffError(DiffError):
    """The bytes end before the diff (or one of its sections) does."""


class TrailingDataError(DiffError):
    """Bytes follow the end of the diff, or a section holds more than its contents."""


class ChecksumError(DiffError):
    """The CRC-32 over the diff does not match: the bytes were corrupted."""


class WrongBaseError(DiffError):
    """The diff applies to a different base model than the one given."""


class LimitError(DiffError):
    """A size in the diff is out of bounds (format limits or the base model's shapes)."""


class UnknownEncodingError(DiffError):
    """A table entry names a dtype, layout, value coding, index coding or compression we lack."""


class BadIndicesError(DiffError):
    """Sparse indices are inconsistent: out of range, wrong count, or stray bits."""


class BadValuesError(DiffError):
    """A value section is inconsistent: wrong length, out-of-range codes, bad scale."""


class TargetHashError(DiffError):
    """Applying the diff did not produce the model hash the diff promises."""


class BadTableError(DiffError):
    """The tensor table is inconsistent: duplicate or unsorted names, or names, dtypes or shapes
    that do not match the base model."""
