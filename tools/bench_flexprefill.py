"""
Benchmark FlexPrefill (flexprefill.py) against dense causal SDPA, side by side in one run.

Default: the Qwen2.5-VL-7B attention shape (28 q heads, 4 kv heads, head dim 128, bf16) at 8k..128k tokens,
on random inputs and on inputs with planted structure (sink + local window + a few key columns).
Per length and input it reports the selection time, the BlockMask build, the sparse attention, the whole
FlexPrefill call, SDPA's default dense causal attention (and SDPA's FlashAttention-2 backend on CUDA), the
kept fraction of causal blocks, the share of query-aware heads and the output error against SDPA's output
(nothing N x N is built). Times are medians over --iters runs after --warmup runs (CUDA events on GPU).
The selection is the fast (compiled) one on CUDA; the eager reference runs beside it, timed (select_ref_ms) and
compared block by block (sel_diff, expected 0). --authors PATH adds the authors' Triton FlexPrefill (a checkout of
bytedance/FlexPrefill, imported from there, never copied) on the same inputs and settings: its time, its selection's
time and density, the share of blocks where it and ours differ, its error, x_authors = its time over our default
(flexprefill_attention, which may run dense) and x_authors_sparse = its time over ours always sparse.

    python -m tools.bench_flexprefill                                   # H100: 8k, 32k, 64k, 128k
    python -m tools.bench_flexprefill --lengths 131072 --select reference --json out.json   # eager selection
    python -m tools.bench_flexprefill --lengths 32768 131072 --authors ../FlexPrefill       # and the authors' code
    python -m tools.bench_flexprefill --activations qkv_layer10.pt      # q, k, v captured from a model
    python -m tools.bench_flexprefill --device cpu --lengths 1024 --heads 4 1   # CPU smoke test
    python -m tools.bench_flexprefill --long-prefill   # dense vs FlexPrefill answers of the shipped model

--long-prefill asks a trained checkpoint questions whose answers need the whole video after prefilling --seconds
of held-out streams, dense and FlexPrefill side by side, and the StreamingVLM cache after streaming the same
seconds (tools/long_prefill.py says how).
"""
import argparse
import importlib.util
import math
import os
import statistics
import time


import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cli import (Parser, Results, at_least, check_device, checked, default_model, file_problem, inputs_of,
                 output_problem, table)
from flexprefill import (FlexPrefillConfig, _flex, block_mask_from_selection, flexprefill_attention,
                         estimate_density, select_blocks, select_blocks_fast, sparse_attention)
from model import causal_attention


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
    R = D - 2 - local_dims
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


