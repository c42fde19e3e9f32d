"""The SAGE agent core: identities, DIDs, the HPKE handshake, sessions, messages, transport.

It imports nothing of OpenTelemetry; telemetry attaches from outside through
:mod:`sage_otel.instrumentation`.
"""
