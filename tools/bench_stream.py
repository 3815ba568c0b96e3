"""
How fast is the streaming loop at full size? The Qwen2.5-VL-7B config (random weights: speed does not depend on
them) streams a synthetic 720p video for --seconds, decoding exactly --max-new-tokens tokens every second, under
each policy and decode path; with --hf, transformers' own Qwen2.5-VL holding the same tensors runs the same loop.

  python -m tools.bench_stream                                   # 7B, 720p, 3,600 s: streaming, native and full
  python -m tools.bench_stream --hf --policies streaming --decode graphs,compiled --seconds 150 --warmup 30
  python -m tools.bench_stream --preset tiny --height 56 --width 84 --seconds 8 --warmup 2   # a CPU smoke run

The ideas:
- The same work every second, so that seconds compare: a teacher-forced reply of one-token words, " ..." and
  <|im_end|>, exactly --max-new-tokens tokens. Greedy decoding must read each token back to the host before it can
  feed it, so the forced run does too (--no-readback lets the CPU run ahead, which real decoding cannot).
- What a second costs, as a live source would see it: a thread resizes second t+1's frames while the GPU works on
  second t (--no-prefetch: inside the step); the latency of a second still includes any wait for its frames.
- Steady state, not start-up: the first --warmup seconds (allocation, kernel selection, compiling, the cache
  growing to its size) are left out; the table shows the mean of the first and the last 10% of the rest (a bounded
  cache stays flat, a growing one does not), p99 over the last half, the mean per phase (preprocess, vision,
  evict, prefill, decode; each phase waits for the GPU at its ends, so the eviction's bookkeeping, which a plain
  step does while the tower runs, shows here on its own; recompute runs its towers inside its prefill), tower_ms (the
  tower alone), ms per decoded token, peak memory and the memory held after a second (first / last 10%), the cache
  length and the largest M-RoPE position.
- Side by side: transformers runs --hf-seconds seconds with its default growing DynamicCache, a forward for the
  user turn and generate() for the reply; hf_ms_per_token_ratio is its ms per token over ours in the same seconds
  of the same run. Both loops are eval.timed_seconds, so they are timed the same way.
- The floor, in the same run (on a GPU): a CUDA graph of matrix-vector products over every weight matrix a decode
  step reads (measure_floor), plus the live cache's K/V bytes at the bandwidth those products reach. Each run's
  row says its ms per token (in the loop: launch, readback and all) and its decode graph's replay alone as
  multiples of it (x_floor, graph_x_floor). --variants reference,...,compiled-prefill runs the model's reference
  layers (separate q/k/v and gate/up Linears, two-matmul decode attention, SDPA prefill), the fused projections
  (VLM.fuse), those plus the split-KV decode kernel (decode.py), and those plus the prefill over the cache through
  cuDNN and FlashAttention-2 (prefill.py; fast), and those plus each layer's work around its prefill attention
  compiled (VLM.compile_prefill; compiled-prefill) or each second's prefill replayed from a CUDA graph
  (prefill.GraphPrefill; graphs, the GPU default) side by side; --profile prints the kernels of one more
  steady second (and its host and GPU time per phase) and of a replay of the decode graph.
Each second is a JSON line in --out/bench_stream.jsonl as it is measured; bench_stream.json is the summary, with
each run's mean and p99 per minute of stream and its memory (per_minute: is it flat?).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cli import Parser, Results, at_least, hardware, table
from decode import decode_kernel_for
from eval import (add_run_flags, check_run_flags, fresh_peak, ms, percentile, run_policy, steady_capacity, sync,
                  timed_seconds)
from flexprefill import enable_flexprefill
from layout import end_ids, layout_of, prefix_segments, reply_ids, user_ids
from model import PRESETS, VLM, pick_device_dtype
from prefill import prefill_kernel_for
from processor import Tokenizer, build_tokenizer, patchify_video, preprocess_video
from quantize import ABOUT, quantize_fp8
from safeio import write_atomic
from stream import streamer_kwargs


# (fuse, split-KV decode kernel, cuDNN + FlashAttention-2 prefill over the cache, VLM.compile_prefill, the second's
# prefill replayed from a CUDA graph: prefill.GraphPrefill)
VARIANTS = {"reference": (False, False, False, False, False), "fused": (True, False, False, False, False),
            "split-kv": (True, True, False, False, False), "fast": (True, True, True, False, False),
            "compiled-prefill": (True, True, True, True, False), "graphs": (True, True, True, False, True)}


def set_variant(model, variant, flexprefill=False):
    """The model's layout and kernels for `variant`; under --flexprefill the prompt attention stays FlexPrefill."""
    fuse, kernel, prefill, compiled, _ = VARIANTS[variant]
    model.fuse(fuse)
    model.compile_prefill(compiled)
    model.use_decode_attention(decode_kernel_for(model.device) if kernel else None)
    if not flexprefill:
        model.use_attention(prefill_kernel_for(model.device, model.dtype, model.cfg.head_dim) if prefill else None)


