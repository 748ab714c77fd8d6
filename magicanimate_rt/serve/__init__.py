"""``magicanimate-rt serve``: the HTTP service (FastAPI + uvicorn) with warm models.

- ``settings.py``: what the command line sets (limits, devices, the data directory, the key);
- ``store.py``: jobs and references as SQLite rows under the data directory;
- ``uploads.py``: multipart uploads streamed to files there, sniffed by content;
- ``jobs.py``: the FIFO queue and one worker thread per device, each holding one warm
  ``AnimationPipeline`` (cancellation at step boundaries, restart recovery, expiry);
- ``metrics.py``: Prometheus metrics;
- ``app.py``: the routes (``/v1/...``, the page at ``/``, ``/healthz``, ``/readyz``, ``/metrics``);
- ``server.py``: uvicorn with a draining SIGTERM;
- ``ray_app.py``: the same service on Ray Serve (``serve --ray``): an ingress deployment with
  the app, the store and the queue, and worker replicas with one warm pipeline each
  (``pip install -e ".[ray]"``; the only module that imports ``ray``).

Imports FastAPI, uvicorn, python-multipart and prometheus_client: ``pip install -e ".[serve]"``.
Nothing else in the package imports this one.
"""
