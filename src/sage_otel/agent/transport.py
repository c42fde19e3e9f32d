"""The HTTP transport's public names, from the modules that each do one job.

* :mod:`.envelope`: the reference's JSON envelope and answer, and the protocol constants;
* :mod:`.server_agent`: :class:`ServerAgent`, the ASGI app that answers peers;
* :mod:`.client_agent`: :class:`ClientAgent` and its :class:`Connection`;
* :mod:`.http`: the client's HTTP session and how it reads answers.
"""

from __future__ import annotations

from .client_agent import ClientAgent, Connection
from .envelope import (
    CLOSE_TASK,
    MAX_BODY_BYTES,
    MAX_FIELD,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_VALUE,
    MAX_SIGNATURE,
    MESSAGE_TASK,
    MESSAGES_PATH,
    REPLY_METHOD,
    SESSION_GONE,
    Envelope,
    answer_body,
    envelope_body,
    parse_envelope,
    wire_body,
)
from .http import AiohttpSession, RawAnswer, read_answer
from .server_agent import INBOX_SIZE, Handler, ServerAgent, error_answer

__all__ = [
    "CLOSE_TASK",
    "INBOX_SIZE",
    "MAX_BODY_BYTES",
    "MAX_FIELD",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_VALUE",
    "MAX_SIGNATURE",
    "MESSAGES_PATH",
    "MESSAGE_TASK",
    "REPLY_METHOD",
    "SESSION_GONE",
    "AiohttpSession",
    "ClientAgent",
    "Connection",
    "Envelope",
    "Handler",
    "RawAnswer",
    "ServerAgent",
    "answer_body",
    "envelope_body",
    "error_answer",
    "parse_envelope",
    "read_answer",
    "wire_body",
]
