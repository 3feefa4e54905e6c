"""The parsers of what uses a fine-tuned CTC model: transcribe, evaluate, emissions, pseudo-label,
build-lm, tune-lm; and average (model files of one architecture)."""

from __future__ import annotations

import argparse

from speechssl_cli.arguments import add_device, floats

INPUTS = """\
AUDIO and DATA are audio files, directories (recursive, or a LibriSpeech tree), manifests (TSV,
JSONL, fairseq) or shard directories; audio is resampled to the model's 16 kHz."""

TRANSCRIBE = f"""\
Transcribe audio with a fine-tuned CTC model: greedy or beam search, with a lexicon and an n-gram LM.

    %(prog)s MODEL AUDIO... [--output hyps.tsv] [--decoder beam --lm LM_DIR]

{INPUTS}
Files that cannot be read are skipped, counted and listed on stderr. --lm is a build-lm folder (its
tuned weights from tune-lm are used unless --lm-weight/--word-score/--blank-penalty are given) or an
ARPA file. A recording longer than --max-seconds runs in overlapping windows. --output is written to
a temporary file and renamed when every input has been decoded.
"""

EVALUATE = f"""\
WER and CER of a fine-tuned CTC model (or of saved emissions) against the transcripts.

    %(prog)s MODEL DATA... [--output DIR] [--decoder beam --lm LM_DIR]
    %(prog)s --emissions dev.pt [--lm LM_DIR]

{INPUTS}
Prints the scores as JSON; --output also writes hypotheses.tsv and scores.json.
"""

EMISSIONS = f"""\
Save a CTC model's log-probabilities over DATA (float16, with the tokenizer), which evaluate and
tune-lm --emissions decode without the model, on any machine.

    %(prog)s MODEL DATA... --output dev.pt

{INPUTS}
"""

PSEUDO_LABEL = f"""\
Pseudo-labelling (self-training): transcribe unlabelled audio with a fine-tuned CTC model and write a
manifest of the transcripts (with a confidence column) to shard and fine-tune a student on, beside
the labelled data. The least confident are dropped by --min-confidence and --keep-fraction and listed
with their reason in OUTPUT.rejected.tsv.

    %(prog)s TEACHER.pt UNLABELLED... --output pseudo.tsv [--keep-fraction 0.9] [--decoder beam --lm LM]
    speechssl data make-shards --input pseudo.tsv --output data/pseudo
    speechssl finetune --config ... pretrained=RUN data.shards=[data/labelled,data/pseudo]

{INPUTS}
Shard inputs work when their audio files are still where make-shards read them (the manifest names
the audio's path). Confidence: the mean posterior of the greedy path's emitted tokens.
"""

BUILD_LM = """\
Build a word n-gram LM and lexicon from transcripts: lm.arpa (interpolated modified Kneser-Ney),
lexicon.txt (each word spelled in characters with | after it, or in the tokens of --model) and
lm.json, in the --output folder.

    %(prog)s data/train [more data or .txt files] --output runs/lm [--order 4] [--model best.pt]
"""

TUNE_LM = """\
Tune the LM weight, word score and blank penalty on dev: run the model once (or read its saved
emissions), decode for every combination of the grid, and write the best (by WER, then CER) to the
LM folder's decoding.json, which transcribe and evaluate use.

    %(prog)s MODEL DEV... --lm runs/lm
    %(prog)s --emissions dev.pt --lm runs/lm --blank-penalties 0,0.5,1,2
"""

AVERAGE = """\
Average model files (the mean of their weights, as ESPnet's and icefall's average_checkpoints), or
the validated models a run kept with trainer.average_models.

    %(prog)s a.pt b.pt c.pt --output averaged.pt
    %(prog)s RUN_DIR --best 5 --output averaged.pt      (or --last 5)
"""


def add_windows(parser: argparse.ArgumentParser) -> None:
    """Long recordings run in overlapping windows (``speechssl.asr.inference.Windows``'s defaults)."""
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="longer recordings run in overlapping windows")
    parser.add_argument("--window-seconds", type=float, default=30.0, help="window length")
    parser.add_argument("--overlap-seconds", type=float, default=4.0,
                        help="overlap of consecutive windows, less than the window")


