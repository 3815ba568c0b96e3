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

Real data (--data): records.py reads the authors' JSONL (and ours) into the same Samples.
"""
import math
import random
import signal
from dataclasses import dataclass, replace

import torch

from layout import (FPS, FRAME_PIXELS, IGNORE, SILENCE, SYSTEM_PROMPT, Kind, prefix_segments, question_segments,
                    reply_ids, round_segments)
from processor import Tokenizer, build_tokenizer, patchify_video, resize_video
from reuse import evicted_prefixes, segment_cuts, split_chunk
from rope import mrope_positions
from world import (QUESTIONS, SportsStream, WorldConfig, answer, commentary, long_questions, split_seed,
                   time_label)

GOALS_PER_STREAM = 100  # a stream with goal rate r is at most this / r seconds long, so each team's score stays
                        # under 100 (one token) even in the goal-dense streams of --goal-rate LO:HI (a goal count
                        # in a question's answer can pass 99 and take two tokens)
LONG_SUPERVISED_SECONDS = 60  # a --long-seconds stream supervises its answers and this many last seconds' replies


@dataclass
class Sample:
    ids: torch.Tensor            # (T,) token ids
    labels: torch.Tensor         # (T,) the id where supervised, else -100 (not yet shifted)
    frames: torch.Tensor | None  # (2 * seconds, H, W, 3) uint8, resized: 4x smaller than patches to ship to the GPU
    patches: torch.Tensor | None  # (sum of patches, 1176) float32, instead of frames when seconds differ in size
    grid_thw: torch.Tensor       # (seconds, 3)
    kind: torch.Tensor           # (T,) layout.Kind of each token, as the cache files it (a question turn: USER)
    round: torch.Tensor          # (T,) the second of the chunk each token belongs to (-1: system, previous text)

    @property
    def pixel_values(self):
        """(sum of patches, 1176) float32, what the vision tower takes."""
        return self.patches if self.frames is None else patchify_video(self.frames)


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
    # the text between the special tokens of every prompt (layout.py), so that "assistant" or "Time" is one token
    texts += [f"user\n{q}" for q in QUESTIONS.values()] * 20
    texts += [f"user\n{time_label(t)}" for t in range(0, 20000, 7)]
    texts += ["assistant\n", "previous text\n", f"system\n{SYSTEM_PROMPT}"] * 400
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
        goals = stream.goals(t1)
        needed = goals[-1][0] if goals else None
    if needed is not None and needed < t0:
        k = next(i for i, (t, _) in enumerate(events) if t == needed)
        if not survives_cut(tok, [text for _, text in events], k, text_sink, text_window):
            return None
    return QUESTIONS[kind], answer(kind, stream.score(t1 - 1), first[1] if first else None)


def build_sample(tok, frames, texts, t0, previous, text_sink=512, text_window=512, frame_pixels=FRAME_PIXELS,
                 question=None, asked=None, preroll=0):
    """One chunk: frames[k] are the 2 frames of second t0 + k, texts[k] its commentary, `previous` the list of
    commentary sentences before t0 (oldest first); `question` an optional (question, answer) after the chunk,
    `asked` {k: [(question, answer), ...]} question turns after second k's reply. Frames are resized to (min, max)
    `frame_pixels`, as the streaming loop resizes them. The first `preroll` seconds are not supervised."""
    asked = {k: list(qs) for k, qs in (asked or {}).items()}
    if question:
        asked.setdefault(len(frames) - 1, []).append(question)
    ids, labels, grids, kinds, rounds = [], [], [], [], []
    for seg, kind in prefix_segments(tok, previous_ids(tok, previous, text_sink, text_window), text_sink,
                                     text_window):
        ids += seg
        labels += [IGNORE] * len(seg)
        kinds += [kind] * len(seg)
        rounds += [-1] * len(seg)
    clips = [resize_video(fr, FPS, *frame_pixels)[:2] for fr in frames]
    if len({clip.shape for clip, _ in clips}) == 1:  # the usual case: patchified later, on the device
        video, patches = torch.cat([clip for clip, _ in clips]), None
    else:
        video, patches = None, torch.cat([patchify_video(clip) for clip, _ in clips])
    for k, ((_, grid), text) in enumerate(zip(clips, texts)):
        grids.append(grid)
        segments = round_segments(tok, t0 + k, int(grid.prod()) // 4, text)
        n_round = len(segments)
        for q in asked.get(k, ()):
            segments += question_segments(tok, *q)
        for i, (seg, kind) in enumerate(segments):
            ids += seg
            # a question and its answer are USER to the cache: they leave with their second and never join the
            # previous text (streaming rewinds them: Streamer.ask)
            kinds += [kind if i < n_round else Kind.USER] * len(seg)
            rounds += [k] * len(seg)
            if k < preroll:  # streamed only to leave its replies in the cache (reuse.py)
                labels += [IGNORE] * len(seg)
            elif kind == Kind.REPLY:  # a reply, or a question's answer and its <|im_end|>
                labels += seg
            elif kind == Kind.END:  # supervise " ..." and <|im_end|>, not the newline the next prompt starts with
                labels += seg[:-1] + [IGNORE]
            else:
                labels += [IGNORE] * len(seg)
    return Sample(torch.tensor(ids), torch.tensor(labels), video, patches, torch.cat(grids), torch.tensor(kinds),
                  torch.tensor(rounds))


def chunk_at(split, index, chunk_seconds=24, overlap=12, stream_seconds=3600, world=None, preroll=0):
    """(the stream, its first second t0) of sample number `index` of a split, deterministic: a random stream of the
    split and a random start on the stride (chunk_seconds - overlap) grid, so consecutive chunks of a stream
    overlap; the chunk is chunk_seconds + preroll long. A `world` goal rate (LO, HI) is drawn per sample."""
    rng = random.Random(f"{split}-{index}")
    world = dict(world or {})
    if isinstance(world.get("goal_rate"), (tuple, list)):
        # a range: each sample's stream draws its own goal rate (log-uniform), so that the clock cannot stand
        # in for the score and the model has to read the last score from the commentary
        lo, hi = world["goal_rate"]
        world["goal_rate"] = math.exp(random.Random(f"{split}-{index}-rate").uniform(math.log(lo), math.log(hi)))
    cfg = WorldConfig(**{**world, "seed": split_seed(split, rng.randrange(10_000))})
    chunk_seconds += preroll
    stream_seconds = min(stream_seconds, max(chunk_seconds, int(GOALS_PER_STREAM / max(cfg.goal_rate, 1e-9))))
    stride = chunk_seconds - preroll - overlap
    return SportsStream(cfg), stride * rng.randrange(max(1, (stream_seconds - chunk_seconds) // stride + 1))


def synthetic_sample(tok, split, index, chunk_seconds=24, overlap=12, stream_seconds=3600, text_sink=512,
                     text_window=512, world=None, question_rate=0.0, frame_pixels=FRAME_PIXELS, preroll=0):
    """Sample number `index` of a split (chunk_at: which stream, where). With probability question_rate the chunk
    ends with a question about the whole stream (chunk_question). With `preroll` the chunk is that many seconds
    longer at the front, and those seconds are not supervised (reuse.py: they put replies made in their own rounds
    into the previous text of the seconds that are); a stream's first `preroll` seconds are then never
    supervised."""
    stream, t0 = chunk_at(split, index, chunk_seconds, overlap, stream_seconds, world, preroll)
    chunk_seconds += preroll
    secs = [stream.second(t) for t in range(t0, t0 + chunk_seconds)]
    events = stream.transcript(0, t0)
    qrng = random.Random(f"{split}-{index}-question")
    if qrng.random() < question_rate:  # answerable from the previous text as it is when the supervised part starts
        seen = stream.transcript(0, t0 + preroll) if preroll else events
        question = chunk_question(tok, stream, t0 + preroll, t0 + chunk_seconds, seen, qrng, text_sink, text_window)
    else:
        question = None
    return build_sample(tok, [s.frames for s in secs], [s.text for s in secs], t0, [text for _, text in events],
                        text_sink, text_window, frame_pixels, question, preroll=preroll)


def long_goal_rate(rate, seconds):
    """A goal rate capped so that a whole stream of `seconds` has at most GOALS_PER_STREAM goals."""
    return min(rate, GOALS_PER_STREAM / seconds)


def long_sample(tok, split, index, seconds, questions=4, world=None, frame_pixels=FRAME_PIXELS, said_at=False):
    """A stream's first `seconds` as one prompt, every round in full (~29 tokens a second: 2,200 s is 64k tokens),
    then up to `questions` of world.long_questions (the whole-stretch ones, not to forget them, and timed ones
    about different goals, none answerable from another's answer), their answers and the last minute's commentary
    supervised: the layout tools.bench_flexprefill --long-prefill asks in, to teach a model to retrieve from far
    back. `said_at`: also what was said at other events' seconds (world.long_questions)."""
    stream, _ = chunk_at(split, index, seconds, 0, seconds, world)  # streams as long as the chunk: t0 = 0
    if long_goal_rate(stream.cfg.goal_rate, seconds) < stream.cfg.goal_rate:  # a goal-dense world: fewer goals
        stream = SportsStream(replace(stream.cfg, goal_rate=long_goal_rate(stream.cfg.goal_rate, seconds)))
    rng = random.Random(f"{split}-{index}-long")
    asked = long_questions(stream, seconds, questions, rng, said_at)
    secs = [stream.second(t) for t in range(seconds)]
    sample = build_sample(tok, [s.frames for s in secs], [s.text for s in secs], 0, [], frame_pixels=frame_pixels,
                          asked={seconds - 1: asked})
    # the answers and the last minute's commentary are supervised, the rest is context: thousands of tokens of
    # commentary a model trained on chunks already says right would drown the answers' few in the step's mean
    # loss, and none at all lets it forget how to comment (a CPU check: events 54 of 112 after 100 steps).
    # Without questions (validation's plain streams) the whole commentary is what is measured.
    if asked:
        context = (sample.kind != Kind.USER) & (sample.round < seconds - LONG_SUPERVISED_SECONDS)
        sample.labels[context] = IGNORE  # a question turn is USER to the cache, its answer too
    return sample


class DataError(ValueError):
    """A bad --data file or record: "<file>:<line>: <why>" (records.py raises it, the DataLoader carries it)."""


# -----------------------------------------------------------------------------
# batches

def phase_at(step, cfg):
    """(the first step of its phase, the settings it trains with) for optimizer step `step` of a run with
    cfg.segment_steps: the steps before the last segment_steps train on plain chunks, the rest on segments
    (reuse.py) of cfg.segment_chunk_seconds chunks, each phase its own run as if the second were a fine-tune of the
    first (its step counted from 0, fresh optimizer moments, the vision tower frozen as StreamingVLM's SFT freezes
    it: the segments teach reading the reused K/V, not seeing). Without segment_steps the run is one phase, cfg."""
    if not getattr(cfg, "segment_steps", 0):
        return 0, cfg
    first = cfg.steps - cfg.segment_steps
    if step < first:
        return 0, replace(cfg, steps=first, segment_steps=0, segment_seconds=0, preroll=0)
    return first, replace(cfg, steps=cfg.segment_steps, segment_steps=0, chunk_seconds=cfg.segment_chunk_seconds,
                          overlap=cfg.segment_chunk_seconds // 2, batch_size=cfg.segment_batch_size,
                          lr=cfg.segment_lr, curriculum=0, time_curriculum=0, freeze_vision=True,
                          goal_rate=cfg.goal_rate if cfg.segment_goal_rate is None else cfg.segment_goal_rate,
                          event_rate=cfg.event_rate if cfg.segment_event_rate is None else cfg.segment_event_rate)


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


def long_range(step, cfg):
    """The --long-seconds range (LO, HI) at optimizer step `step` (None: validation, the whole range). Over the
    first cfg.curriculum steps both ends grow linearly from a minute (or LO, if shorter): a model finds how to
    retrieve on short streams, where the answer is one of a few thousand tokens, before it is stretched."""
    lo, hi = cfg.long_seconds
    if step is None or step >= cfg.curriculum:
        return lo, hi
    start = min(60, lo)
    return start + (lo - start) * step // cfg.curriculum, start + (hi - start) * step // cfg.curriculum


def world_config(split, cfg):
    """The synthetic world's settings for a split: training may use a busier world (cfg.event_rate,
    cfg.goal_rate; None = world.py's default); validation always uses the default one, as eval.py does."""
    world = dict(size=cfg.frame_size)
    if split == "train":
        world.update({k: getattr(cfg, k) for k in ("event_rate", "goal_rate") if getattr(cfg, k) is not None})
    return world


def make_batch(tok, split, indices, cfg, step=None, question_rate=0.0, jsonl=None):
    """Chunks number `indices` of a split, collated. `cfg` holds train.TrainConfig's fields. With `jsonl` (a
    records.JsonlSamples) the chunks are its records in a cycle, built now; otherwise they are synthetic: training
    chunks follow chunk_schedule(step) and end with a question at cfg.question_rate, validation chunks at
    `question_rate`."""
    if jsonl is not None:
        return collate_chunks([jsonl[i % len(jsonl)] for i in indices], tok.pad_id, cfg)
    train = split == "train"
    if getattr(cfg, "long_seconds", None):  # one length a micro-batch, drawn from its first index: little padding
        seconds = random.Random(f"{split}-{indices[0]}-seconds").randint(*long_range(step if train else None, cfg))
        asked = cfg.long_questions if train or question_rate else 0  # validation: questions apart (validate.py)
        return collate([long_sample(tok, split, i, seconds, asked, world_config(split, cfg),
                                    (cfg.min_pixels, cfg.max_pixels), getattr(cfg, "said_at", False))
                        for i in indices], tok.pad_id)
    chunk, overlap, stream_seconds = chunk_schedule(step if train else None, cfg)
    rate = cfg.question_rate if train else question_rate
    preroll = getattr(cfg, "preroll", 0) if train else 0
    samples = [synthetic_sample(tok, split, i, chunk, overlap, stream_seconds, cfg.text_sink, cfg.text_window,
                                world_config(split, cfg), rate, (cfg.min_pixels, cfg.max_pixels), preroll)
               for i in indices]
    return collate_chunks(samples, tok.pad_id, cfg)


def with_positions(batch, model_cfg):
    """Add the M-RoPE position ids, made here (in the DataLoader workers) rather than in the forward, where the
    per-sample bookkeeping would hold up the GPU; for chunks cut into segments, also the cache each later
    segment starts on (reuse.evicted_prefixes)."""
    batch["position_ids"], _ = mrope_positions(batch["input_ids"], model_cfg, video_grid_thw=batch["video_grid_thw"],
                                               attention_mask=batch["attention_mask"])
    if "then" in batch:
        evicted_prefixes(batch, model_cfg)
    return batch


def collate_chunks(samples, pad_id, cfg):
    """collate, or with cfg.segment_seconds (and every chunk longer than that) the segments of each chunk
    (reuse.split_chunk, at reuse.segment_cuts): the first segments as the batch, each next one under "then", with
    every segment's token kinds and rounds, and the eviction rule (vision window, text sink, text window) in
    "evict" (3,)."""
    seconds = [len(s.grid_thw) for s in samples]
    if not getattr(cfg, "segment_seconds", 0) or min(seconds) <= cfg.segment_seconds:
        return collate(samples, pad_id)
    parts = list(zip(*(split_chunk(s, segment_cuts(seconds, cfg.segment_seconds)) for s in samples)))
    batch = None
    for rows in reversed(parts):  # the last segment first: each one goes under its predecessor's "then"
        seg = collate(rows, pad_id)
        T = seg["input_ids"].shape[1]
        seg["kind"] = torch.stack([torch.nn.functional.pad(s.kind, (0, T - len(s.kind))) for s in rows])
        seg["round"] = torch.stack([torch.nn.functional.pad(s.round, (0, T - len(s.round))) for s in rows])
        if batch is not None:
            seg["then"] = batch
        batch = seg
    batch["evict"] = torch.tensor([cfg.vision_window, cfg.text_sink, cfg.text_window])
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
        step, micro = self.first + i // self.cfg.grad_accum, i % self.cfg.grad_accum
        start, c = phase_at(step, self.cfg)  # a second phase's chunks are numbered on from the first's
        first = ((step - start) * c.grad_accum + micro) * c.batch_size * self.world + self.rank * c.batch_size
        first += start * self.cfg.grad_accum * self.cfg.batch_size * self.world
        try:
            batch = make_batch(self.tok, "train", range(first, first + c.batch_size), c, step - start,
                               jsonl=self.jsonl)
        except DataError as e:  # the DataLoader would wrap it in the worker's traceback: carry the one line out
            return {"error": str(e)}
        return pack(with_positions(batch, self.model_cfg))


def pack(batch):
    """A batch's tensors (its "then" parts' too) copied into one flat byte buffer, and where each one lies in it:
    {"flat": (bytes,) uint8, "spec": [(keys, dtype, shape, offset)]}. A DataLoader worker sends it as one
    shared-memory buffer, the DataLoader pins it with one page-locked allocation, and validate.to_device copies it to
    the GPU in one transfer. A batch of 192 s chunks in 8 s segments holds ~760 tensors: pinned one by one, they
    took ~760 page-locked allocations of ~1.4 ms each in a profiled H100 step, beside the step the host queues."""
    spec, tensors, size = [], [], 0

    def walk(d, keys):
        nonlocal size
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, keys + (k,))
                continue
            spec.append((keys + (k,), v.dtype, tuple(v.shape), size))
            tensors.append(v)
            size += -(-v.numel() * v.element_size() // 16) * 16  # 16-byte aligned: a view of any dtype starts here
    walk(batch, ())
    flat = torch.empty(size, dtype=torch.uint8)
    for (_, dtype, shape, offset), v in zip(spec, tensors):
        view_of(flat, dtype, shape, offset).copy_(v)
    return {"flat": flat, "spec": spec}


def unpack(packed):
    """The batch that pack() packed, every tensor a view of packed["flat"] (kept under "flat", where
    validate.to_device finds it)."""
    batch = {"flat": packed["flat"]}
    for keys, dtype, shape, offset in packed["spec"]:
        d = batch
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = view_of(packed["flat"], dtype, shape, offset)
    return batch


def view_of(flat, dtype, shape, offset):
    """The tensor of `dtype` and `shape` whose bytes start at `offset` in the uint8 buffer `flat`."""
    size = math.prod(shape) * dtype.itemsize
    return flat[offset:offset + size].view(dtype).view(shape)


def ignore_ctrl_c(worker_id):
    """Ctrl-C reaches every process of the terminal's group: the workers leave it to the training process, which
    saves after the step in progress (train.py) and then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def micro_batches(tok, cfg, model_cfg, jsonl, first_step, rank, world, pin_memory=False):
    """The MicroBatches of a run, in order, built ahead by cfg.workers DataLoader processes; a record that fails
    in a worker raises its DataError here, in the training process. pin_memory: the DataLoader's thread pins each
    packed batch (one buffer), so that its copy to the GPU never waits for the host."""
    loader = torch.utils.data.DataLoader(MicroBatches(tok, cfg, model_cfg, jsonl, first_step, rank, world),
                                         batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if cfg.workers else None, worker_init_fn=ignore_ctrl_c)
    for batch in loader:
        if "error" in batch:
            raise DataError(batch["error"])
        yield unpack(batch)


def collate(samples, pad_id):
    """Right-pad a list of Samples into a batch for VLM.forward, its frames concatenated in order: as uint8
    "video_frames" when all are one size (validate.to_device patchifies them on the device), else as patches."""
    T = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s.ids)], labels[i, :len(s.ids)], mask[i, :len(s.ids)] = s.ids, s.labels, 1
    sizes = {None if s.frames is None else s.frames.shape[1:] for s in samples}  # (H, W, 3) of each sample's frames
    if len(sizes) == 1 and None not in sizes:
        vision = dict(video_frames=torch.cat([s.frames for s in samples]))
    else:
        vision = dict(pixel_values_videos=torch.cat([s.pixel_values for s in samples]))
    return dict(input_ids=ids, labels=labels, attention_mask=mask, **vision,
                video_grid_thw=torch.cat([s.grid_thw for s in samples]))
