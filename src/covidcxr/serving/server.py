"""``covidcxr serve`` (:func:`serve_run`): uvicorn with the service's connection limits (:func:`uvicorn_config`).

uvicorn's own limits are used where it has them: ``timeout_keep_alive`` (idle keep-alive
connections), ``limit_concurrency`` (503 once that many connections or requests are open),
``h11_max_incomplete_event_size`` (request line + headers, :data:`MAX_HEADER_BYTES`),
``proxy_headers`` only when ``forwarded_allow_ips`` is given (otherwise a local process could
claim any client address in ``X-Forwarded-For``). What uvicorn lacks is added by a small h11
protocol subclass: a **header timeout** (a connection that has not sent complete request headers
``header_timeout_s`` after opening, or after starting its next request, is closed; stock uvicorn
keeps a silent new connection forever) and a **per-client connection cap** (the
``max_connections_per_client + 1``-th connection from one address is answered 429 and closed at
once, so one client cannot use up the process's file descriptors). Request bodies have their own
deadline in :class:`covidcxr.serving.limits.ServiceGuard`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections import Counter
from pathlib import Path

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from covidcxr.errors import ConfigError
from covidcxr.serving.settings import LOCAL_HOSTS, parse_settings, resolve_token, upload_bytes

log = logging.getLogger("covidcxr.serving")

#: Largest request line + headers (h11's default, made explicit): 431-style refusal (400) above it.
MAX_HEADER_BYTES = 16 * 1024


def _trusted(address: str | None, forwarded_allow_ips: str | None) -> bool:
    if address is None or not forwarded_allow_ips:
        return False
    for item in (s.strip() for s in forwarded_allow_ips.split(",")):
        if item == "*" or item == address:
            return True
        try:
            if ipaddress.ip_address(address) in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            continue
    return False


def guarded_protocol(settings) -> type[H11Protocol]:
    """An :class:`H11Protocol` subclass with the header timeout and the per-client connection cap."""
    header_timeout = float(settings.header_timeout_s)
    per_client = int(settings.max_connections_per_client)
    forwarded = settings.forwarded_allow_ips
    open_per_client: Counter = Counter()

    class GuardedH11Protocol(H11Protocol):
        connections_per_client = open_per_client  # shared by the server's connections (tests read it)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._address = self.client[0] if self.client else None
            # A trusted reverse proxy carries many users on its connections: no per-address cap for it.
            self._counted = not _trusted(self._address, forwarded)
            if self._counted:
                open_per_client[self._address] += 1
                if open_per_client[self._address] > per_client:
                    self._refuse(429, f"too many connections from your address (the limit is {per_client})")
                    return
            self._arm_header_timer()

        def _refuse(self, status: int, message: str) -> None:
            body = message.encode()
            reason = b"Too Many Requests" if status == 429 else b"Request Timeout"
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: %d\r\nretry-after: 5\r\nconnection: close\r\n\r\n%s"
                                 % (status, reason, len(body), body))
            self.transport.close()

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            self._refuse(408, f"request headers did not arrive within {header_timeout:g} s")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:  # (part of) a request line / headers: the clock runs
                self._arm_header_timer()
            else:
                self._cancel_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            if getattr(self, "_counted", False):
                open_per_client[self._address] -= 1
                if open_per_client[self._address] <= 0:
                    del open_per_client[self._address]
                self._counted = False
            super().connection_lost(exc)

    return GuardedH11Protocol


def uvicorn_config(app, settings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """The :class:`uvicorn.Config` ``covidcxr serve`` runs (``settings``: a ``ServiceSettings``)."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", ws="none",
        http=guarded_protocol(settings),
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        server_header=False,
    )


def default_hosts(host: str) -> list[str]:
    """Host names accepted by default: the local names plus ``--host`` (unless it is a wildcard)."""
    hosts = list(LOCAL_HOSTS)
    if host and host not in ("0.0.0.0", "::"):
        literal = f"[{host}]" if ":" in host and not host.startswith("[") else host
        if literal.lower() not in hosts:
            hosts.append(literal.lower())
    return hosts


def serve_run(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
              token_file: str | os.PathLike | None = None, max_upload_mb: float | None = None,
              warn=lambda message: log.warning("%s", message), environ=None, **settings) -> None:
    """``covidcxr serve``: validate ``settings`` (:class:`ServiceSettings` fields; ``max_upload_mb`` in MiB,
    the token from ``token`` / ``token_file`` / the environment), load the run, run uvicorn."""
    import uvicorn

    from covidcxr.serving.app import create_app

    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"serve settings: port: must be 1-65535, got {port!r}")
    if max_upload_mb is not None:
        settings["max_upload_bytes"] = upload_bytes(max_upload_mb)
    settings["token"] = resolve_token(settings.pop("token", None), token_file,
                                      os.environ if environ is None else environ, warn)
    if not settings.get("allowed_hosts"):
        settings["allowed_hosts"] = default_hosts(host)
        if host in ("0.0.0.0", "::"):
            warn(f"listening on {host}, but only {', '.join(LOCAL_HOSTS)} are accepted as Host; "
                 "add the names clients use with --allowed-host NAME")
    parsed = parse_settings(**settings)
    if parsed.token is None and host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"serving on {host} without an API token: anyone who can reach it can use it "
             "(set COVIDCXR_TOKEN or --token-file)")
    app = create_app(run_dir, parsed)
    uvicorn.Server(uvicorn_config(app, parsed, host=host, port=port, log_level=log_level)).run()
