"""Building a word n-gram LM and lexicon from transcripts, and tuning its decoding weights on dev.

    python -m finetune build-lm data/train [more data or text files] --output runs/lm [--order 4] [--model best.pt]
    python -m finetune tune-lm runs/ctc/best.pt data/dev --lm runs/lm
    python -m finetune tune-lm --emissions dev.emissions.pt --lm runs/lm   (saved by `emissions`)

``build-lm`` reads the transcripts of manifests or shard directories, or plain text files (one
sentence per line), and writes ``lm.arpa`` (interpolated modified Kneser-Ney, :mod:`finetune.ngram`),
``lexicon.txt`` (each word spelled in characters with ``|`` after it, or in the tokens of
``--model``) and ``lm.json`` (what it was built from). ``tune-lm`` runs the model once over the dev
data (or reads its saved emissions), decodes it for every LM weight, word score and blank penalty
of a small grid, and writes the best (by WER, then CER) to ``decoding.json`` in the LM folder,
where ``transcribe`` and ``evaluate`` find it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from finetune.ngram import KneserNey
from finetune.transcribe import model_or_emissions
from speechssl.asr.beam import (
    ARPA,
    LEXICON,
    SETTINGS,
    BeamDecoder,
    DecoderSettings,
    LanguageModel,
    spell,
    write_lexicon,
)
from speechssl.asr.tokenizer import WORD, CharTokenizer, fold_case


def read_texts(sources: list[str]) -> Iterator[str]:
    """The transcripts of shard directories and manifests, or the lines of ``.txt`` files."""
    from speechssl.data.manifest import read_source
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


def tune(tokenizer, blank: int, batches, lm_dir: str, grid: dict[str, list[float]], beam: int,
         tuned_on: dict, skipped: Counter | None = None) -> dict:
    """Decode the batches (``(utterances, log_probs, frames)``, with transcripts) with every
    combination of ``grid`` (``lm_weight``, ``word_score``, ``blank_penalty``: lists of values);
    write and return the best settings, by WER then CER. ``skipped``: the reader's count of
    unreadable inputs, recorded with them."""
    from itertools import product

    from finetune.transcribe import score
    from speechssl.asr.decoding import GreedyDecoder, penalize_blank

    cached = list(batches)
    if any(u.text is None for batch, _, _ in cached for u in batch):
        raise ValueError("tune-lm needs transcripts for every utterance")
    texts = [(u.id, u.text) for batch, _, _ in cached for u in batch]
    lm = LanguageModel.load(lm_dir)

    def run(decoder) -> dict:
        hyps = [h for _, log_probs, frames in cached for h in decoder(log_probs, frames)]
        return score(tokenizer, [(i, t, h) for (i, t), h in zip(texts, hyps, strict=True)])[0]

    greedy = run(GreedyDecoder(tokenizer, blank))
    results = []
    names = ("lm_weight", "word_score", "blank_penalty")
    for weight, bonus in product(grid["lm_weight"], grid["word_score"]):
        # one decoder per LM setting (building it reads the LM); the penalty changes only its input
        decoder = BeamDecoder(tokenizer, lm, DecoderSettings(beam=beam, lm_weight=weight, word_score=bonus))
        for penalty in grid["blank_penalty"]:
            result = run(lambda log_probs, frames, p=penalty, d=decoder: d(penalize_blank(log_probs, blank, p), frames))
            point = dict(zip(names, (weight, bonus, penalty), strict=True))
            results.append({**point, "wer": result["wer"], "cer": result["cer"]})
            print(" ".join(f"{k} {v:g}" for k, v in point.items()) +
                  f": WER {result['wer']:.2%} CER {result['cer']:.2%}", file=sys.stderr)
    best = min(results, key=lambda r: (r["wer"], r["cer"]))
    tuned = {"beam": beam, **{name: best[name] for name in names}, **tuned_on, "wer": best["wer"],
             "cer": best["cer"], "greedy": {"wer": greedy["wer"], "cer": greedy["cer"]}, "utterances": len(texts),
             "skipped": dict(skipped or {}), "grid": results}
    (Path(lm_dir) / SETTINGS).write_text(json.dumps(tuned, indent=1) + "\n")
    return tuned


def main(argv: list[str]) -> int:
    """``python -m finetune build-lm|tune-lm ...``: ``speechssl build-lm|tune-lm``, whose arguments
    are defined in :mod:`speechssl_cli.decoding`."""
    from speechssl_cli import alias_parser

    return run(alias_parser("python -m finetune", ("build-lm", "tune-lm")).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Build an LM or tune its decoding weights (``args.command``); the exit status."""
    try:
        if args.command == "build-lm":
            tokenizer = None
            if args.model:
                from finetune.transcribe import load_model
                from speechssl.asr.tokenizer import tokenizer_from_dict

                tokenizer = tokenizer_from_dict(load_model(args.model, "cpu")[0].tokenizer)
            print(json.dumps(build_lm(args.sources, args.output, args.order, args.case, tokenizer)))
        else:
            tokenizer, blank, batches, skipped = model_or_emissions(args)
            grid = {"lm_weight": args.lm_weights, "word_score": args.word_scores,
                    "blank_penalty": args.blank_penalties}
            source = {"tuned_on": args.data or args.emissions, "model": args.model or args.emissions}
            tuned = tune(tokenizer, blank, batches, args.lm, grid, args.beam, source, skipped)
            print(json.dumps({k: v for k, v in tuned.items() if k != "grid"}))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
