"""TCP ports for the rendezvous (MASTER_PORT).

``find_free_port`` asks the kernel for an unused port and releases it again, so
there is a short window in which another program could take it; the launchers
pick the port immediately before starting the ranks, and torch's TCPStore on
rank 0 binds it within a second or two.  A port given explicitly is checked up
front, because a clash otherwise surfaces only as a rank-0 traceback deep in
``init_process_group`` after the other ranks have hung until their timeout.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from tierlift.errors import LaunchError

__all__ = ["find_free_port", "check_port_free", "resolve_master_port"]

_FIX_PORT = "choose another port or 0 to pick a free one."


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name: let the resolver decide, IPv4 first
        return socket.AF_INET


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing is bound to right now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(port: int, host: str = "127.0.0.1", *, setting: str = "run.master_port") -> None:
    """Raise :class:`LaunchError` when ``port`` cannot be bound on ``host``.

    SO_REUSEADDR mirrors what torch's TCPStore does, so a port that only has
    connections in TIME_WAIT from a previous run counts as free while a port
    with a live listener (on ``host`` or on the wildcard address) does not.
    """
    if not 0 < int(port) < 65536:
        raise LaunchError("is not a TCP port.", setting=setting, value=port, fix=_FIX_PORT)
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                reason = "port in use" if exc.errno == errno.EADDRINUSE else "port not permitted"
                raise LaunchError(f"{reason} on {host}.", setting=setting, value=port, fix=_FIX_PORT) from None
            raise LaunchError(f"cannot bind {host}:{port}: {exc.strerror}.", setting=setting, value=port,
                              fix=_FIX_PORT) from None


def resolve_master_port(port: int, host: str = "127.0.0.1", *, setting: str = "run.master_port") -> int:
    """``port`` checked free, or a free port when ``port`` is 0."""
    if int(port) == 0:
        return find_free_port(host)
    check_port_free(port, host, setting=setting)
    return int(port)
