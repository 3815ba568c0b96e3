"""
Benchmark FlexPrefill (flexprefill.py) against dense causal SDPA, side by side in one run.

Default: the Qwen2.5-VL-7B attention shape (28 q heads, 4 kv heads, head dim 128, bf16) at 8k..128k tokens,
on random inputs and on inputs with planted structure (sink + local window + a few key columns).
Per length and input it reports the selection time, the BlockMask build, the sparse attention, the whole
FlexPrefill call, SDPA's default dense causal attention (and SDPA's FlashAttention-2 backend on CUDA), the
kept fraction of causal blocks, the share of query-aware heads and the output error against SDPA's output
(nothing N x N is built). Times are medians over --iters runs after --warmup runs (CUDA events on GPU).

    python bench_flexprefill.py                                   # H100: 8k, 32k, 64k, 128k
    python bench_flexprefill.py --lengths 131072 --compile-select --json out.json
    python bench_flexprefill.py --activations qkv_layer10.pt      # q, k, v captured from a model
    python bench_flexprefill.py --device cpu --lengths 1024 --heads 4 1   # CPU smoke test
"""
import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexprefill import _flex, block_mask_from_selection, causal_attention, select_blocks, sparse_attention


def timeit(fn, device, warmup, iters):
    """Median milliseconds of fn() after warmup calls (the first compiled call compiles)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_inputs(N, Hq, Hkv, D, gen):
    return (torch.randn(1, Hq, N, D, generator=gen), torch.randn(1, Hkv, N, D, generator=gen),
            torch.randn(1, Hkv, N, D, generator=gen))


def planted_inputs(N, Hq, Hkv, D, gen, n_columns=4, window=512, local_dims=64):
    """Random q/k plus structure added along reserved directions of the head dim, sized with log(N) so that
    it holds at every length: dim 0 an attention sink on key 0, dim 1 a few strong key columns (different
    per kv head), dims 2..2+local_dims a position code that varies smoothly over ~window tokens, so
    q_i . k_j is large for |i - j| small (a local window). The rest of the head dim is random background
    with logits of std 0.5."""
    g, R = Hq // Hkv, D - 2 - local_dims
    assert R > 0, f"head dim {D} too small for {local_dims} local dims"
    q = torch.zeros(1, Hq, N, D)
    k = torch.zeros(1, Hkv, N, D)
    q[..., 2 + local_dims:] = 0.5 * math.sqrt(D / R) * torch.randn(1, Hq, N, R, generator=gen)
    k[..., 2 + local_dims:] = torch.randn(1, Hkv, N, R, generator=gen)
    sqrt_logit = lambda x: math.sqrt(x * math.sqrt(D))   # a on both sides gives logit a^2 / sqrt(D) = x
    a = sqrt_logit(math.log(N) + 2)                      # sink
    q[..., 0], k[:, :, 0, 0] = a, a
    a = sqrt_logit(math.log(N) - 1)                      # columns
    q[..., 1] = a
    for h in range(Hkv):
        k[0, h, torch.randint(1, N, (n_columns,), generator=gen), 1] = a
    # local: unit vectors at anchors every `window` tokens, linearly interpolated in between
    anchors = F.normalize(torch.randn(N // window + 2, local_dims, generator=gen), dim=-1)
    t = torch.arange(N) / window
    lo, frac = t.long(), (t - t.floor())[:, None]
    code = F.normalize((1 - frac) * anchors[lo] + frac * anchors[lo + 1], dim=-1)   # (N, local_dims)
    a = sqrt_logit(math.log(N / window) + 3)
    q[..., 2:2 + local_dims] = a * code
    k[..., 2:2 + local_dims] = a * code
    v = torch.randn(1, Hkv, N, D, generator=gen)
    return q, k, v


def load_activations(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    q, k, v = (obj["q"], obj["k"], obj["v"]) if isinstance(obj, dict) else obj
    assert q.dim() == 4 and k.shape == v.shape, "expected q (B, Hq, N, D), k and v (B, Hkv, N, D)"
    return q, k, v


def run_one(name, q, k, v, args, device, select_fn):
    N = q.shape[2]
    kw = dict(gamma=args.gamma, tau=args.tau, min_budget=args.min_budget, max_budget=args.max_budget,
              block_size=args.block_size)
    backend = args.backend if args.backend != "auto" else ("flex" if device.type == "cuda" else "dense")
    bench = lambda fn: timeit(fn, device, args.warmup, args.iters)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sel, info = select_fn(q, k, **kw)
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    out = sparse_attention(q, k, v, sel, args.block_size, backend)
    dense = causal_attention(q, k, v)
    err = (out.float() - dense.float()).abs()
    row = dict(input=name, N=N, density=info["density"].mean().item(),
               query_aware=info["query_aware"].float().mean().item(),
               max_err=err.max().item(), mean_err=err.mean().item(), select_peak_gib=peak_gib)
    del out, dense, err

    row["select_ms"] = bench(lambda: select_fn(q, k, **kw))
    if backend == "flex":
        block_mask = block_mask_from_selection(sel, N, N, args.block_size)
        row["mask_ms"] = bench(lambda: block_mask_from_selection(sel, N, N, args.block_size))
        row["attn_ms"] = bench(lambda: _flex(q, k, v, block_mask, True))
    else:   # the dense reference backend builds an N x N token mask inside
        row["mask_ms"] = float("nan")
        row["attn_ms"] = bench(lambda: sparse_attention(q, k, v, sel, args.block_size, backend))
    row["total_ms"] = bench(lambda: sparse_attention(q, k, v, select_fn(q, k, **kw)[0], args.block_size, backend))
    row["sdpa_ms"] = bench(lambda: causal_attention(q, k, v))
    row["sdpa_fa2_ms"] = float("nan")
    if device.type == "cuda":
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                row["sdpa_fa2_ms"] = bench(lambda: causal_attention(q, k, v))
        except RuntimeError as e:   # no FA2 kernel for this GPU / dtype
            print(f"  (SDPA FlashAttention-2 backend unavailable: {str(e).splitlines()[0]})")
    row["speedup"] = row["sdpa_ms"] / row["total_ms"]
    row["select_share"] = row["select_ms"] / row["sdpa_ms"]
    return row


COLUMNS = [("input", "{:>11}"), ("N", "{:>7}"), ("select_ms", "{:>9.2f}"), ("mask_ms", "{:>8.2f}"),
           ("attn_ms", "{:>9.2f}"), ("total_ms", "{:>9.2f}"), ("sdpa_ms", "{:>9.2f}"), ("sdpa_fa2_ms", "{:>11.2f}"),
           ("speedup", "{:>7.2f}x"), ("select_share", "{:>12.1%}"), ("density", "{:>7.3f}"),
           ("query_aware", "{:>11.2f}"), ("max_err", "{:>8.4f}"), ("mean_err", "{:>8.5f}"),
           ("select_peak_gib", "{:>15.2f}")]


def print_row(row):
    print(" ".join(fmt.format(row[key]) for key, fmt in COLUMNS), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    p.add_argument("--heads", type=int, nargs=2, default=[28, 4], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--inputs", nargs="+", default=["random", "planted"], choices=["random", "planted"])
    p.add_argument("--activations", help=".pt file with q (B,Hq,N,D), k, v (B,Hkv,N,D) as a dict or tuple; "
                   "each length takes the first L tokens (a causal prefix)")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--min-budget", type=int, default=1024)
    p.add_argument("--max-budget", type=int, default=None)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--backend", default="auto", choices=["auto", "flex", "dense"])
    p.add_argument("--compile-select", action="store_true",
                   help="torch.compile(select_blocks, dynamic=False): one compile per length")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    Hq, Hkv = args.heads
    select_fn = torch.compile(select_blocks, dynamic=False) if args.compile_select else select_blocks
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.dtype}, heads {Hq}/{Hkv}, head dim {args.head_dim}, "
          f"gamma {args.gamma}, tau {args.tau}, min_budget {args.min_budget}, block {args.block_size}, "
          f"selection {'compiled' if args.compile_select else 'eager'}")
    print("density = kept / causal blocks (mean over heads); query_aware = share of query-aware heads; "
          "errors against SDPA's output")
    if max(args.lengths) <= max(2 * args.block_size, math.ceil(args.min_budget / args.block_size) * args.block_size):
        print("note: flexprefill_attention runs dense SDPA at these lengths; the sparse path is timed anyway")
    print(" ".join(f"{key:>{len(fmt.format(0))}}" for key, fmt in COLUMNS))

    sources = ["activations"] if args.activations else args.inputs
    acts = load_activations(args.activations) if args.activations else None
    rows = []
    for source in sources:
        for N in args.lengths:
            gen = torch.Generator().manual_seed(args.seed)
            if source == "activations":
                if N > acts[0].shape[2]:
                    print(f"  skipping N={N}: the activations hold {acts[0].shape[2]} tokens")
                    continue
                q, k, v = (x[:, :, :N] for x in acts)
            elif source == "random":
                q, k, v = random_inputs(N, Hq, Hkv, args.head_dim, gen)
            else:
                q, k, v = planted_inputs(N, Hq, Hkv, args.head_dim, gen)
            q, k, v = (x.to(device, dtype).contiguous() for x in (q, k, v))
            row = run_one(source, q, k, v, args, device, select_fn)
            print_row(row)
            rows.append(row)
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:  # written whole, then renamed
            rows = [{key: None if val != val else val for key, val in row.items()} for row in rows]  # NaN -> null
            json.dump(dict(device=name, torch=torch.__version__, args=vars(args), rows=rows), f, indent=1)
        os.replace(args.json + ".tmp", args.json)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
