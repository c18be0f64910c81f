"""Running an app under uvicorn: in the foreground (`mtpspec serve`) or on a background thread
(tests, load tests, embedding). The socket is bound first, so that a taken port fails with a
clear message before the model loads, and port 0 picks a free one."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..errors import MtpspecError
from .config import SHUTDOWN_TIMEOUT_S


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise MtpspecError(f"--port must be between 0 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MtpspecError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(128)
    return sock


def _server(app, log_level: str, shutdown_timeout_s: float) -> uvicorn.Server:
    # The default keep-alive (5 s) is short for clients that pause between requests of a session.
    config = uvicorn.Config(
        app, log_level=log_level, timeout_keep_alive=30, timeout_graceful_shutdown=shutdown_timeout_s, lifespan="on"
    )
    return uvicorn.Server(config)


def run(app, sock: socket.socket, log_level: str = "info", shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM); then wait up to `shutdown_timeout_s` for running responses."""
    _server(app, log_level, shutdown_timeout_s).run(sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves `app` on a free loopback port meanwhile."""

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        start_timeout_s: float = 30.0,
        shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
    ):
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = _server(app, log_level, shutdown_timeout_s)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="mtpspec-http", daemon=True
        )
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
