"""``python -m data_tools <command>``, an alias of ``speechssl data <command>``: make-shards, inspect,
split, synth. The arguments are defined in :mod:`speechssl_cli.data`.

make-shards and synth lock their output folder while they write, and replace a finished shard set
there only with ``--overwrite``; split never writes over its input manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The shard builder and the library are imported where they are used, so that --help answers
# without importing torch or webdataset.


def _options(args: argparse.Namespace):
    """The ``ShardOptions`` of the arguments (ValueError for a bad prefix)."""
    from data_tools.shards import ShardOptions

    return ShardOptions(sample_rate=args.sample_rate, max_count=args.max_count, max_megabytes=args.max_megabytes,
                        max_hours=args.max_hours, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                        workers=args.workers, prefix=args.prefix)


def _report(index: dict, output: Path) -> None:
    t = index["totals"]
    print(f"{output}: {t['shards']} shards, {t['num_samples']} utterances, {t['hours']:.3f} h, "
          f"{t['speakers']} speakers; skipped {t['skipped']} of {t['inputs']} inputs {index['skipped'] or ''}"
          + (f" (listed in {output / 'skipped.tsv'})" if t["skipped"] else ""))


def main(argv: list[str] | None = None) -> int:
    """``python -m data_tools ...``; the exit status."""
    from speechssl_cli import parser_for

    return run(parser_for("data", "python -m data_tools").parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``speechssl data`` command; errors in the input are one line, exit 2."""
    from speechssl.locking import FolderLocked

    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, FolderLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from data_tools.shards import make_shards

    if args.command == "make-shards":
        from speechssl.data.manifest import read_source

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
