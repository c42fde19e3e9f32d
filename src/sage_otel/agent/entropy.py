"""Where the agent's randomness and wall-clock time come from.

Everything random or time-stamped on the wire is read through an :class:`Entropy`, in the
same order as the SAGE reference reads it. Production code uses :data:`SYSTEM`; a fixed
Entropy replays a recorded exchange byte for byte (the conformance tests do).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Entropy:
    random: Callable[[int], bytes] = os.urandom  # keys, AEAD nonces (crypto/rand)
    uuid_bytes: Callable[[int], bytes] = os.urandom  # the reference's separate UUID reader
    time_ns: Callable[[], int] = time.time_ns

    def uuid4(self) -> str:
        """A version 4 UUID from 16 bytes of the UUID stream."""
        return str(uuid.UUID(bytes=self.uuid_bytes(16), version=4))


SYSTEM = Entropy()
