"""``llumnix-kv`` command line: ``plugins`` (what is installed and usable), ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from llumnix_kv_core.errors import LlumnixKVError
from llumnix_kv_core.manager import get_registry


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<" + str(w) + "}" for w in widths)
    return "\n".join([line.format(*header), line.format(*["-" * w for w in widths])]
                     + [line.format(*map(str, r)) for r in rows])


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = get_registry()
    records = sorted(reg.records, key=lambda r: (r.kind, r.name, r.plugin))
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=1))
    else:
        rows = [[r.kind, r.name or "-", r.plugin, f"{r.distribution} {r.version}", r.status, r.reason]
                for r in records]
        print(_table(rows, ["kind", "name", "plugin", "distribution", "status", "detail"]))
    return 1 if any(r.status == "failed" for r in records) and args.strict else 0


def cmd_demo(args: argparse.Namespace) -> int:
    provider = get_registry().engine(args.engine)
    target = provider.extras.get("demo")
    if not target:
        print(f"engine adapter {args.engine!r} has no demo", file=sys.stderr)
        return 2
    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(args.rest) or 0)


def cmd_bench(args: argparse.Namespace) -> int:
    from llumnix_kv_core.bench import main as bench_main

    return bench_main(args.rest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llumnix-kv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list plugins with kind, distribution, version and status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.set_defaults(func=cmd_plugins)
    d = sub.add_parser("demo", help="prefill/decode separation on real engines, against a colocated engine; "
                       "other options go to the engine's demo (llumnix-kv demo --help-demo)")
    d.add_argument("--engine", default="vllm")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", add_help=False, help="transfer rates of scattered KV blocks against ceilings measured "
                       "in the same run (llumnix-kv bench --help)")
    b.set_defaults(func=cmd_bench)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("demo", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = [a for a in rest if a != "--"]
    try:
        return args.func(args)
    except LlumnixKVError as exc:
        print(f"llumnix-kv: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
