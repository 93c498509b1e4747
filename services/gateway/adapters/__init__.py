"""The gateway's adapters: the scheduler (endpoints, load, deployments), the registry, the workers."""
