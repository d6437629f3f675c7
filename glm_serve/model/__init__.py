"""GLM model implementation: the decoder and its attention backends."""
