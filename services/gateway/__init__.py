"""The gateway: the public KServe v2 ``inference.GRPCInferenceService``, routing to inference workers."""
