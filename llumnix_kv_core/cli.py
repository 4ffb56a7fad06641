"""``llumnix-kv`` command line: ``plugins`` (what is installed and usable) and the commands plugins contribute.

``demo`` runs an engine adapter's ``demo`` command, ``bench`` a transport's ``bench`` command and
``run KIND NAME COMMAND`` any provider's command (see ``PluginCommand`` in ``llumnix_kv_core.providers``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from llumnix_kv_core.errors import LlumnixKVError
from llumnix_kv_core.errors import PluginError
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
        rows = [[r.kind, r.name or "-", r.plugin, f"{r.distribution} {r.version}", r.status, r.reason or r.summary]
                for r in records]
        print(_table(rows, ["kind", "name", "plugin", "distribution", "status", "detail"]))
    return 1 if any(r.status == "failed" for r in records) and args.strict else 0


def _run_command(kind: str, provider: Any, command: str, argv: list[str]) -> int:
    for c in provider.commands:
        if c.name == command:
            return c.run(argv)
    have = ", ".join(c.name for c in provider.commands) or "none"
    msg = f"{kind} {provider.name!r} has no {command!r} command (its commands: {have})"
    raise PluginError(msg)


def cmd_demo(args: argparse.Namespace) -> int:
    return _run_command("engine", get_registry().engine(args.engine), "demo", args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    reg = get_registry()
    if args.transport:
        return _run_command("transport", reg.transport(args.transport), "bench", args.rest)
    benches = [p for p in reg.providers["transport"].values() if any(c.name == "bench" for c in p.commands)]
    if not benches:
        msg = "no loaded transport has a bench command (`llumnix-kv plugins` lists the transports)"
        raise PluginError(msg)
    if len(benches) > 1:
        names = ", ".join(p.name for p in benches)
        msg = f"several transports have a bench command ({names}): pick one with --transport"
        raise PluginError(msg)
    return _run_command("transport", benches[0], "bench", args.rest)


def cmd_run(args: argparse.Namespace) -> int:
    return _run_command(args.kind, get_registry().provider(args.kind, args.name), args.cmd, args.args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llumnix-kv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list plugins with kind, distribution, version and status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.set_defaults(func=cmd_plugins)
    d = sub.add_parser("demo", allow_abbrev=False, help="prefill/decode separation on real engines, against a "
                       "colocated engine; other options go to the engine's demo (llumnix-kv run engine vllm demo "
                       "--help lists them)")
    d.add_argument("--engine", default="vllm", help="the engine adapter whose demo runs (default vllm)")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", add_help=False, allow_abbrev=False,
                       help="transfer rates of scattered KV blocks against ceilings measured in the same run: the "
                       "bench of a transport (llumnix-kv bench [--transport NAME] --help)")
    b.add_argument("--transport", help="the transport whose bench runs (default: the one transport that has one)")
    b.set_defaults(func=cmd_bench)
    r = sub.add_parser("run", help="run a command a plugin contributes (llumnix-kv run transport shm bench --help)")
    r.add_argument("kind", help="plugin kind: transport, layout, engine, scenario, ...")
    r.add_argument("name", help="provider name (llumnix-kv plugins lists them)")
    r.add_argument("cmd", metavar="command", help="the provider's command")
    r.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    r.set_defaults(func=cmd_run)
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
