"""Fail fast on a Ray address nobody answers at.

``ray.init(address=HOST:PORT)`` retries the GCS for minutes before it gives up (measured: still
waiting after 100 s for a closed port). One short TCP connect to the head's port answers the
common mistakes at once (a typo'd or unresolvable host, a cluster that is not running, the wrong
port) with a one-line error naming the address; a port that accepts but is not Ray still gets
Ray's own, slower, diagnosis.
"""

from __future__ import annotations

import os
import socket

from ..errors import MergescopeError

CONNECT_TIMEOUT_S = 3.0


def host_port(address: str) -> tuple[str, int]:
    """'HOST:PORT', 'ray://HOST:PORT' or '[IPv6]:PORT' -> (host, port); anything else is a user error."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MergescopeError(f"--ray {address}: expected 'local', 'auto', HOST:PORT or ray://HOST:PORT")
    return host, int(port)


def dialled_address(address: str) -> str | None:
    """The HOST:PORT that ``ray.init`` would dial for ``address``, or None when it dials nothing
    ("local" starts a cluster; "auto" with no $RAY_ADDRESS and no cluster file fails fast by itself).
    For "auto": $RAY_ADDRESS, else the latest cluster started on this machine with ``ray start``."""
    if address == "local":
        return None
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS")
    if env and env not in ("auto", "local"):
        return env
    try:  # where Ray records `ray start` clusters is Ray's business: ask it, and skip the check if that fails
        from ray._private.services import get_ray_address_from_environment

        found = get_ray_address_from_environment("auto", None)
    except Exception:
        return None
    return found if found and found not in ("auto", "local") else None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise a one-line MergescopeError unless something accepts a TCP connection at the address
    ``ray.init(address)`` would dial (see ``dialled_address``)."""
    target = dialled_address(address)
    if target is None:
        return
    shown = address if target == address else f"{address} ({target})"
    host, port = host_port(target)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MergescopeError(f"--ray {shown}: cannot resolve host {host!r} ({e.strerror})") from None
    problem = "no address"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout)
            try:
                s.connect(sockaddr)
                return
            except ConnectionRefusedError:
                problem = "connection refused: no Ray head is listening there (start one with `ray start --head`)"
            except TimeoutError:
                problem = f"no answer within {timeout:g} s (wrong host, or a firewall?)"
            except OSError as e:
                problem = e.strerror or type(e).__name__
    raise MergescopeError(f"--ray {shown}: cannot reach {host}:{port}: {problem}")
