"""EdgeLoop edge agent: the daemon that runs on a Jetson Nano or Raspberry Pi.

Deliberately imports nothing at package import time: small tools (the upload queue, the
status server) must start without paying for torch, and the device install carries only
numpy, torch, safetensors, zstandard and pydantic (no FastAPI, SQLAlchemy or httpx).
"""
