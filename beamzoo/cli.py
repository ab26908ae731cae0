"""The ``beamzoo`` command: ``beamzoo flink fetch|up|down|status``."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] != "flink":
        print("usage: beamzoo flink {fetch,up,down,status} [options]\n"
              "  (to score images: python pipelines/score_images.py --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from beamzoo.runners.flink import main as flink
    return flink(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
