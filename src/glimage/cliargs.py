"""What every `glimage` command shares, below the commands that use it (cli.py, train/cli.py, bench.py,
serve/): the argument parser that suggests the closest option, the device and fast-mode options, how a
--model argument names a model, and the error contract (run).

Errors: bad input (glimage.validate.InputError: arguments, files, model folders) exits with status 2 and one
line naming the value and the allowed range; anything else is a bug and exits with 1, a short message and a
hint to rerun with --debug for the traceback. SIGTERM ends a run like Ctrl-C: cleanly, no partial file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .validate import InputError


def model_spec(model: str | None, arg: str = "--model") -> tuple[str, Path | None]:
    """"random:PRESET" -> (preset, None); a folder -> ("", path); None -> the shipped model. `arg` names the
    argument the value came from in error messages (--model, or info's PATH)."""
    from .pipeline import DEFAULT_MODEL
    param = arg.lstrip("-").lower()
    if model and model.startswith("random:"):
        from .config import PRESETS
        preset = model[len("random:"):]
        if preset not in PRESETS:
            raise InputError(f"{arg} {model!r}: unknown preset {preset!r}; presets: "
                             f"{', '.join('random:' + p for p in PRESETS)}", param)
        return preset, None
    path = Path(model) if model else DEFAULT_MODEL
    if not (path / "vision_language_encoder").is_dir():
        what = "does not exist" if not path.exists() else "is not a GLM-Image folder (no vision_language_encoder/)"
        other = "random:PRESET" if arg == "--model" else "an image made by glimage generate"
        raise InputError(f"{arg} {str(path)!r} {what}; name the folder of an official or exported model "
                         f"(e.g. the zai-org/GLM-Image download), or {other}", param)
    return "", path


def load_pipeline(args, preset: str, folder: Path | None):
    """(pipeline, torch threads): --model on --device/--dtype with --offload, --compile and the fast modes, as
    the generating commands load it; --threads is applied first."""
    from . import backends
    from .device import set_threads

    threads = set_threads(args.threads)
    backend = getattr(args, "backend", "torch")
    if backend == "mindspore":
        from .mindspore.pipeline import set_cpu_threads
        set_cpu_threads(threads)
    if preset:  # any preset with random weights: smoke tests and benchmarks
        pipe = backends.from_config(preset, backend, seed=0, device=args.device, dtype=args.dtype)
    else:
        pipe = backends.from_pretrained(folder, backend, device=args.device, dtype=args.dtype, offload=args.offload)
    pipe.set_progress_bar_config(disable=args.quiet)
    if args.compile:
        pipe.enable_compile()
    pipe.enable_fast(args.step_cache, args.ar_int8)
    return pipe, threads


def _threads(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor an integer") from None
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"{n} is out of range: 1 to 1024, or auto")
    return n


def device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto, cpu, cuda[:N], npu[:N], mps (default: the best available)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default auto: bf16 on GPU/NPU; on the CPU bf16 "
                   "for a model stored in bf16 where the CPU has AMX, else fp32)")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="CPU threads for torch (default auto: the CPUs idle now, at least 1; OMP_NUM_THREADS, when "
                        "set, wins). More threads than free cores make every op wait for the slowest one")


def fast_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-cache", type=float, default=None, metavar="T", help="opt-in: skip DiT blocks on steps "
                   "whose first block barely changes (threshold T: 0.2-0.3 gave 1.5-1.7x with no checker loss on "
                   "the shipped model; see README)")
    p.add_argument("--ar-int8", action="store_true", help="opt-in: weight-only int8 AR weights (the decode "
                   "reads a quarter of the bytes; other tokens, so another image)")


class Parser(argparse.ArgumentParser):
    """argparse whose refusal of an unknown option names the closest valid one ("did you mean --seed?").
    Subparsers are of this class too, so `main` has the subcommand's parser report unknown arguments, with
    the subcommand's usage and options."""

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message += self._hint(message[len(prefix):].split())
        super().error(message)

    def _hint(self, extras: list[str]) -> str:
        import difflib
        options = [o for o in self._option_string_actions if o.startswith("--")]
        flags = [x.split("=", 1)[0] for x in extras if x[:1] in self.prefix_chars and len(x) > 1]
        if not flags:  # e.g. glimage generate a red circle
            return " (quote an argument that contains spaces)"
        close = {f: difflib.get_close_matches(f, options, n=1, cutoff=0.6) for f in flags}
        found = [f"{m[0]}" + (f" for {f}" if len(flags) > 1 else "") for f, m in close.items() if m]
        return f" (did you mean {', '.join(found)}?)" if found else ""


def leaf(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)parser of the command `args` came from: glimage generate's, glimage eval shapes', ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if name in action.choices:
                return leaf(action.choices[name], args)
    return parser


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary files are removed on the way out


def run(prog: str, fn, debug: bool = False) -> int:
    """Run `fn()` with the CLI's error contract (see the module docstring)."""
    debug = debug or os.environ.get("GLIMAGE_DEBUG", "") not in ("", "0")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread
            pass
    try:
        return fn()
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `glimage info | head`: the reader is done, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as e:  # noqa: BLE001 - the one place that turns a bug into a short message
        if debug:
            raise
        print(f"{prog}: unexpected error: {type(e).__name__}: {e}\n(this is a bug; rerun with --debug for the "
              "traceback, and report it)", file=sys.stderr)
        return 1
