"""
How many live streams does one GPU serve? N streams of the 7B config (random weights) at 720p, 2 fps, run as one
batch (serve.StreamBatch), for each N of --streams; beside them, in the same run, one stream on the single-stream
fast path (stream.Streamer, compiled decode), as tools/bench_stream.py runs it.

  python -m tools.bench_serve --streams 1 4 8 16 --seconds 300 --warmup 30          # every stream speaks every second
  python -m tools.bench_serve --streams 8 16 32 --speak-every 4 --seconds 300        # ... one second in four
  python -m tools.bench_serve --streams 16 --minutes 5 --warmup 60 --single-seconds 90   # the target: 5 steady minutes
  python -m tools.bench_serve --streams 16 --seconds 90 --warmup 60 --prefill packed flex rows   # the prefill 3 ways
  python -m tools.bench_serve --preset tiny --height 56 --width 84 --streams 1 3 --seconds 6 --warmup 2   # CPU smoke

The ideas:
- The same work as tools/bench_stream.py, per stream: each second of each stream feeds its frames and a
  teacher-forced reply of exactly --max-new-tokens tokens (one-token words, " ..." and <|im_end|>), or, with
  --speak-every K, that reply one second in K (stream i speaks at the seconds t with (t + i) % K == 0) and " ..." in
  the others, the realistic mix. Each decode step's argmax is read back to the host, as greedy decoding must.
- Streams differ: stream i starts its frames i seconds into the synthetic video, so no two rows hold the same frames.
- As a live source decodes ahead, a thread resizes every stream's next second while the batch runs this one
  (--no-prefetch: inside the step), as the single-stream path does; a second's latency includes any wait for them.
- The batch decodes as the single-stream path does (--decode; --batch-decode: another, or several): compiled (the GPU
  default) and graphs are one fixed-shape step over all its rows, replayed from a CUDA graph (decode.FixedStep;
  compiled first, or not), plain a forward over the speaking rows. With --decode compiled both run the vision tower
  compiled and graph-replayed. The batch's prefill attention is one call per layer over all rows (--prefill packed,
  the default: a cuDNN head for every row and FlashAttention-2 over the ragged tails, prefill.RaggedPrefill, once
  the head is planned, FlexAttention before), FlexAttention alone (flex) or the single stream's per row (rows).
- Per N: the latency of a batch second (mean and p99 over the steady seconds, those after --warmup), that per
  stream, its ratio to the single-stream path's second in the same run (x_single), memory held in the first / last
  10% and at its peak, whether the batch is real time (p99 of a second <= 1.0 s; the target asks it over >= 300
  steady seconds: --minutes 5), and the same per minute of the steady seconds (its JSON's "minutes"). The largest N
  that stayed real time, a JSON line per batch second, the summary, and two plots: latency per second, and mean and
  p99 against N. --time-limit stops a batch run early (when GPU time is bounded) and says where.
"""
import argparse
import gc
import importlib.util
import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from cache import can_fuse, fused_move
from cli import Parser, Results, at_least, hardware, table
from eval import add_run_flags, check_run_flags, fresh_peak, ms, percentile, run_policy, steady_capacity, sync
from layout import end_ids, layout_of
from quantize import fp8_problem
from serve import StreamBatch
from stream import streamer_kwargs
from tools.bench_stream import build_models, fixed_reply, plot


