"""
How good is the commentary of a streaming checkpoint? Three tasks, each printing a table and writing its results
into --out as it goes (one JSON line per stream second or question) and whole at the end:

  python eval.py                        # stream: the 5 policies of stream.py on a held-out stream, side by side
  python eval.py questions              # whole-video questions asked of the streaming memory (Streamer.ask)
  python eval.py --video clip.mp4       # video: stream a real video through the checkpoint, save the commentary
  python eval.py --seed 7 --streams 3   # held-out streams 7, 8 and 9 instead of stream 0
  python eval.py --streams 30 --batch --policies streaming   # 30 streams as one batch a second (serve.py)

The policies (stream.POLICIES, one table): the StreamingVLM cache, native RoPE (the same cache, growing positions),
full attention, and two sliding windows (reset every --reset-every seconds; recompute the whole window every second).
The layout flags (--vision-window, --text-sink, ...) override the checkpoint's stream.json, as in stream.py.

The ideas:
- Held out: stream i of --seed N is world.split_seed("eval", N + i), a seed range that training never draws.
- Scored by parsing (metrics.py): event F1, score accuracy, goal steps and silence accuracy, over the whole stream
  and in five 20% slices (the paper's Fig. 8).
- Cost beside quality: latency per stream second (p50 / p99, the first --warmup seconds left out), peak memory, the
  largest M-RoPE position (native RoPE's grows with the stream, the cache's stays bounded) and each policy's time
  per second over the streaming policy's: recompute pays for its whole window every second.
- Whole-video questions (world.QUESTIONS: the score, the number of goals, the first scorer) at the end of every 20%
  slice, on top of the compact cache, which is rewound afterwards; right means equal to world.answer.
- Nothing measured is lost: the JSON lines are flushed as they are written, a policy that runs out of memory or
  past --time-limit is reported with the second it stopped at, and a video the reader rejects ends the run with
  one line after the commentary so far is saved.

Speed is benchmarked in tools/bench_stream.py, tools/bench_flexprefill.py and tools/bench_model.py. Reference:
StreamingVLM, arXiv
2510.09608, and mit-han-lab/streaming-vlm.
"""
import argparse
import gc
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import torch
from tqdm import tqdm

from layout import FPS, FRAME_PIXELS, add_layout_flags, layout_of
from metrics import KEPT, kept_line, score_transcript, slices
from processor import FrameError, resize_video
from cli import (HELD_OUT_SEED, Parser, Results, at_least, between, check_device, default_model, device_name,
                 file_problem, hardware, inputs_of, output_problem, table)
from safeio import Busy, RunLock
from checkpoint import checkpoint_settings, load_checkpoint
from serve import BATCHED, StreamBatch
from stream import DECODERS, POLICIES, make_streamer, streamer_kwargs
from video import is_live, open_video, seconds_of
from world import QUESTIONS, SPLIT_SIZE, SportsStream, WorldConfig, answer, split_seed

TASKS = ("stream", "questions", "video")

# -----------------------------------------------------------------------------
# Numbers


