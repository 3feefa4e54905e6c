"""Speech recognition with CTC models: tokenizers, decoding (greedy, beam search with an n-gram
LM), emissions in windows for long recordings, timestamps, and transcription.

    model = speechssl.load("runs/ctc")
    model.transcribe("talk.wav", return_timestamps="word")     # speechssl.asr.transcriber
"""
