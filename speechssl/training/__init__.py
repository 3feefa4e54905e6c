"""The DeepSpeed trainer shared by pretraining and fine-tuning."""
