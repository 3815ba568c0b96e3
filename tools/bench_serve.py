"""
How many live streams does one GPU serve? N streams of the 7B config (random weights) at 720p, 2 fps, run as one
batch (serve.StreamBatch), for each N of --streams; beside them, in the same run, one stream on the single-stream
fast path (stream.Streamer, compiled decode), as tools/bench_stream.py runs it.

  python -m tools.bench_serve --streams 1 4 8 16 --seconds 300 --warmup 30          # every stream speaks every second
  python -m tools.bench_serve --streams 8 16 32 --speak-every 4 --seconds 300        # ... one second in four
  python -m tools.bench_serve --preset tiny --height 56 --width 84 --streams 1 3 --seconds 6 --warmup 2   # CPU smoke

The ideas:
- The same work as tools/bench_stream.py, per stream: each second of each stream feeds its frames and a
  teacher-forced reply of exactly --max-new-tokens tokens (one-token words, " ..." and <|im_end|>), or, with
  --speak-every K, that reply one second in K (stream i speaks at the seconds t with (t + i) % K == 0) and " ..." in
  the others, the realistic mix. Each decode step's argmax is read back to the host, as greedy decoding must.
- Streams differ: stream i starts its frames i seconds into the synthetic video, so no two rows hold the same frames.
- The batch decodes with one fixed-shape step over all its rows, captured in a CUDA graph (serve.FixedStep; --decode
  plain: a forward over the speaking rows instead); the single-stream path with --decode (compiled on a GPU).
- Per N: the latency of a batch second (mean over the steady seconds, p99 over their last half), that per stream,
  its ratio to the single-stream path's second in the same run (x_single), memory held in the first / last 10%, and
  whether the batch is real time (p99 of a second <= 1.0 s). A JSON line per batch second, the summary, and a plot
  of latency against N.
"""
import argparse
import time

import torch

from cli import Parser, Results, at_least, hardware, table
from eval import add_run_flags, check_run_flags, fresh_peak, ms, percentile, run_policy, steady_capacity, sync
from layout import end_ids, layout_of
from serve import StreamBatch
from stream import streamer_kwargs
from tools.bench_stream import build_models, fixed_reply, plot


def batch_run(args, model, tok, n, frames_of, reply, kw, capacity, res):
    """N streams for --seconds as one batch; returns (latencies in seconds, memory held after each second)."""
    fresh_peak(model.device)
    # the batch's decode steps in a CUDA graph over every row unless --decode plain (the single path: compiled)
    batch = StreamBatch(model, tok, n, capacity, readback=not args.no_readback,
                        decode="plain" if args.decode[0] == "plain" else "graphs")
    for i in range(n):
        batch.add(i, **kw)
    lat, mem = [], []
    for t in range(args.seconds):
        force = {i: reply if (t + i) % args.speak_every == 0 else "" for i in range(n)}
        frames = {i: frames_of(t + i) for i in range(n)}
        sync(model.device)
        t0 = time.perf_counter()
        batch.step(frames, force)
        sync(model.device)
        lat.append(time.perf_counter() - t0)
        mem.append(torch.cuda.memory_allocated() / 2**30 if model.device.type == "cuda" else
                   3 * batch.k.numel() * batch.k.element_size() / 2**30)
        res.log(streams=n, t=t, ms=ms(lat[-1]), memory_gib=round(mem[-1], 3))
    return lat, mem


def summary(name, n, lat, mem, warmup):
    """A table row: the steady seconds' mean and p99 (last half), per stream, memory first / last 10%."""
    steady, held = lat[warmup:], mem[warmup:]
    k = max(1, len(steady) // 10)
    mean = sum(steady) / len(steady)
    p99 = percentile(steady[len(steady) // 2:], 99)
    return dict(run=name, streams=n, mean_ms=ms(mean), p99_ms=ms(p99), per_stream_ms=ms(mean / n),
                realtime=p99 <= 1.0, mem_first_last_gib=f"{sum(held[:k]) / k:.2f}/{sum(held[-k:]) / k:.2f}")


def build_parser():
    ap = Parser(prog="python -m tools.bench_serve", description=__doc__.strip().split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--streams", type=at_least(1), nargs="+", default=[1, 4, 8, 16], help="batch sizes to run, one "
                    "after another (default 1 4 8 16)")
    ap.add_argument("--speak-every", type=at_least(1), default=1, help="a stream speaks one second in this many, "
                    "says ' ...' otherwise (default 1: every second)")
    ap.add_argument("--preset", default="7B", choices=["7B", "3B", "tiny"], help="model config (random weights)")
    ap.add_argument("--seconds", type=at_least(2), default=300, help="seconds of each run (default 300)")
    ap.add_argument("--height", type=at_least(28), default=720, help="frame height in pixels (default 720)")
    ap.add_argument("--width", type=at_least(28), default=1280, help="frame width in pixels (default 1280)")
    ap.add_argument("--no-readback", action="store_true", help="do not read each decode step's argmax back")
    add_run_flags(ap, warmup=30, out="out/bench_serve")
    ap.set_defaults(policies=["streaming"], hf=False, flexprefill=False)
    return ap


def get_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    gpu = check_run_flags(ap, args)
    args.stream_layout = layout_of({}, args)
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
    # the single-stream path, same run: one stream speaking the same seconds as stream 0 of a batch
    speak = lambda t: reply if t % args.speak_every == 0 else ""
    r = run_policy(model, tok, "streaming", args.seconds, frames_of, args, force=speak, decode=args.decode[0],
                   readback=not args.no_readback, **dict(kw, capacity=capacity))
    rows = [summary(f"single ({args.decode[0]})", 1, r["latency"], [x["memory_gib"] for x in r["seconds"]], warmup)]
    print(table(rows), flush=True)
    lat_of = {}
    for n in args.streams:
        lat, mem = batch_run(args, model, tok, n, frames_of, reply, kw, capacity, res)
        lat_of[n] = lat
        rows.append(summary("batch", n, lat, mem, warmup))
        rows[-1]["x_single"] = round(rows[-1]["per_stream_ms"] / rows[0]["mean_ms"], 3)
        print(table(rows[-1:]), flush=True)
    print("\n" + table(rows))
    print("x_single: a stream-second's cost in the batch over the single-stream path's second, same run; realtime: "
          "p99 of a batch second <= 1.0 s")
    res.save(dict(settings=dict(vars(args), stream_layout=vars(layout)), hardware=hardware(), rows=rows))
    plot(args.out, "bench_serve_latency", {f"{n} streams": (range(1, len(v)), v[1:]) for n, v in lat_of.items()},
         "second", "seconds per batch second")
    return rows


if __name__ == "__main__":
    main()
