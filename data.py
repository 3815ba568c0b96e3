"""
Training samples in StreamingVLM's SFT format (arXiv 2510.09608, section 2.2), from the synthetic world or from
real videos with word timestamps.

A sample is one chunk of `chunk_seconds` (24) seconds; consecutive chunks overlap by `overlap` (12) seconds,
so every second is trained both near the start of a chunk (long previous text, little vision history) and in
its middle. The chunk is laid out exactly as the streaming loop lays out its cache (layout.py's round_segments
and prefix_segments: one definition for both):

  system | previous text = all commentary before the chunk, cut to head text_sink + tail text_window tokens
         | 24 x (user turn with 2 frames, reply, " ..." <|im_end|>)

The cut happens on token ids before the forward, so positions are contiguous as at inference. Attention is
plain causal over the whole chunk; the loss covers only the reply tokens, " ..." and <|im_end|>.

Two optional curricula shape the synthetic training chunks (chunk_schedule): the chunk length ramps up from
2 s (a model from scratch first has to find that a reply depends on *this* second's few vision tokens), and
chunk starts widen from a stream's first minute to the whole stream (first copy the one score in the previous
text, then find the latest of many). Validation chunks never follow them and always use the default world.

Real data (JSONL, one object per line; decoded with PyAV when installed):
  {"video": "clip.mp4", "start": 120.0, "end": 144.0,
   "words": [[120.4, 120.7, "What"], [120.7, 121.1, "a"], ...],        # [start s, end s, word], absolute
   "previous": "commentary before start (optional)"}
A second [t, t+1) says the words whose end time falls in (t, t+1], as StreamingVLM's builder does.
"""
import json
import math
import os
import random
from dataclasses import dataclass

import torch

from layout import (FPS, FRAME_PIXELS, SILENCE, SYSTEM_PROMPT, Kind, prefix_segments, question_segments, reply_ids,
                    round_segments)
from processor import Tokenizer, build_tokenizer, preprocess_video
from rope import mrope_positions
from world import QUESTIONS, SportsStream, WorldConfig, answer, commentary, split_seed

IGNORE = -100
GOALS_PER_STREAM = 100  # a stream with goal rate r is at most this / r seconds long, so each team's score stays
                        # under 100 (one token) even in the goal-dense streams of --goal-rate LO:HI (a goal count
                        # in a question's answer can pass 99 and take two tokens)


@dataclass
class Sample:
    ids: torch.Tensor            # (T,) token ids
    labels: torch.Tensor         # (T,) the id where supervised, else -100 (not yet shifted)
    pixel_values: torch.Tensor   # (sum of patches, 1176)
    grid_thw: torch.Tensor       # (seconds, 3)


