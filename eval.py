"""
Measure what the papers claim, side by side. Each task prints a table and writes a JSON file (and PNG plots
when matplotlib is installed) into --out.

  python eval.py                        # stream: the trained tiny model on held-out 2-hour streams, 5 policies
  python eval.py efficiency             # the 7B config (random weights), per-token / per-second latency, memory
  python eval.py flexprefill            # the kernel benchmark (bench_flexprefill.py), then dense vs FlexPrefill
                                        # prefill of a long held-out stream on the trained tiny model
  python eval.py --model DIR --video F  # stream a real video through a real checkpoint, save the commentary

Metrics of the stream task (world.py's sentences are parsed back into (event, team)):
  event F1 (exact second / +-1 s), score accuracy (a true goal counts as right when the model says a goal
  sentence with the right running score within +-1 s), silence accuracy (quiet seconds left quiet), the same
  over five 20% slices of the stream (the paper's Fig. 8), per-second latency p50/p99, peak memory, and the
  largest M-RoPE position. A policy that runs out of memory or time is reported with the second it failed.
"""
import argparse
import functools
import gc
import json
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from cache import POLICIES
from model import PRESETS, VLM, pick_device_dtype
from processor import Tokenizer, build_tokenizer, preprocess_video
from layout import FRAME_PIXELS, end_ids, prefix_segments, question_segments, reply_ids, user_ids
from stream import Streamer, load_checkpoint
from video import open_video, seconds_of
from world import QUESTIONS, SportsStream, WorldConfig, answer, split_seed

EVENT_RES = [("goal", re.compile(r"^(Red|Blue) scores! Red (\d+), Blue (\d+)\.$")),
             ("shot", re.compile(r"^(Red|Blue) shoots!$")), ("save", re.compile(r"^(Red|Blue) keeper saves\.$")),
             ("foul", re.compile(r"^Foul by (Red|Blue)\.$")), ("corner", re.compile(r"^Corner for (Red|Blue)\.$"))]

DECODES = {"eager": {}, "graphs": dict(graphs=True), "compiled": dict(graphs=True, compile=True)}  # Streamer kw

# -----------------------------------------------------------------------------
# Metrics (tested on hand-made transcripts in tests/test_eval.py)


def parse_event(text):
    """(event, team, score or None) of a commentary sentence, None for silence or anything unrecognised."""
    for name, rx in EVENT_RES:
        m = rx.match(text.strip())
        if m:
            return name, m.group(1), (int(m.group(2)), int(m.group(3))) if name == "goal" else None
    return None


def score_transcript(truth, pred, t0=0, t1=None):
    """truth, pred: lists of texts, one per second ('' = silence). Scores seconds [t0, t1)."""
    t1 = len(truth) if t1 is None else t1
    T = {t: parse_event(truth[t]) for t in range(t0, t1) if parse_event(truth[t])}
    P = {t: parse_event(pred[t]) for t in range(t0, t1) if parse_event(pred[t])}

    def f1(tol):
        used, tp = set(), 0
        for t, (ev, team, _) in sorted(T.items()):  # one-to-one: each prediction matches at most one event
            for d in sorted(range(-tol, tol + 1), key=abs):
                p = P.get(t + d)
                if p and t + d not in used and p[:2] == (ev, team):
                    used.add(t + d)
                    tp += 1
                    break
        prec = tp / len(P) if P else 1.0
        rec = tp / len(T) if T else 1.0
        return 2 * prec * rec / (prec + rec) if prec + rec else 0.0

    goals = [(t, e) for t, e in T.items() if e[0] == "goal"]
    right = sum(any(P.get(t + d) == e for d in (-1, 0, 1)) for t, e in goals)
    quiet = [t for t in range(t0, t1) if not truth[t].strip()]
    silent = sum(not pred[t].strip() for t in quiet)
    return dict(f1=f1(0), f1_tol1=f1(1), score_acc=right / len(goals) if goals else None, goals=len(goals),
                silence_acc=silent / len(quiet) if quiet else None, events=len(T))


