"""Algorithms and formats shared by the EdgeLoop server and agent.

Nothing in this package does networking, reads settings or configures logging: every module
is plain functions (and thin ``nn.Module`` wrappers) over tensors and bytes, usable on its own.
"""
