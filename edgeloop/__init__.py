"""EdgeLoop command line and local-fleet tooling (``edgeloop ...``)."""

__version__ = "0.1.0"
