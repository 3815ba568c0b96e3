"""
The token layout of a stream: one definition that the training chunks (data.py) and the streaming loop
(stream.py) both build from, so that training and inference see byte-identical sequences.

  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n                              SYS
  <|im_start|>previous text\\n                                                                PREV_HEAD
      HEAD(text_sink tokens) TAIL(text_window tokens) of all earlier commentary              PREV_BODY
  <|im_end|>\\n                                                                              PREV_END
  per second t:
  <|im_start|>user\\nTime=t.0-t+1.0s<|vision_start|>[video_pad]*N<|vision_end|><|im_end|>\\n
  <|im_start|>assistant\\n                                                                   USER
      " Red scores! Red 3, Blue 2."   (nothing when the second is quiet)                     REPLY
      " ..." <|im_end|> \\n                                                                    END

Training supervises REPLY and END (except its final newline, which the next prompt starts with). A question
about the whole stream (world.QUESTIONS) is a user turn and an answer after the last second.

What a checkpoint expects travels with it, in its stream.json: a StreamLayout (system prompt, the query after
the first second's video, the three cache windows, frame rate and pixel budget, sampling defaults). LAYOUTS
names two: "nanostream" (what train.py trains: no query, greedy) and "streamingvlm", the per-second prompt of
the authors' inference (mit-han-lab/streaming-vlm, streaming_vlm/inference/inference.py) for their released
checkpoint: the query "Commentate on this match" after the first second's video only, sampling at temperature
0.9 with repetition penalty 1.05, a previous text cut to its first 512 and last 511 tokens, frames resized to
between 78,400 and 602,112 pixels. Their training layout differs from their inference in four places (a space
before <|vision_start|> from the second second on, "assistant\\n\\n", no query, a 508 / 510 cut); we follow
their inference, which is what a user of their checkpoint runs, and train our own models with that same layout,
so our training and inference are byte-identical (tests/test_train.py checks it).
"""
import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from enum import IntEnum

import torch

from cli import Parser, between, checked
from safeio import write_atomic
from world import time_label

SYSTEM_PROMPT = "You are a helpful assistant."
SILENCE = " ..."       # what a quiet second says before <|im_end|>
IGNORE = -100          # the label of a token training does not supervise (cross_entropy's ignore_index)
FPS = 2                # frames a second: one temporal patch (2 frames) per second
FRAME_PIXELS = (4 * 28 * 28, 768 * 28 * 28)  # (min, max) pixels of a frame after resizing (smart_resize)
# The most a stream.json or a flag may ask for, checked before anything is allocated: a frame as large as Qwen2.5-VL
# takes (16384 patches of 28 x 28), an hour of vision, 32k tokens of previous text, prompts of 10k characters.
LIMITS = dict(text_sink=32768, text_window=32768, vision_window=3600, evict_every=3600, fps=60,
              min_pixels=16384 * 28 * 28, max_pixels=16384 * 28 * 28, temperature=100.0, repetition_penalty=100.0,
              max_new_tokens=4096, system_prompt=10_000, query=10_000)
# Text a user gives (a prompt flag, a data record) is tokenised as text: anything shaped like a control token
# (<|im_end|>, <|video_pad|>, ...) is refused, never parsed into the chat template it would break out of.
CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,40}\|>")
MAX_TEXT_CHARS = 200_000  # --previous-text: it is cut to text_sink + text_window tokens, after tokenising it whole