def slices(truth, pred, n=5):
    L = len(pred)
    return [score_transcript(truth, pred, L * i // n, L * (i + 1) // n) for i in range(n)]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def hardware():
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}, torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}"


def peak_memory(device, cache):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return cache.nbytes() / 2**30  # on CPU: the cache buffers (weights and activations are constant)


def table(rows, cols):
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def save(args, name, result):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def plot(args, name, series, xlabel, ylabel):
    """series: {label: (xs, ys)}; silently skipped without matplotlib (an optional extra) or without series."""
    if not series:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=120)
    plt.close(fig)

# -----------------------------------------------------------------------------
# The run loop shared by the tasks


def run_policy(model, tok, policy, seconds, frames_of, args, force=None, warmup=1, **kw):
    """Stream `seconds` seconds; returns texts, per-second latencies and (decode time, decode forwards), and where
    it failed (or None). The first `warmup` seconds are left out of the streamer's per-phase means (allocation,
    kernel selection, the cache growing to its steady size, compiling)."""
    device = model.device
    fresh_peak(device)
    s = Streamer(model, tok, policy, **kw)
    texts, lat, decode, maxpos, failed, t_start, mem = [], [], [], 0, None, time.perf_counter(), []
    # prefetch: a thread renders and resizes second t+1 while the GPU works on second t (as a live source would
    # be decoded ahead); a second's latency still includes any wait for its frames
    pool = ThreadPoolExecutor(1) if args.prefetch else None
    resize = []  # CPU seconds of each second's frames + resize, on the thread

    def prepare(t):
        t0 = time.perf_counter()
        out = s.prepare(frames_of(t))
        resize.append(time.perf_counter() - t0)
        return out
    ahead = pool.submit(prepare, 0) if pool else None
    for t in range(seconds):
        try:
            if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                raise TimeoutError(f"over the {args.time_limit} s time limit")
            sync(device)
            t0, d0, n0 = time.perf_counter(), s.decode_time, s.decode_tokens
            if pool:
                frames = ahead.result()
                if t + 1 < seconds:
                    ahead = pool.submit(prepare, t + 1)
            else:
                frames = frames_of(t)
            texts.append(s.step(frames, force_text=force(t) if force else None))
            sync(device)
            lat.append(time.perf_counter() - t0)
            if device.type == "cuda":
                mem.append(torch.cuda.memory_allocated() / 2**30)  # GiB held after this second
            decode.append((s.decode_time - d0, s.decode_tokens - n0))  # this second's decode time and forwards
            if t == warmup - 1:
                s.phases = {}
            maxpos = max(maxpos, s.cache.max_position())
        except (torch.OutOfMemoryError, TimeoutError) as e:
            failed = dict(second=t, reason=type(e).__name__)
            break
    if pool:
        pool.shutdown(wait=True, cancel_futures=True)
    return dict(texts=texts, latency=lat, decode=decode, max_position=maxpos, failed=failed,
                peak_gib=peak_memory(device, s.cache), cache_tokens=s.cache.length, streamer=s, resize=resize,
                memory_gib=mem)


def steady_capacity(frames, fps=2, text_sink=512, text_window=512, vision_window=16):
    """Cache slots for a bounded policy's steady state with these frames each second: text sink + window, the
    prompts, and vision_window + 1 seconds of vision and text. Sized up front because growing the buffers
    mid-stream re-specialises a compiled decode step (an ~8 s stall at second ~860 on the H100)."""
    n_vision = int(preprocess_video(frames, fps=fps, min_pixels=FRAME_PIXELS[0], max_pixels=FRAME_PIXELS[1])[1]
                   .prod()) // 4
    return n_vision, text_sink + text_window + 256 + (vision_window + 1) * (n_vision + 64)


def ms_per_token(decode):
    """Mean decode time per forward over [(seconds, forwards)] of some stream seconds; None when there were none."""
    forwards = sum(n for _, n in decode)
    return 1000 * sum(dt for dt, _ in decode) / forwards if forwards else None


