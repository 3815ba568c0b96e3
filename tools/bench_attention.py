"""
The attention kernels of one streaming second at 7B, side by side on the same inputs: the prefill's attention over
the cache and the decode step's attention, each against the path the model runs (random bf16 inputs, one run).

  python -m tools.bench_attention                                   # a GPU: the 2-fps and 8-fps seconds at 7B
  python -m tools.bench_attention --prefill 775:13277 --decode 13277 --json out/attention.json
  python -m tools.bench_attention --prefill 775:13277 --decode --batch 16  # 16 streams' seconds, as serve.py batches
  python -m tools.bench_attention --device cpu --prefill 64:512 --decode 512 --heads 4 1   # a CPU smoke run

Prefill over the cache, NQ:L (NQ new tokens after L cached ones: the queries are the last NQ of NQ + L positions,
causal from the bottom right). The model's path is model.causal_attention (SDPA with a lower-right causal mask;
FlashAttention-2 on an H100). Beside it:
- cudnn two-call: cuDNN's fused kernel twice, over the cache (no mask) and over the new tokens (square, causal),
  merged by their log-sum-exp; "new shape" is its first call at a cache length it has not seen (cuDNN builds an
  execution plan per shape, and a stream's cache length changes every second);
- cudnn bucket B: the same, with the cache's part over a fixed B key slots (the cache's length rounded up to
  --bucket), the empty ones hidden by a -inf bias: one shape, one plan, at the price of reading the bias and the
  empty slots. "new shape" here is a new cache length in the same bucket;
- cudnn head / flash tail S: cuDNN over the cache rounded down to a multiple of S (--step: few shapes, each planned
  once), FlashAttention-2 over the rest and the new tokens (no plans, causal from the bottom right), merged: the
  fast streaming path's prefill.CachedPrefill;
- cudnn causal (a prompt, L = 0): cuDNN's causal kernel in one call;
- on a GPU, the head and the tail 28 layers' worth in one CUDA graph, as the loop's prefill graph runs them: one
  after the other, and side by side on two streams (together; x_model there is against the first);
- --batch N: N such seconds at once, as serve.py batches streams (see batch_rows).
Decode, L: one token over L cached keys in a buffer of the next power of two (the decode graph reads a fixed-size
buffer with a mask): model.decode_attention (two matmuls) and decode.split_kv_attention, 28 layers' worth in one
CUDA graph (a CPU times them eagerly). Each row: ms, TFLOP/s or TB/s (K/V read once), the largest difference from
the model's path, and the ratio of the model's time to this one (> 1: faster). A kernel this PyTorch lacks is a row
that says so, not an error.
"""
import argparse
import functools
import time

import torch

from cli import Parser, Results, at_least, check_device, file_problem, hardware, table
from decode import decode_kernel_for
from model import causal_attention, decode_attention
from prefill import CachedPrefill, RaggedPrefill, cudnn, merge
from tools.bench_flexprefill import timeit


# how PyTorch says that a kernel is not in this build, or not for this device or these arguments
MISSING = ("Could not run", "Unknown keyword argument", "failed to match any schema", "No available kernel",
           "not supported")


def shape(text):
    """NQ:L for --prefill."""
    try:
        nq, cached = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NQ:L (new tokens:cached tokens), got {text!r}")
    if nq < 1 or cached < 0:
        raise argparse.ArgumentTypeError(f"NQ >= 1 and L >= 0, got {text!r}")
    return nq, cached


def cudnn_two_call(q, k, v, cached, kernel=cudnn):
    """The cache's keys without a mask, the new tokens' square causal, merged: causal_attention's result (kernel:
    cuDNN's, or a stand-in of the same signature)."""
    o1, l1 = kernel(q, k[:, :, :cached], v[:, :, :cached], False)
    o2, l2 = kernel(q, k[:, :, cached:], v[:, :, cached:], True)
    return merge(o1, l1, o2, l2)


def cudnn_bucket(q, k, v, cached, bucket, kernel=cudnn):
    """cudnn_two_call with the cache's part over a fixed `bucket` of key slots, the ones past `cached` hidden by a
    -inf bias: the same shape at every cache length, so one execution plan serves them all. k, v: (B, Hkv, bucket +
    Nq, D), the new tokens' keys last."""
    bias = torch.zeros(1, 1, 1, bucket, device=q.device, dtype=q.dtype)
    bias[..., cached:] = float("-inf")
    o1, l1 = kernel(q, k[:, :, :bucket], v[:, :, :bucket], False, bias.expand(1, 1, q.shape[2], bucket))
    o2, l2 = kernel(q, k[:, :, bucket:], v[:, :, bucket:], True)
    return merge(o1, l1, o2, l2)


