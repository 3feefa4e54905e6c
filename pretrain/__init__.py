"""The pretraining job."""