def batch_run(args, model, tok, n, prefill, decode, frames_of, reply, kw, capacity, res):
    """N streams for --seconds (or until --time-limit) as one batch; returns (latencies in seconds, memory held after
    each second, peak memory, each second's {phase: seconds} with --phases)."""
    fresh_peak(model.device)
    batch = StreamBatch(model, tok, n, capacity, readback=not args.no_readback,
                        decode=decode, prefill=prefill,
                        compile_vision=args.decode[0] == "compiled",   # the single path's vision tower
                        timed=args.phases)
    streams = [batch.add(i, **kw) for i in range(n)]
    # prefetch: second t + 1's frames resized on a thread while the batch runs second t (eval.run_policy's, for N)
    pool = ThreadPoolExecutor(1) if args.prefetch else None
    prepare = lambda t: {i: s.prepare(frames_of(t + i)) for i, s in enumerate(streams)}
    ahead = pool.submit(prepare, 0) if pool else None
    lat, mem, phases, start = [], [], [], time.perf_counter()
    for t in range(args.seconds):
        if args.gc_freeze and t == min(args.warmup, args.seconds // 2):
            gc.collect()
            gc.freeze()   # what exists now (the model, compiled code, graphs) is never scanned by a collection again
        if args.time_limit and time.perf_counter() - start > args.time_limit:
            print(f"{n} streams: --time-limit {args.time_limit:g} s reached after {t} s")
            break
        force = {i: reply if (t + i) % args.speak_every == 0 else "" for i in range(n)}
        sync(model.device)
        t0, before = time.perf_counter(), dict(batch.timer.phases)
        frames = ahead.result() if pool else {i: frames_of(t + i) for i in range(n)}
        if pool and t + 1 < args.seconds:
            ahead = pool.submit(prepare, t + 1)
        batch.step(frames, force)
        sync(model.device)
        lat.append(time.perf_counter() - t0)
        phases.append({k: v - before.get(k, 0.0) for k, v in batch.timer.phases.items()})
        mem.append(torch.cuda.memory_allocated() / 2**30 if model.device.type == "cuda" else
                   3 * batch.k.numel() * batch.k.element_size() / 2**30)
        res.log(streams=n, prefill=prefill, decode=decode, t=t, ms=ms(lat[-1]), memory_gib=round(mem[-1], 3),
                **{f"{k}_ms": ms(v) for k, v in phases[-1].items()})
    if pool:
        pool.shutdown()
    if args.gc_freeze:
        gc.unfreeze()
    peak = torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda" else max(mem, default=0.0)
    return lat, mem, peak, phases


def minutes(lat, mem, warmup):
    """Each minute of the steady seconds (the last may be shorter): its mean and p99 of a second, memory at most."""
    rows = []
    for m in range(warmup, len(lat), 60):
        xs = lat[m:m + 60]
        rows.append(dict(minute=len(rows), seconds=len(xs), mean_ms=ms(sum(xs) / len(xs)),
                         p99_ms=ms(percentile(xs, 99)), memory_gib=round(max(mem[m:m + 60]), 3)))
    return rows


def summary(name, n, lat, mem, warmup, peak, phases=()):
    """A table row: the steady seconds' mean and p99, per stream, memory first / last 10% and peak, the mean of each
    phase (--phases); per minute."""
    steady, held, timed = lat[warmup:], mem[warmup:], list(phases)[warmup:]
    if not steady:
        return dict(run=name, streams=n, steady_s=0, realtime=False)
    k = max(1, len(steady) // 10)
    mean, p99 = sum(steady) / len(steady), percentile(steady, 99)
    return dict(run=name, streams=n, steady_s=len(steady), mean_ms=ms(mean), p99_ms=ms(p99),
                per_stream_ms=ms(mean / n), realtime=p99 <= 1.0,
                mem_first_last_gib=f"{sum(held[:k]) / k:.2f}/{sum(held[-k:]) / k:.2f}", peak_gib=round(peak, 2),
                **{f"{ph}_ms": ms(sum(p.get(ph, 0.0) for p in timed) / len(timed))
                   for ph in dict.fromkeys(ph for p in timed for ph in p)},
                minutes=minutes(lat, mem, warmup))


def build_parser():
    ap = Parser(prog="python -m tools.bench_serve", description=__doc__.strip().split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--streams", type=at_least(1), nargs="+", default=[1, 4, 8, 16], help="batch sizes to run, one "
                    "after another (default 1 4 8 16)")
    ap.add_argument("--speak-every", type=at_least(1), default=1, help="a stream speaks one second in this many, "
                    "says ' ...' otherwise (default 1: every second)")
    ap.add_argument("--preset", default="7B", choices=["7B", "3B", "tiny"], help="model config (random weights)")
    ap.add_argument("--seconds", type=at_least(2), default=300, help="seconds of each run (default 300)")
    ap.add_argument("--minutes", type=at_least(1), default=None, help="steady minutes to measure: sets --seconds to "
                    "--warmup + 60 x this (the target: p99 <= 1 s over 5 minutes)")
    ap.add_argument("--single-seconds", type=at_least(2), default=None, help="seconds of the single-stream run "
                    "(default: --seconds; shorter saves GPU time on long runs)")
    ap.add_argument("--prefill", choices=["packed", "flex", "rows"], nargs="+", default=["packed"], help="a "
                    "batched prefill's attention: one call per layer, cuDNN and FlashAttention-2 where they run "
                    "(packed, default), one FlexAttention call per layer (flex), or row by row (rows); several: each "
                    "N runs with each, one after another")
    ap.add_argument("--batch-decode", choices=["plain", "graphs", "compiled"], nargs="+", default=None,
                    help="the batch's decode step: a forward over the speaking rows (plain), one fixed-shape step over "
                    "every row replayed from a CUDA graph (graphs), compiled first (compiled); several: each N runs "
                    "with each (default: --decode's)")
    ap.add_argument("--height", type=at_least(28), default=720, help="frame height in pixels (default 720)")
    ap.add_argument("--width", type=at_least(28), default=1280, help="frame width in pixels (default 1280)")
    ap.add_argument("--gc-freeze", action="store_true", help="batch runs: after the warm-up, gc.freeze() the objects "
                    "made so far "
                    "(~0.4M after torch.compile: a full collection of them took ~180 ms on a 2-core CPU, 0.6 ms "
                    "frozen), in case the garbage collector's pauses make the p99")
    ap.add_argument("--no-readback", action="store_true", help="do not read each decode step's argmax back")
    ap.add_argument("--phases", action="store_true", help="time each phase of a second (preprocess, vision, evict, "
                    "prefill, decode; the GPU is waited for at each phase's ends, which costs a little and keeps the "
                    "host's eviction bookkeeping from running beside the tower)")
    ap.add_argument("--fp8", action="store_true", help="every Linear of both towers in FP8 with row-wise scales "
                    "(quantize.py; an approximation, for Hopper GPUs), the single stream too")
    add_run_flags(ap, warmup=30, out="out/bench_serve")
    ap.set_defaults(policies=["streaming"], hf=False, flexprefill=False)
    return ap


def get_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.minutes:
        if "--seconds" in (argv if argv is not None else sys.argv[1:]):
            ap.error("--minutes sets --seconds (--warmup + 60 x minutes): give one of them")
        args.seconds = args.warmup + 60 * args.minutes
    gpu = check_run_flags(ap, args)
    if len(args.decode) > 1:
        ap.error(f"--decode {','.join(args.decode)}: one path for the single stream here (--batch-decode takes "
                 "several for the batch)")
    args.batch_decode = args.batch_decode or args.decode   # the single path's: compiled on a GPU
    args.stream_layout = layout_of({}, args)
    if args.fp8 and (problem := fp8_problem(args.device or ("cuda" if gpu else "cpu"))):
        ap.error(problem)
    if not gpu and args.preset != "tiny":
        ap.error(f"--preset {args.preset} is a GPU's work; on a CPU, the smoke run: --preset tiny --height 56 "
                 "--width 84 --streams 1 3 --seconds 6 --warmup 2")
    return args


def main(argv=None):
    args = get_args(argv)
    model, _, tok = build_models(args)
    layout = args.stream_layout
    if layout.max_new_tokens < len(end_ids(tok)):
        raise SystemExit(f"--max-new-tokens must be at least {len(end_ids(tok))} here (a word, ' ...', <|im_end|>)")
    g = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 255, (args.height, args.width, 3), generator=g, dtype=torch.uint8) for _ in range(8)]
    frames_of = lambda t: [frames[(layout.fps * t + j) % 8] for j in range(layout.fps)]
    kw = streamer_kwargs(layout)
    capacity = steady_capacity(frames_of(0), layout.fps, layout.text_sink, layout.text_window, layout.vision_window,
                               (layout.min_pixels, layout.max_pixels), layout.evict_every)[1]
    reply, warmup = fixed_reply(tok, layout.max_new_tokens), min(args.warmup, args.seconds // 2)
    print(f"{hardware()}; {args.preset} config, {args.height}x{args.width} at {layout.fps} fps, {args.seconds} s a "
          f"run, speaking one second in {args.speak_every}; means leave out the first {warmup} s", flush=True)
    res = Results(args.out, "bench_serve")
    compile_eviction(model)
    # the single-stream path, same run: one stream speaking the same seconds as stream 0 of a batch
    speak = lambda t: reply if t % args.speak_every == 0 else ""
    single = args.single_seconds or args.seconds
    # --time-limit bounds the batch runs; the single run is bounded by --single-seconds (its first second compiles)
    r = run_policy(model, tok, "streaming", single, frames_of, argparse.Namespace(**dict(vars(args), time_limit=0)),
                   force=speak, decode=args.decode[0],
                   readback=not args.no_readback, **dict(kw, capacity=capacity, timed=args.phases))
    rows = [summary(f"single ({args.decode[0]})", 1, r["latency"], [x["memory_gib"] for x in r["seconds"]],
                    min(args.warmup, single // 2), r["peak_gib"], [x["phases"] for x in r["seconds"]])]
    print(table(brief(rows)), flush=True)
    lat_of = {}
    for n, prefill, decode in itertools.product(args.streams, args.prefill, args.batch_decode):
        lat, mem, peak, phases = batch_run(args, model, tok, n, prefill, decode, frames_of, reply, kw, capacity, res)
        lat_of[n, prefill, decode] = lat
        rows.append(dict(summary("batch", n, lat, mem, warmup, peak, phases), prefill=prefill, decode=decode,
                         heads=ragged_heads(model, n) if prefill == "packed" else "-"))
        if rows[-1]["steady_s"] and rows[0]["steady_s"]:
            rows[-1]["x_single"] = round(rows[-1]["per_stream_ms"] / rows[0]["mean_ms"], 3)
        print(table(brief(rows[-1:])), flush=True)
        for m in rows[-1].get("minutes", []):
            print(f"  minute {m['minute']}: mean {m['mean_ms']} ms, p99 {m['p99_ms']} ms, {m['memory_gib']} GiB")
    report(args, layout, rows, lat_of, res)
    return rows


def compile_eviction(model):
    """Compile cache.fused_move (with and without the rotation) before anything is timed: its first call compiles,
    ~0.6 s on an H100, which otherwise lands in the first evicting second of the first run (the single stream's)."""
    c = model.cfg
    x = torch.zeros(1, 1, c.num_key_value_heads, 4, c.head_dim, device=model.device, dtype=model.dtype)
    if can_fuse(x):
        angle = torch.zeros(1, 2, c.head_dim, device=x.device, dtype=x.dtype)
        fused_move(x, x.clone(), x.clone(), [0], [torch.tensor([1, 2])], angle.cos(), angle.sin())
        fused_move(x, x.clone(), x.clone(), [0], [torch.tensor([1, 2])])


def ragged_heads(model, n):
    """The cuDNN head lengths planned for a batch of n (RaggedPrefill ran with them; none: FlexAttention ran)."""
    plans = getattr(model.prompt_kernel, "plans", {})
    return ",".join(str(h) for key, hs in plans.items() if key[:2] == ("rows", n) for h in hs) or "none (flex)"


def brief(rows):
    """The rows for the table: their per-minute numbers stay in the JSON."""
    return [{k: v for k, v in r.items() if k != "minutes"} for r in rows]


def report(args, layout, rows, lat_of, res):
    """The table, the largest N that stayed real time, the summary JSON and the plots."""
    batches = [r for r in rows[1:] if r["steady_s"]]
    largest = max((r["streams"] for r in batches if r["realtime"]), default=0)
    steady = min((r["steady_s"] for r in batches), default=0)
    print("\n" + table(brief(rows)))
    print("x_single: a stream-second's cost in the batch over the single-stream path's second, same run; realtime: "
          "p99 of a batch second <= 1.0 s")
    print(f"largest real-time batch: {largest} streams (over {steady} steady seconds"
          + ("; the target asks for >= 300: --minutes 5)" if steady < 300 else ")"))
    res.save(dict(settings=dict(vars(args), stream_layout=vars(layout)), hardware=hardware(), rows=rows,
                  largest_realtime=largest))
    if importlib.util.find_spec("matplotlib") is None:
        print("no plots: matplotlib is not installed (pip install matplotlib)")
        return
    plot(args.out, "bench_serve_latency", {f"{n} streams ({p}, {d})": (range(1, len(v)), v[1:])
                                           for (n, p, d), v in lat_of.items()}, "second", "seconds per batch second")
    series = {}
    for p, d in itertools.product(args.prefill, args.batch_decode):
        mine = [r for r in batches if r["prefill"] == p and r["decode"] == d]
        ns = [r["streams"] for r in mine]
        series[f"mean ({p}, {d})"] = (ns, [r["mean_ms"] for r in mine])
        series[f"p99 ({p}, {d})"] = (ns, [r["p99_ms"] for r in mine])
    ns = sorted({r["streams"] for r in batches})
    series.update({"real time (1 s)": (ns, [1000] * len(ns)),
                   "single stream x N": (ns, [(rows[0].get("mean_ms") or 0) * n for n in ns])})
    plot(args.out, "bench_serve_by_streams", series, "streams", "ms per batch second")


if __name__ == "__main__":
    main()