def first_call_ms(fn, device):
    """Wall milliseconds of one call, waiting for it (what a call that builds a plan costs)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1e3, 2)


def measured(name, fn, ref, base_ms, args, work, unit):
    """A row: fn's median time, its rate (work per second, in `unit`), its largest difference from ref and the
    model path's time over its own; or a row saying why fn cannot run here."""
    try:
        err = (fn().float() - ref).abs().max().item()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        if not any(m in str(e) for m in MISSING):
            raise  # a bug, not a kernel this build lacks
        return dict(kernel=name, note=f"missing: {str(e).splitlines()[0][:90]}")
    ms = timeit(fn, args.device, args.warmup, args.iters)
    return dict(kernel=name, ms=round(ms, 3), rate=f"{work / ms / 1e9:.3g} {unit}", max_err=f"{err:.1e}",
                x_model=round(base_ms / ms, 3))


def prefill_rows(args, nq, cached, gen):
    hq, hkv, d = args.heads + [args.head_dim]
    q = torch.randn(1, hq, nq, d, generator=gen).to(args.device, args.dtype)
    k, v = (torch.randn(1, hkv, nq + cached, d, generator=gen).to(args.device, args.dtype) for _ in range(2))
    ref = causal_attention(q, k, v).float()
    flops = 4 * hq * d * (nq * cached + nq * (nq + 1) / 2)   # QK^T and PV over the visible pairs
    base = timeit(lambda: causal_attention(q, k, v), args.device, args.warmup, args.iters)
    rows = [dict(kernel="model: causal_attention", ms=round(base, 3), rate=f"{flops / base / 1e9:.3g} TFLOP/s",
                 max_err="0", x_model=1.0)]
    if not cached:   # a prompt: cuDNN's causal kernel in one call (the rows below split the keys at the cache's end)
        rows.append(measured("cudnn causal", lambda: cudnn(q, k, v, True)[0], ref, base, args, flops, "TFLOP/s"))
        return [dict(shape=f"prefill {nq}:0", **r) for r in rows]
    rows.append(measured("cudnn two-call", lambda: cudnn_two_call(q, k, v, cached), ref, base, args, flops, "TFLOP/s"))
    if "ms" in rows[-1]:   # a cache length not seen yet: its plan is built now
        shorter = lambda: cudnn_two_call(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], cached - 1)
        rows[-1]["new_shape_ms"] = first_call_ms(shorter, args.device)
    bucket = -(-(cached + 1) // args.bucket) * args.bucket        # the cache's slots, rounded up
    pad = lambda x: torch.cat([x[:, :, :cached], x.new_zeros(*x.shape[:2], bucket - cached, x.shape[3]),
                               x[:, :, cached:]], 2)
    kb, vb = pad(k), pad(v)                                      # (1, Hkv, bucket + Nq, D)
    rows.append(measured(f"cudnn bucket {bucket}", lambda: cudnn_bucket(q, kb, vb, cached, bucket), ref, base,
                         args, flops, "TFLOP/s"))
    if "ms" in rows[-1]:   # a new cache length in the same bucket: the same plan
        rows[-1]["new_shape_ms"] = first_call_ms(lambda: cudnn_bucket(q, kb, vb, cached - 1, bucket), args.device)
    head_tail = CachedPrefill(step=args.step, slack=1, patience=0, device_type=args.device.type)   # prefill.py's
    rows.append(measured(f"cudnn head / flash tail {args.step}", lambda: head_tail(q, k, v), ref, base, args, flops,
                         "TFLOP/s"))
    if "ms" in rows[-1]:   # a new cache length, one more key in the tail (the head's shape again, unless it grew)
        more = torch.cat([k[:, :, :1], k], 2), torch.cat([v[:, :, :1], v], 2)
        rows[-1]["new_shape_ms"] = first_call_ms(lambda: head_tail(q, *more), args.device)
        if args.device.type == "cuda" and head_tail.head_for(q, k):
            rows += graphed_head_tail(args, q, k, v, head_tail, ref, flops)
    return [dict(shape=f"prefill {nq}:{cached}", **r) for r in rows]


def together(first, second, side):
    """(first(), second()), second() on the stream `side` beside first() on the current stream, which then waits
    for both. Why try it: a 2-fps second's head is 7 query blocks x 28 heads = 196 thread blocks on an H100's 132
    multiprocessors, so its second wave leaves about half of them idle, which the tail's blocks could fill. (Each
    result is used on the current stream only after the join, so the memory allocator's per-stream reuse is safe;
    inside a graph capture the fork and join become parallel branches.)"""
    main = torch.cuda.current_stream()
    side.wait_stream(main)          # the second's inputs were written on the current stream
    with torch.cuda.stream(side):
        b = second()
    a = first()
    main.wait_stream(side)
    return a, b


def graphed_head_tail(args, q, k, v, head_tail, ref, flops):
    """The head and the tail as the streaming loop's prefill graph runs them (prefill.GraphPrefill), 28 layers' worth
    in one CUDA graph: one after the other, and side by side on two streams (together)."""
    h, side = head_tail.head_for(q, k), torch.cuda.Stream()
    head = lambda: head_tail.over_head(q, k[:, :, :h], v[:, :, :h])
    tail = lambda: head_tail.tail_kernel(q, k[:, :, h:], v[:, :, h:])
    ways = {"one after the other": lambda: merge(*head(), *tail()),
            "side by side": lambda: merge(*[x for part in together(head, tail, side) for x in part])}
    out = []
    for name, fn in ways.items():
        err = (fn().float() - ref).abs().max().item()
        ms = layers_ms(fn, args)
        out.append(dict(kernel=f"cudnn head / flash tail, graphed, {name}", ms=round(ms, 3),
                        rate=f"{flops / ms / 1e9:.3g} TFLOP/s", max_err=f"{err:.1e}"))
    for row in out:
        row["x_model"] = round(out[0]["ms"] / row["ms"], 3)   # here: against the graphed one after the other
    return out


def batch_rows(args, nq, cached, gen):
    """--batch N: N streams' seconds as serve.py batches them, the caches rows of one buffer, ragged (row i holds
    cached - 37 i keys): row by row (the model's path, then prefill.CachedPrefill's), and in one call a layer,
    FlexAttention (serve.PackedRowAttention) and a cuDNN head for all rows + FlashAttention-2's varlen tails
    (prefill.RaggedPrefill). Each built once, as a second builds it once for its layers."""
    from serve import PackedRowAttention, RowAttention
    n, (hq, hkv, d) = args.batch, args.heads + [args.head_dim]
    rows, starts, lengths = list(range(n)), [max(0, cached - 37 * i) for i in range(n)], [nq] * n
    q = torch.randn(n, hq, nq, d, generator=gen).to(args.device, args.dtype)
    k, v = (torch.randn(n, hkv, cached + nq + 1, d, generator=gen).to(args.device, args.dtype) for _ in range(2))
    model_path = RowAttention(causal_attention, rows, starts, lengths)
    ref = model_path(q, k, v).float()
    flops = sum(4 * hq * d * (nq * s + nq * (nq + 1) / 2) for s in starts)
    base = timeit(lambda: model_path(q, k, v), args.device, args.warmup, args.iters)
    out = [dict(kernel="model: causal_attention, row by row", ms=round(base, 3),
                rate=f"{flops / base / 1e9:.3g} TFLOP/s", max_err="0", x_model=1.0)]
    head_tail = CachedPrefill(step=args.step, slack=1, patience=0, device_type=args.device.type)
    for name, fn in [("cudnn head / flash tail, row by row", RowAttention(head_tail, rows, starts, lengths)),
                     ("flex, one call", PackedRowAttention(rows, starts, lengths)),
                     ("ragged: cudnn head + flash varlen, one call",   # (FlexAttention's without a head)
                      RaggedPrefill(head_tail, rows, starts, lengths, PackedRowAttention(rows, starts, lengths)))]:
        out.append(measured(name, lambda fn=fn: fn(q, k, v), ref, base, args, flops, "TFLOP/s"))
    return [dict(shape=f"{n} x prefill {nq}:{cached}", **r) for r in out]


def layers_ms(fn, args, layers=28):
    """One layer's time, from `layers` calls captured in one CUDA graph (eager calls on a CPU)."""
    if args.device.type != "cuda":
        return timeit(fn, args.device, args.warmup, args.iters)
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn()
    return timeit(graph.replay, args.device, args.warmup, args.iters) / layers


def decode_rows(args, cached, gen):
    hq, hkv, d = args.heads + [args.head_dim]
    capacity = 1 << cached.bit_length()                      # a power of two above the cache (the decode buffer)
    q = torch.randn(1, hkv, hq // hkv, d, generator=gen).to(args.device, args.dtype)
    k, v = (torch.randn(1, hkv, capacity, d, generator=gen).to(args.device, args.dtype) for _ in range(2))
    mask = (torch.arange(capacity, device=args.device) <= cached)[None, None, None]   # the cache and the token
    ref = decode_attention(q, k, v, mask).float()
    kv_bytes = 2 * hkv * (cached + 1) * d * k.element_size()
    base = layers_ms(lambda: decode_attention(q, k, v, mask), args)
    rows = [dict(kernel="model: decode_attention", ms=round(base, 4), rate=f"{kv_bytes / base / 1e9:.3g} TB/s",
                 max_err="0", x_model=1.0)]
    kernel = decode_kernel_for(args.device)
    if kernel is None:
        rows.append(dict(kernel="split-KV", note="missing: needs CUDA and Triton"))
    else:
        err = (kernel(q, k, v, mask).float() - ref).abs().max().item()
        ms = layers_ms(lambda: kernel(q, k, v, mask), args)
        rows.append(dict(kernel="split-KV", ms=round(ms, 4), rate=f"{kv_bytes / ms / 1e9:.3g} TB/s",
                         max_err=f"{err:.1e}", x_model=round(base / ms, 3)))
    return [dict(shape=f"decode {cached}", **r) for r in rows]


def build_parser():
    p = Parser(prog="python -m tools.bench_attention", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefill", type=shape, nargs="*", default=[(775, 13277), (2980, 47800)], metavar="NQ:L",
                   help="prefill shapes: new tokens:cached tokens (default: a 2-fps and an 8-fps 720p second at 7B)")
    p.add_argument("--decode", type=at_least(1), nargs="*", default=[13277, 47800], metavar="L",
                   help="decode over L cached tokens (default: the 2-fps and 8-fps caches)")
    p.add_argument("--batch", type=at_least(0), default=0, metavar="N", help="also each --prefill shape for N "
                   "streams batched, the caches ragged (serve.py's prefill paths; default 0: off)")
    p.add_argument("--bucket", type=at_least(1), default=1024, help="cudnn bucket: the cache's key slots are "
                   "rounded up to a multiple of this")
    p.add_argument("--step", type=at_least(1), default=512, help="cudnn head / flash tail: the head is the cache "
                   "rounded down to a multiple of this")
    p.add_argument("--heads", type=at_least(1), nargs=2, default=[28, 4], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=at_least(1), default=128)
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--iters", type=at_least(1), default=10)
    p.add_argument("--json", help="also write the rows here (and each to the .jsonl beside it)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_device(p, args.device)
    if args.heads[0] % args.heads[1]:
        p.error(f"--heads {args.heads[0]} {args.heads[1]}: the query heads must be a multiple of the KV heads")
    if args.json and file_problem(args.json):
        p.error(f"--json {args.json}: {file_problem(args.json)}")
    args.device = torch.device(args.device)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    print(f"{hardware()}; {args.heads[0]}/{args.heads[1]} heads of {args.head_dim}, {args.dtype}", flush=True)
    out = Results.at(args.json) if args.json else None
    gen, rows = torch.Generator().manual_seed(0), []
    batched = [functools.partial(batch_rows, args, *s, gen) for s in args.prefill if args.batch and s[1]]
    for part in [functools.partial(prefill_rows, args, *s, gen) for s in args.prefill] + batched + [
            functools.partial(decode_rows, args, n, gen) for n in args.decode]:
        with torch.no_grad():
            new = part()
        for row in new:
            if out:
                out.log(**row)
        print(table(new), flush=True)
        rows += new
    if out:
        out.save(dict(hardware=hardware(), rows=rows))
    return rows


if __name__ == "__main__":
    main()
