"""The ``cmbdetect`` command line (also ``python -m CMBDetectLib``)."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Sequence

from CMBDetectLib import __version__, commands
from CMBDetectLib.errors import CMBDetectError

# Order in ``cmbdetect --help``; any other command module is listed after these.
PREFERRED_ORDER = ["detect", "evaluate", "synth", "train", "export", "models", "summary"]


def _command_modules() -> list:
    modules = [importlib.import_module(f"{commands.__name__}.{info.name}")
               for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_")]
    rank = {name: index for index, name in enumerate(PREFERRED_ORDER)}
    return sorted(modules, key=lambda module: (rank.get(module.NAME, len(rank)), module.NAME))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmbdetect",
        description="Detect cerebral microbleeds on SWI / T2*-GRE / QSM MRI (two-stage deep learning).")
    parser.add_argument("--version", action="version", version=f"cmbdetect {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CMBDetectError as error:
        print(f"cmbdetect {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cmbdetect {args.command}: cancelled", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"cmbdetect {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except OSError as error:
        # A full disk or a read-only folder: one clear line, no traceback.
        if os.environ.get("CMBDETECT_DEBUG"):
            raise
        print(f"cmbdetect {args.command}: error: {error.strerror or error}"
              + (f": {error.filename}" if error.filename else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
