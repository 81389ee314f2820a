"""Running the app: the listening socket, uvicorn, and what Ctrl-C does.

* ``bind`` opens the socket before the model loads: a busy port fails at once, and ``--port 0`` is known
  (the banner prints the port the system chose).
* ``Server`` is uvicorn's server with its own signal handling. The first Ctrl-C (or SIGTERM) starts the
  shutdown: no new connections, queued requests refused, the running one may finish within ``--grace`` and
  is then stopped at its next prefill chunk or token and answered with OpenAI's error shape (a stream gets an
  error event and ``data: [DONE]``). A second Ctrl-C answers it at once and exits within about a second.
* ``run`` ends the process with exit code 0 after a shutdown, through ``os._exit(0)`` once the logs are
  flushed: the interpreter's teardown of torch and transformers takes 1-2 s, and when the worker thread is
  still inside a forward pass (a second Ctrl-C) it aborts ("terminate called without an active exception",
  SIGABRT). Every client has been answered by then and nothing is left to save.

The signal handler only sets flags and schedules callbacks in the event loop: it runs between two bytecodes
of the event loop's thread, which may hold the locks the shutdown needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from types import FrameType

import uvicorn

logger = logging.getLogger("selfextend.serve")

BACKSTOP_S = 30.0  # past --grace, uvicorn cancels what is still open (a client that stopped reading)
FLUSH_S = 1.0  # after a second Ctrl-C: time for the answers already sent to reach their clients


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port), as uvicorn binds one; ``ValueError`` naming the
    flags when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        reason = err.strerror or str(err)
        raise ValueError(f"cannot listen on {host}:{port} (--host/--port): {reason}; choose another --port "
                         "(0: any free port)") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server; Ctrl-C gives the running request ``grace`` seconds, a second Ctrl-C none."""

    def __init__(self, config: uvicorn.Config, worker, grace: float) -> None:
        super().__init__(config)
        self.worker, self.grace = worker, grace
        self.loop: asyncio.AbstractEventLoop | None = None
        self.signals = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own records the signal to raise it again after serving (a KeyboardInterrupt): not here
        self.signals += 1
        if self.signals == 1:
            self.should_exit = True
            self._soon(self._shut_down, time.monotonic(), sig)
        else:
            self._soon(self._stop_now)

    def _soon(self, callback, *args) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            self.should_exit = self.force_exit = True
            return
        loop.call_soon_threadsafe(callback, *args)

    def _shut_down(self, since: float, sig: int) -> None:
        name = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
        queued = self.worker.jobs.qsize()
        running = (f"the running request has {self.grace:g} s (--grace) to finish, then stops at its next "
                   "chunk or token" if self.worker.current is not None else "no request is running")
        logger.info("shutting down (%s): %d queued request%s refused; %s; Ctrl-C again stops at once", name,
                    queued, "" if queued == 1 else "s", running)
        self.worker.begin_shutdown(since + self.grace)

    def _stop_now(self) -> None:
        if self.worker.aborted:
            return
        logger.info("stopping now (second Ctrl-C)")
        self.worker.abort()
        self.should_exit = True
        assert self.loop is not None
        self.loop.create_task(self._exit_soon())

    async def _exit_soon(self) -> None:
        """Let uvicorn's shutdown go on as after the first Ctrl-C (it skips the app's lifespan shutdown when
        forced, which then ends in a CancelledError traceback), only faster: the answers already sent get
        ``FLUSH_S`` to reach their clients, then what is still open is cancelled (``AnswerWhenCancelled``
        answers it), then closed."""
        state = self.server_state
        await self._drained(FLUSH_S)
        for task in list(state.tasks):
            task.cancel()
        await self._drained(FLUSH_S / 2)
        for connection in list(state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()
        await self._drained(FLUSH_S / 2)
        if state.connections or state.tasks:
            self.force_exit = True  # the last resort

    async def _drained(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (self.server_state.connections or self.server_state.tasks) and time.monotonic() < end:
            await asyncio.sleep(0.02)


def run(app, sock: socket.socket, grace: float) -> int:
    """Serve ``app`` (from ``create_app``) on ``sock`` until Ctrl-C, then end the process with exit code 0
    (1 when the server never started, 130 on a Ctrl-C before it had)."""
    config = uvicorn.Config(app, host=sock.getsockname()[0], port=sock.getsockname()[1], log_level="info",
                            timeout_graceful_shutdown=grace + BACKSTOP_S)
    worker = app.state.worker
    server = Server(config, worker, grace)
    interrupted = False
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # a Ctrl-C before uvicorn's handlers were installed
        interrupted = True
        worker.abort()
    if not server.started:
        print("interrupted" if interrupted else "error: the server did not start (see the log above)",
              file=sys.stderr)
        return 130 if interrupted else 1
    if worker.thread.is_alive():
        logger.info("stopped, without waiting for the model's forward pass to end")
    else:
        logger.info("stopped")
    # Leave at once: the interpreter's own teardown of torch and transformers takes 1-2 s more, and with the
    # worker still inside a forward pass it aborts (SIGABRT). Every client was answered; nothing is unsaved.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
