"""`glimage train CONFIG [--set key=value ...]`: the command line of the training loop.

CONFIG is a TOML/YAML file or a shipped recipe name (tiny-vae, tiny-tokenizer, tiny-ar, tiny-decoder).
Rerunning the same command with the same `out` resumes from its last checkpoint; the same command under
`torchrun --nproc_per_node N -m glimage.train.cli CONFIG ...` (or `torchrun $(which glimage) train ...`)
trains data-parallel with FSDP2 and the same global batch.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from ..cliargs import Parser  # an unknown option gets "did you mean ...?"
    p = Parser(prog="glimage train", description="train a GLM-Image stage (vae, tokenizer, ar, decoder); "
               "rerun the same command to resume")
    p.add_argument("config", help="a TOML/YAML file or a shipped recipe name (e.g. tiny-ar)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key (TOML value syntax), e.g. --set steps=20 lr=3e-4 "
                        "model.ar.text.num_hidden_layers=2; repeatable")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    return p


def main(argv: list[str] | None = None, handle_errors: bool = True) -> int:
    """handle_errors: apply the CLI's error contract (exit 2 for bad input); `glimage train` applies it itself."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from .config import load_config
        cfg = load_config(args.config, args.overrides)
        from ..backends import train
        export = train(cfg)
        if int(os.environ.get("RANK", 0)) == 0:
            print(export)
        return 0

    if not handle_errors:
        return run()
    from ..cliargs import run as run_with_errors
    return run_with_errors("glimage train", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
