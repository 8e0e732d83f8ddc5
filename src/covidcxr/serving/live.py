"""Run the service with uvicorn in a background thread on a free loopback port (tests, benchmarks, screenshots).

It runs exactly what ``covidcxr serve`` runs: :func:`covidcxr.serving.server.uvicorn_config` with the
app's own :class:`~covidcxr.serving.settings.ServiceSettings` (connection caps, header timeout).
"""

from __future__ import annotations

import socket
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LiveServer:
    """``with LiveServer(app) as live: httpx.get(live.url + "/healthz")`` - stops when the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, startup_timeout_s: float = 60.0):
        import uvicorn

        from covidcxr.serving.server import uvicorn_config
        from covidcxr.serving.settings import ServiceSettings

        service = getattr(app.state, "service", None)
        settings = service.settings if service is not None else ServiceSettings()
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.config = uvicorn_config(app, settings, host=host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="covidcxr-live-server", daemon=True)
        self.startup_timeout_s = startup_timeout_s

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
