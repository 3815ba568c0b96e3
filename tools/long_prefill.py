"""
Whole-video questions after a long prefill: does FlexPrefill pay inside our VLM? (`bench_flexprefill --long-prefill`)

For each --seconds length and each held-out stream (world.split_seed("eval", SEED + i)), the stream's first SECONDS
(its true commentary, laid out as training lays it out: data.build_sample, ~29 tokens a second) are prefilled
once with dense causal attention and once with FlexPrefill, each into its own KVCache. Each question (the
score, the goals, the first scorer, and --timed of each timed kind, naming different goals' seconds: the score
at the second, the goals before it, who scored at it) is then a short chunk on that cache, answered greedily,
and the cache is cut back to the video. That is how a user asks about a long video: prefill it once, ask many
times. The question and its answer attend densely in both modes (as a chunk under FlexPrefillConfig.min_len does
in the model), so FlexPrefill's answer differs from dense only through what its sparse prefill wrote into the
cache (every layer's keys and values past the first).

Reported per length: the answers (right = equal to the world's answer), the share where FlexPrefill's answer
equals dense's, the prefill times (the whole forward: vision tower, decoder, and for FlexPrefill its block
selection; CUDA events, median of 3 after a warm-up that compiles) of dense, FlexPrefill as the model runs it
(flexprefill.GUARDED's rules: dense where sparse cannot win) and FlexPrefill always sparse, the density it kept,
the share of query-aware heads (the rest are vertical-slash), and its attention error against dense. The answers
come from the always-sparse run: the stricter test. With --streaming-cache (the default) the same questions also
go to the StreamingVLM cache after streaming the same seconds (Streamer.ask): sink, text window, vision window.

Paper: Lai et al., FlexPrefill, arXiv 2502.20766 (RULER: 89.18 vs 88.70 dense, ~2.4x faster prefill at 128k).
"""
import random
import statistics
from dataclasses import replace

import torch
from tqdm import tqdm

from cache import KVCache
from checkpoint import load_checkpoint
from cli import Results, hardware, table
from data import build_sample, long_goal_rate
from flexprefill import FlexPrefill, FlexPrefillConfig, flexprefill_attention
from layout import layout_of, question_segments
from model import causal_attention
from stream import make_streamer, streamer_kwargs
from tools.bench_flexprefill import timeit
from world import QUESTIONS, TIMED, SportsStream, WorldConfig, long_question, split_seed


class MeasuredFlexPrefill(FlexPrefill):
    """FlexPrefill that also records, for each chunk it makes sparse, the kept density (1.0 where it fell back to
    dense), the share of query-aware heads, and the relative error of its output against dense causal attention
    (computed beside it: slower)."""

    def __init__(self, cfg=FlexPrefillConfig()):
        super().__init__(cfg)
        self.density, self.query_aware, self.rel_err = [], [], []

    def __call__(self, q, k, v):
        if q.shape[2] < self.cfg.min_len:
            return causal_attention(q, k, v)
        out, info = flexprefill_attention(q, k, v, self.cfg, return_info=True)
        dense = causal_attention(q, k, v)
        self.density.append(1.0 if info["dense_fallback"] else float(info["density"].float().mean()))
        if "query_aware" in info:
            self.query_aware.append(float(info["query_aware"].float().mean()))
        self.rel_err.append(float((out - dense).float().norm() / dense.float().norm()))
        return out


def stream_questions(world, seconds, timed=1):
    """[(kind, question, answer)] asked after `seconds` of a world: world.QUESTIONS (the last goal sentence answers
    the score and the count, the first one the first scorer), then of each timed world.LONG_QUESTIONS `timed`
    questions about different goals (as many as there are; one about any second when there is none, the scorer's
    then asking for the first scorer), drawn from the world's seed."""
    rng = random.Random(world.cfg.seed)
    goals = [t for t, _ in world.goals(seconds)]
    asked = [(k, *long_question(k, world, seconds, rng)) for k in QUESTIONS]
    for kind in TIMED:
        named = rng.sample(goals, min(timed, len(goals))) if goals else [None]
        asked += [(kind, *long_question(kind, world, seconds, rng, t)) for t in named]
    return asked


