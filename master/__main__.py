"""``python -m master status --base BASE [--json] [--watch]``."""
from __future__ import annotations

import argparse
import json
import sys
import time

EPILOG = """examples:
  python -m master status --base /shared/base
  python -m master status --base /shared/base --watch      # refresh every 2 s, like watch nvidia-smi
  python -m master status --base /shared/base --json | jq '.runs'"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m master", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="agents and runs of a spool", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--base", required=True, help="spool folder")
    s.add_argument("--json", action="store_true", help="print JSON for scripts")
    s.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="S", help="refresh every S seconds (default 2)")
    s.add_argument("--dead-after", type=float, default=20.0, help="heartbeat age that marks an agent dead")
    args = p.parse_args(argv)

    from jobs.paths import Spool
    from master.liveness import Liveness
    from master.status import gather, render

    spool = Spool(args.base)
    if not spool.base.is_dir():
        print(f"python -m master status: {spool.base} does not exist (no spool there yet)", file=sys.stderr)
        return 2
    live = Liveness(spool, args.dead_after)
    color = sys.stdout.isatty()
    try:
        while True:
            data = gather(spool, args.dead_after, live)
            text = json.dumps(data, indent=1) if args.json else render(data, color)
            if args.watch and color:
                sys.stdout.write("\033[H\033[2J")
            print(text, flush=True)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
