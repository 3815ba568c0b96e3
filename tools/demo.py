"""
A picture of the model at work: stream a held-out synthetic match through a checkpoint, second by second, and
render an animated GIF of a window of it with the model's live commentary and the true events under the frames.

The model streams from second 0 (the score it says at a goal is read from its own earlier commentary, which only
a stream from the start has); the GIF shows `--seconds` of it around a goal.

  python -m tools.demo                                   # the shipped checkpoint, held-out stream 0 -> assets/demo.gif
  python -m tools.demo --model out/tiny --seed 3 --out demo.gif
"""
import os
import sys

from PIL import Image, ImageDraw, ImageFont

from cli import HELD_OUT_SEED, Parser, at_least, default_model, file_problem
from safeio import write_atomic
from layout import layout_of
from checkpoint import load_checkpoint
from stream import make_streamer, streamer_kwargs
from world import SportsStream, WorldConfig, split_seed

GREEN, RED, WHITE, GREY = (120, 230, 120), (255, 120, 120), (255, 255, 255), (170, 170, 170)


def window(world, seconds, before=12):
    """[start, end) of a `seconds`-long window that shows the second goal of the match (a goal whose score
    needs memory), or the first events when there are no goals early on."""
    goals = [t for t, _ in world.goals(3600)]
    start = max(0, goals[min(1, len(goals) - 1)] - before) if goals else 0
    return start, start + seconds


def panel(frame, t, said, truth, score, scale=4):
    """One GIF frame: the video frame, then what the model said and what happened (green: they agree)."""
    S = frame.width * scale
    im = Image.new("RGB", (max(S, 300), S + 44), (0, 0, 0))
    im.paste(frame.resize((S, S), Image.NEAREST), (0, 0))
    d, font = ImageDraw.Draw(im), ImageFont.load_default()
    d.text((4, S + 2), f"{t:4d} s   score {score[0]}-{score[1]}", fill=GREY, font=font)
    d.text((4, S + 16), f"model: {said or '...'}", fill=GREEN if said == truth else RED, font=font)
    d.text((4, S + 30), f"truth: {truth or '...'}", fill=WHITE, font=font)
    return im


def main(argv=None):
    ap = Parser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model(), help=f"checkpoint folder (default {default_model()})")
    ap.add_argument("--seed", type=HELD_OUT_SEED, default=0,
                    help="which held-out stream, as eval.py --seed (default 0)")
    ap.add_argument("--seconds", type=at_least(1), default=40, help="length of the GIF in stream seconds (default 40)")
    ap.add_argument("--out", default="assets/demo.gif", help="the GIF to write (default assets/demo.gif, the "
                    "README's picture)")
    args = ap.parse_args(argv)
    if not args.out.lower().endswith(".gif"):  # said now, not after the run
        ap.error(f"--out {args.out}: the demo is a GIF; give a name ending in .gif")
    if problem := file_problem(args.out, [args.model]):
        ap.error(f"--out {problem}")
    frames, t = [], -1
    try:
        model, tok, settings = load_checkpoint(args.model)
        layout = layout_of(settings)
        s = make_streamer(model, tok, **streamer_kwargs(layout))
        world = SportsStream(WorldConfig(seed=split_seed("eval", args.seed), size=settings.get("frame_size", 56)))
        start, end = window(world, args.seconds)
        for t in range(end):
            sec = world.second(t)
            said = s.step(sec.frames)
            if t >= start:
                frames += [panel(f, t, said, sec.text, sec.score) for f in sec.frames]
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with write_atomic(args.out, "wb") as f:  # a new file renamed into place: a link there is replaced
            frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // layout.fps,
                           loop=0)
    except KeyboardInterrupt:   # the GIF is written whole or not at all
        where = f"at second {t + 1} of {end}" if t >= 0 else "before the first second"
        print(f"stopped {where}; {args.out} not written", file=sys.stderr)
        sys.exit(130)   # the status of a process ended by SIGINT
    print(f"wrote {args.out}: seconds {start}-{end} of held-out stream {args.seed}")


if __name__ == "__main__":
    main()