@dataclass
class StreamLayout:
    """How a checkpoint is served second by second; saved as its stream.json."""
    system_prompt: str = SYSTEM_PROMPT
    query: str = ""                 # text after the first second's video ("" = none)
    text_sink: int = 512            # previous-text head tokens kept (an attention sink)
    text_window: int = 512          # previous-text tail tokens kept
    vision_window: int = 16         # seconds of vision (and their replies) kept
    evict_every: int = 1            # seconds between evictions: 1 = every second (the paper); N = as a model
                                    # trained on N s segments saw it (train.py --segment-seconds)
    fps: int = FPS
    min_pixels: int = FRAME_PIXELS[0]
    max_pixels: int = FRAME_PIXELS[1]
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 20        # tokens decoded a second at most

    def save(self, folder, **extra):
        """Write stream.json into a checkpoint folder, atomically (a new temporary file renamed into place: a planted
        stream.json.tmp symlink is never followed); `extra` keys (e.g. how it was trained) ride along."""
        with write_atomic(os.path.join(folder, "stream.json")) as f:
            json.dump({**asdict(self), **extra}, f, indent=1)

    @classmethod
    def from_dict(cls, d, source="stream.json"):
        """The layout in a stream.json's dict; keys it does not know (training notes) are ignored, a value of the
        wrong type or out of range (LIMITS) is a ValueError that names `source`, the value and the limit."""
        out = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        for f in fields(cls):
            v, kind = getattr(out, f.name), type(getattr(cls, f.name))
            ok = isinstance(v, str) if kind is str else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and math.isfinite(v) and v >= 0
                                                        and (kind is float or float(v).is_integer()))
            if not ok:
                raise ValueError(f"{source}: {f.name} = {str(v)[:40]!r} is not a valid {kind.__name__}")
            size = len(v) if kind is str else v
            if f.name in LIMITS and size > LIMITS[f.name]:
                what = f"{size:,} characters" if kind is str else f"{v:g}"
                raise ValueError(f"{source}: {f.name} is {what}; the limit is {LIMITS[f.name]:,} (layout.LIMITS)")
        if min(out.vision_window, out.evict_every, out.max_new_tokens, out.fps, out.min_pixels) < 1 \
                or not 0 < out.top_p <= 1 or out.repetition_penalty <= 0:
            raise ValueError(f"{source}: vision_window, evict_every, max_new_tokens, fps and min_pixels must be at "
                             "least 1, top_p in (0, 1], repetition_penalty > 0")
        if out.min_pixels > out.max_pixels:
            raise ValueError(f"{source}: min_pixels ({out.min_pixels:,}) must not exceed max_pixels "
                             f"({out.max_pixels:,})")
        return out


def prompt_text(limit, where=""):
    """The argparse type of text a user gives a prompt: at most `limit` characters, no control token."""
    return checked(str, lambda v: len(v) <= limit and not CONTROL_TOKEN.search(v),
                   f"at most {limit:,} characters{where}, no control token such as <|im_end|>")


def layout_flags():
    """The command-line flag of every StreamLayout field: {field: (argparse type, help)}. stream.py, eval.py and
    tools/bench_stream.py take all of them (add_layout_flags), so a setting is never a flag in one script and
    silently missing in another; tests/test_layout.py checks that every field has one."""
    count = lambda name, lo: between(lo, LIMITS[name], what=" (layout.LIMITS)")
    real = lambda name, ok, what: checked(float, lambda v: ok(v) and v <= LIMITS[name],
                                          f"{what} and at most {LIMITS[name]:g} (layout.LIMITS)")
    text = lambda name: prompt_text(LIMITS[name])
    return {
        "system_prompt": (text("system_prompt"), "the system prompt"),
        "query": (text("query"), "text after the first second's video (\"\" = none)"),
        "text_sink": (count("text_sink", 0), "previous-text head tokens kept (an attention sink)"),
        "text_window": (count("text_window", 0), "previous-text tail tokens kept"),
        "vision_window": (count("vision_window", 1), "seconds of vision (and their replies) kept"),
        "evict_every": (count("evict_every", 1), "seconds between evictions (1: every second, as the paper)"),
        "fps": (count("fps", 1), "frames a second fed to the model"),
        "min_pixels": (count("min_pixels", 1), "least pixels of a frame after resizing (smart_resize)"),
        "max_pixels": (count("max_pixels", 1), "most pixels of a frame after resizing (smart_resize)"),
        "temperature": (real("temperature", lambda v: v >= 0, ">= 0"), "sampling temperature (0 = greedy)"),
        "top_p": (checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), "sample from the smallest set of tokens whose "
                  "probability reaches this (1 = all)"),
        "repetition_penalty": (real("repetition_penalty", lambda v: v > 0, "> 0"), "divide the logits of tokens "
                               "already said by this (1 = none)"),
        "max_new_tokens": (count("max_new_tokens", 1), "tokens decoded a second at most"),
    }


