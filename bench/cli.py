"""The `longlive-bench` command (also `python -m longlive_triton.bench`): kernel and end-to-end benchmarks."""
from __future__ import annotations

import argparse

from . import e2e, e2e_stock, kernels, vae


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longlive-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kernels", help="time every provider of every registered kernel case (CUDA only)")
    k.add_argument("--only", nargs="+", metavar="NAME", help="kernel families to run (default: all registered)")
    k.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up time per provider (default 25)")
    k.add_argument("--rep-ms", type=float, default=100, help="do_bench timed time per provider (default 100)")
    k.add_argument("--timing", choices=("graph", "eager"), default="graph",
                   help="graph: replay each call from a CUDA graph (kernel time, the default); "
                        "eager: launch from Python every time (includes launcher overhead)")
    k.set_defaults(run=kernels.run)

    e = sub.add_parser("e2e", help="stock reference vs patched models, ms per block and output difference")
    e.add_argument("--preset-model", choices=["longlive-1.3b", "tiny"],
                   help="model shapes (default: longlive-1.3b with a GPU, tiny without)")
    e.add_argument("--configs", nargs="*", default=["exact"], metavar="CONFIG",
                   help="patch presets or YAML paths, one row each, optionally with overrides "
                        "(e.g. exact,cuda_graphs=false); default: exact; none: stock only")
    e.add_argument("--blocks", type=int, default=16, help="blocks to generate (default 16)")
    e.add_argument("--warmup-blocks", type=int,
                   help="blocks left out of the statistics (default: until the KV window is full, 4 at defaults)")
    e.add_argument("--frames-per-block", type=int, default=3, help="latent frames per block (default 3)")
    e.add_argument("--dtype", choices=sorted(e2e.DTYPES), default="bf16", help="model and latent dtype (default bf16)")
    e.add_argument("--seed", type=int, default=0, help="weights, noise and prompt seed (default 0)")
    e.add_argument("--switch-block", type=int, default=None, metavar="N",
                   help="switch to a second prompt at block N (timed apart from the steady median)")
    e.add_argument("--profile", action="store_true",
                   help="also profile two extra blocks per row: time by kind of work, and the GPU's idle share")
    e2e_stock.add_arguments(e)
    e.set_defaults(run=e2e.run)

    for p in (k, e):
        p.add_argument("--json", metavar="PATH", help="write the run as one JSON document")
        p.add_argument("--append", metavar="PATH", help="append the run as one line of a JSON-lines log")
    vae.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