@torch.no_grad()
def prefill(model, attn_fn, ids, vision, room=256):
    """A KVCache holding the prompt `ids` (1, T), prefilled under attn_fn, with `room` tokens to spare (a question
    and its answer). The model is left with dense attention."""
    cache = KVCache(model.cfg, 1, ids.shape[1] + room, model.device, model.dtype)
    try:
        model.use_attention(attn_fn)(ids, cache=cache, logits_to_keep=1, **vision)
    finally:
        model.use_attention(None)
    return cache


@torch.no_grad()
def answer(model, tok, cache, question, max_new_tokens=12):
    """The greedy answer to `question` asked on top of the prefilled cache, which is then cut back to the prompt."""
    length, next_pos = cache.length, cache.next_pos.clone()
    ids = torch.tensor([question_segments(tok, question)[0][0]], device=model.device)
    try:
        logits, out = model(ids, cache=cache, logits_to_keep=1), []
        while len(out) < max_new_tokens:
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == tok.im_end_id:
                break
            logits = model(torch.tensor([out[-1:]], device=model.device), cache=cache)
    finally:  # forget the question, whatever happened: the next one asks the video afresh
        cache.length, cache.added, cache.next_pos = length, 0, next_pos
    return tok.decode([i for i in out if i != tok.im_end_id]).strip()


@torch.no_grad()  # FlexAttention's BlockMask here is forward-only
def prefill_ms(model, attn_fn, ids, vision):
    """Median milliseconds of the whole prefill forward under attn_fn, after a warm-up (allocation, compilation)."""
    model.use_attention(attn_fn)
    try:
        return timeit(lambda: model(ids, logits_to_keep=1, **vision), model.device, 1, 3)
    finally:
        model.use_attention(None)


def streaming_answers(model, tok, st, secs, questions):
    """The StreamingVLM cache's answers after streaming `secs` with their true commentary (teacher-forced)."""
    streamer = make_streamer(model, tok, "streaming", **streamer_kwargs(layout_of(st)))
    for s in secs:
        streamer.step(s.frames, force_text=s.text)
    return [streamer.ask(q) for _, q, _ in questions]


def video_prompt(model, tok, st, world, seconds):
    """(seconds, ids (1, T), vision inputs) of a world's first `seconds` with their true commentary, laid out as
    training lays a stream out (data.build_sample) at the checkpoint's frame size (its stream.json)."""
    secs = [world.second(t) for t in range(seconds)]
    kw = streamer_kwargs(layout_of(st))
    sample = build_sample(tok, [s.frames for s in secs], [s.text for s in secs], 0, [], frame_pixels=kw["frame_pixels"])
    vision = dict(pixel_values_videos=sample.pixel_values.to(model.device), video_grid_thw=sample.grid_thw)
    return secs, sample.ids[None].to(model.device), vision


@torch.no_grad()
def ask_stream(args, model, tok, st, world, seconds, res):
    """One held-out world after `seconds`: its rows, one a question, each with the stream's measures."""
    sparse = FlexPrefillConfig(gamma=args.gamma, tau=args.tau, min_budget=args.min_budget, min_len=1)
    guarded = replace(sparse, dense_above=args.dense_above, dense_below=args.dense_below)
    secs, ids, vision = video_prompt(model, tok, st, world, seconds)
    measured = MeasuredFlexPrefill(sparse)
    caches = dict(dense=prefill(model, None, ids, vision), flexprefill=prefill(model, measured, ids, vision))
    times = dict(dense_ms=prefill_ms(model, None, ids, vision), flexprefill_ms=prefill_ms(model, FlexPrefill(guarded),
                 ids, vision), sparse_ms=prefill_ms(model, FlexPrefill(sparse), ids, vision))
    questions = stream_questions(world, seconds, args.timed)
    streaming = streaming_answers(model, tok, st, secs, questions) if args.streaming_cache else [None] * len(questions)
    # this stream's measures ride on each of its rows: an interrupted run keeps them with its answers
    measures = dict(times, density=round(statistics.mean(measured.density), 4),
                    query_aware=round(statistics.mean(measured.query_aware or [0.0]), 4),
                    attn_rel_err=round(max(measured.rel_err), 4))
    rows = []
    for (kind, question, truth), streamed in zip(questions, streaming):
        got = {mode: answer(model, tok, cache, question) for mode, cache in caches.items()}
        rows.append(dict(seconds=seconds, seed=world.cfg.seed, question=kind, asked=question, tokens=ids.shape[1],
                         truth=truth, dense=got["dense"], flexprefill=got["flexprefill"],
                         same=got["dense"] == got["flexprefill"], dense_right=got["dense"] == truth,
                         flexprefill_right=got["flexprefill"] == truth, streaming=streamed,
                         streaming_right=None if streamed is None else streamed == truth) | measures)
        res.log(**rows[-1])
    return rows


