"""Peak memory of ``python -m finetune transcribe`` (or of ``model.transcribe`` from Python, with
``--python``) on one long recording, by its length.

A random tiny CTC model (``configs/model/tiny_transformer.yaml`` with a character head) transcribes
one FLAC file of synthetic speech per length, each in a fresh process; the peak resident memory of
that process (``ru_maxrss``) is reported. Long recordings run in overlapping windows
(``--max-seconds``/``--window-seconds``/``--overlap-seconds``), so the peak should be the model, the
decoded audio (4 bytes a sample) and one batch of windows, not growing with the recording's frames.

    python bench/transcribe_memory.py --minutes 1 16 60 [--device cpu] [--single-pass] [--python]

``--single-pass`` gives a ``--max-seconds`` above the longest recording: the unwindowed baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiny_ctc_model(path: Path) -> None:
    from speechssl import load_model_config
    from speechssl.asr.tokenizer import CharTokenizer
    from speechssl.models.ctc import CTCModel

    torch.manual_seed(0)
    tokenizer = CharTokenizer.build(["THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG"])
    model = CTCModel(load_model_config(REPO / "configs/model/tiny_transformer.yaml"), len(tokenizer),
                     blank=tokenizer.blank, vocab=tokenizer.vocab, tokenizer=tokenizer.to_dict(), normalize_audio=True)
    model.save(path)


def long_recording(path: Path, minutes: float) -> None:
    """Synthetic utterances end to end, written block by block (the file is never whole in memory here)."""
    from data_tools.synthetic import corpus_entries, render

    speech = np.concatenate([render(**e.synth) for e in corpus_entries(0.01, num_speakers=2, seed=5)])
    total = int(minutes * 60 * 16000)
    with sf.SoundFile(path, "w", samplerate=16000, channels=1, format="FLAC", subtype="PCM_16") as f:
        for start in range(0, total, len(speech)):
            f.write(speech[: min(len(speech), total - start)])


CLI = ("import resource, sys, runpy; sys.argv = ['finetune'] + sys.argv[1:];"
       "code = 0\ntry: runpy.run_module('finetune', run_name='__main__')\n"
       "except SystemExit as e: code = e.code or 0\n"
       "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")
# The Python call a user writes: ``speechssl.load(model).transcribe(path)``, windowed by default.
PYTHON = ("import resource, sys, speechssl; from speechssl.asr.inference import DEFAULT_WINDOWS;"
          "_, _, model, audio, _, device, *single_pass = sys.argv; windows = None if single_pass else DEFAULT_WINDOWS;"
          "text = speechssl.load(model).transcribe(audio, device=device, windows=windows).text;"
          "print(len(text.split()), 'words');"
          "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def peak_rss(model: Path, audio: Path, device: str, extra: list[str], python: bool) -> tuple[float, float]:
    """(peak resident MiB, wall seconds) of one transcribe process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PYTHON if python else CLI, "transcribe", str(model), str(audio),
                           "--device", device, *extra], capture_output=True, text=True, cwd=REPO, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"transcribe failed:\n{done.stderr[-3000:]}")
    peak_kib = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK"))
    return peak_kib / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 16, 60])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--single-pass", action="store_true", help="no windows: the baseline")
    parser.add_argument("--python", action="store_true", help="model.transcribe(path) instead of the CLI")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.pt"
        tiny_ctc_model(model)
        for minutes in args.minutes:
            audio = Path(tmp) / f"long_{minutes:g}min.flac"
            long_recording(audio, minutes)
            extra = ([] if not args.single_pass else ["single-pass"] if args.python
                     else ["--max-seconds", str(max(args.minutes) * 60 + 1)])
            peak, seconds = peak_rss(model, audio, args.device, extra, args.python)
            audio.unlink()
            rows.append({"minutes": minutes, "peak_rss_mib": round(peak, 1), "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| minutes | peak RSS (MiB) | wall (s) |\n|---:|---:|---:|")
    for row in rows:
        print(f"| {row['minutes']:g} | {row['peak_rss_mib']:.0f} | {row['seconds']:.1f} |")
    print(f"\ntorch {torch.__version__}, python {sys.version.split()[0]}, "
          f"{'single pass' if args.single_pass else 'windowed (defaults)'}, device {args.device}, "
          f"{'model.transcribe' if args.python else 'python -m finetune transcribe'}")


if __name__ == "__main__":
    main()
