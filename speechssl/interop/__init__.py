"""Weights in and out of other toolkits (torchaudio, Hugging Face, fairseq2)."""
