"""The one way every service runs: ``python run.py service=<name>``."""

from __future__ import annotations

from hydra.utils import instantiate

from core.serving.app import ServerSettings
from core.serving.server import check_address, serve


def run_service(cfg) -> None:
    """Build the engine the service config's ``engine:`` node names, the app its ``app:`` node
    makes over it (a partial taking ``(engine, settings)``), and serve it with ``server:``."""
    settings = ServerSettings.from_config(cfg.server)
    check_address(settings)  # a port in use is found in a second, not after the model has loaded
    engine = instantiate(cfg.engine)
    serve(instantiate(cfg.app)(engine, settings), settings)