def sync(device):
    """Wait for the GPU's queued work (timings must include it); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_gpu(args):
    """Whether this run uses CUDA: available, and --device (if given) names it."""
    return torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")


def fresh_peak(device):
    """Free what earlier runs left (collect first: a cycle could still hold a cache) and restart the peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def load(args):
    return load_checkpoint(args.model, args.device, args.flexprefill)


def windows(st):
    """The cache windows a checkpoint was trained for (its stream.json; the paper's 512 / 512 / 16 without one)."""
    return dict(text_sink=st.get("text_sink", 512), text_window=st.get("text_window", 512),
                vision_window=st.get("vision_window", 16))

# -----------------------------------------------------------------------------
# Tasks


def task_stream(args):
    model, tok, st = load(args)
    kw = dict(**windows(st), max_new_tokens=args.max_new_tokens, **DECODES[args.decode[0]])
    frame = SportsStream(WorldConfig(seed=split_seed("eval", 0), size=st.get("frame_size", 56))).second(0).frames
    _, capacity = steady_capacity(frame, text_sink=kw["text_sink"], text_window=kw["text_window"],
                                  vision_window=kw["vision_window"])
    print(f"{hardware()}; {args.streams} held-out stream(s) x {args.seconds} s, windows {kw}")
    kw["capacity"] = capacity
    rows, result = [], dict(settings=dict(vars(args), **kw), hardware=hardware(), policies={})
    for policy in args.policies:
        agg, per_slice, lat, runs = [], [], [], []
        for i in range(args.streams):
            world = SportsStream(WorldConfig(seed=split_seed("eval", i), size=st.get("frame_size", 56)))
            truth = [world.text(t) for t in range(args.seconds)]
            reset = dict(reset_every=args.reset_every) if policy == "reset" else {}
            r = run_policy(model, tok, policy, args.seconds, lambda t: world.second(t).frames, args, **kw, **reset)
            n = len(r["texts"])
            agg.append(score_transcript(truth[:n], r["texts"]))
            per_slice.append(slices(truth[:n], r["texts"]) if n >= 5 else [])
            lat += r["latency"]
            runs.append({k: v for k, v in r.items() if k != "streamer"})
            del r  # free this run's cache before the next run measures its peak memory
        mean = lambda key, rows_: (lambda v: round(sum(v) / len(v), 3) if v else None)(
            [x[key] for x in rows_ if x.get(key) is not None])
        failed = [r["failed"] for r in runs if r["failed"]]
        row = dict(policy=policy, f1=mean("f1", agg), f1_1s=mean("f1_tol1", agg), score=mean("score_acc", agg),
                   silence=mean("silence_acc", agg), p50_ms=round(1000 * percentile(lat, 50), 1),
                   p99_ms=round(1000 * percentile(lat, 99), 1), peak_gib=round(max(r["peak_gib"] for r in runs), 3),
                   max_pos=max(r["max_position"] for r in runs),
                   failed=f"{failed[0]['reason']} at {failed[0]['second']} s" if failed else "-")
        rows.append(row)
        sl = [[x for x in col] for col in zip(*per_slice)] if all(per_slice) else []
        result["policies"][policy] = dict(summary=row, runs=runs,
                                          slices=[dict(f1=mean("f1", c), score=mean("score_acc", c)) for c in sl])
        print(table([row], list(row)), flush=True)
    print("\n" + table(rows, list(rows[0])))
    if any(result["policies"][p]["slices"] for p in args.policies):
        print("\nevent F1 / score accuracy per 20% slice of the stream (paper Fig. 8):")
        for p in args.policies:
            print(f"  {p:10s} " + "  ".join(f"{s['f1']}/{s['score']}" for s in result["policies"][p]["slices"]))
    save(args, "stream", result)
    plot(args, "stream_latency", {p: (range(len(v["runs"][0]["latency"])), [1000 * x for x in v["runs"][0]["latency"]])
                                  for p, v in result["policies"].items()}, "stream second", "latency per second (ms)")
    return result