def build_models(args):
    """(ours, transformers' or None, tokenizer): random weights of the --preset config, shared with transformers'
    model under --hf; a toy tokenizer whose ids sit where the config expects them."""
    device, dtype = pick_device_dtype(args.device)
    cfg = PRESETS[args.preset]()
    tok = Tokenizer(build_tokenizer(["a b c d e f g", " ...", " ..."], 300, qwen_ids=cfg.vocab_size > 151664))
    cfg.image_token_id, cfg.video_token_id = tok.image_pad_id, tok.video_pad_id
    cfg.vocab_size = max(cfg.vocab_size, len(tok))
    hf = None
    if args.hf:
        from tools.bench_model import twins  # transformers' model built first; ours shares its tensors
        torch.manual_seed(0)
        hf, model = twins(cfg, device, dtype)
    else:
        with torch.device(device):
            model = VLM(cfg).to(dtype).init_weights(std=0.02).eval()
    if args.flexprefill:
        enable_flexprefill(model)
    if getattr(args, "fp8", False):   # (bench_serve's --fp8)
        quantize_fp8(model)
        print(ABOUT, flush=True)
    return model, hf, tok


def fixed_reply(tok, n):
    """A reply of exactly n decoded tokens: words of one token each, then ' ...' and <|im_end|>."""
    words = " ".join(["b"] * (n - len(end_ids(tok)) + 1))
    assert len(reply_ids(tok, words)) + len(end_ids(tok)) - 1 == n, "the toy tokenizer changed"
    return words


