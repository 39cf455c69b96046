"""Loopback ports for the servers a test, a benchmark or the demo starts."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports nothing listens on now (bound once by the OS, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports
