"""The ``speechssl`` command: one entry point with a subcommand for every job and tool.

    speechssl --help                     the subcommands
    speechssl SUBCOMMAND --help          its arguments and their defaults
    speechssl --version

Each subcommand's arguments are defined once, here (:mod:`speechssl_cli.jobs`,
:mod:`~speechssl_cli.decoding`, :mod:`~speechssl_cli.data`, :mod:`~speechssl_cli.extract`), and
the older entry points (``python -m pretrain``, ``python -m finetune ...``, ``python -m
data_tools ...``, ``python -m pretrain.overfit``, ``python -m pretrain.demo``) build their parsers
from the same definitions (:func:`parser_for`, :func:`alias_parser`). Building a parser imports
neither torch nor the library: the code that runs a subcommand (``COMMANDS[name].run``, a
``module:function`` taking the parsed arguments and returning the exit status) is imported only
once the arguments are parsed.

This package sits above the library: ``speechssl`` never imports it, nor ``pretrain``,
``finetune`` or ``data_tools``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from speechssl_cli import data, decoding, extract, jobs
from speechssl_cli.arguments import HelpFormatter, add_launcher_arguments


@dataclass(frozen=True)
class Command:
    """summary: the one line ``speechssl --help`` shows. description: the subcommand's own help
    (``%(prog)s`` is its invocation). add_arguments: defines its arguments on a parser. run:
    ``module:function`` that runs it on the parsed arguments and returns the exit status."""

    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str


COMMANDS: dict[str, Command] = {
    "data": Command("build, inspect and split shards; the synthetic demo corpus (make-shards, inspect, split, synth)",
                    data.DATA, data.add_data, "data_tools.cli:run"),
    "pretrain": Command("pretrain a model with the wav2vec 2.0 objective (DeepSpeed)", jobs.PRETRAIN,
                        jobs.add_pretrain, "pretrain.__main__:run"),
    "finetune": Command("fine-tune a pretrained model with CTC on labelled shards", jobs.FINETUNE, jobs.add_finetune,
                        "finetune.__main__:run"),
    "transcribe": Command("transcribe audio with a fine-tuned CTC model (greedy, or beam search with an LM)",
                          decoding.TRANSCRIBE, decoding.add_transcribe, "finetune.transcribe:run"),
    "evaluate": Command("WER and CER of a CTC model, or of saved emissions, against transcripts",
                        decoding.EVALUATE, decoding.add_evaluate, "finetune.transcribe:run"),
    "emissions": Command("save a CTC model's log-probabilities over data, to decode later without it",
                         decoding.EMISSIONS, decoding.add_emissions, "finetune.transcribe:run"),
    "pseudo-label": Command("transcribe unlabelled audio into a manifest to self-train on (confidence-filtered)",
                            decoding.PSEUDO_LABEL, decoding.add_pseudo_label, "finetune.pseudo_label:run"),
    "build-lm": Command("build a word n-gram LM and lexicon from transcripts", decoding.BUILD_LM,
                        decoding.add_build_lm, "finetune.lm:run"),
    "tune-lm": Command("tune the LM weight, word score and blank penalty on dev", decoding.TUNE_LM,
                       decoding.add_tune_lm, "finetune.lm:run"),
    "average": Command("average model files, or a run's best or last validated models", decoding.AVERAGE,
                       decoding.add_average, "finetune.__main__:run_average"),
    "extract": Command("extract hidden states of chosen layers to disk (npy, shards, safetensors)", extract.EXTRACT,
                       extract.add_extract, "speechssl.extract:run"),
    "report": Command("plot a run's metrics.jsonl to a PNG report", "Plot a run's training curves (metrics.jsonl) "
                      "to a PNG.\n\n    %(prog)s RUN_DIR [--output report.png]\n", jobs.add_report,
                      "pretrain.__main__:run_report"),
    "export": Command("write the model file of a run from its newest (or a given) checkpoint", jobs.EXPORT,
                      jobs.add_export, "speechssl_cli.export:run"),
    "overfit": Command("sanity check: train the pretraining objective on one fixed batch", jobs.OVERFIT,
                       jobs.add_overfit, "pretrain.overfit:run_command"),
    "demo": Command("the README's main job: synthetic corpus, tiny pretraining, CTC fine-tuning, held-out CER",
                    jobs.DEMO, jobs.add_demo, "pretrain.demo:run"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("speechssl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _add_command(sub, name: str) -> argparse.ArgumentParser:
    command = COMMANDS[name]
    parser = sub.add_parser(name, help=command.summary, description=command.description,
                            formatter_class=HelpFormatter)
    command.add_arguments(parser)
    parser.set_defaults(speechssl_command=name)
    return parser


def build_parser(prog: str = "speechssl") -> argparse.ArgumentParser:
    """The ``speechssl`` parser, with every subcommand."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=(
        "Self-supervised speech pretraining in the wav2vec 2.0 family: shards, pretraining, CTC fine-tuning, "
        "decoding and feature extraction.\n\n    %(prog)s SUBCOMMAND --help    the arguments of one, with defaults"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version and exit")
    add_launcher_arguments(parser)
    sub = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND", dest="speechssl_command", required=True)
    for name in COMMANDS:
        _add_command(sub, name)
    return parser


def parser_for(name: str, prog: str) -> argparse.ArgumentParser:
    """The parser of one subcommand on its own, for an older entry point (``python -m pretrain``)."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=prog, description=command.description, formatter_class=HelpFormatter)
    command.add_arguments(parser)
    parser.set_defaults(speechssl_command=name)
    return parser


def alias_parser(prog: str, names: Sequence[str]) -> argparse.ArgumentParser:
    """A parser whose subcommands are ``names`` (``python -m finetune transcribe|evaluate|emissions``)."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(metavar="COMMAND", dest="speechssl_command", required=True)
    for name in names:
        _add_command(sub, name)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand (importing its code only now)."""
    module, function = COMMANDS[args.speechssl_command].run.split(":")
    handler: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), function)
    return handler(args)


def main(argv: list[str] | None = None) -> int:
    """``speechssl ...``; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run(args)
