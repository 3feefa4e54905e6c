"""The CTC fine-tuning job."""
