"""The gateway's gRPC surface: ``inference.GRPCInferenceService`` handlers and conversions."""
