"""
Draw what the StreamingVLM cache keeps over time: assets/cache.png (and a text version on the terminal).

Only the cache's bookkeeping runs here (cache.py: stage tokens, commit, evict once a second), no model: each
second adds a user turn with its vision tokens and, now and then, a reply. The picture has one column per stream
second and one row per cached token, coloured by kind (layout.Kind): the system prompt and the head of the
previous text stay at the top for ever (the attention sink), replies of seconds that left the vision window
join the previous text and the oldest of them fall out of its tail, and only the last `vision_window` seconds
keep their vision tokens. A second panel shows the largest M-RoPE position: bounded with contiguous RoPE,
growing without bound with the original ("native") positions.

  python -m tools.draw_cache                        # small windows so the picture is readable
  python -m tools.draw_cache --text-sink 512 --text-window 512 --vision-window 16 --seconds 600
"""
import os
import random

import torch

from cache import StreamingCache
from cli import Parser, checked, file_problem
from layout import Kind, end_ids, prefix_segments, reply_ids, user_ids
from model import PRESETS
from processor import Tokenizer, build_tokenizer
from safeio import write_atomic
from stream import POLICIES

COLOURS = {Kind.SYS: "#444444", Kind.PREV_HEAD: "#444444", Kind.PREV_BODY: "#e08e0b", Kind.PREV_END: "#444444",
           Kind.USER: "#3b7dd8", Kind.REPLY: "#2ca02c", Kind.END: "#98df8a"}
LETTERS = {Kind.SYS: "S", Kind.PREV_HEAD: "S", Kind.PREV_BODY: "p", Kind.PREV_END: "S", Kind.USER: "v",
           Kind.REPLY: "R", Kind.END: "."}
LINES = ["Red scores! Red 1, Blue 0.", "Blue shoots!", "Foul by Red.", "Corner for Blue.", "Blue keeper saves."]


def simulate(policy, seconds, text_sink, text_window, vision_window, n_vision=8, seed=0):
    """Stream `seconds` seconds through a StreamingCache's bookkeeping; returns, per second, the kinds of the kept
    tokens (after that second's reply) and the largest position."""
    tok = Tokenizer(build_tokenizer(LINES * 10 + ["Time=12.0-13.0s", " ..."], vocab_size=300))
    cfg = PRESETS["tiny"](vocab_size=len(tok))
    cfg.num_hidden_layers, cfg.video_token_id = 1, tok.video_pad_id
    p = POLICIES[policy]  # streaming or native: the same cache, re-indexed or not
    cache = StreamingCache(cfg, p.evict, p.reindex, text_sink, text_window, vision_window, capacity=256)
    grid = torch.tensor([[1, 2 * int(n_vision ** 0.5), 2 * int(n_vision ** 0.5)]])  # n_vision merged tokens
    rng, kinds, maxpos = random.Random(seed), [], []
    pending = [(ids, kind, 0) for ids, kind in prefix_segments(tok, [], text_sink, text_window)]
    for t in range(seconds):
        cache.evict(t)
        said = reply_ids(tok, rng.choice(LINES)) if rng.random() < 0.3 else []
        segments = pending + [(user_ids(tok, t, int(grid.prod()) // 4), Kind.USER, t), (said, Kind.REPLY, t),
                              (end_ids(tok)[:-1], Kind.END, t)]
        for ids, kind, r in segments:
            if len(ids):
                cache.add_tokens(ids, kind, r, grid, torch.tensor([1.0]))
                cache.commit(len(ids))  # bookkeeping only: no forward writes K/V here
        pending = [(end_ids(tok)[-1:], Kind.END, t)]
        kinds.append(cache.kind[:cache.length].tolist())
        maxpos.append(cache.max_position())
    return kinds, maxpos


def draw_text(kinds, every):
    """The cache as letters, a column every `every` seconds (S sink, p previous text, v user turn and vision,
    R reply, . end of a reply)."""
    cols = kinds[::every]
    for row in range(max(len(k) for k in cols)):
        print("".join(LETTERS[Kind(k[row])] if row < len(k) else " " for k in cols))


def draw_png(kinds, maxpos, native, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    height = max(len(k) for k in kinds)
    grid = torch.full((height, len(kinds)), -1.0)
    for t, k in enumerate(kinds):
        grid[:len(k), t] = torch.tensor(k, dtype=torch.float)
    cmap = ListedColormap(["white"] + [COLOURS[k] for k in Kind])
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6.5), height_ratios=[3, 1])
    a.imshow(grid + 1, aspect="auto", cmap=cmap, vmin=0, vmax=len(Kind), interpolation="nearest")
    a.set(xlabel="stream second", ylabel="cached token",
          title=f"What the StreamingVLM cache keeps (text sink {args.text_sink}, text window {args.text_window}, "
                f"vision window {args.vision_window} s)")
    for label, kind in (("sink: system prompt", Kind.SYS), ("previous text", Kind.PREV_BODY),
                        ("user turn + vision", Kind.USER), ("reply", Kind.REPLY)):
        a.plot([], [], "s", color=COLOURS[kind], label=label)
    a.legend(loc="lower right", fontsize=8)
    b.plot(maxpos, label="contiguous RoPE (streaming)")
    b.plot(native, label="native RoPE")
    b.set(xlabel="stream second", ylabel="largest position")
    b.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with write_atomic(path, "wb") as f:  # a new file renamed into place: a link there is replaced, not followed
        fig.savefig(f, dpi=110, format="png")
    print(f"wrote {path}")


def main(argv=None):
    ap = Parser(prog="python -m tools.draw_cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=checked(int, lambda v: 1 <= v <= 100_000, "in [1, 100,000]"), default=80)
    ap.add_argument("--text-sink", type=checked(int, lambda v: 0 <= v <= 4096, "in [0, 4096]"), default=12)
    ap.add_argument("--text-window", type=checked(int, lambda v: 0 <= v <= 4096, "in [0, 4096]"), default=24)
    ap.add_argument("--vision-window", type=checked(int, lambda v: 1 <= v <= 3600, "in [1, 3600]"), default=8)
    ap.add_argument("--out", default="assets/cache.png", help="the PNG to write (default assets/cache.png)")
    args = ap.parse_args(argv)
    if not args.out.lower().endswith(".png"):
        ap.error(f"--out {args.out}: the picture is a PNG; give a name ending in .png")
    if problem := file_problem(args.out):
        ap.error(f"--out {problem}")
    windows = (args.text_sink, args.text_window, args.vision_window)
    kinds, maxpos = simulate("streaming", args.seconds, *windows)
    _, native = simulate("native", args.seconds, *windows)
    draw_text(kinds, every=max(1, args.seconds // 80))
    try:
        draw_png(kinds, maxpos, native, args.out, args)
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no PNG, only the text picture above")


if __name__ == "__main__":
    main()