def add_layout_flags(ap):
    """--layout NAME and a flag per StreamLayout field; each overrides the checkpoint's stream.json (layout_of)."""
    ap.add_argument("--layout", choices=list(LAYOUTS), help="serve with a named layout instead of the checkpoint's "
                    "stream.json; the flags below override either")
    for name, (kind, text) in layout_flags().items():
        ap.add_argument("--" + name.replace("_", "-"), type=kind, help=f"{text} (default: the checkpoint's "
                        f"stream.json, else {getattr(StreamLayout, name)!r})")


def layout_of(settings, args=None):
    """The StreamLayout to serve with: the flags of add_layout_flags when given, else --layout or the checkpoint's
    stream.json (`settings`, a dict), else our defaults. args=None: the stream.json alone."""
    base = LAYOUTS[args.layout] if args is not None and args.layout else StreamLayout.from_dict(settings)
    flags = {k: getattr(args, k) for k in layout_flags() if getattr(args, k) is not None} if args is not None else {}
    return StreamLayout.from_dict({**asdict(base), **flags}, "the layout flags with the checkpoint's stream.json")


LAYOUTS = {
    "nanostream": StreamLayout(),
    "streamingvlm": StreamLayout(query="Commentate on this match", text_sink=512, text_window=511,
                                 min_pixels=78_400, max_pixels=602_112, temperature=0.9, repetition_penalty=1.05),
}


class Kind(IntEnum):
    """What a token is, in the order the kinds sit in a cache (eviction and training labels read it)."""
    SYS = 0        # system prompt: an attention sink, never evicted
    PREV_HEAD = 1  # "<|im_start|>previous text\n"
    PREV_BODY = 2  # earlier commentary, cut to head + tail
    PREV_END = 3   # "<|im_end|>\n" closing the previous text
    USER = 4       # a second's user turn (time, vision block) and the assistant header
    REPLY = 5      # what the model said that second
    END = 6        # " ..." <|im_end|> "\n" closing a reply


def stop_ids(tok):
    """Token ids that end a reply."""
    return {tok.im_end_id, tok.endoftext_id}


def check_text(token, cfg):
    """A decoded token about to be fed back must be text: a vision placeholder would be given a vision block's
    positions without its pixels (the reply's last token, never fed, is not checked)."""
    if token in (cfg.image_token_id, cfg.video_token_id):
        raise ValueError(f"the model emitted a vision placeholder token ({token}) as text")


def cut_previous(body, text_sink, text_window):
    """The previous text kept: its first text_sink and last text_window tokens (a list or a 1-D tensor)."""
    if len(body) <= text_sink + text_window:
        return body
    head, tail = body[:text_sink], body[len(body) - text_window:]
    return torch.cat([head, tail]) if torch.is_tensor(body) else list(head) + list(tail)


def prefix_segments(tok, previous_ids=(), text_sink=512, text_window=512, system_prompt=SYSTEM_PROMPT):
    """System prompt and previous-text block as [(ids, kind)], the previous text cut to head + tail tokens."""
    return [(tok.encode(f"<|im_start|>system\n{system_prompt}<|im_end|>\n"), Kind.SYS),
            (tok.encode("<|im_start|>previous text\n"), Kind.PREV_HEAD),
            (cut_previous(list(previous_ids), text_sink, text_window), Kind.PREV_BODY),
            (tok.encode("<|im_end|>\n"), Kind.PREV_END)]


@functools.lru_cache(maxsize=1 << 16)
def _encode(tok, text):
    # the few strings a stream repeats (commentary, time stamps), tokenized once: training builds thousands of
    # chunks a minute, and tokenizing was a fifth of the cost of building one
    return tuple(tok.encode(text))