def summarize(seconds, rows):
    """One line of the table: a length's answers and speeds over its streams (each stream's measures once)."""
    share = lambda key: None if rows[0][key] is None else round(sum(r[key] for r in rows) / len(rows), 3)  # noqa
    streams = list({r["seed"]: r for r in rows}.values())
    mean = lambda key, digits=1: round(statistics.mean(r[key] for r in streams), digits)  # noqa: E731
    line = dict(seconds=seconds, tokens=round(statistics.mean(r["tokens"] for r in rows)), questions=len(rows),
                dense_right=share("dense_right"), flexprefill_right=share("flexprefill_right"),
                same_answer=share("same"), streaming_right=share("streaming_right"),
                dense_ms=mean("dense_ms"), flexprefill_ms=mean("flexprefill_ms"), sparse_ms=mean("sparse_ms"))
    line.update(speedup=round(line["dense_ms"] / line["flexprefill_ms"], 2),
                speedup_sparse=round(line["dense_ms"] / line["sparse_ms"], 2),
                density=mean("density", 3), query_aware=mean("query_aware", 3),
                attn_rel_err=max(r["attn_rel_err"] for r in streams))
    return line


def per_question(rows):
    """{kind: {dense, flexprefill, streaming: right answers, asked}} over all rows."""
    kinds = dict.fromkeys(r["question"] for r in rows)
    def right(q, mode):  # None: that mode was not asked (--no-streaming-cache)
        got = [r[f"{mode}_right"] for r in rows if r["question"] == q]
        return None if None in got else sum(got)
    return {q: {m: right(q, m) for m in ("dense", "flexprefill", "streaming")}
            | dict(asked=sum(r["question"] == q for r in rows)) for q in kinds}


def long_prefill(args):
    """Dense vs FlexPrefill vs the streaming cache on whole-video questions after long prefills (see the top)."""
    from tools.bench_stream import plot
    model, tok, st = load_checkpoint(args.model, args.device)
    print(f"whole-video questions after {', '.join(map(str, args.seconds))} s prefills on {args.model} "
          f"({hardware()}; gamma {args.gamma}, tau {args.tau}, min_budget {args.min_budget}; prefill times include "
          "the vision tower)", flush=True)
    res, rows, summary = Results(args.out, "long_prefill"), [], []
    for seconds in args.seconds:
        here = []
        for i in tqdm(range(args.streams), desc=f"{seconds} s", disable=args.streams < 2):
            rate = {} if args.goal_rate is None else dict(goal_rate=long_goal_rate(args.goal_rate, seconds))
            world = SportsStream(WorldConfig(seed=split_seed("eval", args.seed + i), size=st.get("frame_size", 56),
                                             **rate))
            here += ask_stream(args, model, tok, st, world, seconds, res)
        rows += here
        summary.append(summarize(seconds, here))
        print(table([summary[-1]]), flush=True)
    print(table(rows[:12], ["seed", "asked", "truth", "dense", "flexprefill", "streaming"]))
    if len(rows) > 12:
        print(f"... {len(rows) - 12} more rows in {res.path}.jsonl")
    print(table(summary))
    kinds = per_question(rows)
    print("right per question (dense / FlexPrefill / streaming cache): " + ", ".join(
        f"{q} {v['dense']}/{v['flexprefill']}/{'-' if v['streaming'] is None else v['streaming']} of {v['asked']}"
        for q, v in kinds.items()))
    tokens = [s["tokens"] for s in summary]
    plot(args.out, "long_prefill", {f"{name} ({hardware()})": (tokens, [s[f"{key}_ms"] for s in summary])
                                    for name, key in (("dense", "dense"), ("FlexPrefill", "flexprefill"),
                                                      ("FlexPrefill, always sparse", "sparse"))},
         "prompt tokens", "prefill ms (vision tower included)")
    result = dict(summary=summary, per_question=kinds, rows=rows)
    res.save(result)
    return result
