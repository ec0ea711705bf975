"""A throwaway Linux network namespace joined to the host by a veth pair, with an optional
tbf rate limit: a "device behind a slow link" that tests can cut and restore."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass


def netns_supported() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@dataclass
class Link:
    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def set_up(self, up: bool) -> None:
        _run("ip", "link", "set", self.host_if, "up" if up else "down")

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def create_link(rate: str | None = "4mbit", subnet: int | None = None) -> Link:
    tag = uuid.uuid4().hex[:6]
    octet = subnet if subnet is not None else int(tag[:2], 16) % 250 + 1
    link = Link(ns=f"elns-{tag}", host_if=f"elh{tag}", ns_if=f"eln{tag}",
                host_ip=f"10.231.{octet}.1", ns_ip=f"10.231.{octet}.2")
    _run("ip", "netns", "add", link.ns)
    try:
        _run("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if)
        _run("ip", "link", "set", link.ns_if, "netns", link.ns)
        _run("ip", "addr", "add", f"{link.host_ip}/30", "dev", link.host_if)
        _run("ip", "link", "set", link.host_if, "up")
        _run("ip", "netns", "exec", link.ns, "ip", "addr", "add", f"{link.ns_ip}/30", "dev", link.ns_if)
        _run("ip", "netns", "exec", link.ns, "ip", "link", "set", link.ns_if, "up")
        _run("ip", "netns", "exec", link.ns, "ip", "link", "set", "lo", "up")
        if rate:
            # Shape what the server sends towards the device (host side egress).
            _run("tc", "qdisc", "add", "dev", link.host_if, "root", "tbf", "rate", rate, "burst", "32kbit",
                 "latency", "400ms")
    except Exception:
        destroy_link(link)
        raise
    return link


def destroy_link(link: Link) -> None:
    subprocess.run(["ip", "netns", "del", link.ns], capture_output=True)
    subprocess.run(["ip", "link", "del", link.host_if], capture_output=True)