def user_ids(tok, t, n_vision, query=""):
    """The user turn of second t with n_vision video tokens (and a query after them), and the assistant header."""
    return (list(_encode(tok, f"<|im_start|>user\n{time_label(t)}<|vision_start|>"))
            + [tok.video_pad_id] * n_vision
            + list(_encode(tok, f"<|vision_end|>{query}<|im_end|>\n<|im_start|>assistant\n")))


def reply_ids(tok, text):
    """The commentary tokens of a reply ('' = silence, no tokens)."""
    return list(_encode(tok, " " + text.strip())) if text.strip() else []


def end_ids(tok):
    """What closes every reply: ' ...' <|im_end|> and the newline."""
    return list(_encode(tok, SILENCE)) + [tok.im_end_id] + list(_encode(tok, "\n"))


def round_segments(tok, t, n_vision, text):
    """One whole second as [(ids, kind)]: user turn, reply, end."""
    return [(user_ids(tok, t, n_vision), Kind.USER), (reply_ids(tok, text), Kind.REPLY), (end_ids(tok), Kind.END)]


def question_segments(tok, question, answer=""):
    """A question about the whole stream after its last second, as [(ids, kind)]: the user turn and assistant
    header (USER), then the answer and <|im_end|> (REPLY: both supervised). A prompt for generation is the first
    segment alone."""
    return [(tok.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"), Kind.USER),
            (reply_ids(tok, answer) + [tok.im_end_id], Kind.REPLY)]


def split_reply(out, silence, stops):
    """Split the tokens decoded for a second into (content, rest): the reply is what comes before ' ...' (or
    before the stop or the cap); the rest is the closing ' ...' <|im_end|>."""
    content = out[:-1] if out and out[-1] in stops else list(out)
    for i in range(len(content) - len(silence) + 1):
        if content[i:i + len(silence)] == silence:
            return content[:i], out[i:]
    return content, out[len(content):]


def main(argv=None):
    ap = Parser(prog="layout.py", description="Write the stream.json a checkpoint is served with (e.g. for a "
                                 "downloaded StreamingVLM checkpoint: python layout.py DIR --layout streamingvlm).")
    ap.add_argument("folder", help="the checkpoint folder")
    ap.add_argument("--layout", default="streamingvlm", choices=list(LAYOUTS), help="default streamingvlm: the "
                    "authors' inference prompt and sampling")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.folder):
        ap.error(f"{args.folder} is not a folder")
    if not os.path.isfile(os.path.join(args.folder, "config.json")):   # a typo'd folder gets no stray stream.json
        ap.error(f"{args.folder} holds no config.json: not a checkpoint folder")
    if os.path.isdir(os.path.join(args.folder, "stream.json")):
        ap.error(f"{os.path.join(args.folder, 'stream.json')} is a folder; move it away first")
    from cli import touches_shipped
    if touches_shipped(args.folder):  # the shipped model's stream.json is what its tests and README were made with
        ap.error(f"{args.folder} is the shipped checkpoint (checkpoints/), which is never rewritten; copy it first")
    path = os.path.join(args.folder, "stream.json")
    old = {}
    if os.path.isfile(path):  # replaced; its notes (how the checkpoint was trained) ride along
        try:
            with open(path) as f:
                old = {k: v for k, v in json.load(f).items() if k not in {*asdict(StreamLayout()), "layout"}}
        except (OSError, ValueError, AttributeError, RecursionError) as e:  # not JSON, or not an object
            ap.error(f"{path}: cannot read the stream.json it would replace ({e}); move it away first")
        print(f"replacing {path} (keeping its notes: {', '.join(old) or 'none'})")
    LAYOUTS[args.layout].save(args.folder, **old, layout=args.layout)
    print(f"wrote {path} ({args.layout}): {asdict(LAYOUTS[args.layout])}")


if __name__ == "__main__":
    main()
