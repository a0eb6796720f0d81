"""Where every benchmark writes its JSON: one shape, with the run's config and machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch


def write_report(args: argparse.Namespace, name: str, results: object, **extra: object) -> Path:
    """`<args.output>/<name>.json` = {config (CLI options + machine), results, extra...}."""
    machine = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    config = {k: v for k, v in vars(args).items() if k != "func"} | machine
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"config": config, "results": results, **extra}, indent=2))
    print(f"\nwrote {path}")
    return path
