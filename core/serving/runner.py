"""The one way every service runs: ``python run.py service=<name>``."""

from __future__ import annotations

from hydra.utils import instantiate

from core.serving.app import ServerSettings
from core.serving.server import check_address, serve


def build_service(cfg, settings: ServerSettings | None = None):
    """The app of a service config: the engine its ``engine:`` node names, under the app its
    ``app:`` node makes (a partial taking ``(engine, settings)``)."""
    settings = settings or ServerSettings.from_config(cfg.server)
    return instantiate(cfg.app)(instantiate(cfg.engine), settings)


def run_service(cfg) -> None:
    """Build the service's app (``build_service``) and serve it with ``server:``; with a ``serve:``
    option (``serve=ray``), hand the whole config to the function it names instead."""
    from hydra.utils import get_method

    from core.models.loading import check_gpus

    settings = ServerSettings.from_config(cfg.server)
    # found in a second, not after a model load or while Ray waits for GPUs that are not there
    check_gpus(int(cfg.get("gpus") or 0))
    if cfg.get("serve"):
        return get_method(cfg.serve._target_)(cfg)
    check_address(settings)
    serve(build_service(cfg, settings), settings)
