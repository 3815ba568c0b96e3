"""
Which kept keys and values does a streamed reply hinge on? A diagnostic for the gap between reused and fresh K/V.

StreamingVLM reuses K/V (cache.py): a token's keys and values are computed once, in the forward of its own second,
and kept, re-rotated at contiguous positions, while later seconds arrive. A fresh prefill of the same kept tokens
at the same positions gives other K/V from the second layer on: each token then attends to what is kept now, not
to what was in view when it was written. eval.py's `recompute` policy re-prefills everything kept every second.

This script asks which part of the cache a difference comes from. It streams a held-out stream of the synthetic
world up to second T, teacher-forced (the true commentary, so the cache holds what a model that was right so far
holds), beside the recompute policy; then it decodes second T from the streamed cache with the K/V of one kind of
kept token swapped for the fresh prefill's (same tokens, same positions: checked), one kind at a time.

  python -m tools.swap_kv --seed 62 --second 1168     # a goal the shipped model misreads when it evicts every second

Reference: StreamingVLM, arXiv 2510.09608 (the cache; their inference reuses K/V the same way).
"""
import argparse
import copy

import torch
from tqdm import tqdm

from eval import held_out
from cli import HELD_OUT_SEED, Parser, at_least, default_model, device_name
from layout import Kind, add_layout_flags, layout_of
from checkpoint import load_checkpoint
from stream import make_streamer, streamer_kwargs


def variants(kind, rnd, T):
    """(name, which kept tokens get fresh K/V) for the kinds and rounds of a streamed cache at second T."""
    rounds = kind >= Kind.USER
    return [("streamed (reused K/V)", torch.zeros_like(rounds)),
            ("fresh: everything kept", torch.ones_like(rounds)),
            ("fresh: previous text", kind == Kind.PREV_BODY),
            ("fresh: rounds in the vision window", rounds),
            ("fresh: their user turns (frames, prompt)", kind == Kind.USER),
            ("fresh: their replies", (kind == Kind.REPLY) | (kind == Kind.END)),
            ("fresh: rounds older than T - 8", rounds & (rnd < T - 8)),
            ("fresh: rounds T - 8 .. T - 1", rounds & (rnd >= T - 8))]


@torch.no_grad()
def swap(args):
    """Prints and returns {"truth", "recompute", and each variant's name: the reply it decodes}."""
    model, tok, st = load_checkpoint(args.model, args.device)
    # greedy, whatever the checkpoint samples with: every variant then decodes from the same state
    kw = dict(streamer_kwargs(layout_of(st, args)), capacity=args.capacity, temperature=0.0, repetition_penalty=1.0)
    world = held_out(argparse.Namespace(seed=args.seed, streams=1), st)[0]  # eval.py --seed's stream
    streamed, fresh = (make_streamer(model, tok, policy, **kw) for policy in ("streaming", "recompute"))
    T = args.second
    for t in tqdm(range(T), desc="streaming and recomputing", unit="s", dynamic_ncols=True):
        frames, text = world.second(t).frames, world.text(t)
        streamed.step(frames, force_text=text)
        fresh.step(frames, force_text=text)
    frames = world.second(T).frames
    streamed.cache.evict(T)  # what step(T) does first; a second call there evicts nothing
    cache, pending, L = copy.deepcopy(streamed.cache), copy.deepcopy(streamed.pending), streamed.cache.length
    recompute = fresh.step(frames)  # re-prefills the same kept tokens, then second T's turn, then decodes
    f = fresh.cache
    if not (f.ids[:L].equal(cache.ids[:L]) and f.pos[:, :L].equal(cache.pos[:, :L])):
        raise SystemExit("the fresh prefill does not hold the streamed cache's tokens at its positions")
    print(f"seed {args.seed}, second {T}: truth {world.text(T)!r}; {L} kept tokens, "
          f"{int((cache.kind[:L] == Kind.PREV_BODY).sum())} of them previous text")
    print(f"  {'recompute policy':44s} {recompute!r}")
    out = dict(truth=world.text(T), recompute=recompute)
    for name, mask in variants(cache.kind[:L], cache.round[:L], T):
        streamed.cache, streamed.pending, streamed.t = copy.deepcopy(cache), copy.deepcopy(pending), T
        idx = torch.nonzero(mask).flatten().to(f.k.device)
        for buf in ("k", "v", "raw_k"):  # (layers, 1, kv heads, capacity, head dim)
            getattr(streamed.cache, buf)[..., idx, :] = getattr(f, buf)[..., idx, :]
        out[name] = streamed.step(frames)
        print(f"  {name:44s} {out[name]!r}", flush=True)
    return out


def main(argv=None):
    """The command line; returns what swap() decoded."""
    ap = Parser(prog="python -m tools.swap_kv", description=__doc__.strip().split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default=default_model(), help=f"checkpoint folder (default {default_model()})")
    ap.add_argument("--seed", type=HELD_OUT_SEED, default=62,
                    help="the held-out stream: world.split_seed('eval', SEED), as eval.py --seed (default 62)")
    ap.add_argument("--second", type=at_least(1), default=1168, help="the second to decode, streamed up to it "
                    "(default 1168: the first miss of stream 62)")
    ap.add_argument("--capacity", type=at_least(256), default=4096, help="cache slots in tokens (default 4096)")
    add_layout_flags(ap)
    # evicting every second, the paper's way, is where the shipped model's misses above are (its stream.json says 8)
    ap.set_defaults(evict_every=1)
    ap.add_argument("--device", type=device_name, default=None, help="cpu, cuda, ... (default: cuda if any)")
    return swap(ap.parse_args(argv))


if __name__ == "__main__":
    main()