def percentile(xs, q):
    """The q-th percentile of xs (nearest rank), None for no values (JSON has no NaN)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else None


def mean(xs, digits=3):
    """The mean of the values that are not None, rounded; None when there are none (not 0, not 1)."""
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), digits) if xs else None


def ms(seconds):
    return None if seconds is None else round(1000 * seconds, 1)

# -----------------------------------------------------------------------------
# The timed loop: ours here, transformers' in tools/bench_stream.py


def sync(device):
    """Wait for the GPU's queued work (timings must include it); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_peak(device):
    """Free what earlier runs left (collect first: a cycle could still hold a cache) and restart the peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed_seconds(seconds, step, device, time_limit=0, after=None, desc=None):
    """Run step(t) for t = 0 .. seconds-1, timing each call with the GPU's work included. Stops at an out-of-memory
    error or once time_limit seconds of wall time are spent (0: no limit) and says where. after(t, latency) runs
    after each second, outside its time. Returns (latencies in seconds, failed: None or {second, reason})."""
    lat, failed, start = [], None, time.perf_counter()
    for t in tqdm(range(seconds), desc=desc, unit="s", leave=False, dynamic_ncols=True):
        try:
            if time_limit and time.perf_counter() - start > time_limit:
                raise TimeoutError(f"over the {time_limit} s time limit")
            sync(device)
            t0 = time.perf_counter()
            step(t)
            sync(device)
        except (torch.OutOfMemoryError, TimeoutError) as e:
            failed = dict(second=t, reason=type(e).__name__)
            break
        lat.append(time.perf_counter() - t0)
        if after is not None:
            after(t, lat[-1])
    return lat, failed


def ahead_of(make, seconds, pool):
    """get(t) -> make(t), called for t = 0, 1, ... in order. With a thread pool, make(t + 1) runs on it while the
    caller works on second t, as a live source is decoded ahead (a second's latency still includes any wait)."""
    if pool is None:
        return make
    queued = [pool.submit(make, 0)]

    def get(t):
        out = queued[0].result()
        if t + 1 < seconds:
            queued[0] = pool.submit(make, t + 1)
        return out
    return get


def run_policy(model, tok, policy, seconds, frames_of, args, force=None, after=None, **kw):
    """Stream frames_of(t) for t < seconds through make_streamer(policy, **kw); force(t): teacher-force second t's
    reply. Each second gets a record {t, text, latency (s), forwards (decode forwards), phases ({phase: s}, with
    timed=True), memory_gib (held after it: the GPU's, or on a CPU the cache's buffers, the only part that
    changes)}, passed to after(streamer, record) outside the second's time. Returns the records, the latencies,
    where it failed, the peak memory, the largest position, the cache length, the resize times and the streamer."""
    device = model.device
    fresh_peak(device)
    s = make_streamer(model, tok, policy, reset_every=args.reset_every, **kw)
    r = dict(seconds=[], resize=[], max_position=0, peak_gib=0.0, streamer=s)
    # prefetch: a thread renders and resizes second t+1 while the model works on second t
    pool = ThreadPoolExecutor(1) if args.prefetch else None

    def prepare(t):
        t0 = time.perf_counter()
        out = s.prepare(frames_of(t))
        r["resize"].append(time.perf_counter() - t0)
        return out
    frames, texts, before = ahead_of(prepare if pool else frames_of, seconds, pool), [], dict(forwards=0)

    def step(t):
        texts.append(s.step(frames(t), force_text=force(t) if force else None))

    def measured(t, latency):
        held = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else s.cache.nbytes() / 2**30
        rec = dict(t=t, text=texts[-1], latency=latency, forwards=s.forwards - before["forwards"],
                   phases={k: v - before.get(k, 0.0) for k, v in s.phases.items()}, memory_gib=held)
        before.update(s.phases, forwards=s.forwards)  # the streamer's totals: a second's cost is their change
        r["seconds"].append(rec)
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else max(r["peak_gib"], held)
        r["max_position"] = max(r["max_position"], s.cache.max_position())
        if after is not None:
            after(s, rec)
    try:
        r["latency"], r["failed"] = timed_seconds(seconds, step, device, args.time_limit, measured, desc=policy)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    r["cache_tokens"] = s.cache.length
    return r


def run_batch(model, tok, policy, worlds, args, after=None, **kw):
    """run_policy for every world at once (--batch): one serve.StreamBatch steps all their seconds together, each
    stream in its own cache row, saying what it says alone (tests/test_serve.py, tests/test_eval.py). A second's
    latency is the batch second's, the same for every stream, and --time-limit the batch's; its memory is the whole
    batch's (on a CPU, the shared cache buffers). after[i](streamer, record) runs for world i's record. Returns, one a
    world, run_policy's records (t, text, latency, memory_gib), latencies, failure, peak, positions and cache length."""
    device, p, n = model.device, POLICIES[policy], len(worlds)
    fresh_peak(device)
    batch = StreamBatch(model, tok, n, kw["capacity"], decode=kw["decode"], compile_vision=kw["decode"] == "compiled")
    own = {k: v for k, v in kw.items() if k not in ("capacity", "decode")}
    streams = [batch.add(i, evict=p.evict, reindex=p.reindex, **own) for i in range(n)]
    runs = [dict(seconds=[], max_position=0, peak_gib=0.0, streamer=s) for s in streams]
    # as run_policy: a thread renders and resizes second t+1 for every stream while the batch runs second t
    pool, texts = ThreadPoolExecutor(1) if args.prefetch else None, {}
    frames = ahead_of(lambda t: {i: s.prepare(w.second(t).frames) for i, (w, s) in enumerate(zip(worlds, streams))},
                      args.seconds, pool)

    def step(t):
        texts.update(batch.step(frames(t)))

    def measured(t, latency):
        held = (torch.cuda.memory_allocated() if device.type == "cuda" else
                sum(b.nbytes for b in (batch.k, batch.v, batch.raw_k))) / 2**30
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else held
        for i, (r, s) in enumerate(zip(runs, streams)):
            rec = dict(t=t, text=texts[i], latency=latency, memory_gib=held)
            r["seconds"].append(rec)
            r["peak_gib"], r["max_position"] = peak, max(r["max_position"], s.cache.max_position())
            if after is not None:
                after[i](s, rec)
    try:
        lat, failed = timed_seconds(args.seconds, step, device, args.time_limit, measured, desc=f"{policy} x {n}")
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    for r, s in zip(runs, streams):
        r.update(latency=lat, failed=failed, cache_tokens=s.cache.length)
    return runs


def steady_capacity(frames, fps=FPS, text_sink=512, text_window=512, vision_window=16, frame_pixels=FRAME_PIXELS,
                    evict_every=1):
    """(vision tokens a second, cache slots for a bounded policy's steady state with these frames each second):
    text sink + window, the prompts, and vision_window + evict_every seconds of vision and text. Sized up front
    because growing the buffers mid-stream re-specialises a compiled decode step (an ~8 s stall on an H100)."""
    n_vision = int(resize_video(frames, fps=fps, min_pixels=frame_pixels[0], max_pixels=frame_pixels[1])[1]
                   .prod()) // 4
    return n_vision, text_sink + text_window + 256 + (vision_window + evict_every) * (n_vision + 64)

# -----------------------------------------------------------------------------
# Tasks


def held_out(args, st):
    """The held-out worlds of this run: stream i is split_seed('eval', --seed + i), at the checkpoint's frame size."""
    return [SportsStream(WorldConfig(seed=split_seed("eval", args.seed + i), size=st.get("frame_size", 56)))
            for i in range(args.streams)]


def streamer_settings(args, st, frames=None):
    """make_streamer's keywords: the checkpoint's stream.json layout (stream.layout_of: windows, frame pixels,
    prompts, sampling; --max-new-tokens wins), the decode path, and, given a second's frames, a cache sized for
    the steady state up front."""
    kw = dict(streamer_kwargs(layout_of(st, args)), decode=args.decode[0])
    if frames is not None:
        kw["capacity"] = steady_capacity(frames, kw["fps"], kw["text_sink"], kw["text_window"], kw["vision_window"],
                                         kw["frame_pixels"], kw["evict_every"])[1]
    return kw


def stream_policy(args, model, tok, policy, worlds, kw, res):
    """One policy over every held-out stream: the scores, latencies and costs, and a JSON line per second."""
    scores, per_slice, lat, runs = [], [], [], []
    truths = [[world.text(t) for t in range(args.seconds)] for world in worlds]
    logs = [lambda s, rec, seed=world.cfg.seed, truth=truth: res.log(
        policy=policy, seed=seed, t=rec["t"], text=rec["text"], truth=truth[rec["t"]], ms=ms(rec["latency"]))
        for world, truth in zip(worlds, truths)]
    batched = args.batch and policy in BATCHED  # every stream at once; else one after another
    together = iter(run_batch(model, tok, policy, worlds, args, after=logs, **kw)) if batched else None
    for world, truth, log in zip(worlds, truths, logs):
        r = next(together) if batched else run_policy(model, tok, policy, args.seconds,
                                                      lambda t: world.second(t).frames, args, after=log, **kw)
        texts = [rec["text"] for rec in r["seconds"]]
        n = len(texts)
        if n:  # a run that stopped in its first second has no scores (an empty transcript is not a perfect one)
            scores.append(score_transcript(truth[:n], texts))
        per_slice.append(slices(truth[:n], texts) if n >= 5 else None)
        lat += r["latency"][args.warmup:]
        mine = {k: scores[-1][k] if n else None for k in ("f1", "score_acc", "goal_step", "silence_acc", "goals")}
        runs.append(dict(seed=world.cfg.seed, seconds=n, failed=r["failed"], peak_gib=r["peak_gib"],
                         max_position=r["max_position"], cache_tokens=r["cache_tokens"], **mine))
        del r  # free this run's cache before the next run measures its peak memory
    col = lambda key, rows: mean([x[key] for x in rows])
    failed = next((r["failed"] for r in runs if r["failed"]), None)
    row = dict(policy=policy, f1=col("f1", scores), f1_1s=col("f1_tol1", scores), score=col("score_acc", scores),
               goal_step=col("goal_step", scores), silence=col("silence_acc", scores),
               p50_ms=ms(percentile(lat, 50)), p99_ms=ms(percentile(lat, 99)),
               mean_ms=ms(mean(lat, 6)), peak_gib=round(max(r["peak_gib"] for r in runs), 3),
               max_pos=max(r["max_position"] for r in runs),
               **(dict(batch=len(worlds) if batched else 1) if args.batch else {}),
               failed=f"{failed['reason']} at {failed['second']} s" if failed else "-")
    done = [s for s in per_slice if s]
    sl = [dict(f1=col("f1", c), score=col("score_acc", c)) for c in zip(*done)] if done else []
    return dict(summary=row, runs=runs, slices=sl)


def over_policies(args, model, tok, st, res, per_policy, what):
    """per_policy(args, model, tok, policy, worlds, streamer settings, res) -> {summary: row, ...} for each of
    --policies on the held-out worlds; each row is printed as it comes. Returns (rows, the result to save)."""
    worlds = held_out(args, st)
    kw = streamer_settings(args, st, worlds[0].second(0).frames)
    print(f"{what}: {args.streams} held-out stream(s) x {args.seconds} s (--seed {args.seed}: world seeds "
          f"{worlds[0].cfg.seed}..{worlds[-1].cfg.seed}), reset every {args.reset_every} s, streamer settings {kw}",
          flush=True)
    rows, result = [], dict(settings=dict(vars(args), **kw), hardware=hardware(), policies={})
    for policy in tqdm(args.policies, desc="policies", dynamic_ncols=True):
        result["policies"][policy] = per_policy(args, model, tok, policy, worlds, kw, res)
        rows.append(result["policies"][policy]["summary"])
        tqdm.write(table(rows[-1:]))
    return rows, result


def task_stream(args, model, tok, st, res):
    rows, result = over_policies(args, model, tok, st, res, stream_policy, "commentary")
    base = next((r for r in rows if r["policy"] == "streaming"), None)
    for r in rows:  # the cost of a stream second against the StreamingVLM cache's, measured in this same run; a
        # batched row against a batched one only (a batch second serves all its streams)
        alike = base and base["mean_ms"] and r["mean_ms"] and r.get("batch") == base.get("batch")
        r["x_streaming"] = round(r["mean_ms"] / base["mean_ms"], 2) if alike else None
    print("\n" + table(rows))
    if base:
        print("x_streaming: mean time per stream second over the streaming policy's (same run, same streams)")
    if any(r.get("batch", 1) > 1 for r in rows):
        print("batch: streams stepped together; their ms and peak_gib are the batch second's and the whole batch's")
    if args.streams > 1:  # the exact score metric: one misread goal sinks every later count
        print(f"\nstreams with a goal that keep the score (accuracy >= {KEPT}), the others by world seed:")
        for p, v in result["policies"].items():
            print(f"  {p:10s} " + kept_line(v["runs"]))
    print("\nevent F1 / score accuracy per 20% slice of the stream (the paper's Fig. 8):")
    for p, v in result["policies"].items():
        print(f"  {p:10s} " + ("  ".join(f"{s['f1']}/{s['score']}" for s in v["slices"]) or "(under 5 seconds)"))
    res.save(result)
    return result


def ask_policy(args, model, tok, policy, worlds, kw, res):
    """Stream each world under one policy and, at the end of every 20% slice, ask world.QUESTIONS of the cache
    (Streamer.ask, which rewinds it: the stream goes on as if nothing was asked)."""
    ask_at = sorted({args.seconds * (i + 1) // 5 - 1 for i in range(5)})
    rows = []
    for world in worlds:
        def ask(s, rec):
            t = rec["t"]
            if t not in ask_at:
                return
            first = world.first_goal(t)
            for kind, question in QUESTIONS.items():
                truth, got = answer(kind, world.score(t), first[1] if first else None), s.ask(question)
                rows.append(dict(policy=policy, seed=world.cfg.seed, t=t, question=kind, truth=truth, answer=got,
                                 right=got == truth))
                res.log(**rows[-1])
        force = (lambda t: world.text(t)) if args.teacher_forced else None
        run_policy(model, tok, policy, args.seconds, lambda t: world.second(t).frames, args, force, ask, **kw)
    right = {q: [r["right"] for r in rows if r["question"] == q] for q in QUESTIONS}
    summary = dict(policy=policy, asked=len(rows), right=mean([r["right"] for r in rows]),
                   **{q: f"{sum(v)}/{len(v)}" for q, v in right.items()})
    return dict(summary=summary, rows=rows)


def task_questions(args, model, tok, st, res):
    fed = "the true commentary (teacher-forced)" if args.teacher_forced else "the model's own commentary"
    rows, result = over_policies(args, model, tok, st, res, ask_policy, f"questions at every 20%, after {fed}")
    print("\n" + table(rows))
    print("right: the answer equals world.answer (" + "; ".join(f"{k}: {q!r}" for k, q in QUESTIONS.items()) + ")")
    res.save(result)
    return result


def video_seconds(path, errors):
    """The seconds of a video as video.py reads them; a reader error (video.VideoError is a ValueError; or an
    OSError) ends them and goes into `errors`, so the seconds before it are kept. Errors of the model are not
    caught here: they come from the caller's loop, not from this generator."""
    try:
        yield from seconds_of(open_video(path))
    except (ValueError, OSError) as e:
        errors.append(e)


def task_video(args, model, tok, st, res):
    s = make_streamer(model, tok, "streaming", **streamer_settings(args, st))
    commentary, errors = [], []
    seconds = islice(video_seconds(args.video, errors), args.seconds or None)  # --seconds 0: all of it
    for t, frames in enumerate(tqdm(seconds, desc=args.video, unit="s", total=args.seconds or None, leave=False,
                                    dynamic_ncols=True)):
        try:
            commentary.append(dict(t=t, text=s.step(frames)))
        except FrameError as e:   # frames the processor refuses (two sizes in one second, a 300:1 frame): the video's
            errors.append(f"{args.video}: second {t}: {e}")
            break
        res.log(**commentary[-1])
        if commentary[-1]["text"]:
            tqdm.write(f"[{t:6d}s] {commentary[-1]['text']}")
    error = str(errors[0]) if errors else None
    if error and not error.startswith(args.video):
        error = f"{args.video}: {error}"
    res.save(dict(video=args.video, model=args.model, seconds=len(commentary), error=error, commentary=commentary))
    if error:  # one line, after the commentary read so far is saved
        sys.exit(f"{error} (the commentary of the {len(commentary)} s before it is in {res.path}.json)")
    return commentary

# -----------------------------------------------------------------------------
# The command line


def decode_paths(text):
    """'plain' or a comma list such as 'graphs,compiled' (stream.DECODERS)."""
    paths = text.split(",")
    if not all(p in DECODERS for p in paths):
        raise argparse.ArgumentTypeError(f"expected {', '.join(DECODERS)} (or a comma list), got {text!r}")
    return paths


def add_run_flags(ap, warmup, out):
    """The flags of the streaming loop that eval.py and tools/bench_stream.py share, each checked as it is parsed."""
    ap.add_argument("--out", default=out, help=f"folder for the JSON lines and the summary (default {out})")
    paper = [name for name, p in POLICIES.items() if p.paper]
    ap.add_argument("--policies", nargs="+", default=paper, choices=list(POLICIES), help="policies to run, one after "
                    f"another (default: the paper's {len(paper)}, {' '.join(paper)}); "
                    + "; ".join(f"{name}: {p.about}" for name, p in POLICIES.items()))
    add_layout_flags(ap)
    ap.add_argument("--time-limit", type=at_least(0.0, float), default=0.0,
                    help="seconds of wall time per policy and stream, or batch (default 0: none)")
    ap.add_argument("--warmup", type=at_least(0), default=warmup,
                    help=f"first seconds left out of the latency numbers (default {warmup})")
    ap.add_argument("--reset-every", type=at_least(1), default=None,
                    help="the reset policy's period in seconds (default: 100, or half of --seconds when shorter)")
    ap.add_argument("--decode", type=decode_paths, default=None, help="decode step: plain (model.forward), graphs "
                    "(CUDA-graph step), compiled (compiled, then a graph); default: compiled on a GPU, plain on a CPU")
    ap.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if any)")
    ap.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="resize each second's frames "
                    "inside its step instead of on a thread during the second before")


def check_run_flags(ap, args, default_seconds=None):
    """Defaults that depend on the device and --seconds, and flags that make no sense together."""
    gpu = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    check_device(ap, args.device)
    policies = getattr(args, "policies", None) or []
    if len(set(policies)) < len(policies):   # the results keep one row a policy
        ap.error(f"--policies names {', '.join(sorted({p for p in policies if policies.count(p) > 1}))} twice")
    # before anything loads, a bad --out costs one line: it and the files a run writes there (Results) must be
    # writable and none of the inputs (the video, the model, the data), nor inside one
    inputs = inputs_of(args, "video", "model", "data")
    written = [os.path.join(args.out, getattr(args, "task", "results") + ext) for ext in (".json", ".jsonl")]
    problems = [output_problem(args.out, inputs, holds=False, results=True)]
    problems += [file_problem(f, inputs) for f in written]
    if problem := next((p for p in problems if p), None):
        ap.error(f"--out {problem}")
    args.decode = args.decode or ["compiled" if gpu else "plain"]
    if not gpu and "graphs" in args.decode:
        print("--decode graphs on a CPU: the same fixed-shape step, run eagerly (CUDA graphs need a GPU)")
    if args.seconds is None:
        args.seconds = default_seconds(gpu)
    args.reset_every = args.reset_every or max(1, min(100, args.seconds // 2))
    return gpu


def build_parser():
    ap = Parser(prog="eval.py", description=__doc__.strip().split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("task", nargs="?", choices=TASKS, help="default: stream (video with --video)")
    ap.add_argument("--model", default=default_model(), help="checkpoint folder (default: checkpoints/tiny if it "
                    f"exists, else out/tiny, what `python train.py` writes; now {default_model()})")
    ap.add_argument("--video", help="a video file, a GIF or a folder of frames to comment on (the video task)")
    # (bounds: a held-out stream's truth is built before its first second, and a batch holds every stream at once)
    ap.add_argument("--seconds", type=between(1, 10**6), default=None, help="stream length (stream: 7200 on a GPU, 600 "
                    "on a CPU, ~2 minutes for the five policies on 2 cores; questions: 7200 / 60; video: the whole "
                    "video)")
    ap.add_argument("--streams", type=between(1, 1024), default=1, help="held-out streams per policy (default 1)")
    ap.add_argument("--batch", action="store_true", help="stream: run the held-out streams together, one batch a "
                    f"second (serve.StreamBatch; policies {', '.join(BATCHED)}; the others one after another): each "
                    "says what it says alone; latency is a batch second's, memory the batch's")
    ap.add_argument("--seed", type=HELD_OUT_SEED, default=0,
                    help="the first held-out stream (default 0): stream i is world.split_seed('eval', SEED + i)")
    ap.add_argument("--teacher-forced", action="store_true", help="questions: stream the true commentary instead of "
                    "the model's own (the questions then test the memory alone)")
    ap.add_argument("--flexprefill", action="store_true", help="block-sparse prefill (FlexPrefill) in the model")
    ap.add_argument("--fp8", action="store_true", help="every Linear in FP8 with row-wise scales (quantize.py): how "
                    "much of the score the approximation keeps")
    add_run_flags(ap, warmup=1, out="out/eval")
    return ap


def get_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    args.task = args.task or ("video" if args.video else "stream")
    if args.video and args.task != "video":
        ap.error(f"--video streams a video (the video task), not the {args.task} task: drop one of them")
    if args.task == "video" and not args.video:
        ap.error("the video task needs --video FILE")
    if args.video and not (os.path.exists(args.video) or is_live(args.video)):
        ap.error(f"--video {args.video}: no such file or folder")
    if args.batch and args.task != "stream":
        ap.error(f"--batch runs the stream task's held-out streams together; the {args.task} task streams one at "
                 "a time")
    if args.seed + args.streams > SPLIT_SIZE:
        ap.error(f"--seed {args.seed} with --streams {args.streams} leaves the held-out range (seed + streams must "
                 f"be at most {SPLIT_SIZE}; world.split_seed)")
    if len(args.decode or []) > 1:
        ap.error("--decode takes one path here (tools/bench_stream.py compares several)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        ap.error(f"--model {args.model}: no checkpoint there; make one with `python train.py` (it writes out/tiny) "
                 "or pass --model DIR")
    # on a CPU, 600 s: long enough for the policies to part (native RoPE and resets lose the score, full attention
    # the events), short enough for a first run
    check_run_flags(ap, args, lambda gpu: 0 if args.task == "video" else 7200 if gpu else
                    600 if args.task == "stream" else 60)
    return args


def main(argv=None):
    args = get_args(argv)
    st = checkpoint_settings(args.model)
    try:  # the layout flags against the checkpoint's stream.json, before the model loads
        layout_of(st, args)
    except ValueError as e:
        sys.exit(f"eval.py: error: {e}")
    res = None
    try:
        with RunLock(args.out):  # one run at a time writes --out
            print(f"eval.py {args.task}: model {args.model}; {hardware()}", flush=True)
            model, tok, st = load_checkpoint(args.model, args.device, args.flexprefill, st, args.fp8)
            task = dict(stream=task_stream, questions=task_questions, video=task_video)[args.task]
            res = Results(args.out, args.task)
            return task(args, model, tok, st, res)
    except Busy as e:
        sys.exit(f"eval.py: error: {e}")
    except KeyboardInterrupt:  # what was measured is on disk already (Results flushes every line): say where
        done = res.last.get("t", -1) + 1 if res and res.last else 0
        print(f"stopped at second {done}; outputs complete up to it ({args.out})", file=sys.stderr)
        raise  # a caller of main() sees the interrupt; the command line ends with status 130, below


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)  # the status of a process ended by SIGINT, without a traceback
