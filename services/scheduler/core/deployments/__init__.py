"""Inference deployments: the model, the pool and store ports, the reconciler, the autoscaler, and the service."""
