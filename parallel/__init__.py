"""Process topology, tensor-parallel layers and pipeline stages, applied to the plain model."""
