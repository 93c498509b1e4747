"""The scheduler's gRPC surface: a thin servicer and the proto <-> domain conversions."""
