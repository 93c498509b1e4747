"""The scheduler's domain core: no grpc, no Ray, no SQL, no generated code."""
