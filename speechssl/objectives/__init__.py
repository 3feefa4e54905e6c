"""Pretraining objectives: span masking, negative sampling, contrastive and diversity losses."""
