"""Call metadata between the gateway and its inference workers (one definition for both ends)."""

from __future__ import annotations

#: The registry version the gateway chose for a ModelInfer / ModelStreamInfer call (overrides the request's).
VERSION_KEY = "maas-model-version"

#: The initial metadata a worker sends when it accepts an InferStream: the gateway writes nothing before
#: it (a server without InferStream ends the call at once, trailers only, with UNIMPLEMENTED).
STREAM_ACCEPTED = ("maas-infer-stream", "accepted")
