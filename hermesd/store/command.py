"""The ``hermesd convert`` subcommand: options, progress lines and the report (torch loads only when it runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hermesd import progressbar
from hermesd.errors import HermesError
from hermesd.units import format_size


def add_convert(commands) -> None:
    """Register ``hermesd convert`` on the ``hermesd`` command's subparsers."""
    convert = commands.add_parser("convert", help="convert a model into a layer store (one file per stage)")
    convert.add_argument("paths", nargs="+", metavar="PATH",
                         help="SRC DEST (a Hugging Face directory or .gguf file, then the store), or only DEST "
                              "with --random-config")
    convert.add_argument("--gguf-file", help="name of the GGUF file inside SRC")
    convert.add_argument("--dequantize", action="store_true",
                         help="GGUF: store float weights (through transformers, whole model in memory) instead of "
                              "keeping the file's quantization")
    convert.add_argument("--random-config", type=Path, help="config.json of an architecture: random weights")
    convert.add_argument("--seed", type=int, default=0, help="seed for --random-config (default 0)")
    convert.add_argument("--dtype", help="stored dtype: fp32, bf16 or fp16 (default: the source's)")
    convert.add_argument("--quantize", choices=("int8", "int4"),
                         help="store large Linear weights quantized: int8 (symmetric, one scale per row) or "
                              "int4 (affine, groups of 32 along the input); embeddings, norms, tied and small "
                              "weights stay float")
    convert.add_argument("--group-size", type=int, metavar="N",
                         help="with --quantize: weights per scale along the input (int4: 32, 64, 128 or 256)")
    convert.add_argument("--force", action="store_true", help="replace DEST if it exists")
    convert.add_argument("--quiet", action="store_true", help="no progress bar or lines (transformers' bars too)")
    convert.add_argument("--json", action="store_true", help="print the summary as JSON")
    convert.set_defaults(handler=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    bars = progressbar.configure(args.quiet)  # before transformers loads: it reads the switches then
    from hermesd.memory import return_large_frees
    from hermesd.store.convert import convert, open_source

    return_large_frees()  # each stage's tensors are freed before the next: give the memory back

    if args.random_config is not None and len(args.paths) != 1:
        raise HermesError("with --random-config give only DEST")
    if args.random_config is None and len(args.paths) != 2:
        raise HermesError("give SRC and DEST")
    src = None if args.random_config is not None else Path(args.paths[0])
    dest = Path(args.paths[-1])
    if dest.exists() and not args.force:  # refuse before the (possibly slow) source is opened
        raise HermesError(f"{dest} already exists; pass --force to replace it")
    source = open_source(src, gguf_file=args.gguf_file, random_config=args.random_config, seed=args.seed,
                         dequantize=args.dequantize, quantize=args.quantize, group_size=args.group_size)
    if bars:
        with progressbar.StageBar(f"writing {dest.name}") as bar:
            report = convert(source, dest, dtype=args.dtype, force=args.force,
                             progress=lambda done, total, name, nbytes: bar.advance(name, nbytes, total))
    else:
        progress = None if args.quiet else _print_progress
        report = convert(source, dest, dtype=args.dtype, force=args.force, progress=progress)
    if args.json:
        print(json.dumps(report.__dict__))
    else:
        print(f"wrote {report.store}: {report.stages} stages, {format_size(report.weight_bytes)} of weights "
              f"in {report.seconds:.1f} s; peak memory {format_size(report.peak_rss_bytes)}")
        _print_quant_errors(report.quant_errors)
    return 0


def _print_quant_errors(errors: dict[str, float]) -> None:
    """Per-stage relative RMS error of ``--quantize`` (worst first), then the range."""
    if not errors:
        return
    print("quantization error (relative RMS of each stage's quantized weights):")
    for name, error in sorted(errors.items(), key=lambda item: -item[1]):
        print(f"  {name:<40} {100 * error:6.2f} %")


def _print_progress(done: int, total: int, name: str, nbytes: int) -> None:
    print(f"[{done}/{total}] {name} ({format_size(nbytes)})", file=sys.stderr, flush=True)
