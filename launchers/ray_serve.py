"""``serve=ray``: any ``service=<name>`` as a Ray Serve deployment of its own FastAPI app.

Each replica builds the service's app from the resolved config (``core.serving.build_service``:
the engine, its routes, errors, limits and Bearer key), so replicas answer exactly as the plain
server does; Ray's proxy is the one entry URL on ``server.host:server.port`` and spreads requests
over the replicas, and Ray starts a replica again when one dies. The launcher runs until SIGTERM
or Ctrl-C, then stops the local Ray instance it started (or deletes its application from an
existing cluster, ``serve.address=``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def replica_config(cfg, replicas: int) -> dict:
    """The resolved config each replica builds its app from: ``gpus`` per replica, not in all."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    total = int(cfg.get("gpus") or 0)
    if total:
        copy.gpus = max(1, total // replicas)
    copy.paths.output_dir = str(cfg.paths.output_dir)  # resolved here: no Hydra in a replica
    return OmegaConf.to_container(copy, resolve=True)


def ray_actor_options(cfg) -> dict:
    """Ray's resources for one replica: ``gpus`` shared out over the replicas, and CPUs."""
    replicas = int(cfg.serve.replicas)
    cpus = cfg.serve.cpus_per_replica
    options = {"num_cpus": float(cpus) if cpus is not None else max(1, (os.cpu_count() or 1) // replicas)}
    if int(cfg.get("gpus") or 0):
        options["num_gpus"] = int(cfg.gpus) / replicas
    return options


class ServiceReplica:
    """One replica: the service's app, built in the replica's own process."""

    def __init__(self, config: dict):
        self.config = config

    def __serve_build_asgi_app__(self):
        from core.serving.runner import build_service

        return build_service(OmegaConf.create(self.config))


def serve_deployment(cfg) -> None:
    """Run the service of ``cfg`` as a Ray Serve application until SIGTERM."""
    import ray
    from ray import serve

    from core.serving.app import ServerSettings
    from core.serving.server import check_address

    settings = ServerSettings.from_config(cfg.server)
    check_address(settings)
    name = str(cfg.tasks.service)
    replicas = int(cfg.serve.replicas)
    # the app keeps its own request metrics; Ray's access log line per request costs CPU on every hop
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=cfg.serve.address, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=quiet)
    options = {
        "name": name,
        "logging_config": quiet,
        "ray_actor_options": ray_actor_options(cfg),
        # Ray's own queue in front of each replica stays out of the way: the app's gate decides (429/503)
        "max_ongoing_requests": settings.max_concurrency + settings.max_queue,
    }
    if cfg.serve.autoscaling:
        options["autoscaling_config"] = OmegaConf.to_container(cfg.serve.autoscaling, resolve=True)
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress()(ServiceReplica), **options)
    serve.run(deployment.bind(replica_config(cfg, replicas)), name=name, route_prefix="/")
    log.info("serving %s on http://%s:%d as %d Ray Serve replica(s)", name, settings.host, settings.port, replicas)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        if started_ray:
            # the local Ray instance goes with its deployment; its processes may already have had
            # SIGTERM too (SLURM signals every process of a job), so no graceful Serve shutdown first
            ray.shutdown()
        else:
            serve.delete(name)  # an existing cluster keeps running
        log.info("%s stopped", name)
