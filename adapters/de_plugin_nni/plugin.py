"""The core's entry point into this adapter (group ``de_plugin``): adds ``de-plugin nni CONFIG``.

Loaded by the core even when NNI is missing, so nothing here imports NNI at module level.
"""
from __future__ import annotations

import argparse

from de_plugin.hookspecs import hookimpl


def _run(args: argparse.Namespace) -> int:
    from . import require_nni

    require_nni()
    from .config import run_config

    run_config(args.config, out_dir=args.out, overwrite=args.overwrite)
    return 0


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("nni", help="run an NNI compression config (YAML or JSON) end to end")
    p.add_argument("config", help="path to the config file")
    p.add_argument("--out", default="runs/nni", help="where to write the report (refused if it holds one)")
    p.add_argument("--overwrite", action="store_true", help="replace the report already in --out")
    p.set_defaults(func=_run)
