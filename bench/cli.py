"""The `longlive-bench` command (also `python -m longlive_triton.bench`): kernel and end-to-end benchmarks."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import e2e, e2e_stock, e2e_stock2, e2e_vae, kernels, multi_gpu, report_html, vae
from .measure import DTYPES


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
    e.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model and latent dtype (default bf16)")
    e.add_argument("--seed", type=int, default=0, help="weights, noise and prompt seed (default 0)")
    e.add_argument("--switch-block", type=int, default=None, metavar="N",
                   help="switch to a second prompt at block N (timed apart from the steady median)")
    e.add_argument("--profile", action="store_true",
                   help="also profile two extra blocks per row: time by kind of work, and the GPU's idle share")
    e2e_vae.add_arguments(e)
    e2e_stock.add_arguments(e)
    e.set_defaults(run=run_e2e)

    e.add_argument("--html", metavar="PATH", help="also write the time-budget report as a self-contained HTML page "
                   "(bench/report_html.py); the JSON goes beside it unless --json names a file")

    for p in (k, e):
        p.add_argument("--json", metavar="PATH", help="write the run as one JSON document")
        p.add_argument("--append", metavar="PATH", help="append the run as one line of a JSON-lines log")
    vae.add_parser(sub)

    r = sub.add_parser("report", help="render a saved e2e JSON document (or the last run of a JSON-lines log) as HTML")
    r.add_argument("json", metavar="JSON", help="what `e2e --json` (or --append) wrote")
    r.add_argument("--html", metavar="PATH", required=True, help="the HTML page to write")
    r.set_defaults(run=report)
    _add_devices(sub)
    return parser


def run_e2e(args) -> int:
    """`e2e`: the checks every model shares, then the run of the model asked for: a stock class
    (bench/e2e_stock.py), or the reference generator with the VAE (bench/e2e_vae.py) or alone (bench/e2e.py)."""
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    try:
        problem = e2e.check_arguments(args, on_cuda) or e2e_stock.check_arguments(args)
        if problem is not None:
            raise e2e.UsageError(problem)
        configs = e2e.row_configs(args, on_cuda)
        if args.model == "stock2":  # LongLive 2.0's class, driven by its own pipeline
            return e2e_stock2.run(args, configs, device)
        if args.model in e2e_stock.MODELS:
            return e2e_stock.run(args, configs, device)
        inputs = e2e.reference_inputs(args, device)
    except e2e.UsageError as err:
        print(f"e2e: {err}", file=sys.stderr)
        return 2
    return (e2e_vae.run if args.vae else e2e.run)(args, configs, inputs)


def report(args) -> int:
    try:
        out = report_html.render_file(args.json, args.html)
    except (OSError, ValueError) as e:  # a missing or unreadable file, bad JSON, not an e2e document
        print(f"report: {args.json}: {e}", file=sys.stderr)
        return 2
    print(f"report: wrote {out}")
    return 0


def _add_devices(sub) -> None:
    """--devices on e2e and vae: above 1, bench/multi_gpu.py runs them over that many ranks (torchrun)."""
    helps = {"e2e": "ranks to spread each block's tokens over (sequence parallel; launch with torchrun "
                    "--nproc-per-node N); default 1",
             "vae": "2: the decode on rank 1, pipelined with the generator on rank 0 (launch with torchrun "
                    "--nproc-per-node 2); default 1"}
    for name, text in helps.items():
        sub.choices[name].add_argument("--devices", type=int, default=1, choices=(1, 2) if name == "vae" else None,
                                       metavar="N", help=text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "devices", 1) > 1:
        return multi_gpu.run(args)
    html = getattr(args, "html", None) if args.command == "e2e" else None
    if html is not None:
        if not Path(html).resolve().parent.is_dir():
            print(f"e2e: --html {html}: its folder does not exist", file=sys.stderr)
            return 2
        args.json = args.json or str(Path(html).with_suffix(".json"))
    rc = args.run(args)
    if html is not None and rc in (0, 1):  # 1: some rows failed; the report shows them
        print(f"e2e: wrote {report_html.render_file(args.json, html)} (from {args.json})")
    return rc
