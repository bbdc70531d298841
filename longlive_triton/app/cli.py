"""The `longlive-triton` command: `generate` (prompts in, an mp4 out) and `serve` (a live demo in the browser).

Without a GPU the Triton kernels run in Triton's CPU interpreter. That choice has to be made before
any kernel is defined, so this module imports nothing of the package's kernels at import time and
sets TRITON_INTERPRET=1 (unless the variable is set already) before it loads the commands.
"""
from __future__ import annotations

import argparse
import os
import sys


def _use_interpreter_without_gpu() -> str | None:
    import torch

    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return None
    if any(name.startswith("longlive_triton.kernels") for name in sys.modules):
        return "no GPU, and the kernels were imported before the interpreter could be chosen: patches will skip"
    os.environ["TRITON_INTERPRET"] = "1"
    return "no GPU: the Triton kernels run in Triton's CPU interpreter (slow: 10 to 30 s a block for the tiny model)"


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user can cause and fix: each is reported as one line, without a traceback."""
    from longlive_triton.loading.checkpoints import CheckpointError
    from longlive_triton.app.generate import UsageError
    from longlive_triton.app.mp4 import MissingWriterError, OutputError
    from longlive_triton.app.prompts import PromptError
    from longlive_triton.models.wan21_vae import VAECheckpointError
    from longlive_triton.app.embeddings import EmbeddingsError
    from longlive_triton.loading.weights import MissingWeightsError

    # FileNotFoundError: the LongLive checkout (--longlive-src); ImportError: its tokenizer's packages.
    return (CheckpointError, VAECheckpointError, EmbeddingsError, MissingWeightsError, MissingWriterError, OutputError,
            PromptError, UsageError, FileNotFoundError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    from longlive_triton.app import generate, serve

    parser = argparse.ArgumentParser(prog="longlive-triton", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video from prompts (with switch points) and write an mp4",
                       description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_arguments(g)
    g.set_defaults(run=generate.run)
    s = sub.add_parser("serve", help="stream frames to a browser as they are generated; switch prompts live",
                       description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_arguments(s)
    s.set_defaults(run=serve.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    note = _use_interpreter_without_gpu()
    parser = build_parser()
    args = parser.parse_args(argv)
    if note and getattr(args, "preset", None) != "stock":
        print(f"longlive-triton: {note}", file=sys.stderr)
    try:
        return args.run(args)
    except _user_errors() as e:
        print(f"longlive-triton {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
