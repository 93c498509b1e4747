"""The parameter server's domain core: no grpc, no Ray, no generated code, no database."""