def add_model_run(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs over the inputs."""
    add_device(parser)
    parser.add_argument("--batch-seconds", type=float, default=300.0, help="padded audio per batch")
    add_windows(parser)


def add_decoder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None,
                        help="greedy (the default without --lm) or beam (the default with --lm)")
    parser.add_argument("--lm", help="a build-lm folder (lm.arpa, lexicon.txt, tuned decoding.json) or an ARPA file")
    parser.add_argument("--lexicon", help="WORD<TAB>tokens per line (default: the LM folder's, or the LM's "
                                          "words spelled with the model's tokenizer)")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default 50)")
    parser.add_argument("--beam-threshold", type=float, default=None, help="pruning margin (default 50)")
    parser.add_argument("--lm-weight", type=float, default=None, help="LM weight (default: tuned, else 2)")
    parser.add_argument("--word-score", type=float, default=None, help="score per word (default: tuned, else 0)")
    parser.add_argument("--blank-penalty", type=float, default=None,
                        help="subtracted from the blank's log-probability (default: tuned with the LM, else 0)")


def add_source(parser: argparse.ArgumentParser) -> None:
    """A model and labelled data, or saved emissions (evaluate, tune-lm)."""
    parser.add_argument("model", nargs="?", help="a fine-tuned CTC model file")
    parser.add_argument("data", nargs="*", help="manifests or shard directories with transcripts")
    parser.add_argument("--emissions", nargs="+", help="emissions files (from `emissions`) instead of MODEL and DATA")
    add_model_run(parser)


def add_transcribe(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(command="transcribe")
    parser.add_argument("model", help="a CTC model: a fine-tuned model file (model.pt or best.pt), a fine-tuning "
                                      "run folder, hf:NAME or ta:BUNDLE")
    parser.add_argument("inputs", nargs="+", help="audio files, directories, manifests or shard directories")
    parser.add_argument("--output", help="write id<TAB>transcript lines here instead of stdout")
    parser.add_argument("--timestamps", choices=("word", "char", "all"),
                        help="write JSON lines with word and/or character times (seconds) from the CTC alignment")
    add_model_run(parser)
    add_decoder(parser)


def add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(command="evaluate")
    add_source(parser)
    parser.add_argument("--output", help="folder for hypotheses.tsv and scores.json")
    add_decoder(parser)


def add_emissions(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(command="emissions")
    parser.add_argument("model", help="a fine-tuned CTC model file")
    parser.add_argument("data", nargs="+", help="audio files, directories, manifests or shard directories")
    parser.add_argument("--output", required=True, help="the emissions file to write")
    add_model_run(parser)


def add_pseudo_label(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the teacher: a fine-tuned CTC model file")
    parser.add_argument("inputs", nargs="+", help="unlabelled audio files, directories, manifests or shard directories")
    parser.add_argument("--output", required=True, help="the manifest to write (.tsv)")
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="drop utterances whose confidence (0-1) is lower")
    parser.add_argument("--keep-fraction", type=float, default=1.0,
                        help="keep this fraction of the most confident (after --min-confidence)")
    add_model_run(parser)
    add_decoder(parser)


def add_build_lm(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(command="build-lm")
    parser.add_argument("sources", nargs="+", help="shard directories, manifests with text, or .txt files")
    parser.add_argument("--output", required=True, help="the LM folder")
    parser.add_argument("--order", type=int, default=4, help="n-gram order")
    parser.add_argument("--case", choices=("upper", "lower", "keep"), default="upper",
                        help="case folding (the tokenizer's)")
    parser.add_argument("--model", help="spell the lexicon in this CTC model's tokens (default: characters)")


def add_tune_lm(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(command="tune-lm")
    add_source(parser)
    parser.add_argument("--lm", required=True, help="a build-lm folder; decoding.json is written there")
    parser.add_argument("--lm-weights", type=floats, default="0,0.5,1,1.5,2,3", help="LM weights to try")
    parser.add_argument("--word-scores", type=floats, default="-1,0,1,2", help="word scores to try")
    parser.add_argument("--blank-penalties", type=floats, default="0,1", help="blank penalties to try")
    parser.add_argument("--beam", type=int, default=50, help="beam size")


def add_average(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="model files, or one run folder (trained with "
                                                  "trainer.average_models) with --best or --last")
    parser.add_argument("--output", required=True, help="the averaged model file")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--best", type=int, metavar="N", help="a run folder's N best validated models")
    choice.add_argument("--last", type=int, metavar="N", help="a run folder's N last validated models")
