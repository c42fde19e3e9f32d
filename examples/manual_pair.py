"""A server agent and a client agent in one process, with telemetry set up by hand.

Run::

    .venv/bin/python examples/manual_pair.py          # /metrics on a free port
    .venv/bin/python examples/manual_pair.py 9464     # /metrics on 127.0.0.1:9464

``sage_otel.configure()`` builds the tracer and meter providers, serves ``/metrics`` and
instruments the SAGE agent core. Traces and metrics are also exported over OTLP, but only
when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (for example ``http://localhost:4318``).

The two agents run one handshake and exchange a few messages; the script then prints the
``/metrics`` URL and a few of the ``sage_`` series it scraped from it, and shuts down.
"""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.request

import sage_otel
from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry, sign_registration
from sage_otel.agent.identity import AgentIdentity
from sage_otel.agent.transport import ClientAgent, ServerAgent

SHOWN = (
    'sage_handshakes_completed_total{status="success"}',
    'sage_messages_processed_total{status="success",type="text"}',
    'sage_session_duration_seconds_count{operation="encrypt"}',
    "sage_sessions_active ",
)


async def conversation(messages: int = 3) -> None:
    """Register two agents, run one handshake, send ``messages`` messages, close."""
    registry = InMemoryRegistry()
    server_id = AgentIdentity.generate("solana")
    client_id = AgentIdentity.generate("ethereum")
    for identity in (server_id, client_id):
        document = DIDDocument.for_identity(identity)
        await registry.register(document, sign_registration(identity, document))

    server = ServerAgent(server_id, DIDResolver(registry))
    port = await server.start("127.0.0.1", 0)
    client = ClientAgent(client_id, DIDResolver(registry))
    try:
        conn = await client.connect(f"http://127.0.0.1:{port}", str(server_id.did))
        for i in range(messages):
            reply = await client.send(conn, f"hello #{i}")
            print(f"reply: {reply}")
        await client.close(conn)
    finally:
        await client.aclose()
        await server.stop()


def scrape(url: str, accept: str = "text/plain") -> str:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return answer.read().decode()


def main(argv: list[str]) -> int:
    port = int(argv[1]) if len(argv) > 1 else 0
    telemetry = sage_otel.configure(
        service_name="sage-example-manual",
        metrics_port=port,
        otlp=bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")),
    )
    try:
        asyncio.run(conversation())
        host, bound = telemetry.metrics_address
        url = f"http://{host}:{bound}/metrics"
        print(f"metrics: {url}")
        for line in scrape(url).splitlines():
            if line.startswith(SHOWN):
                print(f"  {line}")
        # OpenMetrics carries exemplars: the trace and span a bucket's latest value came from.
        openmetrics = scrape(url, "application/openmetrics-text; version=1.0.0")
        for line in openmetrics.splitlines():
            if line.startswith("sage_message_processing_duration_seconds_bucket") and "#" in line:
                print(f"  {line}")
                break
    finally:
        telemetry.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
