"""Run the service under uvicorn, with a SIGTERM that drains.

On SIGTERM (or Ctrl-C) the server answers 503 to every new request but ``/healthz``, stops
listening, ends the event streams, lets running jobs go on for ``--shutdown-grace`` seconds,
cancels them at their next step boundary (their rows say so; no partial file stays), and
exits 0. Queued jobs stay queued: the next start on the same ``--data-dir`` runs them.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from .app import create_app
from .jobs import JobManager
from .settings import ServeSettings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which marks the manager draining the moment a signal arrives (before
    uvicorn closes the listening socket and waits for connections)."""

    def __init__(self, config: uvicorn.Config, manager: JobManager):
        super().__init__(config)
        self.manager = manager

    def handle_exit(self, sig, frame) -> None:
        self.manager.draining = True
        loop = self.manager.notifier.loop
        if loop is not None and not loop.is_closed():  # wake the event streams so they end
            for job_id in list(self.manager.notifier._waiters):
                self.manager.notifier.notify(job_id)
        super().handle_exit(sig, frame)
        # uvicorn re-raises the captured signal once it has shut down (the process then dies
        # of it); a drained server has done what the signal asked, so it exits 0 instead
        self._captured_signals.clear()


def serve(settings: ServeSettings, log_level: str = "info") -> int:
    """Start the server and block until it stops; returns the exit code (0 after a signal,
    2 when a worker's models could not load)."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manager = JobManager(settings)
    app = create_app(settings, manager)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=max(5.0, settings.shutdown_grace_s + 5.0),
                            server_header=False)
    server = DrainingServer(config, manager)

    def fatal(message: str) -> None:
        server.should_exit = True

    manager.on_fatal = fatal
    print(f"magicanimate-rt serve: http://{settings.host}:{settings.port}/ (API docs at /docs); "
          f"{len(settings.devices)} worker(s) on {', '.join(settings.devices)}; data in {settings.data_dir}",
          file=sys.stderr, flush=True)
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind; it has logged why
        server.started = False
    if manager.fatal is not None:
        print(f"magicanimate-rt: error: the models failed to load: {manager.fatal}", file=sys.stderr)
        return 2
    if not server.started:  # the port was taken (uvicorn logged why)
        print(f"magicanimate-rt: error: --host {settings.host} --port {settings.port}: cannot listen there "
              "(see the log line above)", file=sys.stderr)
        return 2
    return 0