@torch.no_grad()
def hf_loop(hf, tok, seconds, frames_of, args, after=None):
    """transformers' Qwen2.5-VL on our per-second loop: its default (growing) DynamicCache, a forward for the new
    user turn with its frames, then generate() for exactly --max-new-tokens tokens. Its positions after the first
    second follow transformers' text rule (rope_deltas), not the video one: the same work, other numbers. Returns
    records like eval.run_policy's (phases preprocess, prefill, decode)."""
    import transformers
    from transformers import DynamicCache
    dev, n = hf.device, args.max_new_tokens
    fresh_peak(dev)
    types = int(transformers.__version__.split(".")[0]) >= 5  # 5.x builds M-RoPE runs from token types it is given
    layout = args.stream_layout  # frames are resized as the Streamer resizes them
    pixels = dict(min_pixels=layout.min_pixels, max_pixels=layout.max_pixels)
    state = dict(cache=DynamicCache(), ids=torch.tensor([[i for seg, _ in prefix_segments(tok) for i in seg]],
                                                         device=dev))
    records = []

    def step(t):
        cache, t0 = state["cache"], time.perf_counter()
        pv, grid, secs = preprocess_video(frames_of(t), fps=args.fps, device=dev, **pixels)
        sync(dev)
        t1 = time.perf_counter()
        ids = torch.cat([state["ids"], torch.tensor([user_ids(tok, t, int(grid.prod()) // 4)], device=dev)], 1)
        new = ids[:, cache.get_seq_length():-1]  # the last token is left for generate to feed
        vision = dict(pixel_values_videos=pv.to(hf.dtype), video_grid_thw=grid.to(dev), second_per_grid_ts=secs)
        if types:
            vision["mm_token_type_ids"] = (new == tok.video_pad_id).long() * 2
        hf(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=1, **vision)
        sync(dev)
        t2 = time.perf_counter()
        state["ids"] = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                   max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id)
        sync(dev)
        records.append(dict(t=t, forwards=n, phases=dict(preprocess=t1 - t0, prefill=t2 - t1,
                                                         decode=time.perf_counter() - t2)))

    def measured(t, latency):
        records[-1].update(latency=latency, memory_gib=torch.cuda.memory_allocated() / 2**30
                           if dev.type == "cuda" else None)
        if after is not None:
            after(None, records[-1])
    lat, failed = timed_seconds(seconds, step, dev, args.time_limit, measured, desc="transformers")
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    # max_position: None, transformers' positions (cache position + rope_deltas) are not ours to report
    return dict(seconds=records[:len(lat)], latency=lat, failed=failed, peak_gib=peak,
                cache_tokens=state["cache"].get_seq_length(), max_position=None, resize=[])


# -----------------------------------------------------------------------------
# The floor of a decode step, and what one run's step costs beside it


def gpu_ms(fn, iters=20, repeats=5):
    """Median over `repeats` of the mean milliseconds of `iters` back-to-back fn() calls, timed with CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def decode_weights(model):
    """The weight matrices one decode step reads, in the fused layout (fewest, largest products): per layer the
    stacked q/k/v, o, the stacked gate/up and down; then the LM head (the embeddings when tied). Left out: one
    embedding row, the biases and norms (a few KB a layer)."""
    mats = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        mats += [a.fused[0], a.o_proj.weight, m.fused[0], m.down_proj.weight]
    return mats + [model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight]


@torch.no_grad()
def measure_floor(model, cache_tokens):
    """What a decode step cannot beat on this GPU: a CUDA graph of one matrix-vector product per weight matrix
    of decode_weights (the bytes a step must read, read the fastest way PyTorch reads a matrix for one token),
    replayed; plus the K/V of `cache_tokens` cached tokens read at the bandwidth those products reached. Also a
    plain device copy's bandwidth, for scale. Times in ms, bytes in GB (1e9)."""
    was = model.fusion
    model.fuse()
    mats = decode_weights(model)
    xs = {n: torch.randn(1, n, device=model.device, dtype=model.dtype) for n in {w.shape[1] for w in mats}}
    chain = lambda: [F.linear(xs[w.shape[1]], w) for w in mats]
    side = torch.cuda.Stream()  # warm up off the capture (cuBLAS picks and loads its kernels)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    weights_ms = gpu_ms(graph.replay)
    del graph
    cfg = model.cfg
    weight_gb = sum(w.numel() * w.element_size() for w in mats) / 1e9
    cache_gb = cache_tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 / 1e9
    src = torch.empty(2**29, dtype=torch.uint8, device=model.device)  # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = gpu_ms(lambda: dst.copy_(src))
    model.fuse(bool(was))
    model.fusion = was
    tb_s = weight_gb / weights_ms  # GB/ms = TB/s
    return dict(weight_gb=round(weight_gb, 2), cache_gb=round(cache_gb, 3), cache_tokens=cache_tokens,
                weights_ms=round(weights_ms, 3), floor_ms=round(weights_ms + cache_gb / tb_s, 3),
                gemv_tb_s=round(tb_s, 2), copy_tb_s=round(2 * src.numel() / 1e9 / copy_ms, 2))


def print_profile(title, fn, rows=25):
    """The kernels (and CPU ops) of fn(), heaviest first: what is left between a step and its floor."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    avg = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"\n== profile: {title}\n" + avg.table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)
    phases = [e for e in avg if e.key.startswith("phase:")]  # a timed Streamer's phases (stream.PhaseTimer)
    if phases:
        print("per phase (ms): " + ", ".join(f"{e.key[6:]} host {e.cpu_time_total / 1e3:.1f} / GPU "
                                              f"{e.device_time_total / 1e3:.1f}" for e in phases), flush=True)


@torch.no_grad()
def inspect_run(s, frames, reply, profile):
    """After a run, on its streamer `s`: the decode graph's replay alone (the GPU's time per step, no host in the
    loop) and the vision tower on one second's frames, in ms; with `profile`, the kernels of one more second and of
    five replays. Replays rewrite the K/V slot past the cache's end: harmless once the run is over."""
    out = {}
    dec, cuda = s.decoder, s.model.device.type == "cuda"
    if cuda and dec is not None and dec.graph is not None:
        out["graph_ms"] = round(gpu_ms(dec.graph.replay), 3)
    if cuda:
        clip, grid, _ = s.prepare(frames)
        pix = patchify_video(clip, s.model.device).to(s.model.dtype)
        out["tower_ms"] = round(gpu_ms(lambda: s.model.visual(pix, grid, compiled=s.compile_vision), 5, 3), 2)
    if profile:
        print_profile("one steady second (preprocess, vision, evict, prefill, decode)",
                      lambda: s.step(frames, force_text=reply))
        if "graph_ms" in out:
            print_profile("five decode graph replays", lambda: [dec.graph.replay() for _ in range(5)])
    return out


def ms_per_token(records):
    """Mean decode time per forward over some seconds' records; None when they decoded nothing."""
    forwards = sum(r["forwards"] for r in records)
    if not any("decode" in r["phases"] for r in records):   # --no-phases
        return None
    return round(1000 * sum(r["phases"].get("decode", 0.0) for r in records) / forwards, 2) if forwards else None


def report(name, decode, r, warmup):
    """A table row for one run: the steady seconds (after `warmup`), first and last 10%, p99 over the last half."""
    steady, recs = r["latency"][warmup:], r["seconds"][warmup:]  # empty when the run failed within the warm-up
    k = max(1, len(steady) // 10)
    avg = lambda xs: ms(sum(xs) / len(xs)) if xs else None
    row = dict(policy=name, decode=decode, first_ms=avg(steady[:k]), last_ms=avg(steady[-k:]),
               p99_ms=ms(percentile(steady[len(steady) // 2:], 99)), ms_per_token=ms_per_token(recs),
               peak_gib=round(r["peak_gib"], 2), cache=r["cache_tokens"], max_pos=r["max_position"],
               failed=f"{r['failed']['reason']} at {r['failed']['second']} s" if r["failed"] else "-")
    for ph in dict.fromkeys(p for rec in recs for p in rec["phases"]):  # mean per steady second
        row[f"{ph}_ms"] = avg([rec["phases"].get(ph, 0.0) for rec in recs])
    mem = [rec["memory_gib"] for rec in recs if rec.get("memory_gib") is not None]  # GPU; CPU: the cache
    if mem:
        row["mem_first_last_gib"] = f"{sum(mem[:k]) / len(mem[:k]):.2f}/{sum(mem[-k:]) / len(mem[-k:]):.2f}"
    if len(r["resize"]) > warmup:  # prefetched: frames and resize ran on a thread meanwhile
        row["resize_ms_on_thread"] = avg(r["resize"][warmup:])
    return row


def plot(out, name, series, xlabel, ylabel):
    """A PNG of series {label: (xs, ys)} in out; skipped without matplotlib (requirements.txt installs it) or
    without series."""
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
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    with write_atomic(os.path.join(out, f"{name}.png"), "wb") as f:  # a new file: a planted link is not followed
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def build_parser():
    ap = Parser(prog="python -m tools.bench_stream", description=__doc__.strip().split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--preset", default="7B", choices=list(PRESETS), help="model config (random weights)")
    ap.add_argument("--seconds", type=at_least(1), default=3600, help="stream length")
    ap.add_argument("--height", type=at_least(28), default=720, help="frame height in pixels")
    ap.add_argument("--width", type=at_least(28), default=1280, help="frame width in pixels")
    ap.add_argument("--flexprefill", action="store_true", help="block-sparse prefill (FlexPrefill) in our model")
    ap.add_argument("--hf", action="store_true", help="also run transformers' Qwen2.5-VL (same weights) on the same "
                    "loop with its default cache and generate()")
    ap.add_argument("--hf-seconds", type=at_least(1), default=120, help="seconds of the transformers run")
    ap.add_argument("--no-readback", action="store_true", help="do not read each forced token's argmax back to "
                    "the host (real greedy decoding must; without it the CPU runs ahead of the GPU)")
    ap.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=["graphs"],
                    help="comma-separated, each policy and decode path runs once per variant: reference (separate "
                    "Linears, two-matmul decode attention, SDPA prefill), fused (VLM.fuse), split-kv (fused + "
                    "split-KV decode kernel), fast (split-kv + cuDNN / FlashAttention-2 prefill over the cache), "
                    "compiled-prefill (fast + VLM.compile_prefill), graphs (fast + each second's prefill replayed "
                    "from a CUDA graph: the streaming loop's GPU default)")
    ap.add_argument("--profile", action="store_true", help="after each run print the kernels of one more second "
                    "and of decode graph replays (torch.profiler)")
    ap.add_argument("--no-floor", dest="floor", action="store_false", help="skip measuring the decode floor")
    ap.add_argument("--no-phases", dest="phases", action="store_false", help="time whole seconds only, as stream.py "
                    "runs them: no wait for the GPU between phases (and no per-phase columns or ms per token)")
    ap.add_argument("--streams", nargs="+", metavar="N", help="many streams as one batch: the run is "
                    "tools/bench_serve.py's, given every flag (python -m tools.bench_serve --help)")
    add_run_flags(ap, warmup=30, out="out/bench")
    ap.set_defaults(policies=["streaming", "native", "full"])
    return ap


def get_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.streams:   # an abbreviation of --streams that main() did not see
        ap.error("write --streams in full: it hands the run to tools/bench_serve.py")
    check_run_flags(ap, args)
    # the layout flags over our defaults (no checkpoint here): windows, frame rate and pixels, reply cap
    args.stream_layout = layout_of({}, args)
    args.fps, args.max_new_tokens = args.stream_layout.fps, args.stream_layout.max_new_tokens
    if not args.variants or set(args.variants) - set(VARIANTS):
        ap.error(f"--variants: expected {', '.join(VARIANTS)}, comma-separated, got {','.join(args.variants)}")
    on_gpu = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    if not on_gpu and args.preset != "tiny":  # 7B: ~15 GiB of weights, minutes a second on a CPU
        ap.error(f"--preset {args.preset} streams a full-size model: a GPU's work. On a CPU, the smoke run: --preset "
                 "tiny --height 56 --width 84 --seconds 8 --warmup 2")
    if args.hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            ap.error("--hf needs transformers (pip install -r requirements-dev.txt)")
    return args


def per_minute(latency, memory):
    """Flatness at a glance: for each minute of stream (60 seconds' records), the mean and p99 of a second's
    latency in ms and the most GPU memory held after a second."""
    minutes = [slice(60 * m, 60 * m + 60) for m in range((len(latency) + 59) // 60)]
    held = lambda sl: max((x for x in memory[sl] if x is not None), default=None)  # None: not measured (transformers)
    return [dict(minute=m, seconds=len(latency[sl]), mean_ms=ms(statistics.mean(latency[sl])),
                 p99_ms=ms(percentile(latency[sl], 99)), memory_gib=held(sl) and round(held(sl), 3))
            for m, sl in enumerate(minutes)]


def cache_gb(cfg, tokens):
    """GB of K and V that `tokens` cached tokens hold (bf16), all layers."""
    return tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 / 1e9


def against_floor(row, floor, cfg, extra):
    """The run's decode beside the floor for its own cache length: in the loop and as a bare graph replay."""
    row.update(extra)
    if floor is None or not row.get("ms_per_token"):
        return
    row["floor_ms"] = round(floor["weights_ms"] + cache_gb(cfg, row["cache"]) / floor["gemv_tb_s"], 3)
    row["x_floor"] = round(row["ms_per_token"] / row["floor_ms"], 3)
    if "graph_ms" in row:
        row["graph_x_floor"] = round(row["graph_ms"] / row["floor_ms"], 3)


def run_all(args, model, hf, tok, frames_of, warmup, res, floor=None):
    """transformers first (when asked), then every policy x decode path x variant; a table row and a summary each."""
    rows, runs, hf_window, hf_ms = [], {}, (0, 0), None
    reply = fixed_reply(tok, args.max_new_tokens)
    kw = streamer_kwargs(args.stream_layout)
    capacity = steady_capacity(frames_of(0), kw["fps"], kw["text_sink"], kw["text_window"], kw["vision_window"],
                               kw["frame_pixels"], kw["evict_every"])[1]
    for name, decode, variant in ([("transformers", "generate", "-")] if hf is not None else []) + [
            (p, d, var) for p in args.policies for d in args.decode for var in args.variants]:
        log = lambda s, rec: res.log(policy=name, decode=decode, variant=variant,
                                     **{k: v for k, v in rec.items() if k != "text"})
        if name == "transformers":
            seconds = min(args.seconds, args.hf_seconds)
            r, w = hf_loop(hf, tok, seconds, frames_of, args, after=log), min(warmup, seconds // 2)
            hf_window = (w, len(r["latency"]))  # the seconds the ratio compares, ours and theirs
        else:
            set_variant(model, variant, args.flexprefill)
            try:
                r, w = run_policy(model, tok, name, args.seconds, frames_of, args, force=lambda t: reply, after=log,
                                  **dict(kw, capacity=capacity, readback=not args.no_readback, decode=decode,
                                         timed=args.phases, prefill_graphs=VARIANTS[variant][4])), warmup
            except Exception as e:  # one variant that fails here (say a kernel that does not build) ends only itself
                print(f"{name} / {decode} / {variant} failed: {type(e).__name__}: {str(e).strip()[-400:]}", flush=True)
                continue
        row = report(name, decode, r, w)
        row = {"policy": name, "decode": decode, "variant": variant, **row}
        ours = ms_per_token(r["seconds"][hf_window[0]:hf_window[1]])
        if name == "transformers":
            hf_ms = row["ms_per_token"]
        else:
            if hf_ms and ours:
                row["hf_ms_per_token_ratio"] = round(hf_ms / ours, 2)
            extra = {} if r["failed"] else inspect_run(r["streamer"], frames_of(len(r["latency"])), reply,
                                                       args.profile)
            against_floor(row, floor, model.cfg, extra)
        rows.append(row)
        print(table([row]), flush=True)
        key = "-".join([name] + ([decode] if len(args.decode) > 1 and name != "transformers" else [])
                       + ([variant] if len(args.variants) > 1 and name != "transformers" else []))
        memory = [x["memory_gib"] for x in r["seconds"]]
        runs[key] = dict(summary=row, latency=r["latency"], memory_gib=memory,
                         per_minute=per_minute(r["latency"], memory))
        del r  # free this run's cache (and graph) before the next run measures its peak memory
    return rows, runs, hf_window


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--streams" or a.startswith("--streams=") for a in argv):   # many streams: bench_serve's run
        from tools import bench_serve
        return bench_serve.main(argv)
    args = get_args(argv)
    model, hf, tok = build_models(args)
    if args.max_new_tokens < len(end_ids(tok)):
        sys.exit(f"python -m tools.bench_stream: --max-new-tokens must be at least {len(end_ids(tok))} here (a word, "
                 "' ...' and <|im_end|>)")
    g = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 255, (args.height, args.width, 3), generator=g, dtype=torch.uint8) for _ in range(4)]
    frames_of = lambda t: [frames[(t + j) % 4] for j in range(args.fps)]
    n_vision = steady_capacity(frames_of(0), args.fps, frame_pixels=(args.stream_layout.min_pixels,
                                                                      args.stream_layout.max_pixels))[0]
    warmup = min(args.warmup, args.seconds // 2)
    print(f"{hardware()}; {args.preset} config, {args.height}x{args.width} at {args.fps} fps ({n_vision} vision "
          f"tokens a second), {args.seconds} s; means leave out the first {warmup} s", flush=True)
    res = Results(args.out, "bench_stream")
    floor = None
    if args.floor and model.device.type == "cuda":
        floor = measure_floor(model, 0)
        print(f"decode floor, this GPU, this run: {floor['weight_gb']} GB of weights read by a CUDA graph of "
              f"matrix-vector products in {floor['weights_ms']} ms ({floor['gemv_tb_s']} TB/s; a device copy: "
              f"{floor['copy_tb_s']} TB/s); each row's floor_ms adds its cache's K/V at that rate", flush=True)
    rows, runs, hf_window = run_all(args, model, hf, tok, frames_of, warmup, res, floor)
    print("\n" + table(rows))
    if hf is not None:
        print(f"hf_ms_per_token_ratio: transformers' ms per token over ours in the same seconds of the stream "
              f"({hf_window[0]} to {hf_window[1]}: transformers runs the first {min(args.seconds, args.hf_seconds)} s "
              "only, its cache only grows), same weights, same loop, same run")
    result = dict(settings=dict(vars(args), stream_layout=vars(args.stream_layout)), hardware=hardware(),
                  floor=floor, runs=runs)
    res.save(result)
    # second 0 left out: its start-up (and compilation, tens of seconds) would flatten everything else
    plot(args.out, "bench_stream_latency", {p: (range(1, len(v["latency"])), v["latency"][1:])
                                            for p, v in runs.items()}, "stream second", "seconds per second")
    if model.device.type == "cuda":
        plot(args.out, "bench_stream_memory", {p: (range(len(v["memory_gib"])), v["memory_gib"])
                                               for p, v in runs.items()}, "stream second", "GPU memory held (GiB)")
    return result


if __name__ == "__main__":
    main()
