"""A component's Prometheus metrics live in their own registry (no process-global collectors) and are
served over HTTP only when asked for."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the port it listens on (port 0: any free one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
