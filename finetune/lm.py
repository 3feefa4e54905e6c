"""Building a word n-gram LM and lexicon from transcripts, and tuning its decoding weights on dev.

    python -m finetune build-lm data/train [more data or text files] --output runs/lm [--order 4] [--model best.pt]
    python -m finetune tune-lm runs/ctc/best.pt data/dev --lm runs/lm

``build-lm`` reads the transcripts of manifests or shard directories, or plain text files (one
sentence per line), and writes ``lm.arpa`` (interpolated modified Kneser-Ney, :mod:`finetune.ngram`),
``lexicon.txt`` (each word spelled in characters with ``|`` after it, or in the tokens of
``--model``) and ``lm.json`` (what it was built from). ``tune-lm`` runs the model once over the dev
data, decodes it for every LM weight and word score of a small grid, and writes the best pair (by
WER, then CER) to ``decoding.json`` in the LM folder, where ``transcribe`` and ``evaluate`` find it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from finetune.beam import ARPA, LEXICON, SETTINGS, BeamDecoder, DecoderSettings, LanguageModel, spell, write_lexicon
from finetune.ngram import KneserNey
from finetune.tokenizer import WORD, CharTokenizer, fold_case


def read_texts(sources: list[str]) -> Iterator[str]:
    """The transcripts of shard directories and manifests, or the lines of ``.txt`` files."""
    from data_tools.sources import read_source
    from speechssl.data.shardset import INDEX, ShardSet

    for name in sources:
        path = Path(name)
        if (path / INDEX).is_file():
            yield from ShardSet([str(path)]).transcripts()
        elif path.suffix == ".txt" and path.is_file():
            with path.open(encoding="utf-8") as f:
                yield from (line.strip() for line in f if line.strip())
        else:
            entries = read_source(path)[0]
            texts = [e.text for e in entries if e.text]
            if not texts:
                raise ValueError(f"{name}: no transcripts (a manifest needs a text column)")
            yield from texts


def build_lm(sources: list[str], output: str | Path, order: int = 4, case: str = "upper",
             tokenizer=None) -> dict:
    """Estimate the LM of the sources' text and write the LM folder; returns ``lm.json``'s content."""
    sentences = [" ".join(fold_case(t, case).replace(WORD, " ").split()) for t in read_texts(sources)]
    sentences = [s for s in sentences if s]
    model = KneserNey.estimate(sentences, order)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    model.write_arpa(folder / ARPA)
    words = model.words
    if tokenizer is None:  # characters, as a character tokenizer of this case spells them
        tokenizer = CharTokenizer.build(words, case=case)
    write_lexicon({word: spell(word, tokenizer) for word in words}, folder / LEXICON)
    (folder / SETTINGS).unlink(missing_ok=True)  # weights tuned for an earlier LM no longer apply
    info = {"sources": sources, "order": order, "case": case, "sentences": len(sentences),
            "words": sum(len(s.split()) for s in sentences), "vocabulary": len(words),
            "ngrams": [len(p) for p in model.probs[1:]]}
    (folder / "lm.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def tune(model_path: str, data: list[str], lm_dir: str, lm_weights: list[float], word_scores: list[float],
         beam: int, device: str, batch_seconds: float) -> dict:
    """Decode ``data`` with every pair of the grid; write and return the best settings."""
    from finetune.tokenizer import tokenizer_from_dict
    from finetune.transcribe import emissions, greedy_decoder, load_model, score
    from speechssl.data.inputs import read_utterances

    model, chosen = load_model(model_path, device)
    tokenizer = tokenizer_from_dict(model.tokenizer)
    lm = LanguageModel.load(lm_dir)
    skipped: Counter = Counter()
    cached = [(batch, log_probs, frames) for batch, log_probs, frames in
              emissions(model, read_utterances(data, skipped), chosen, batch_seconds)]
    if any(u.text is None for batch, _, _ in cached for u in batch):
        raise ValueError("tune-lm needs transcripts for every utterance")
    texts = [(u.id, u.text, "") for batch, _, _ in cached for u in batch]

    def run(decoder) -> dict:
        hyps = [h for _, log_probs, frames in cached for h in decoder(log_probs, frames)]
        return score(tokenizer, [(i, t, h) for (i, t, _), h in zip(texts, hyps, strict=True)])[0]

    greedy = run(greedy_decoder(tokenizer, model.blank))
    grid = []
    for weight in lm_weights:
        for bonus in word_scores:
            settings = DecoderSettings(beam=beam, lm_weight=weight, word_score=bonus)
            result = run(BeamDecoder(tokenizer, lm, settings))
            grid.append({"lm_weight": weight, "word_score": bonus, "wer": result["wer"], "cer": result["cer"]})
            print(f"lm_weight {weight:g} word_score {bonus:g}: WER {result['wer']:.2%} CER {result['cer']:.2%}",
                  file=sys.stderr)
    best = min(grid, key=lambda r: (r["wer"], r["cer"]))
    tuned = {"beam": beam, "lm_weight": best["lm_weight"], "word_score": best["word_score"],
             "tuned_on": data, "model": model_path, "wer": best["wer"], "cer": best["cer"],
             "greedy": {"wer": greedy["wer"], "cer": greedy["cer"]}, "utterances": len(texts),
             "skipped": dict(skipped), "grid": grid}
    (Path(lm_dir) / SETTINGS).write_text(json.dumps(tuned, indent=1) + "\n")
    return tuned


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-lm", help="an n-gram LM and lexicon from transcripts")
    b.add_argument("sources", nargs="+", help="shard directories, manifests with text, or .txt files")
    b.add_argument("--output", required=True, help="the LM folder")
    b.add_argument("--order", type=int, default=4)
    b.add_argument("--case", choices=("upper", "lower", "keep"), default="upper",
                   help="case folding (the tokenizer's; default upper)")
    b.add_argument("--model", help="spell the lexicon in this CTC model's tokens (default: characters)")
    t = sub.add_parser("tune-lm", help="the LM weight and word score that decode dev best")
    t.add_argument("model", help="a fine-tuned CTC model file")
    t.add_argument("data", nargs="+", help="dev manifests or shard directories with transcripts")
    t.add_argument("--lm", required=True, help="a build-lm folder; decoding.json is written there")
    t.add_argument("--lm-weights", type=_floats, default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    t.add_argument("--word-scores", type=_floats, default=[-1.0, 0.0, 1.0, 2.0])
    t.add_argument("--beam", type=int, default=50)
    t.add_argument("--device", default="auto")
    t.add_argument("--batch-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "build-lm":
            tokenizer = None
            if args.model:
                from finetune.tokenizer import tokenizer_from_dict
                from finetune.transcribe import load_model

                tokenizer = tokenizer_from_dict(load_model(args.model, "cpu")[0].tokenizer)
            print(json.dumps(build_lm(args.sources, args.output, args.order, args.case, tokenizer)))
        else:
            tuned = tune(args.model, args.data, args.lm, args.lm_weights, args.word_scores, args.beam,
                         args.device, args.batch_seconds)
            print(json.dumps({k: v for k, v in tuned.items() if k != "grid"}))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
