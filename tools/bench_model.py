"""
The full-size check of model.py on a GPU: the Qwen2.5-VL-7B config with random weights in bf16, against
transformers' own Qwen2_5_VLForConditionalGeneration holding the *same* tensors (no second copy), side by side:

  - logits on a few prompts (text; an image; a one-grid video): max / mean absolute difference;
  - greedy generation: how many of the first N tokens agree;
  - prefill of --prefill tokens (text, no cache): time and MFU for both, ours also with the fused projections,
    compiled around the attention (VLM.compile_prefill), and with cuDNN's causal attention;
  - peak GPU memory; optionally (--load-test) save our model and load it back through from_pretrained,
    reporting the peak CPU memory of the process (the loader streams tensors to the GPU one at a time).

    python -m tools.bench_model                   # needs CUDA and transformers
    python -m tools.bench_model --preset 3B --json out/bench_model.json
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from tools.bench_flexprefill import timeit
from cli import Parser, Results, at_least, checked
from model import PRESETS, VLM
from weights import canonical_name


def twins(cfg, device, dtype):
    """transformers' Qwen2_5_VLForConditionalGeneration with random weights, and our VLM holding the very same
    tensors (no second copy on the GPU): (hf, ours), both in eval mode. Needs transformers."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    hf_cfg = Qwen2_5_VLConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, torch_dtype=dtype).eval()
    with torch.device("meta"):
        ours = VLM(cfg)
    state = {canonical_name(k): v for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, assign=True)
    ours.model.rope_tables(cfg, device)
    return hf, ours.eval()


