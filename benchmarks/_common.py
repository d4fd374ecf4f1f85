"""Shared benchmark plumbing: timing, unit conversion, environment capture, result files.

Every unit conversion in the benchmarks goes through :func:`gbps` and :func:`tflops`.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Linear-layer shapes (out_features, in_features) of the LLaMA family.
LLAMA_SHAPES = {
    "7B": {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)},
    "13B": {"q/k/v/o": (5120, 5120), "gate/up": (13824, 5120), "down": (5120, 13824)},
    "70B": {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192), "down": (8192, 28672)},
}


def add_protocol_args(p) -> None:
    """The options of the SmolLM2 + Austen protocol (``ppl_table.py``, ``bitmap_checkpoint.py``)."""
    p.add_argument("--model", default=None, help="local HF model folder (default: the built-in SmolLM2-135M)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens of Emma (default 8192)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default=None)


def load_protocol(args):
    """``(device, dtype, model, tokenizer, calib, windows)`` for :func:`add_protocol_args`' options.

    The model in fp16 on CUDA, fp32 on a CPU; calibration windows (seed 0) from the Austen
    novels other than Emma; evaluation windows from Emma.
    """
    from wanda_kernels.llm import data, models

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tok = models.load_model(args.model, dtype=dtype, device=device)
    calib = data.sample_windows(tok, data.load_corpus(split="calib"), args.nsamples, args.seqlen, seed=0)
    windows = data.eval_windows(tok, data.load_corpus(split="eval"), args.seqlen, max_tokens=args.eval_tokens)
    return device, dtype, model, tok, calib, windows


def protocol_info(args, windows, script: str, argv) -> dict:
    """What a protocol run records: model, calibration and evaluation sizes, the command."""
    return dict(model=args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", nsamples=args.nsamples,
                seqlen=args.seqlen, eval_tokens=int(windows.numel()),
                command=f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]))


def gbps(nbytes: float, ms: float) -> float:
    """Bytes moved in ``ms`` milliseconds, in GB/s (10**9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    """Floating-point operations in ``ms`` milliseconds, in TFLOP/s (10**12 per second)."""
    return flops / (ms * 1e-3) / 1e12


def bench_ms(fn, device: torch.device, *, cpu_reps: int = 5, cpu_max_s: float = 20.0) -> float:
    """Median time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (median, L2 flushed between runs). CPU: the median
    of ``cpu_reps`` wall-clock runs after one warm-up, fewer if a run is slow.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > cpu_max_s:
            break
    return statistics.median(times)


def capture_graph(body, device: torch.device, warmup=None):
    """``(graph, body's result)``: ``body()`` captured in a CUDA graph, after one ``warmup()``
    (default: ``body()``) on a side stream, so that JIT compilation, workspaces and handles
    are created outside the capture, as ``torch.cuda.graphs`` asks."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        (warmup or body)()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = body()
    graph.replay()
    torch.cuda.synchronize(device)
    return graph, result


def graph_ms(fns, device: torch.device, *, min_calls: int = 64, repeats: int = 10) -> float:
    """Median GPU time per call of ``fns`` (called round-robin), replayed from one CUDA graph.

    For short kernels, where a Python loop would time the host: ``fns`` are closures
    over different copies of the operands (together larger than L2, so each call reads
    its weight from HBM as a decoding model does), captured ``ceil(min_calls / len(fns))``
    times over in one graph whose replays are timed with CUDA events.
    """
    rounds = -(-min_calls // len(fns))

    def one_pass():
        for fn in fns:
            fn()

    def body():
        for _ in range(rounds):
            one_pass()

    graph, _ = capture_graph(body, device, warmup=one_pass)
    times = [event_ms(graph.replay) / (rounds * len(fns)) for _ in range(repeats)]
    del graph
    return statistics.median(times)


def event_ms(fn) -> float:
    """GPU time of the work ``fn()`` enqueues on the current stream, in ms (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def rotation_copies(nbytes: int, device: torch.device, cap: int = 64) -> int:
    """How many copies of an operand of ``nbytes`` together exceed 4x the GPU's L2 (at least 1)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    return max(1, min(cap, -(-4 * l2 // max(nbytes, 1))))


def peak_hbm_gbps(device: torch.device) -> float | None:
    """The GPU's spec-sheet memory bandwidth in GB/s (double data rate x bus width), or None.

    From ``torch.cuda.get_device_properties`` where this torch reports the memory clock
    and bus width; H100 SXM: 2 x 2619 MHz x 5120 bit / 8 = 3352 GB/s.
    """
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    bytes_per_s = 2 * clock_khz * 1e3 * bus_bits / 8
    return gbps(bytes_per_s, 1000.0)


def copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write) on ``nbytes``, in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return gbps(2 * nbytes, ms)


def environment(device: torch.device) -> dict:
    """What the numbers were measured on: device name, library versions, host."""
    info = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device_type": device.type,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, sm_count=props.multi_processor_count)
    else:
        info.update(device_name=_cpu_name(), cpu_threads=torch.get_num_threads())
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def write_results(name: str, env: dict, rows: list[dict], out_dir: Path | None = None, *,
                  path: Path | None = None) -> Path:
    """Write ``{"environment": env, "results": rows}`` to a new ``<out_dir>/<name>_<device>_<date>.json``.

    The name carries the device and the UTC date of the run, with ``-2``, ``-3``... when
    taken: a run never overwrites an earlier one, so the committed results that the README
    cites stay as they are. Files written beside it (``.md``, ``.csv``, ``.png``) take its
    name with their suffix. ``path``: this run's file from an earlier call, rewritten (a
    run that saves after every case).
    """
    if path is not None:
        path.write_text(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")
        return path
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env.get("device_name", env["device_type"]).lower()).strip("-")
    date = env.get("timestamp_utc", "")[:10] or _dt.date.today().isoformat()
    stem = f"{name}_{slug}_{date}"
    path = out_dir / f"{stem}.json"
    n = 1
    while any(path.with_suffix(s).exists() for s in (".json", ".md", ".csv", ".png")):
        n += 1
        path = out_dir / f"{stem}-{n}.json"
    path.write_text(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` is ``[(key, header, format spec)]``."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` with the file-only Agg backend, or None (and one warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import logging

        logging.getLogger("benchmarks").warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt
