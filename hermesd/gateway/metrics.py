"""The gateway's /metrics: its own HTTP counters (prometheus-client) plus the daemon's status as metrics.

The daemon's part is read with one ``status`` request per scrape and rendered by
``hermes_client.metrics`` (the same lines ``hermes status --prometheus`` writes). When the daemon
does not answer, ``hermesd_up`` is 0 and the gateway's own metrics still come.
"""

from __future__ import annotations

import logging
from typing import Any

from hermes_client.metrics import prometheus_text
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

log = logging.getLogger("hermesd.gateway")
DOWN = "# HELP hermesd_up 1 when the daemon answered the status request\n# TYPE hermesd_up gauge\nhermesd_up 0\n"


class GatewayMetrics:
    """Counters of the gateway's requests and of the jobs it saw end."""

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("hermesd_gateway_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.seconds = Histogram("hermesd_gateway_request_seconds", "time to answer an HTTP request, by route",
                                 ["route"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.streamed = Counter("hermesd_gateway_streamed_bytes", "bytes written to streaming responses",
                                registry=self.registry)
        self.tokens = Counter("hermesd_gateway_tokens_generated", "tokens generated for the gateway's clients",
                              ["model"], registry=self.registry)
        self.jobs = Counter("hermesd_gateway_jobs", "jobs the gateway saw finish, by task and model",
                            ["task", "model"], registry=self.registry)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)

    def observe_streamed(self, size: int) -> None:
        self.streamed.inc(size)

    def observe_result(self, task: str, model: str, result: dict[str, Any]) -> None:
        self.jobs.labels(task, model).inc()
        if task == "generate":
            self.tokens.labels(model).inc(int(result.get("new_tokens", 0)))

    async def exposition(self) -> tuple[bytes, str]:
        """The text to serve and its content type."""
        try:
            daemon = prometheus_text(await self.bridge.request("status"))
        except Exception as exc:  # the daemon is down or restarting: say so in the metrics, not as an error
            log.debug("status for /metrics failed: %s", exc)
            daemon = DOWN
        return generate_latest(self.registry) + daemon.encode(), CONTENT_TYPE_LATEST