def make_tokenizer(vocab_size=640, seed=0):
    """A byte-level BPE for the synthetic world's language plus the Qwen special tokens. The training texts
    are weighted so that what is said most gets one token: silence " ...", the team names, scores 0-99."""
    rng = random.Random(seed)
    said = [commentary(ev, team, (rng.randint(0, 12), rng.randint(0, 12)))
            for ev in ("goal", "shot", "save", "foul", "corner") for team in ("Red", "Blue") for _ in range(20)]
    said += [commentary("goal", team, (n, n)) for n in range(100) for team in ("Red", "Blue")] * 4
    said += [answer(q, (rng.randint(0, 60), rng.randint(0, 60)), rng.choice(["Red", "Blue", None]))
             for q in QUESTIONS for _ in range(100)]
    texts = [" " + t for t in said] + [SILENCE] * 400
    texts += [f"<|im_start|>user\n{q}<|im_end|>\n" for q in QUESTIONS.values()] * 20
    texts += [f" Time={t:.1f}-{t + 1:.1f}s" for t in range(0, 20000, 7)]
    texts += ["<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>previous text\n",
              f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"]
    return Tokenizer(build_tokenizer(texts * 3, vocab_size))


def previous_ids(tok, texts, text_sink, text_window):
    """The concatenated reply tokens of `texts` (oldest first), cut to head text_sink + tail text_window, the
    same cut the streaming cache makes. Only as many sentences as the head and the tail need are tokenized, so a
    chunk at second 50,000 costs no more than one at second 50."""
    head = []
    for i, text in enumerate(texts):
        head += reply_ids(tok, text)
        if len(head) > text_sink + text_window:
            break
    else:
        return head  # everything fits: no cut
    tail = []
    for text in reversed(texts[i + 1:]):
        if len(tail) >= text_window:
            break
        tail = reply_ids(tok, text) + tail
    full_tail = (head + tail)[-text_window:] if len(tail) < text_window else tail[-text_window:]
    return head[:text_sink] + full_tail


def survives_cut(tok, texts, k, text_sink, text_window):
    """Whether sentence texts[k] is wholly in what previous_ids keeps (head text_sink + tail text_window tokens).
    Tokenizes only as far as the cut needs, like previous_ids."""
    n = lambda i: len(reply_ids(tok, texts[i]))
    limit = text_sink + text_window
    before = after = 0
    for i in range(k):
        before += n(i)
        if before > limit:
            break
    for i in range(len(texts) - 1, k, -1):
        after += n(i)
        if after > limit:
            break
    nk = n(k)
    return before + nk + after <= limit or before + nk <= text_sink or after + nk <= text_window


def chunk_question(tok, stream, t0, t1, events, rng, text_sink, text_window):
    """A (question, answer) about the stream up to second t1 - 1, asked at the end of a chunk [t0, t1), or None
    when the chunk cannot answer it: the goal sentence it needs was cut from the previous text. `events` are the
    (t, text) of the previous text. Training only asks what the model can see, so it learns to read, not guess."""
    kind = rng.choice(["score", "score", "goals", "first"])  # the score twice: it is what the stream task needs
    first = stream.first_goal(t1 - 1)
    if kind == "first":
        needed = first[0] if first else None
    else:
        goals = [t for t, e, _ in stream.events(0, t1) if e == "goal"]
        needed = goals[-1] if goals else None
    if needed is not None and needed < t0:
        k = next(i for i, (t, _) in enumerate(events) if t == needed)
        if not survives_cut(tok, [text for _, text in events], k, text_sink, text_window):
            return None
    return QUESTIONS[kind], answer(kind, stream.score(t1 - 1), first[1] if first else None)


def build_sample(tok, frames, texts, t0, previous, text_sink=512, text_window=512, frame_pixels=FRAME_PIXELS,
                 question=None):
    """One chunk: frames[k] are the 2 frames of second t0 + k, texts[k] its commentary, `previous` the list of
    commentary sentences before t0 (oldest first); `question` an optional (question, answer) after the chunk.
    Frames are resized to (min, max) `frame_pixels`, as the streaming loop resizes them."""
    ids, labels, pix, grids = [], [], [], []
    for seg, _ in prefix_segments(tok, previous_ids(tok, previous, text_sink, text_window), text_sink,
                                  text_window):
        ids += seg
        labels += [IGNORE] * len(seg)
    for k, (fr, text) in enumerate(zip(frames, texts)):
        pv, grid, _ = preprocess_video(fr, fps=FPS, min_pixels=frame_pixels[0], max_pixels=frame_pixels[1])
        pix.append(pv)
        grids.append(grid)
        for seg, kind in round_segments(tok, t0 + k, int(grid.prod()) // 4, text):
            ids += seg
            if kind == Kind.REPLY:
                labels += seg
            elif kind == Kind.END:  # supervise " ..." and <|im_end|>, not the newline the next prompt starts with
                labels += seg[:-1] + [IGNORE]
            else:
                labels += [IGNORE] * len(seg)
    if question:
        for seg, kind in question_segments(tok, *question):
            ids += seg
            labels += seg if kind == Kind.REPLY else [IGNORE] * len(seg)
    return Sample(torch.tensor(ids), torch.tensor(labels), torch.cat(pix), torch.cat(grids))


def synthetic_sample(tok, split, index, chunk_seconds=24, overlap=12, stream_seconds=3600, text_sink=512,
                     text_window=512, world=None, question_rate=0.0, frame_pixels=FRAME_PIXELS):
    """Sample number `index` of a split, deterministic: a random stream of the split and a random chunk start
    on the stride (chunk_seconds - overlap) grid, so consecutive chunks of a stream overlap. With probability
    question_rate the chunk ends with a question about the whole stream (chunk_question)."""
    rng = random.Random(f"{split}-{index}")
    world = dict(world or {})
    if isinstance(world.get("goal_rate"), (tuple, list)):
        # a range: each sample's stream draws its own goal rate (log-uniform), so that the clock cannot stand
        # in for the score and the model has to read the last score from the commentary
        lo, hi = world["goal_rate"]
        world["goal_rate"] = math.exp(random.Random(f"{split}-{index}-rate").uniform(math.log(lo), math.log(hi)))
    cfg = WorldConfig(**{**world, "seed": split_seed(split, rng.randrange(10_000))})
    stream = SportsStream(cfg)
    stream_seconds = min(stream_seconds, max(chunk_seconds, int(GOALS_PER_STREAM / max(cfg.goal_rate, 1e-9))))
    stride = chunk_seconds - overlap
    t0 = stride * rng.randrange(max(1, (stream_seconds - chunk_seconds) // stride + 1))
    secs = [stream.second(t) for t in range(t0, t0 + chunk_seconds)]
    events = stream.transcript(0, t0)
    qrng = random.Random(f"{split}-{index}-question")
    question = (chunk_question(tok, stream, t0, t0 + chunk_seconds, events, qrng, text_sink, text_window)
                if qrng.random() < question_rate else None)
    return build_sample(tok, [s.frames for s in secs], [s.text for s in secs], t0, [text for _, text in events],
                        text_sink, text_window, frame_pixels, question)


def jsonl_samples(path, tok, chunk_seconds=24, text_sink=512, text_window=512, frame_pixels=FRAME_PIXELS):
    """Samples from a JSONL file of real videos (format in the module docstring); video paths are relative
    to the JSONL file. Yields one Sample per line."""
    from video import open_video, seconds_of
    root = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                video, start, end, words = rec["video"], float(rec["start"]), float(rec["end"]), rec["words"]
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a valid sample ({e}); see data.py for the format")
            secs = list(seconds_of(open_video(os.path.join(root, video))))
            t_first, t_last = int(start), min(int(end), int(start) + chunk_seconds, len(secs))
            if t_last <= t_first:
                raise ValueError(f"{path}:{n}: the video {video} has {len(secs)} s, none in [{start}, {end})")
            texts = [" ".join(w for ws, we, w in words if t < float(we) <= t + 1) for t in range(t_first, t_last)]
            previous = [rec["previous"]] if rec.get("previous") else []
            yield build_sample(tok, secs[t_first:t_last], texts, t_first, previous, text_sink, text_window,
                               frame_pixels)


def chunk_schedule(step, cfg):
    """(chunk_seconds, overlap, stream_seconds) of the synthetic training chunks at optimizer step `step`
    (None: no curriculum, as for validation). Over the first cfg.curriculum steps the chunk grows linearly from
    2 s to cfg.chunk_seconds (the overlap at most half of it); over the first cfg.time_curriculum steps the
    stretch of stream that chunks start in grows from 60 s to cfg.stream_seconds."""
    chunk, overlap, stream_seconds = cfg.chunk_seconds, cfg.overlap, cfg.stream_seconds
    if step is not None and step < cfg.curriculum:
        chunk = min(chunk, 2 + (chunk - 2) * step // cfg.curriculum)
        overlap = min(overlap, chunk // 2)
    if step is not None and step < cfg.time_curriculum:
        stream_seconds = min(stream_seconds, 60 + (stream_seconds - 60) * step // cfg.time_curriculum)
    return chunk, overlap, stream_seconds


def world_config(split, cfg):
    """The synthetic world's settings for a split: training may use a busier world (cfg.event_rate,
    cfg.goal_rate; None = world.py's default); validation always uses the default one, as eval.py does."""
    world = dict(size=cfg.frame_size)
    if split == "train":
        world.update({k: getattr(cfg, k) for k in ("event_rate", "goal_rate") if getattr(cfg, k) is not None})
    return world


def make_batch(tok, split, indices, cfg, step=None, question_rate=0.0, jsonl=None):
    """Chunks number `indices` of a split, collated. `cfg` holds train.TrainConfig's fields. With `jsonl` (a list
    of Samples from jsonl_samples) the chunks are taken from it in a cycle; otherwise they are synthetic: training
    chunks follow chunk_schedule(step) and end with a question at cfg.question_rate, validation chunks at
    `question_rate`."""
    if jsonl is not None:
        return collate([jsonl[i % len(jsonl)] for i in indices], tok.pad_id)
    train = split == "train"
    chunk, overlap, stream_seconds = chunk_schedule(step if train else None, cfg)
    rate = cfg.question_rate if train else question_rate
    samples = [synthetic_sample(tok, split, i, chunk, overlap, stream_seconds, cfg.text_sink, cfg.text_window,
                                world_config(split, cfg), rate, (cfg.min_pixels, cfg.max_pixels)) for i in indices]
    return collate(samples, tok.pad_id)


def with_positions(batch, model_cfg):
    """Add the M-RoPE position ids, made here (in the DataLoader workers) rather than in the forward, where the
    per-sample bookkeeping would hold up the GPU."""
    batch["position_ids"], _ = mrope_positions(batch["input_ids"], model_cfg, video_grid_thw=batch["video_grid_thw"],
                                               attention_mask=batch["attention_mask"])
    return batch


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch i of a run that starts at `first_step`: (step first_step + i // grad_accum, micro-batch
    i % grad_accum), built in DataLoader workers. Its chunks are a pure function of (step, micro-batch, rank),
    so a resumed run and a 2-process run see exactly the samples of an uninterrupted 1-process run."""

    def __init__(self, tok, cfg, model_cfg, jsonl, first_step, rank, world):
        self.tok, self.cfg, self.model_cfg, self.jsonl = tok, cfg, model_cfg, jsonl
        self.first, self.rank, self.world = first_step, rank, world

    def __len__(self):
        return (self.cfg.steps - self.first) * self.cfg.grad_accum

    def __getitem__(self, i):
        c = self.cfg
        step, micro = self.first + i // c.grad_accum, i % c.grad_accum
        first = (step * c.grad_accum + micro) * c.batch_size * self.world + self.rank * c.batch_size
        batch = make_batch(self.tok, "train", range(first, first + c.batch_size), c, step, jsonl=self.jsonl)
        return with_positions(batch, self.model_cfg)


def collate(samples, pad_id):
    """Right-pad a list of Samples into a batch for VLM.forward (pixel values concatenated in order)."""
    T = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s.ids)], labels[i, :len(s.ids)], mask[i, :len(s.ids)] = s.ids, s.labels, 1
    return dict(input_ids=ids, labels=labels, attention_mask=mask,
                pixel_values_videos=torch.cat([s.pixel_values for s in samples]),
                video_grid_thw=torch.cat([s.grid_thw for s in samples]))
