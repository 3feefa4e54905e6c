"""Model components: feature extractor, frontend, context networks, quantizer, assembled model."""