def load_authors(path):
    """The authors' flex_prefill/ops/flex_prefill_attention.py from a bytedance/FlexPrefill checkout at path, imported
    as a lone module (their package __init__ also patches transformers models, which we do not need; the module itself
    needs triton, einops and transformers). Returns (module, None), or (None, why it failed)."""
    file = os.path.join(path, "flex_prefill", "ops", "flex_prefill_attention.py")
    try:
        spec = importlib.util.spec_from_file_location("authors_flex_prefill_attention", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, None
    except Exception as e:  # a missing file or package, or a triton/transformers version it does not know
        return None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def run_authors(authors, q, k, v, cfg, sel, dense, bench):
    """The authors' FlexPrefill on the same q, k, v (their layout: (B, N, H, D)) and settings: the whole call, their
    selection (get_active_blocks), their density counted as ours (kept / causal blocks), how many blocks their
    selection and ours differ in (share of causal blocks; ours differs by design: see flexprefill.py's docstring) and
    their output's error against dense SDPA."""
    bs, N = cfg.block_size, q.shape[2]
    nb, max_budget = math.ceil(N / bs), math.ceil((cfg.max_budget or 2**31 - 1) / bs)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    call = lambda: authors.flex_prefill_attention(qt, kt, vt, cfg.gamma, cfg.tau, cfg.min_budget, cfg.max_budget,
                                                  block_size=bs)
    select = lambda: authors.get_active_blocks(qt, kt, vt, bs, cfg.gamma, math.ceil(cfg.min_budget / bs),
                                               max_budget, cfg.tau)
    theirs = torch.zeros_like(sel).flatten(2)                       # (B, Hq, nb * nb): their flat block indices
    for b, heads in enumerate(select()):
        for h, idx in enumerate(heads):
            theirs[b, h, idx.long()] = True
    theirs = theirs.view(sel.shape)
    causal = nb * (nb + 1) / 2
    err = (call().transpose(1, 2).float() - dense.float()).abs().max().item()
    return dict(authors_ms=bench(call), authors_select_ms=bench(select), authors_max_err=err,
                authors_density=(theirs.sum((-2, -1)) / causal).float().mean().item(),
                vs_authors=((theirs != sel).sum((-2, -1)) / causal).float().mean().item())


def timeit_pair(fa, fb, device, warmup, iters):
    """Median milliseconds of fa() and of fb(), called in turn (a, b, a, b, ...): a GPU's clocks drift over a long
    run (heat, power), so two functions timed minutes apart can differ by more than what they compute differently;
    timed in alternation, both see the same drift."""
    times = ([], [])
    for i in range(warmup + iters):
        for fn, out in zip((fa, fb), times):
            ms = timeit(fn, device, 0, 1)
            if i >= warmup:
                out.append(ms)
    return statistics.median(times[0]), statistics.median(times[1])


def run_one(name, q, k, v, args, device, authors=None):
    N = q.shape[2]
    cfg = FlexPrefillConfig(gamma=args.gamma, tau=args.tau, min_budget=args.min_budget, max_budget=args.max_budget,
                            block_size=args.block_size, dense_above=args.dense_above, dense_below=args.dense_below,
                            fast=dict(auto=None, fast=True, reference=False)[args.select])
    fast = device.type == "cuda" if cfg.fast is None else cfg.fast
    select_fn = select_blocks_fast if fast else select_blocks
    backend = args.backend if args.backend != "auto" else ("flex" if device.type == "cuda" else "dense")
    bench = lambda fn: timeit(fn, device, args.warmup, args.iters)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sel, info = select_fn(q, k, cfg)
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    sel_ref, info_ref = select_blocks(q, k, cfg)    # the eager reference: the fast path must keep the same blocks
    out = sparse_attention(q, k, v, sel, args.block_size, backend)
    dense = causal_attention(q, k, v)
    err = (out.float() - dense.float()).abs()
    row = dict(input=name, N=N, select="fast" if fast else "reference", density=info["density"].mean().item(),
               query_aware=info["query_aware"].float().mean().item(), sel_diff=int((sel != sel_ref).sum()),
               qa_diff=int((info["query_aware"] != info_ref["query_aware"]).sum()),
               max_err=err.max().item(), mean_err=err.mean().item(), select_peak_gib=peak_gib)
    del out, err, sel_ref, info_ref
    if authors is not None:
        try:   # their Triton kernels were written for older Triton versions: a failure costs their columns only
            row.update(run_authors(authors, q, k, v, cfg, sel, dense, bench))
        except Exception as e:
            why = (str(e).splitlines() or [""])[0]
            print(f"  authors' FlexPrefill failed on {name} N={N}: {type(e).__name__}: {why}")
    del dense

    row["select_ms"] = bench(lambda: select_fn(q, k, cfg))
    row["select_ref_ms"] = bench(lambda: select_blocks(q, k, cfg)) if fast else row["select_ms"]
    if backend == "flex":
        block_mask = block_mask_from_selection(sel, N, N, args.block_size, fast)
        row["mask_ms"] = bench(lambda: block_mask_from_selection(sel, N, N, args.block_size, fast))
        row["attn_ms"] = bench(lambda: _flex(q, k, v, block_mask, True))
    else:   # the dense reference backend builds an N x N token mask inside
        row["mask_ms"] = float("nan")
        row["attn_ms"] = bench(lambda: sparse_attention(q, k, v, sel, args.block_size, backend))
    row["total_ms"] = bench(lambda: sparse_attention(q, k, v, select_fn(q, k, cfg)[0], args.block_size, backend,
                                                     fast))
    row["sdpa_fa2_ms"] = float("nan")
    if device.type == "cuda":
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                row["sdpa_fa2_ms"] = bench(lambda: causal_attention(q, k, v))
        except RuntimeError as e:   # no FA2 kernel for this GPU / dtype
            print(f"  (SDPA FlashAttention-2 backend unavailable: {str(e).splitlines()[0]})")
    # the whole of flexprefill_attention as a model calls it: probe, and selection and sparse attention unless the
    # input looks too dense for sparse attention to win (cfg.dense_above), then dense SDPA
    _, fp_info = flexprefill_attention(q, k, v, cfg, return_info=True)
    row["fallback"] = "dense" if fp_info["dense_fallback"] else "sparse"
    row["est_density"] = float(fp_info.get("estimated_density") or float("nan"))
    row["estimate_ms"] = bench(lambda: estimate_density(q, k, cfg))
    # the ratio that decides "never slower than dense": both timed in alternation (timeit_pair)
    row["sdpa_ms"], row["flexprefill_ms"] = timeit_pair(lambda: causal_attention(q, k, v),
                                                        lambda: flexprefill_attention(q, k, v, cfg), device,
                                                        args.warmup, max(args.iters, 5))
    row["fp_x_sdpa"] = row["sdpa_ms"] / row["flexprefill_ms"]
    row["speedup"] = row["sdpa_ms"] / row["total_ms"]
    mask_ms = 0.0 if math.isnan(row["mask_ms"]) else row["mask_ms"]      # no BlockMask on the dense backend
    row["select_share"] = (row["select_ms"] + mask_ms) / row["sdpa_ms"]
    row["x_authors"] = row.get("authors_ms", float("nan")) / row["flexprefill_ms"]   # against our default (guarded)
    row["x_authors_sparse"] = row.get("authors_ms", float("nan")) / row["total_ms"]  # against ours always sparse
    return row


COLUMNS = [("input", "{:>11}"), ("N", "{:>7}"), ("select_ms", "{:>9.2f}"), ("select_ref_ms", "{:>13.2f}"),
           ("sel_diff", "{:>8}"), ("mask_ms", "{:>8.2f}"),
           ("attn_ms", "{:>9.2f}"), ("total_ms", "{:>9.2f}"), ("sdpa_ms", "{:>9.2f}"), ("sdpa_fa2_ms", "{:>11.2f}"),
           ("speedup", "{:>7.2f}x"), ("select_share", "{:>12.1%}"), ("density", "{:>7.3f}"),
           ("query_aware", "{:>11.2f}"), ("max_err", "{:>8.4f}"), ("mean_err", "{:>8.5f}"),
           ("select_peak_gib", "{:>15.2f}"), ("est_density", "{:>11.3f}"), ("estimate_ms", "{:>11.2f}"),
           ("fallback", "{:>8}"),
           ("flexprefill_ms", "{:>14.2f}"), ("fp_x_sdpa", "{:>8.2f}x"), ("x_authors", "{:>9.2f}x"),
           ("x_authors_sparse", "{:>16.2f}x")]


SUMMARY = ["input", "N", "select_ms", "select_ref_ms", "mask_ms", "select_share", "sel_diff", "density", "fallback",
           "flexprefill_ms", "sdpa_ms", "fp_x_sdpa", "max_err", "authors_ms", "authors_select_ms", "authors_density",
           "vs_authors", "x_authors", "x_authors_sparse"]


def print_row(row):
    print(" ".join(fmt.format(row[key]) for key, fmt in COLUMNS), flush=True)


# -----------------------------------------------------------------------------


def kernel_bench(args):
    """The kernel table: per input kind and length, FlexPrefill's parts against dense SDPA."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    Hq, Hkv = args.heads
    authors = None
    if args.authors:
        authors, why = load_authors(args.authors)
        if authors is None:
            print(f"authors' FlexPrefill not importable from {args.authors} ({why}): running ours only")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.dtype}, heads {Hq}/{Hkv}, head dim {args.head_dim}, "
          f"gamma {args.gamma}, tau {args.tau}, min_budget {args.min_budget}, block {args.block_size}, "
          f"selection {args.select}{', authors: ' + args.authors if authors else ''}")
    print("density = kept / causal blocks (mean over heads); query_aware = share of query-aware heads; "
          "errors against SDPA's output")
    if max(args.lengths) <= max(2 * args.block_size, math.ceil(args.min_budget / args.block_size) * args.block_size):
        print("note: flexprefill_attention runs dense SDPA at these lengths; the sparse path is timed anyway")
    print(" ".join(f"{key:>{len(fmt.format(0))}}" for key, fmt in COLUMNS))
    acts = load_activations(args.activations) if args.activations else None
    res = Results.at(args.json) if args.json else None
    rows = []
    for source in ["activations"] if acts else args.inputs:
        for N in args.lengths:
            gen = torch.Generator().manual_seed(args.seed)
            if source == "activations":
                if N > acts[0].shape[2]:
                    print(f"  skipping N={N}: the activations hold {acts[0].shape[2]} tokens")
                    continue
                q, k, v = (x[:, :, :N] for x in acts)
            else:
                q, k, v = (random_inputs if source == "random" else planted_inputs)(N, Hq, Hkv, args.head_dim, gen)
            q, k, v = (x.to(device, dtype).contiguous() for x in (q, k, v))
            row = run_one(source, q, k, v, args, device, authors)
            print_row(row)
            rows.append({key: None if val != val else val for key, val in row.items()})  # NaN: null in JSON
            if res:
                res.log(**rows[-1])
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if res:
        res.save(dict(device=name, torch=torch.__version__, args=vars(args), rows=rows))
    short = lambda v: round(v, 3 if abs(v) < 10 else 1) if isinstance(v, float) else v
    print("summary (select_share: selection + BlockMask over dense SDPA; x_authors: authors' time over our default, "
          "which may run dense; x_authors_sparse: over ours always sparse)")
    print(table([{c: short(r.get(c)) for c in SUMMARY} for r in rows], SUMMARY))
    return rows


def build_parser():
    p = Parser(prog="python -m tools.bench_flexprefill", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=at_least(1), nargs="+", default=[8192, 32768, 65536, 131072])
    p.add_argument("--heads", type=at_least(1), nargs=2, default=[28, 4], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=at_least(1), default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--inputs", nargs="+", default=["random", "planted"], choices=["random", "planted"])
    p.add_argument("--activations", help=".pt file with q (B,Hq,N,D), k, v (B,Hkv,N,D) as a dict or tuple; "
                   "each length takes the first L tokens (a causal prefix)")
    p.add_argument("--gamma", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=0.9)
    p.add_argument("--tau", type=at_least(0.0, float), default=0.1)
    p.add_argument("--min-budget", type=at_least(0), default=1024)
    p.add_argument("--max-budget", type=at_least(1), default=None)
    p.add_argument("--block-size", type=at_least(1), default=128)
    p.add_argument("--backend", default="auto", choices=["auto", "flex", "dense"])
    p.add_argument("--dense-above", type=checked(float, lambda v: 0 <= v <= 1, "in [0, 1]"), default=0.4,
                   help="flexprefill_attention runs dense SDPA when the probe or the selection keeps more than this "
                   "share of the visible blocks (FlexPrefillConfig.dense_above; flexprefill.GUARDED's value)")
    p.add_argument("--dense-below", type=at_least(0), default=16384, help="flexprefill_attention runs dense SDPA "
                   "on inputs of fewer keys (FlexPrefillConfig.dense_below; flexprefill.GUARDED's value)")
    p.add_argument("--select", default="auto", choices=["auto", "fast", "reference"], help="the block selection: "
                   "fast (select_blocks_fast, compiled: one compile per length), reference (eager select_blocks) or "
                   "auto (fast on CUDA); the reference also runs beside the fast one as a check (sel_diff)")
    p.add_argument("--authors", metavar="PATH", help="a checkout of bytedance/FlexPrefill: their "
                   "flex_prefill_attention runs on the same inputs and settings, side by side (needs CUDA, triton, "
                   "einops)")
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--iters", type=at_least(1), default=5)
    p.add_argument("--seed", type=at_least(0), default=0, help="inputs' seed; --long-prefill: the first "
                   "held-out stream (world.split_seed('eval', SEED + i))")
    p.add_argument("--json", help="also write the results here (and each row to the .jsonl beside it)")
    p.add_argument("--long-prefill", action="store_true", help="instead of the kernels: whole-video questions "
                   "to --model after a long prefill, dense vs FlexPrefill (see above)")
    p.add_argument("--model", default=default_model(), help=f"--long-prefill: checkpoint folder (default "
                   f"{default_model()})")
    p.add_argument("--seconds", type=at_least(1), nargs="+", default=None, help="--long-prefill: seconds "
                   "prefilled, one or more lengths (~29 tokens a second; default 1800 on a GPU, 120 on a CPU)")
    p.add_argument("--streams", type=at_least(1), default=1, help="--long-prefill: held-out streams, each asked "
                   "the whole-stretch questions and --timed of each timed kind")
    p.add_argument("--goal-rate", type=checked(float, lambda v: 0 < v <= 0.5, "in (0, 0.5]"), default=None,
                   help="--long-prefill: the held-out streams' goals a second, capped as training caps it (default: "
                   "the world's, 1/150)")
    p.add_argument("--timed", type=at_least(1), default=1, help="--long-prefill: questions of each timed kind "
                   "(world.LONG_QUESTIONS but the first scorer's) a stream is asked, about different goals (at most "
                   "as many as it has)")
    p.add_argument("--streaming-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="--long-prefill: also ask the StreamingVLM cache after streaming the same seconds")
    p.add_argument("--out", default="out/bench", help="--long-prefill: folder for long_prefill.json(l)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_device(p, args.device)
    # outputs before anything runs: none of them an input (the activations, the model) or inside one
    inputs = inputs_of(args, "activations", "model", "authors")
    if args.json and (problem := next(filter(None, (file_problem(f, inputs) for f in Results.files_at(args.json))),
                                      None)):
        p.error(f"--json {problem}")
    if args.long_prefill and (problem := output_problem(args.out, inputs, holds=False, results=True)):
        p.error(f"--out {problem}")
    if not args.long_prefill:
        if args.activations and not os.path.isfile(args.activations):
            p.error(f"--activations {args.activations}: no such file")
        if not args.device.startswith("cuda") and max(args.lengths) > 16384:  # q, k, v, and a dense N x N reference
            p.error(f"--lengths up to {max(args.lengths)} on a CPU would take tens of GiB and hours: this benchmark "
                    "is for a GPU; on a CPU try the smoke test, --device cpu --lengths 1024 --heads 4 1")
        return kernel_bench(args)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model}: no checkpoint there; make one with `python train.py` or pass --model DIR")
    args.seconds = args.seconds or [1800 if args.device.startswith("cuda") else 120]
    from tools.long_prefill import long_prefill  # the VLM-level check lives in its own file
    return long_prefill(args)


if __name__ == "__main__":
    main()
