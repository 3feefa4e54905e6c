"""The parser of ``data``: make-shards, inspect, split, synth (run by :mod:`data_tools.cli`)."""

from __future__ import annotations

import argparse
import os

DATA = """\
Build, inspect and split shards; generate the synthetic demo corpus.

    %(prog)s make-shards --input AUDIO_OR_MANIFEST --output data/shards/train
    %(prog)s inspect data/shards/train
    %(prog)s split --input all.tsv --output data/manifests --dev-speakers 4
    %(prog)s synth --output data/synth --hours 0.3

make-shards and synth lock their output folder while they write, and replace a finished shard set
there only with --overwrite; split never writes over its input manifest.
"""

SUBCOMMANDS = {
    "make-shards": "build WebDataset shards from audio files or a manifest",
    "inspect": "summarise and verify a shard directory",
    "split": "hold out a dev set from a manifest, deterministically",
    "synth": "generate the labelled synthetic demo corpus as shards",
}


def _shard_options(parser: argparse.ArgumentParser) -> None:
    """``data_tools.shards.ShardOptions``, with its defaults."""
    parser.add_argument("--sample-rate", type=int, default=16000, help="target rate (Hz)")
    parser.add_argument("--max-count", type=int, default=2000, help="samples per shard (0: no limit)")
    parser.add_argument("--max-megabytes", type=float, default=256.0, help="shard size (0: no limit)")
    parser.add_argument("--max-hours", type=float, default=0.0, help="audio per shard (0: no limit)")
    parser.add_argument("--min-seconds", type=float, default=0.1, help="skip shorter inputs")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="skip longer inputs")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                        help="decoding processes (default: the CPU count)")
    parser.add_argument("--prefix", default="shard",
                        help="shard file name prefix: letters, digits, '_', '-', '.' (not first); no paths")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished shard set (index.json) or shards of this prefix in the output "
                             "folder; without it they are kept and the build refused. A killed build's leftovers "
                             "need no --overwrite: make-shards does not resume, it starts again")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_data(parser: argparse.ArgumentParser) -> None:
    from speechssl_cli.arguments import HelpFormatter

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="the data tool to run")

    def command(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=SUBCOMMANDS[name], description=SUBCOMMANDS[name].capitalize() + ".",
                              formatter_class=HelpFormatter)

    p = command("make-shards")
    p.add_argument("--input", required=True,
                   help="folder of audio, LibriSpeech tree, or manifest: TSV, JSON lines (NeMo's, with offset and "
                        "duration cutting segments), fairseq .tsv (with its .wrd/.ltr labels), lhotse cuts "
                        "(.jsonl.gz or .jsonl)")
    p.add_argument("--output", required=True, help="shard directory to write")
    _shard_options(p)

    p = command("inspect")
    p.add_argument("directory", help="a shard directory")
    p.add_argument("--histogram", help="PNG path for the duration histogram (default: DIRECTORY/durations.png)")

    p = command("split")
    p.add_argument("--input", required=True, help="TSV or JSONL manifest")
    p.add_argument("--output", required=True, help="folder for train.* and dev.* (not the input's own names)")
    p.add_argument("--dev-speakers", type=int, default=0, help="hold out this many speakers (a seeded choice)")
    p.add_argument("--dev-fraction", type=float, default=0.0,
                   help="or hold out this fraction of the speakers (of the utterances without a speaker column); "
                        "give exactly one of the two")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice")

    p = command("synth")
    p.add_argument("--output", required=True, help="writes OUTPUT/train and OUTPUT/dev (held-out speakers)")
    p.add_argument("--hours", type=float, required=True, help="hours of audio in all")
    p.add_argument("--speakers", type=int, default=40, help="synthetic speakers")
    p.add_argument("--dev-speakers", type=int, default=4, help="speakers held out as OUTPUT/dev")
    p.add_argument("--seed", type=int, default=0, help="the corpus drawn")
    p.add_argument("--utterance-seconds", type=float, nargs=2, default=[1.0, 5.0], metavar=("MIN", "MAX"),
                   help="utterance durations are drawn uniformly in [MIN, MAX] seconds")
    _shard_options(p)
