"""Fail fast on a Ray address nobody answers at.

``ray.init(address=HOST:PORT)`` retries the GCS for minutes before it gives up (measured: still
waiting after 100 s for a closed port, and over 3 minutes, with a log line every few seconds, for a
port where something that is not Ray accepts and stays silent). One short TCP connect to the
head's port answers the common mistakes at once (a typo'd or unresolvable host, a cluster that is
not running, the wrong port) with a one-line error naming the address. On the same connection the
probe then speaks the first step of the protocol every Ray endpoint talks (the GCS and the Ray
Client server are gRPC servers, i.e. HTTP/2): it sends the HTTP/2 connection preface and waits at
most ``PROTOCOL_TIMEOUT_S`` for the server's SETTINGS frame, which a gRPC server sends at once and
before any authentication. A silent service, an HTTP/1 server or anything else is refused in one
line before Ray is ever called. (With ``RAY_USE_TLS`` set the endpoint expects TLS first, so only
the TCP check runs.)
"""

from __future__ import annotations

import os
import socket

from ..errors import MergescopeError

CONNECT_TIMEOUT_S = 3.0
PROTOCOL_TIMEOUT_S = 5.0
# RFC 9113 3.4: the client connection preface, then an empty SETTINGS frame (length 0, type 4, flags 0, stream 0)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2_SETTINGS = 4


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


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S,
                    protocol_timeout: float = PROTOCOL_TIMEOUT_S) -> None:
    """Raise a one-line MergescopeError unless a gRPC (HTTP/2) server accepts a TCP connection at the
    address ``ray.init(address)`` would dial (see ``dialled_address``); at most ``timeout`` +
    ``protocol_timeout`` seconds per resolved address."""
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
            except ConnectionRefusedError:
                problem = "connection refused: no Ray head is listening there (start one with `ray start --head`)"
            except TimeoutError:
                problem = f"no answer within {timeout:g} s (wrong host, or a firewall?)"
            except OSError as e:
                problem = e.strerror or type(e).__name__
            else:
                if _tls():
                    return
                answer = speaks_http2(s, protocol_timeout)
                if answer is None:
                    return
                raise MergescopeError(f"--ray {shown}: {host}:{port} accepts connections but is not a Ray head or "
                                      f"Ray Client server: {answer}")
    raise MergescopeError(f"--ray {shown}: cannot reach {host}:{port}: {problem}")


def _tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true", "yes")


def speaks_http2(sock: socket.socket, timeout: float = PROTOCOL_TIMEOUT_S) -> str | None:
    """None if the peer on ``sock`` answers the HTTP/2 preface with a SETTINGS frame (as gRPC servers,
    hence Ray's GCS and Ray Client server, do at once); else why not, in a few words."""
    import time

    deadline = time.monotonic() + timeout
    try:
        sock.sendall(H2_PREFACE)
        got = b""
        while len(got) < 9:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(9 - len(got))
            if not chunk:
                return ("it closed the connection without an HTTP/2 answer" if not got else
                        f"it answered {_show(got)}, not HTTP/2")
            got += chunk
    except TimeoutError:
        return (f"it sent no HTTP/2 (gRPC) answer within {timeout:g} s" if not got else
                f"it answered {_show(got)} and then nothing within {timeout:g} s, not HTTP/2")
    except OSError as e:
        return f"the connection failed during the protocol check ({e.strerror or type(e).__name__})"
    if got[3] != H2_SETTINGS or int.from_bytes(got[5:9], "big") & 0x7FFFFFFF != 0:
        try:  # a little more of the answer, so an HTTP/1 status line reads whole
            sock.settimeout(0.2)
            got += sock.recv(64)
        except OSError:
            pass
        return f"it answered {_show(got)}, not HTTP/2"
    return None


def _show(data: bytes) -> str:
    """The first bytes a peer sent, printable (an HTTP/1 status line shows as text)."""
    text = data.decode("ascii", "replace").split("\r\n")[0].split("\n")[0][:40]
    if text and all(c.isprintable() for c in text):
        return repr(text)
    return "bytes " + data[:16].hex()