def prompts(cfg):
    """Three prompts with random ids and pixels: text; a 480x640 image; a 560x1008 video of one temporal grid."""
    g = torch.Generator().manual_seed(0)
    S, E, I, Vd = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id
    txt = lambda n: torch.randint(0, 150000, (n,), generator=g).tolist()
    img_grid, vid_grid = torch.tensor([[1, 34, 46]]), torch.tensor([[1, 40, 72]])
    return {
        "text": (txt(64), {}),
        "image": (txt(20) + [S] + [I] * (34 * 46 // 4) + [E] + txt(12),
                  dict(pixel_values=torch.randn(34 * 46, 1176, generator=g), image_grid_thw=img_grid)),
        "video": (txt(20) + [S] + [Vd] * (40 * 72 // 4) + [E] + txt(12),
                  dict(pixel_values_videos=torch.randn(40 * 72, 1176, generator=g), video_grid_thw=vid_grid,
                       second_per_grid_ts=torch.tensor([1.0]))),
    }


@torch.no_grad()
def compare_prompts(args, cfg, hf, ours, dev, out=None):
    """Logits and greedy tokens of both models on each prompt, each a line in `out` (eval.Results) as it comes;
    returns the report and the bf16 logits (for the fp32 reference)."""
    report, logits = {}, {}
    for name, (ids, vis) in prompts(cfg).items():
        ids = torch.tensor([ids], device=dev)
        vis = {k: v.to(dev) for k, v in vis.items()}
        mm = torch.zeros_like(ids)  # transformers 5 builds M-RoPE runs from these token types
        mm[ids == cfg.image_token_id], mm[ids == cfg.video_token_id] = 1, 2
        try:
            ref = hf(input_ids=ids, mm_token_type_ids=mm, **vis).logits.float()
        except TypeError:  # transformers 4.x reads the types off the ids
            ref = hf(input_ids=ids, **vis).logits.float()
        got = ours(ids, **vis).float()
        d = (ref - got).abs()
        ref_gen = hf.generate(input_ids=ids, max_new_tokens=args.generate, min_new_tokens=args.generate,
                              do_sample=False, **({"mm_token_type_ids": mm} if name != "text" else {}), **vis)
        our_gen = ours.generate(ids, max_new_tokens=args.generate, stop_ids=[-1], **vis)
        a, b = ref_gen[0, ids.shape[1]:].tolist(), our_gen[0, ids.shape[1]:].tolist()
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        logits[name] = (ids, vis, mm, ref.cpu(), got.cpu())
        report[name] = dict(tokens=ids.shape[1], max_abs=d.max().item(), mean_abs=d.mean().item(),
                            logit_scale=ref.abs().mean().item(),
                            argmax_agree=(ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
                            greedy_prefix_agree=agree, greedy_total=len(a))
        print(name, report[name], flush=True)
        if out:
            out.log(prompt=name, **report[name])
    return report, logits


@torch.no_grad()
def prefill_mfu(args, cfg, hf, ours, dev):
    """Prefill time of --prefill text tokens, both models, and MFU: matmul FLOPs 2 * params per token, plus causal
    attention 2 * 2 * L * T^2 / 2 * heads * head_dim."""
    T = args.prefill
    ids = torch.randint(0, 150000, (1, T), device=dev)
    n_lm = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("visual."))
    n_lm -= cfg.vocab_size * cfg.hidden_size  # the embedding lookup is no matmul (logits of 1 token are ~0)
    flops = 2 * n_lm * T + 2 * cfg.num_hidden_layers * T * T * cfg.num_attention_heads * cfg.head_dim
    t_ours = timeit(lambda: ours(ids, logits_to_keep=1), dev, 2, 5) / 1e3
    t_hf = timeit(lambda: hf(input_ids=ids, logits_to_keep=1), dev, 2, 5) / 1e3
    # and with the fused q/k/v and gate/up projections (VLM.fuse: new stacked tensors, ~8.5 GB more at 7B, since
    # transformers' model keeps the separate ones it shares with ours). By default the fused matmul serves only
    # inputs of at most layers.FUSE_MAX_ROWS rows (decode steps); "forced" raises that limit for this prompt
    import layers
    ours.fuse()
    limit, layers.FUSE_MAX_ROWS = layers.FUSE_MAX_ROWS, 10**9
    t_forced = timeit(lambda: ours(ids, logits_to_keep=1), dev, 2, 5) / 1e3
    # and each layer's norms, rotary, SiLU and residual adds fused by torch.compile (VLM.compile_prefill; the first
    # warm-up call compiles), then with cuDNN's causal kernel for the attention (the prompt has no cache: square)
    ours.compile_prefill(True)
    t_compiled = timeit(lambda: ours(ids, logits_to_keep=1), dev, 2, 5) / 1e3
    t_cudnn = None
    if dev.type == "cuda":
        from prefill import cudnn
        ours.use_attention(lambda q, k, v: cudnn(q, k, v, causal=True)[0])
        t_cudnn = timeit(lambda: ours(ids, logits_to_keep=1), dev, 2, 5) / 1e3
        ours.use_attention(None)
    ours.compile_prefill(False)
    layers.FUSE_MAX_ROWS = limit
    t_fused = timeit(lambda: ours(ids, logits_to_keep=1), dev, 2, 5) / 1e3
    ours.fuse(False)
    t_again = timeit(lambda: ours(ids, logits_to_keep=1), dev, 2, 5) / 1e3  # the unfused model again: the spread
    cudnn_text = f", and cuDNN causal {1000 * t_cudnn:.1f}" if t_cudnn else ""
    print(f"prefill {T} tokens, ms: ours {1000 * t_ours:.1f}, fused forced {1000 * t_forced:.1f}, that compiled "
          f"{1000 * t_compiled:.1f}{cudnn_text}, fused (default limit) {1000 * t_fused:.1f}, ours again "
          f"{1000 * t_again:.1f}, transformers {1000 * t_hf:.1f} (transformers / fused forced compiled "
          f"{t_hf / t_compiled:.3f}x)", flush=True)
    return dict(tokens=T, ours_ms=1000 * t_ours, fused_forced_ms=1000 * t_forced, fused_ms=1000 * t_fused,
                compiled_ms=1000 * t_compiled, compiled_cudnn_ms=1000 * t_cudnn if t_cudnn else None,
                ratio_hf_over_compiled=t_hf / t_compiled, ours_again_ms=1000 * t_again, hf_ms=1000 * t_hf,
                ratio_hf_over_fused=t_hf / t_fused, ours_tflops=flops / t_ours / 1e12,
                hf_tflops=flops / t_hf / 1e12, ours_mfu=flops / t_ours / 1e12 / args.peak_tflops,
                hf_mfu=flops / t_hf / 1e12 / args.peak_tflops, ratio_hf_over_ours=t_hf / t_ours)


@torch.no_grad()
def fp32_reference(report, logits, hf, dt):
    """Which bf16 model is nearer the truth? transformers in fp32 (a copy; ours keeps the bf16 tensors)."""
    hf.float()
    for name, (ids, vis, mm, ref, got) in logits.items():
        v32 = {k: v.float() if v.is_floating_point() else v for k, v in vis.items()}
        kw = {"mm_token_type_ids": mm} if name != "text" else {}
        truth = hf(input_ids=ids, **kw, **v32).logits.float().cpu()
        report[name].update(hf_bf16_vs_fp32_mean=(ref - truth).abs().mean().item(),
                            ours_bf16_vs_fp32_mean=(got - truth).abs().mean().item(),
                            hf_bf16_vs_fp32_max=(ref - truth).abs().max().item(),
                            ours_bf16_vs_fp32_max=(got - truth).abs().max().item())
        print(name, "vs fp32:", {k: round(v, 4) for k, v in report[name].items() if "fp32" in k}, flush=True)
    hf.to(dt)


def load_test(ours):
    """Save our model and load it back through from_pretrained in a fresh process, so that its peak CPU memory is
    the loader's alone (it streams tensors to the GPU one at a time)."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        t0 = time.perf_counter()
        ours.save_pretrained(d)
        t_save = time.perf_counter() - t0
        code = ("import resource, time, torch; from model import VLM; t = time.perf_counter(); "
                f"VLM.from_pretrained({d!r}, device='cuda', dtype=torch.bfloat16); "
                "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        load_s, rss = map(float, out.stdout.split()[-2:])
        return dict(save_s=t_save, load_s=load_s, peak_rss_gib=rss,
                    checkpoint_gib=sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**30)


def get_args(argv=None):
    ap = Parser(prog="python -m tools.bench_model", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="7B", choices=["3B", "7B"])
    ap.add_argument("--prefill", type=at_least(1), default=8192, help="prompt tokens of the prefill timing")
    ap.add_argument("--generate", type=at_least(1), default=20, help="greedy tokens compared")
    ap.add_argument("--peak-tflops", type=checked(float, lambda v: v > 0, "> 0"), default=989.0,
                    help="bf16 dense peak of the GPU (H100 SXM)")
    ap.add_argument("--load-test", action="store_true", help="save our model, load it back, report the memory")
    ap.add_argument("--fp32-reference", action="store_true",
                    help="also run transformers in fp32 and report how far each bf16 model is from it")
    ap.add_argument("--json", default=None, help="also write the results here (and a JSON line per prompt)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("the full-size check needs a CUDA GPU (tests/test_model.py checks the same against transformers "
                 "at a tiny size on the CPU)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        ap.error("needs transformers (pip install -r requirements-dev.txt)")
    return args


def main(argv=None):
    args = get_args(argv)
    import transformers
    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = PRESETS[args.preset]()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hf, ours = twins(cfg, dev, dt)
    print(f"transformers {transformers.__version__}: random {args.preset} built in {time.perf_counter() - t0:.0f} s")
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
               preset=args.preset)
    out = Results.at(args.json) if args.json else None
    res["prompts"], logits = compare_prompts(args, cfg, hf, ours, dev, out)
    res["prefill"] = prefill_mfu(args, cfg, hf, ours, dev)
    res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("prefill", res["prefill"], f"peak GPU {res['peak_gpu_gib']:.1f} GiB", flush=True)
    if args.fp32_reference:
        fp32_reference(res["prompts"], logits, hf, dt)
    if out:
        out.log(prefill=res["prefill"])
    if args.load_test:
        del hf
        res["load"] = load_test(ours)
        print("load", res["load"], flush=True)
    if out:
        out.save(res)
    return res


if __name__ == "__main__":
    main()
