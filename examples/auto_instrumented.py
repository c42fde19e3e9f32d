"""A plain SAGE agent pair: no telemetry code at all.

Run it under the OpenTelemetry launcher, which loads the ``sage`` instrumentor from the
``opentelemetry_instrumentor`` entry point and sets up the SDK from the environment::

    OTEL_SERVICE_NAME=sage-example-auto \\
    OTEL_TRACES_EXPORTER=console \\
    OTEL_METRICS_EXPORTER=console \\
    OTEL_LOGS_EXPORTER=none \\
    .venv/bin/opentelemetry-instrument .venv/bin/python examples/auto_instrumented.py

The console exporters print the ``sage.*`` spans (client and server handshake, message
send, receive and processing, DID resolution, session create and close) and, at exit, the
``sage.*`` metrics. Point ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` at ``otlp``
(with ``OTEL_EXPORTER_OTLP_ENDPOINT``) to send them to a collector instead.

Run without the launcher, it is just two agents talking.
"""

from __future__ import annotations

import asyncio

from sage_otel.agent.did import DIDDocument, DIDResolver, InMemoryRegistry, sign_registration
from sage_otel.agent.identity import AgentIdentity
from sage_otel.agent.transport import ClientAgent, ServerAgent


async def main(messages: int = 3) -> None:
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
            print(f"reply: {await client.send(conn, f'hello #{i}')}")
        await client.close(conn)
    finally:
        await client.aclose()
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
