"""Call metadata between the gateway and its inference workers (one definition for both ends)."""

from __future__ import annotations

#: The registry version the gateway chose for a ModelInfer / ModelStreamInfer call (overrides the request's).
VERSION_KEY = "maas-model-version"

#: The initial metadata a worker sends when it accepts an InferStream: the gateway writes nothing before
#: it (a server without InferStream ends the call at once, trailers only, with UNIMPLEMENTED).
STREAM_ACCEPTED = ("maas-infer-stream", "accepted")

#: The ``ErrorInfo`` reason of a worker's FAILED_PRECONDITION when it cannot map the shared-memory objects an
#: InferStream entry names (another host or /dev/shm): the gateway then sends that worker the data inline.
SHARED_MEMORY_UNREACHABLE = "SHARED_MEMORY_UNREACHABLE"
