"""The parameter server: sharded model parameters, server-side optimizers and worker consistency."""
