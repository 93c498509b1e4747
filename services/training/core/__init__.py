"""The training worker's domain core: the data-parallel loop through a parameter server. No grpc, no Ray."""
