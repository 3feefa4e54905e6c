"""The ``speechssl`` console entry: ``speechssl data <command> ...`` runs the data tools."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("data",):
        print("usage: speechssl data {make-shards,inspect,split,synth} ...", file=sys.stderr)
        return 2
    from data_tools.cli import main as data_main

    return data_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
