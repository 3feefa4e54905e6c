"""The ``speechssl`` console entry: ``speechssl data <command> ...`` runs the data tools,
``speechssl extract ...`` the feature extraction (:mod:`speechssl.extract`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("data", "extract"):
        print("usage: speechssl data {make-shards,inspect,split,synth} ... | speechssl extract MODEL INPUT... "
              "--output DIR", file=sys.stderr)
        return 2
    if argv[0] == "extract":
        from speechssl.extract import main as extract_main

        return extract_main(argv[1:])
    from data_tools.cli import main as data_main

    return data_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
