"""Models in and out of other toolkits: torchaudio, Hugging Face, ONNX, fairseq and fairseq2
(one module each), and reading their checkpoint files without running pickled code (untrusted)."""
