"""gRPC plumbing every service shares: server builder, interceptors, channels, status mapping."""
