"""``cmbdetect models``: list, show, verify and select installed model versions."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "models"
HELP = "list, show, verify or select model versions (bundled and retrained)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="every installed version (* = selected)")
    listing.add_argument("--verify", action="store_true", help="also check every file's sha256")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = actions.add_parser("show", help="print a package's model.json (provenance, metrics)")
    show.add_argument("name", metavar="NAME", help="name, name-version or folder")
    verify = actions.add_parser("verify", help="check a package's files against their sha256")
    verify.add_argument("name", metavar="NAME", help="name, name-version or folder")
    select = actions.add_parser("select", help="use this version in CMBDetect (verified first)")
    select.add_argument("name", nargs="?", metavar="NAME", help="name, name-version or folder")
    select.add_argument("--default", action="store_true", help="go back to the bundled default model")
    select.add_argument("--previous", action="store_true", help="go back to the previously selected model")


def run(args: argparse.Namespace) -> int:
    from CMBDetectLib import model_registry as registry
    from CMBDetectLib.errors import InputError
    from CMBDetectLib.model_package import resolve_model

    action = getattr(args, "action", None) or "list"
    if action == "list":
        versions = registry.list_versions(verify=getattr(args, "verify", False))
        if getattr(args, "json", False):
            print(json.dumps([v.to_dict() for v in versions], indent=2))
            return 0
        if not versions:
            print("no model installed (run `make model`, or retrain one with CMBDetectTraining)")
            return 0
        for v in versions:
            parent = f" from {v.parent.get('name')}-{v.parent.get('version')}" if v.parent else ""
            after = registry.describe_metrics(((v.metrics.get("validation") or {}).get("after")
                                               or {}).get("clusterwise"))
            status = f"  [{v.problem}]" if v.problem else ""
            print(f"{'*' if v.selected else ' '} {v.label:<32} {v.source:<7} {v.created[:10]:<10}{parent}"
                  + (f"  ({after})" if after else "") + status)
        selected = registry.selected_model_path()
        if selected is None:
            print("(no selection: CMBDetect uses the bundled default)")
        return 1 if any(v.problem for v in versions) else 0
    if action == "show":
        path = resolve_model(args.name)
        print((path / "model.json").read_text(encoding="utf-8"), end="")
        problem = registry.model_problem(path)
        if problem:
            print(f"cmbdetect models: warning: {problem}", file=sys.stderr)
            return 1
        return 0
    if action == "verify":
        package = registry.verify_model(args.name)   # ModelError -> one line + exit 1 (cli.py)
        print(f"{package.label}: OK ({len(package.manifest.get('networks', {}))} weight files verified)")
        return 0
    if action == "select":
        if args.default:
            registry.clear_selection()
            print("CMBDetect now uses the bundled default model")
            return 0
        if args.previous:
            package = registry.select_previous()
            print(f"CMBDetect now uses {package.label if package else 'the bundled default model'}")
            return 0
        if not args.name:
            raise InputError("name a model to select, or use --default / --previous")
        package = registry.select_model(args.name)
        print(f"CMBDetect now uses {package.label} ({package.path})")
        return 0
    raise InputError(f"unknown action {action!r}")