def task_efficiency(args):
    """The 7B config (or --preset), random weights, a fixed number of decoded tokens a second; then, with --hf,
    transformers' own Qwen2.5-VL holding the same weights on the same loop."""
    device, dtype = pick_device_dtype(args.device)
    cfg = PRESETS[args.preset]()
    tok = Tokenizer(build_tokenizer(["a b c d e f g", " ...", " ..."], 300, qwen_ids=cfg.vocab_size > 151664))
    cfg.image_token_id, cfg.video_token_id = tok.image_pad_id, tok.video_pad_id
    if cfg.vocab_size < len(tok):
        cfg.vocab_size = len(tok)
    hf, hf_ms, hf_window = None, None, (0, 0)
    if args.hf:
        from bench_model import twins  # transformers' model built first; ours shares its tensors
        torch.manual_seed(0)
        hf, model = twins(cfg, device, dtype)
    else:
        with torch.device(device):
            model = VLM(cfg).to(dtype).init_weights(std=0.02).eval()
    if args.flexprefill:
        model.enable_flexprefill()
    g = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 255, (args.height, args.width, 3), generator=g, dtype=torch.uint8) for _ in range(4)]
    frames_of = lambda t: [frames[(t + j) % 4] for j in range(args.fps)]
    rows, result = [], dict(settings=vars(args), hardware=hardware(), policies={})
    # a reply that makes exactly max_new_tokens decoded tokens a second: words of one token, then " ..." <|im_end|>
    if args.max_new_tokens < len(end_ids(tok)):
        sys.exit(f"efficiency needs --max-new-tokens >= {len(end_ids(tok))} (a word, ' ...' and <|im_end|>)")
    fixed = " ".join(["b"] * (args.max_new_tokens - len(end_ids(tok)) + 1))
    assert len(reply_ids(tok, fixed)) + len(end_ids(tok)) - 1 == args.max_new_tokens, "toy tokenizer changed"
    pixels = dict(min_pixels=FRAME_PIXELS[0], max_pixels=FRAME_PIXELS[1])  # what the Streamer resizes to
    n_vision, capacity = steady_capacity(frames_of(0), fps=args.fps)  # the Streamer's default windows
    warmup = min(args.warmup, args.seconds // 2)
    print(f"{hardware()}; {args.preset} config, {args.height}x{args.width} at {args.fps} fps ({n_vision} vision "
          f"tokens a second), {args.seconds} s; means leave out the first {warmup} s")

    def report(name, decode, r, phases, warmup=warmup):
        lat = r["latency"]
        steady = lat[warmup:]  # empty when the run failed (or the stream ended) within the warm-up
        k = max(1, len(steady) // 10)
        ms = lambda xs: round(1000 * sum(xs) / len(xs), 1) if xs else None
        per_token = ms_per_token(r["decode"][warmup:])
        row = dict(policy=name, decode=decode, first_ms=ms(steady[:k]), last_ms=ms(steady[-k:]),
                   p99_ms=round(1000 * percentile(steady[-max(1, len(steady) // 2):], 99), 1) if steady else None,
                   ms_per_token=round(per_token, 2) if per_token else None,
                   peak_gib=round(r["peak_gib"], 2), cache=r["cache_tokens"], max_pos=r["max_position"],
                   failed=f"{r['failed']['reason']} at {r['failed']['second']} s" if r["failed"] else "-")
        if steady:  # mean per second
            row.update({f"{ph}_ms": round(1000 * v / len(steady), 1) for ph, v in phases.items()})
        if len(r.get("memory_gib", [])) > warmup:  # memory held after a second, first and last 10% of the steady part
            m = r["memory_gib"][warmup:]
            row["mem_first_last_gib"] = f"{sum(m[:k]) / k:.2f}/{sum(m[-k:]) / k:.2f}"
        if r.get("resize") and len(r["resize"]) > warmup:  # prefetched: frames + resize ran on a thread meanwhile
            row["resize_ms_on_thread"] = ms(r["resize"][warmup:])
        rows.append(row)
        print(table([row], list(row)), flush=True)
        result["policies"][name if name == "transformers" or len(args.decode) == 1 else f"{name}-{decode}"] = dict(
            summary=row, latency=lat, memory_gib=r.get("memory_gib"))

    if hf is not None:
        hf_seconds = min(args.seconds, args.hf_seconds)
        r = hf_loop(hf, tok, hf_seconds, frames_of, args, min(warmup, hf_seconds // 2), pixels)
        report("transformers", "generate", r, r["phases"], r["warmup"])
        hf_window = (r["warmup"], len(r["latency"]))  # the seconds the ratio compares, ours and theirs
        hf_ms = rows[-1]["ms_per_token"]
        del r
    for policy, decode in [(p, d) for p in args.policies for d in args.decode]:
        r = run_policy(model, tok, policy, args.seconds, frames_of, args, force=lambda t: fixed, warmup=warmup,
                       max_new_tokens=args.max_new_tokens, fps=args.fps, capacity=capacity,
                       readback=not args.no_readback, **DECODES[decode])
        s = r["streamer"]
        report(policy, decode, r, s.phases)
        ours = ms_per_token(r["decode"][hf_window[0]:hf_window[1]])
        if hf_ms and ours:
            rows[-1]["hf_ms_per_token_ratio"] = round(hf_ms / ours, 2)
        del r, s  # free this run's cache (and graph) before the next run measures its peak memory
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print("\n" + table(rows, cols))
    if hf is not None:
        print("hf_ms_per_token_ratio: transformers' ms per token over ours in the same seconds of the stream "
              f"({hf_window[0]} to {hf_window[1]}: transformers runs the first {min(args.seconds, args.hf_seconds)} s "
              "only, its cache only grows), same weights, same loop, same run")
    save(args, "efficiency", result)
    # second 0 left out: its start-up (and compilation, tens of seconds) would flatten everything else
    plot(args, "efficiency_latency", {p: (range(1, len(v["latency"])), v["latency"][1:]) for p, v in
                                      result["policies"].items()}, "stream second", "seconds per stream second")
    plot(args, "efficiency_memory", {p: (range(len(v["memory_gib"])), v["memory_gib"]) for p, v in
                                     result["policies"].items() if v.get("memory_gib")}, "stream second",
         "GPU memory held (GiB)")
    return result


@torch.no_grad()
def hf_loop(hf, tok, seconds, frames_of, args, warmup, pixels):
    """transformers' Qwen2.5-VL on our per-second loop: its default (growing) DynamicCache, a forward for the new
    user turn with its frames, then generate() for exactly --max-new-tokens tokens. Its positions after the first
    second follow transformers' text rule (rope_deltas), not the video one: the same work, other numbers."""
    import transformers
    from transformers import DynamicCache
    dev = hf.device
    fresh_peak(dev)
    # transformers 5 builds the M-RoPE runs from token types it is given; 4.x reads them off the ids
    types = int(transformers.__version__.split(".")[0]) >= 5
    cache = DynamicCache()
    ids = torch.tensor([[i for seg, _ in prefix_segments(tok) for i in seg]], device=dev)
    n = args.max_new_tokens
    lat, decode, phases, failed, t_start = [], [], {}, None, time.perf_counter()
    for t in range(seconds):
        try:
            if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                raise TimeoutError(f"over the {args.time_limit} s time limit")
            frames = frames_of(t)
            sync(dev)
            t0 = time.perf_counter()
            pv, grid, secs = preprocess_video(frames, fps=args.fps, device=dev, **pixels)
            sync(dev)
            t1 = time.perf_counter()
            ids = torch.cat([ids, torch.tensor([user_ids(tok, t, int(grid.prod()) // 4)], device=dev)], 1)
            new = ids[:, cache.get_seq_length():-1]  # the last token is left for generate to feed
            vision = dict(pixel_values_videos=pv.to(hf.dtype), video_grid_thw=grid.to(dev), second_per_grid_ts=secs)
            if types:
                vision["mm_token_type_ids"] = (new == tok.video_pad_id).long() * 2
            hf(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=1, **vision)
            sync(dev)
            t2 = time.perf_counter()
            ids = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id)
            sync(dev)
            t3 = time.perf_counter()
            lat.append(t3 - t0)
            decode.append((t3 - t2, n))
            if t >= warmup:
                for ph, dt in (("preprocess", t1 - t0), ("prefill", t2 - t1), ("decode", t3 - t2)):
                    phases[ph] = phases.get(ph, 0.0) + dt
        except (torch.OutOfMemoryError, TimeoutError) as e:
            failed = dict(second=t, reason=type(e).__name__)
            break
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    # max_position: None, transformers' positions (cache position + rope_deltas) are not ours to report
    return dict(latency=lat, decode=decode, failed=failed, peak_gib=peak, cache_tokens=cache.get_seq_length(),
                max_position=None, phases=phases, warmup=warmup)


def task_flexprefill(args):
    """The kernel benchmark, then FlexPrefill on the trained tiny model over a long held-out stream."""
    import bench_flexprefill
    if args.skip_kernel_bench:
        return dict(long_prefill=long_prefill_check(args))
    gpu = on_gpu(args)
    small = [] if gpu else ["--device", "cpu", "--lengths", "1024", "--heads", "4", "1", "--iters", "2"]  # a CPU smoke
    kernel = bench_flexprefill.main(["--json", os.path.join(args.out, "flexprefill.json")] + small
                                    + (["--device", args.device] if args.device and gpu else []))
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"no checkpoint at {args.model}: skipping the long-prefill check (make one with `python train.py`)")
        return dict(kernel=kernel)
    return dict(kernel=kernel, long_prefill=long_prefill_check(args))


@torch.no_grad()
def long_prefill_check(args):
    """Prefill `--seconds` of each of `--streams` held-out streams (true commentary as the context, laid out as in
    training) plus a question whose answer needs the whole video (world.QUESTIONS: the score, the number of goals,
    who scored first) in one forward, and decode the answer. Dense and FlexPrefill side by side: the answers, the
    prefill time (first question of each stream), the density and the attention-output error. For contrast the
    same questions go to the StreamingVLM cache after streaming the same seconds (Streamer.ask): its memory is the
    sink, the text window and the vision window, which is what the model was trained on."""
    from flexprefill import causal_attention, flexprefill_attention
    from data import build_sample
    model, tok, st = load(args)
    fp = dict(gamma=args.gamma, min_budget=args.min_budget)
    stats = dict(density=[], rel_err=[])

    def measured(q, k, v):  # FlexPrefill that also records its density and error against dense attention
        out, info = flexprefill_attention(q, k, v, return_info=True, **fp)
        dense = causal_attention(q, k, v)
        stats["density"].append(1.0 if info["dense_fallback"] else float(info["density"].float().mean()))
        stats["rel_err"].append(float((out - dense).float().norm() / dense.float().norm()))
        return out
    measured.min_len = 1
    fast = functools.partial(flexprefill_attention, **fp)
    fast.min_len = 1

    def use(attn):
        for layer in model.model.layers:
            layer.self_attn.prefill_attn = attn

    def timed_prefill(ids, vision):
        model(ids, **vision, logits_to_keep=1)  # warm-up (and compilation)
        sync(model.device)
        t0 = time.perf_counter()
        model(ids, **vision, logits_to_keep=1)
        sync(model.device)
        return time.perf_counter() - t0

    def reply(ids, vision):
        out = model.generate(ids, max_new_tokens=12, stop_ids=[tok.im_end_id], **vision)[0, ids.shape[1]:].tolist()
        return tok.decode([i for i in out if i != tok.im_end_id]).strip()

    rows, times, longest = [], [], 0
    for n in tqdm(range(args.streams), desc="streams", disable=args.streams < 2):
        world = SportsStream(WorldConfig(seed=split_seed("eval", n), size=st.get("frame_size", 56)))
        secs = [world.second(t) for t in range(args.seconds)]
        sample = build_sample(tok, [s.frames for s in secs], [s.text for s in secs], 0, [])
        vision = dict(pixel_values_videos=sample.pixel_values.to(model.device), video_grid_thw=sample.grid_thw)
        first = world.first_goal(args.seconds - 1)
        streamer = Streamer(model, tok, **windows(st))
        for s in secs:  # the same context as the prefill: the true commentary, teacher-forced
            streamer.step(s.frames, force_text=s.text)
        for kind, question in QUESTIONS.items():
            truth = answer(kind, world.score(args.seconds - 1), first[1] if first else None)
            ids = torch.cat([sample.ids, torch.tensor(question_segments(tok, question)[0][0])])[None].to(model.device)
            longest = max(longest, ids.shape[1])
            if kind == "score":  # time and measure once per stream: the questions share all but a few tokens
                use(None)
                dense_s = timed_prefill(ids, vision)
                use(fast)
                times.append((dense_s, timed_prefill(ids, vision)))
                use(measured)
                model(ids, **vision, logits_to_keep=1)
            use(None)
            dense = reply(ids, vision)
            use(fast)
            sparse = reply(ids, vision)
            use(None)
            streaming = streamer.ask(question)
            rows.append(dict(stream=n, question=kind, truth=truth, dense=dense, flexprefill=sparse,
                             same=dense == sparse, dense_right=dense == truth, flexprefill_right=sparse == truth,
                             streaming=streaming, streaming_right=streaming == truth))
    k = len(rows)
    summary = dict(seconds=args.seconds, tokens=longest, streams=args.streams, questions=k,
                   dense_right=round(sum(r["dense_right"] for r in rows) / k, 3),
                   flexprefill_right=round(sum(r["flexprefill_right"] for r in rows) / k, 3),
                   same_answer=round(sum(r["same"] for r in rows) / k, 3),
                   streaming_right=round(sum(r["streaming_right"] for r in rows) / k, 3),
                   dense_ms=round(1000 * sum(d for d, _ in times) / len(times), 1),
                   flexprefill_ms=round(1000 * sum(f for _, f in times) / len(times), 1),
                   density=round(sum(stats["density"]) / len(stats["density"]), 3),
                   attn_rel_err=round(max(stats["rel_err"]), 4))
    print(f"\nwhole-video questions after a {args.seconds} s prefill on {args.model} ({hardware()}; "
          f"gamma {args.gamma}, min_budget {args.min_budget}; prefill times include the vision tower):")
    print(table(rows[:12], list(rows[0])))
    if k > 12:
        print(f"... {k - 12} more rows in the JSON file")
    print(table([summary], list(summary)))
    per_kind = {q: {m: sum(r[f"{m}_right"] for r in rows if r["question"] == q)
                    for m in ("dense", "flexprefill", "streaming")} | dict(asked=sum(r["question"] == q for r in rows))
                for q in QUESTIONS}
    print("right per question (dense / FlexPrefill / streaming cache): " + ", ".join(
        f"{q} {v['dense']}/{v['flexprefill']}/{v['streaming']} of {v['asked']}" for q, v in per_kind.items()))
    result = dict(summary=summary, per_question=per_kind, rows=rows)
    save(args, "long_prefill", result)
    return result


def task_video(args):
    model, tok, st = load(args)
    s = Streamer(model, tok, **windows(st), max_new_tokens=args.max_new_tokens, **DECODES[args.decode[0]])
    out = []
    for t, frames in enumerate(seconds_of(open_video(args.video))):
        if args.seconds and t >= args.seconds:
            break
        text = s.step(frames)
        out.append(dict(t=t, text=text))
        if text:
            print(f"[{t:6d}s] {text}", flush=True)
    save(args, "video", dict(video=args.video, model=args.model, commentary=out))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate streaming policies and FlexPrefill; see the docstring.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("task", nargs="?", default="stream", choices=["stream", "efficiency", "flexprefill"])
    ap.add_argument("--model", default="out/tiny", help="checkpoint folder (default: what train.py writes)")
    ap.add_argument("--video", default=None, help="stream this video through --model instead of a task")
    ap.add_argument("--out", default="out/eval", help="where JSON results and plots go")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--seconds", type=int, default=None, help="stream length (stream: 7200 on a GPU, 600 on a CPU; efficiency: 3600; "
                    "flexprefill: 1800 / 120)")
    ap.add_argument("--streams", type=int, default=1, help="held-out streams (stream: per policy; flexprefill: "
                    "each asked the three questions)")
    ap.add_argument("--reset-every", type=int, default=100, help="the reset policy's period in seconds")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=0, help="seconds of wall time per policy (0 = none)")
    ap.add_argument("--flexprefill", action="store_true", help="block-sparse prefill in the model")
    ap.add_argument("--preset", default="7B", choices=list(PRESETS), help="efficiency: model config")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--fps", type=int, default=2, choices=[2, 4, 6, 8])
    ap.add_argument("--device", default=None)
    ap.add_argument("--gamma", type=float, default=0.9, help="flexprefill: attention mass to keep")
    ap.add_argument("--min-budget", type=int, default=1024, help="flexprefill: tokens always kept per query block")
    ap.add_argument("--skip-kernel-bench", action="store_true", help="flexprefill: only the long-prefill check")
    ap.add_argument("--decode", default=None, type=lambda x: x.split(","),
                    help="decode step, or a comma list for the efficiency task: eager (model.forward), graphs "
                    "(decode.py's step in a CUDA graph), compiled (torch.compile'd, then a CUDA graph); "
                    "default: compiled on a GPU, eager on a CPU")
    ap.add_argument("--warmup", type=int, default=30, help="efficiency: seconds left out of the means")
    ap.add_argument("--hf", action="store_true", help="efficiency: also run transformers' Qwen2.5-VL (same "
                    "weights) on the same loop with its default cache and generate")
    ap.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="resize each second's frames "
                    "inside its step instead of on a thread during the previous second")
    ap.add_argument("--no-readback", action="store_true", help="efficiency: do not read each forced token's "
                    "argmax back to the host (real greedy decoding must; without it the CPU runs ahead of the GPU)")
    ap.add_argument("--hf-seconds", type=int, default=120, help="efficiency: seconds of the transformers run")
    args = ap.parse_args(argv)
    if args.seconds is not None and args.seconds < 1:
        ap.error("--seconds must be positive")
    gpu = on_gpu(args)
    args.decode = args.decode or ["compiled" if gpu else "eager"]
    if any(d not in DECODES for d in args.decode):
        ap.error(f"--decode takes {', '.join(DECODES)} (a comma list for efficiency), got {','.join(args.decode)}")
    if len(args.decode) > 1 and (args.task != "efficiency" or args.video):
        ap.error("several --decode paths are for the efficiency task (the others run one)")
    if args.hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            ap.error("--hf needs transformers (pip install -r requirements-dev.txt)")
    if args.video:
        return task_video(args)
    if args.seconds is None:
        args.seconds = {"stream": 7200 if gpu else 600, "efficiency": 3600, "flexprefill": 1800 if gpu else 120}[args.task]
        print(f"--seconds {args.seconds} ({'the paper-scale default' if gpu else 'a CPU-sized default; 7200 on a GPU'})")
    if args.task == "stream":
        return task_stream(args)
    if args.task == "efficiency":
        return task_efficiency(args)
    return task_flexprefill(args)


if __name__ == "__main__":
    main()
