"""The errors p-Meta raises at its boundaries."""

from __future__ import annotations


class PMetaError(ValueError):
    """Bad input to p-Meta: a spec section, a model, a configuration or a support set."""


class PMetaRefused(PMetaError):
    """No adaptation setting fits the memory budget; ``reason`` says what was tried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
