"""Prometheus metrics of one server process, served at ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stored = Counter("scribe_chunks_stored", "Chunks stored for the first time", registry=r)
        self.stored_bytes = Counter("scribe_chunk_bytes_stored", "Audio bytes stored", registry=r)
        self.duplicates = Counter("scribe_chunks_duplicate", "Copies acknowledged as duplicates", registry=r)
        self.errors = Counter("scribe_chunk_errors", "Error replies by code", ["code"], registry=r)
        self.batches = Counter("scribe_chunk_batches", "audio-chunks events received (several chunks each)",
                               registry=r)
        self.auth_failures = Counter("scribe_auth_failures", "Refused connections (bad token)", registry=r)
        self.connections = Gauge("scribe_connections", "Open Socket.IO connections", registry=r)
        self.sockets = Gauge("scribe_sockets", "Open TCP connections of any kind (HTTP, Engine.IO, Socket.IO)",
                             registry=r)
        self.in_flight_bytes = Gauge("scribe_in_flight_bytes", "Audio bytes received and not yet stored", registry=r)
        self.put_seconds = Histogram(
            "scribe_chunk_store_seconds",
            "Time from a validated chunk to its durable commit",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
