"""Training jobs: the model, the store and runner ports, submit-time validation, and the service."""
