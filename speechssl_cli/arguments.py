"""What the parsers of every subcommand share: the help format, the job arguments and value types.

Nothing here, nor in the modules that define the parsers, imports torch or the library: a parser
is built, and ``--help`` answered, in the time Python takes to start.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (their examples keep their lines); every option's help ends with its
    default, except flags, required options and options whose absence is the default (``None``,
    an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        absent = default is None or default is False or default is argparse.SUPPRESS or default == []
        shown = action.option_strings or action.nargs in ("?", "*")  # positionals that may be left out
        if "%(default)" in text or absent or action.required or not shown:
            return text
        return f"{text} (default: %(default)s)"


def new_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_job_arguments(parser: argparse.ArgumentParser, config_help: str, example: str) -> None:
    """A training job's arguments: the config, dotted overrides, --print-config and --dry-run."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"dotted overrides applied after the config, in order, e.g. {example}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the file with the overrides applied) as YAML and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, the shards and the DeepSpeed settings, print the plan (model size, "
                             "data, updates, batch, output folder, device) and exit without training or writing")
    add_launcher_arguments(parser)


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--local_rank``, which the DeepSpeed launcher passes to every process (the job reads
    ``LOCAL_RANK`` from the environment instead); hidden from the help."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, dest="local_rank",
                        help=argparse.SUPPRESS)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs: auto is the GPU when there is one")


def floats(text: str) -> list[float]:
    """``0,0.5,1`` -> ``[0.0, 0.5, 1.0]``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {text!r}") from None


def layers(text: str) -> list[int] | str:
    """``--layers``: ``6,12``, ``all`` or ``last``."""
    if text in ("all", "last"):
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers: indices like 6,12, or all, or last; got {text!r}") from None
