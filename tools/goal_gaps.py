"""
What a training recipe teaches about the score: where the last score sentence is when a supervised goal comes.

A goal's sentence ("Red scores! Red 3, Blue 2.") copies the score from the last one. While streaming, that sentence
is always reused K/V (cache.py): it was written in its own round, seconds or many minutes ago. In a training chunk
it is written in an earlier segment (reused K/V, when the chunk is cut into segments: reuse.py), in the goal's
own forward, or is part of the previous text the chunk starts with; the last two are computed fresh. On held-out
streams (the default world, a goal every 150 s on average) one goal in seven comes more than 300 s after the one
before, and those are where models trained from scratch misread the score (docs/RESULTS.md). This counts, for the
chunks a recipe trains on, how often each case occurs and how long ago the copied sentence was written: the flags
are train.py's, so any recipe can be checked on the CPU before a GPU trains it.

  python -m tools.goal_gaps --preset gpu --step 6100          # the gpu preset's segment phase
  python -m tools.goal_gaps --preset gpu --step 6100 --preroll 192 --goal-rate 0.003:0.03

No frames are drawn: the world's event schedule alone says where the goals are (world.event_table).
"""
import argparse
import bisect
import math

from cli import at_least

from data import chunk_at, chunk_schedule, phase_at, world_config
from reuse import segment_cuts
from world import WorldConfig, event_table

EDGES = (100, 300, 600)  # seconds: the gap bins printed
HELD_OUT = WorldConfig().goal_rate


def goals_of(split, index, chunk, overlap, stream_seconds, world, preroll, segment_seconds=0):
    """[(where, gap)] for each goal in the supervised part of one chunk: where the copied sentence is ("reused":
    written in an earlier segment, "same": in the same forward as the goal, "prefix": in the previous text the
    chunk starts with, "none": the stream's first goal) and how many seconds before the goal it was written."""
    stream, t0 = chunk_at(split, index, chunk, overlap, stream_seconds, world, preroll)
    cuts = segment_cuts([chunk + preroll], segment_seconds) if segment_seconds else []
    segment = lambda t: bisect.bisect_right(cuts, t - t0)  # which forward second t is in
    goals = [t for t, e, _ in event_table(stream.cfg, 0, t0 + chunk + preroll) if e == "goal"]
    out = []
    for i, g in enumerate(goals):
        if g < t0 + preroll:
            continue
        p = goals[i - 1] if i else None
        where = ("none" if p is None else "prefix" if p < t0 else "same" if segment(p) == segment(g) else "reused")
        out.append((where, g - p if p is not None else 0))
    return out


def binned(gaps):
    """'<=100 s: n | 100-300 s: n | ...' for a list of gaps."""
    bounds = (0, *EDGES, math.inf)
    return " | ".join(f"{lo}-{hi} s: {sum(lo < g <= hi for g in gaps)}".replace("-inf", "+")
                      for lo, hi in zip(bounds, bounds[1:]))


def report(cfg, step, chunks):
    start, phase = phase_at(step, cfg)
    chunk, overlap, stream_seconds = chunk_schedule(step - start, phase)
    preroll = getattr(phase, "preroll", 0)
    world = world_config("train", phase)
    seen = [x for i in range(chunks) for x in goals_of("train", i, chunk, overlap, stream_seconds, world, preroll,
                                                      phase.segment_seconds)]
    print(f"step {step}: {chunk} s chunks, overlap {overlap}, pre-roll {preroll}, segments "
          f"{phase.segment_seconds or 'none'}, goal rate {world.get('goal_rate', HELD_OUT)}, events "
          f"{world.get('event_rate', WorldConfig().event_rate)}; {chunks} chunks, {len(seen)} supervised goals")
    for where, what in (("reused", "written in an earlier segment (reused K/V, as streaming reads it)"),
                        ("same", "written in the goal's own forward (fresh K/V)"),
                        ("prefix", "in the previous text the chunk starts with (fresh K/V)"),
                        ("none", "the stream's first goal")):
        gaps = [g for w, g in seen if w == where]
        print(f"  {what}: {len(gaps)} ({100 * len(gaps) / max(1, len(seen)):.0f}%)"
              + (f"; gap {binned(gaps)}" if where != "none" else ""))
    print(f"  held-out world (goal rate {HELD_OUT:.4f}, all reused while streaming): gap > 300 s on "
          f"{100 * math.exp(-300 * HELD_OUT):.1f}% of goals, > 600 s on {100 * math.exp(-600 * HELD_OUT):.1f}%")


def main(argv=None):
    import train  # its flags and presets; imported here so that importing this module stays cheap
    ap = argparse.ArgumentParser(prog="python -m tools.goal_gaps", add_help=False)
    ap.add_argument("--step", type=at_least(0), default=0, help="the optimizer step whose chunks are counted")
    ap.add_argument("--chunks", type=at_least(1), default=2000, help="how many chunks")
    ours, rest = ap.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__.strip() + "\n\n" + ap.format_help().split("\n", 1)[1]
              + "every other flag is train.py's (python train.py --help)")
        return
    cfg = train.get_args(rest).cfg
    if cfg.long_seconds:
        raise SystemExit("goal_gaps counts the goals of chunks; --long-seconds trains whole streams in one forward")
    if ours.step >= cfg.steps:
        raise SystemExit(f"goal_gaps: --step {ours.step} is past the recipe's --steps {cfg.steps}")
    report(cfg, ours.step, ours.chunks)


if __name__ == "__main__":
    main()
