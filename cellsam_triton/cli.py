"""`cellsam-triton` console script: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so the client
commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import UserError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("cellsam_triton.export.command", "export a checkpoint to ONNX and a Triton model repository"),
    "serve": ("cellsam_triton.server", "run the embedded tritonserver on a model repository"),
    "segment": ("cellsam_triton.client.command", "segment images through a running server"),
    "eval": ("cellsam_triton.client.evaluate", "measure accuracy on a DSB-layout data set"),
    "train-detector": ("cellsam_triton.export.train_detector", "train CellFinder-lite on DSB-layout data"),
    "train-decoder": ("cellsam_triton.export.train_decoder", "fine-tune LiteMedSAM's mask decoder on DSB-layout data (box and point prompts)"),
    "select-grid": ("cellsam_triton.export.grid_selection", "choose the grid's thresholds for decoder weights on training images"),
    "finetune": ("cellsam_triton.export.finetune", "train CellSeg1 LoRA adapters from one annotated image (LiteMedSAM base)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with ``only``, just that subcommand's module is imported for its options."""
    parser = argparse.ArgumentParser(prog="cellsam-triton", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if only in (None, name):
            _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user-facing failures print one line on stderr and exit non-zero."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_load(args._module).run(args) or 0)
    except UserError as exc:
        print(f"cellsam-triton {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cellsam-triton {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
