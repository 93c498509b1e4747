"""The registry's domain core: no grpc, no Ray, no generated code."""
