"""``python -m data_tools <command>`` (also ``speechssl data <command>``): make-shards, inspect, split, synth.

make-shards and synth lock their output folder while they write, and replace a finished shard set
there only with ``--overwrite``; split never writes over its input manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.shards import ShardOptions, make_shards
from data_tools.sources import read_source
from speechssl.locking import FolderLocked


def _shard_options(parser: argparse.ArgumentParser) -> None:
    d = ShardOptions()
    parser.add_argument("--sample-rate", type=int, default=d.sample_rate, help="target rate (Hz)")
    parser.add_argument("--max-count", type=int, default=d.max_count, help="samples per shard (0: no limit)")
    parser.add_argument("--max-megabytes", type=float, default=d.max_megabytes, help="shard size (0: no limit)")
    parser.add_argument("--max-hours", type=float, default=d.max_hours, help="audio per shard (0: no limit)")
    parser.add_argument("--min-seconds", type=float, default=d.min_seconds, help="skip shorter inputs")
    parser.add_argument("--max-seconds", type=float, default=d.max_seconds, help="skip longer inputs")
    parser.add_argument("--workers", type=int, default=d.workers, help="decoding processes")
    parser.add_argument("--prefix", default=d.prefix,
                        help="shard file name prefix: letters, digits, '_', '-', '.' (not first); no paths")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished shard set (index.json) or shards of this prefix in the output "
                             "folder; without it they are kept and the build refused. A killed build's leftovers "
                             "need no --overwrite: make-shards does not resume, it starts again")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _options(args: argparse.Namespace) -> ShardOptions:
    return ShardOptions(sample_rate=args.sample_rate, max_count=args.max_count, max_megabytes=args.max_megabytes,
                        max_hours=args.max_hours, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                        workers=args.workers, prefix=args.prefix)


def _report(index: dict, output: Path) -> None:
    t = index["totals"]
    print(f"{output}: {t['shards']} shards, {t['num_samples']} utterances, {t['hours']:.3f} h, "
          f"{t['speakers']} speakers; skipped {t['skipped']} of {t['inputs']} inputs {index['skipped'] or ''}"
          + (f" (listed in {output / 'skipped.tsv'})" if t["skipped"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-shards", help="build WebDataset shards from audio files or a manifest")
    p.add_argument("--input", required=True,
                   help="folder of audio, LibriSpeech tree, TSV/JSONL manifest or fairseq manifest")
    p.add_argument("--output", required=True, help="shard directory to write")
    _shard_options(p)

    p = sub.add_parser("inspect", help="summarise and verify a shard directory")
    p.add_argument("directory")
    p.add_argument("--histogram", help="PNG path for the duration histogram (default: DIR/durations.png)")

    p = sub.add_parser("split", help="hold out a dev set from a manifest, deterministically")
    p.add_argument("--input", required=True, help="TSV or JSONL manifest")
    p.add_argument("--output", required=True, help="folder for train.* and dev.* (not the input's own names)")
    p.add_argument("--dev-speakers", type=int, default=0)
    p.add_argument("--dev-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("synth", help="generate the labelled synthetic demo corpus as shards")
    p.add_argument("--output", required=True, help="writes OUTPUT/train and OUTPUT/dev (held-out speakers)")
    p.add_argument("--hours", type=float, required=True)
    p.add_argument("--speakers", type=int, default=40)
    p.add_argument("--dev-speakers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--utterance-seconds", type=float, nargs=2, default=[1.0, 5.0], metavar=("MIN", "MAX"),
                   help="utterance durations are drawn uniformly in [MIN, MAX] seconds (default 1 5)")
    _shard_options(p)

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, FolderLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "make-shards":
        options = _options(args)  # checked before the input is read
        entries, kind = read_source(args.input)
        print(f"{args.input}: {kind}, {len(entries)} inputs")
        output = Path(args.output)
        _report(make_shards(entries, output, options, source=str(args.input), progress=not args.quiet,
                            overwrite=args.overwrite), output)
    elif args.command == "inspect":
        from data_tools.inspect_shards import format_histogram, inspect

        histogram = args.histogram or str(Path(args.directory) / "durations.png")
        summary = inspect(args.directory, histogram)
        print(json.dumps({k: v for k, v in summary.items() if k != "duration_histogram"}, indent=1,
                         ensure_ascii=False))
        print(format_histogram(summary["duration_histogram"]))
        return 1 if summary["problems"] else 0
    elif args.command == "split":
        from data_tools.split import split_manifest

        print(json.dumps(split_manifest(args.input, args.output, args.dev_speakers, args.dev_fraction, args.seed)))
    elif args.command == "synth":
        from data_tools.synthetic import corpus_entries

        if not 0 <= args.dev_speakers < args.speakers:
            raise ValueError("--dev-speakers must be in [0, --speakers)")
        low, high = args.utterance_seconds
        if not 0 < low <= high:
            raise ValueError(f"--utterance-seconds needs 0 < MIN <= MAX, got {low:g} {high:g}")
        entries = corpus_entries(args.hours, num_speakers=args.speakers, seed=args.seed,
                                 min_seconds=low, max_seconds=high)
        dev_names = {f"spk{i:03d}" for i in range(args.speakers - args.dev_speakers, args.speakers)}
        for name, part in (("train", [e for e in entries if e.speaker not in dev_names]),
                           ("dev", [e for e in entries if e.speaker in dev_names])):
            if part:
                output = Path(args.output) / name
                _report(make_shards(part, output, _options(args), source=f"synth seed={args.seed}",
                                    progress=not args.quiet, overwrite=args.overwrite), output)
    return 0
