"""Running the application: ``psal serve`` in the foreground (:func:`run_server`), or a server in a
background thread of this process (:class:`BackgroundServer`: tests, notebooks)."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time

from psal.tasks.files import InputError


def require() -> None:
    """Raise a one-line :class:`InputError` unless the ``serve`` extra's packages import."""
    missing = []
    for modules, package in (
        (("starlette",), "starlette"),
        (("uvicorn",), "uvicorn"),
        (("python_multipart", "multipart"), "python-multipart"),
    ):
        for module in modules:
            try:
                __import__(module)
                break
            except ImportError:
                pass
        else:
            missing.append(package)
    if missing:
        raise InputError(f"psal serve needs {', '.join(missing)}: pip install 'psal[serve]'")


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (``port=0``: a free one), listening; a one-line
    :class:`InputError` when that address cannot be had."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be from 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _uvicorn_server(app, **options):
    """A uvicorn server for ``app`` that closes its job queue as soon as it starts to stop: the
    requests still waiting are answered 503 at once and the running job stops at its next progress
    report, so that stopping does not wait for the jobs."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.jobs.close()
            await super().shutdown(sockets=sockets)

    return Server(uvicorn.Config(app, access_log=False, timeout_graceful_shutdown=5, **options))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(host: str = "127.0.0.1", port: int = 8765, device: str = "auto", max_pixels: int | None = None, quiet: bool = False) -> None:
    """``psal serve``: serve the page and the API on ``host:port`` until Ctrl+C."""
    require()
    from psal.tasks import device_from_name

    from .app import create_app

    if max_pixels is not None and max_pixels < 1:
        raise InputError(f"--max-pixels must be at least 1, got {max_pixels}")
    resolved = device_from_name(device)
    sock = _listen(host, port)
    try:
        app = create_app(resolved, max_pixels)
    except BaseException:
        sock.close()
        raise
    if not quiet:
        limit = "any size" if app.state.max_pixels is None else f"up to {app.state.max_pixels} pixels"
        print(f"psal serve: {_url(sock)} (device {resolved}, pictures {limit}); Ctrl+C stops", file=sys.stderr)
        if not _is_loopback(host):
            print(f"psal serve: listening on {host}: anyone who can reach this machine can use it", file=sys.stderr)
    try:
        _uvicorn_server(app, log_level="error" if quiet else "warning").run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        app.state.jobs.close()
    # The running job stops at its next progress report; one that reports none (colorize) runs on.
    if not app.state.jobs.join(timeout=60):
        print("psal serve: a job is still running; stopping without it", file=sys.stderr)
    elif not quiet:
        print("psal serve: stopped", file=sys.stderr)


class BackgroundServer:
    """Serve ``app`` from a thread of this process on ``host:port`` (``port=0``: a free one) until
    :meth:`close` (or the end of a ``with`` block); :attr:`url` is its address."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        require()
        self._sock = _listen(host, port)
        self.url = _url(self._sock).rstrip("/")
        self._server = _uvicorn_server(app, log_config=None, log_level="warning")
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="psal-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)

    def close(self) -> None:
        """Stop serving (the app's jobs are closed as in :func:`run_server`)."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
