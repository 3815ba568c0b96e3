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

Real data (--data): a JSONL file, one record a line, in either of two shapes (told apart by the line's JSON type).
  StreamingVLM's Inf-Stream-Train, which is LiveCC's format (mit-han-lab/streaming-vlm,
  streaming_vlm/data/lmm_dataset.py; showlab/livecc), a list [user, assistant]:
    [{"role": "user", "content": [{"type": "video", "video": "a.mp4", "video_start": 12.0, "video_end": 36.0},
                                  {"type": "text", "text": "(unused, as theirs)", "previous": "earlier words"}]},
     {"role": "assistant", "content": [{"type": "text_stream", "text_stream": [[12.4, 12.7, "What"], ...],
                                        "qa_stream": [[x, 20.5, "Who scored?", "Red."], ...]}]}]
  ours, an object: {"video": "a.mp4", "start": 12.0, "end": 36.0, "words": [[12.4, 12.7, "What"], ...],
                    "previous": "earlier words"}
Times are seconds from the video's start. A record is one chunk: its first chunk_seconds whole seconds from
start (fractional starts work; a last part-second is dropped), time stamps counting from start. Words go to
seconds by the authors' rule: walking the words in order, second k takes every word that ends by start + k + 1,
so words that end before start go to the first second; each word is stripped and follows one space. A qa_stream
entry [_, t, question, answer] is a question turn (layout.question_segments, the answer supervised) right after
the reply of the second t falls in, (start + k, start + k + 1]: the prompt Streamer.ask builds after that
second. The chunk's later seconds follow the answer (the authors keep theirs in the stream too; Streamer.ask
rewinds it). Entries outside the chunk are dropped. The authors put the question in that second's user turn and
the answer before its commentary; we keep one layout of user turn a second, the one inference uses.

The file is never held in memory (JsonlSamples): the index is each record's byte offset, from the authors'
`<stem>_seeks.jsonl` beside the file (a JSON list of offsets; stem = the name without "_with_seeks" and
".jsonl") or, without it, a scan. Each chunk is read when a DataLoader worker builds it: a seek to its line, and
video.read_seconds decodes only its seconds. Relative video paths are under --video-root, else beside the JSONL.
Every record is parsed once at the start (one read of the file; two integers a record kept), so a malformed line
or a missing video stops the run before it trains, with "file:line: why"; a video that exists but does not
decode is found when its chunk is built and stops the run the same way.
"""
import json
import math
import os
import random
import re
import signal
from array import array
from dataclasses import dataclass

import torch

from layout import (FPS, FRAME_PIXELS, IGNORE, SILENCE, SYSTEM_PROMPT, Kind, prefix_segments, question_segments,
                    reply_ids, round_segments)
from processor import Tokenizer, build_tokenizer, patchify_video, resize_video
from reuse import evicted_prefixes, segment_cuts, split_chunk
from rope import mrope_positions
from video import VideoError, read_seconds
from world import QUESTIONS, SportsStream, WorldConfig, answer, commentary, split_seed

GOALS_PER_STREAM = 100  # a stream with goal rate r is at most this / r seconds long, so each team's score stays
                        # under 100 (one token) even in the goal-dense streams of --goal-rate LO:HI (a goal count
                        # in a question's answer can pass 99 and take two tokens)


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
    texts += [f"user\nTime={t:.1f}-{t + 1:.1f}s" for t in range(0, 20000, 7)]
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
        goals = [t for t, e, _ in stream.events(0, t1) if e == "goal"]
        needed = goals[-1] if goals else None
    if needed is not None and needed < t0:
        k = next(i for i, (t, _) in enumerate(events) if t == needed)
        if not survives_cut(tok, [text for _, text in events], k, text_sink, text_window):
            return None
    return QUESTIONS[kind], answer(kind, stream.score(t1 - 1), first[1] if first else None)


def build_sample(tok, frames, texts, t0, previous, text_sink=512, text_window=512, frame_pixels=FRAME_PIXELS,
                 question=None, asked=None):
    """One chunk: frames[k] are the 2 frames of second t0 + k, texts[k] its commentary, `previous` the list of
    commentary sentences before t0 (oldest first); `question` an optional (question, answer) after the chunk,
    `asked` {k: [(question, answer), ...]} question turns after second k's reply. Frames are resized to (min, max)
    `frame_pixels`, as the streaming loop resizes them."""
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
            if kind == Kind.REPLY:  # a reply, or a question's answer and its <|im_end|>
                labels += seg
            elif kind == Kind.END:  # supervise " ..." and <|im_end|>, not the newline the next prompt starts with
                labels += seg[:-1] + [IGNORE]
            else:
                labels += [IGNORE] * len(seg)
    return Sample(torch.tensor(ids), torch.tensor(labels), video, patches, torch.cat(grids), torch.tensor(kinds),
                  torch.tensor(rounds))


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


# -----------------------------------------------------------------------------
# real data: JSONL records (format in the module docstring), read lazily


class DataError(ValueError):
    """A bad --data file or record: "<file>:<line>: <why>"."""


@dataclass
class Record:
    """One JSONL line, either shape, as the chunk builder needs it."""
    video: str        # as written in the line
    start: float      # seconds from the video's start
    end: float
    words: list       # [(start, end, word)]
    previous: str     # commentary before start ("" = none)
    questions: list   # [(t, question, answer)]


SEEK_INDEX = re.compile(rb"\s*\[[\d\s,]*\]\s*")  # a line that is a list of integers: LiveCC's in-file seek index


def parse_record(line, where):
    """The Record of a JSONL line (bytes or str); `where` ("file:line") starts every error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    try:
        rec = _authors_record(obj) if isinstance(obj, list) else _our_record(obj)
    except KeyError as e:
        raise DataError(f"{where}: no {e.args[0]!r} where the format has one (formats: data.py)") from None
    except (IndexError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: not a valid record ({e}; formats: data.py)") from None
    if not (math.isfinite(rec.start) and math.isfinite(rec.end) and 0 <= rec.start and rec.end - rec.start >= 1):
        raise DataError(f"{where}: start {rec.start:g} s, end {rec.end:g} s do not span a whole second")
    return rec


def _our_record(obj):
    if not isinstance(obj, dict):
        raise TypeError("a line is a JSON object (ours) or a list [user, assistant] (the authors')")
    return Record(str(obj["video"]), float(obj["start"]), float(obj["end"]), _words(obj["words"]),
                  str(obj.get("previous") or ""), [])


def _authors_record(obj):
    if len(obj) != 2:
        raise ValueError(f"a list line is [user, assistant], this one has {len(obj)} items")
    user, stream = obj[0]["content"], obj[1]["content"][0]
    video = [e for e in user if e.get("type") == "video"]
    if not video:
        raise ValueError("the user turn has no {'type': 'video'} element")
    previous = [e["previous"] for e in user if "previous" in e]  # the last one wins, as theirs
    qa = [(float(q[1]), str(q[2]), str(q[3])) for q in stream.get("qa_stream") or []]
    return Record(str(video[0]["video"]), float(video[0]["video_start"]), float(video[0]["video_end"]),
                  _words(stream["text_stream"]), str(previous[-1] if previous else ""), qa)


def _words(words):
    out = []
    for w in words:
        if not isinstance(w, (list, tuple)) or len(w) != 3:
            raise ValueError(f"a word is [start, end, word], got {json.dumps(w)[:60]}")
        out.append((float(w[0]), float(w[1]), str(w[2])))
    return out


def words_by_second(words, start, n):
    """The commentary of each of n seconds from `start`, by StreamingVLM's rule (lmm_dataset.py,
    get_phrase_before_timestamp): walking the words in order, second k takes every word that ends by start + k + 1
    and stops at the first that ends later; each word stripped, after one space."""
    texts, i = [], 0
    for k in range(n):
        phrase = ""
        while i < len(words) and words[i][1] <= start + k + 1:
            phrase += " " + words[i][2].strip()
            i += 1
        texts.append(phrase)
    return texts


def questions_by_second(questions, start, n):
    """{k: [(question, answer), ...]}: each question asked at t goes after second k, the one t falls in:
    start + k < t <= start + k + 1 (the same edge as a word's). Questions outside the n seconds are dropped."""
    asked = {}
    for t, q, a in questions:
        k = next((k for k in range(n) if start + k < t <= start + k + 1), None)
        if k is not None:
            asked.setdefault(k, []).append((q, a))
    return asked


def seeks_path(path):
    """The authors' seek index beside a JSONL: a_with_seeks.jsonl -> a_seeks.jsonl (and a.jsonl -> a_seeks.jsonl)."""
    root, name = os.path.split(path)
    return os.path.join(root, name.replace("_with_seeks", "").rsplit(".jsonl", 1)[0] + "_seeks.jsonl")


class JsonlSamples:
    """The chunks of a JSONL file, one per record, built when asked for (make_batch, in the DataLoader workers).
    It holds two integers a record (byte offset, line number) and nothing else: a chunk is a seek to its line and
    a decode of its seconds only, so memory does not grow with the file or the videos. Every record is checked
    here, once (shape, video present), so a bad line stops the run before it trains; records whose video is an
    empty file (a failed download) are skipped and counted."""

    def __init__(self, path, tok, cfg, video_root=None, log=print):
        self.path, self.tok, self.cfg = path, tok, cfg  # cfg: chunk_seconds, text_sink/window, min/max_pixels
        self.roots = [r for r in (video_root, os.path.dirname(os.path.abspath(path))) if r]
        self.offsets, self.lines = array("q"), array("q")
        empty = 0
        try:
            for offset, n, line in self._lines(log):
                video = self.video_path(parse_record(line, f"{path}:{n}"), f"{path}:{n}")
                if os.path.getsize(video) == 0:
                    empty += 1
                    continue
                self.offsets.append(offset)
                self.lines.append(n)
        except OSError as e:
            raise DataError(f"{e.filename or path}: {e.strerror or e}") from None
        if empty:
            log(f"{path}: skipped {empty} zero-byte videos")
        if not self.offsets:
            raise DataError(f"{path}: no samples in the file")

    def _lines(self, log):
        """(byte offset, line number, line) of each record: at the offsets the seeks file lists (record i is
        taken to be line i + 1), else found by a scan that skips blank lines and an in-file seek index."""
        seeks = seeks_path(self.path)
        with open(self.path, "rb") as f:
            if os.path.isfile(seeks):
                yield from self._seek(f, seeks)
                return
            log(f"{self.path}: no {os.path.basename(seeks)} beside it; scanning the file for line offsets")
            offset = 0
            for n, line in enumerate(f, 1):
                if line.strip() and not SEEK_INDEX.fullmatch(line):
                    yield offset, n, line
                offset += len(line)

    def _seek(self, f, seeks):
        size = os.fstat(f.fileno()).st_size
        for i, offset in enumerate(read_seeks(seeks)):
            f.seek(max(0, offset - 1))
            if offset >= size or (offset > 0 and f.read(1) != b"\n"):
                raise DataError(f"{seeks}: offset {offset} (record {i + 1}) is not the start of a line of "
                                f"{self.path} ({size} bytes)")
            f.seek(offset)
            yield offset, i + 1, f.readline()

    def video_path(self, rec, where):
        """The record's video: an absolute path, or the first of --video-root/path, <JSONL folder>/path."""
        found = [rec.video] if os.path.isabs(rec.video) else [os.path.join(r, rec.video) for r in self.roots]
        for p in found:
            if os.path.exists(p):
                return p
        raise DataError(f"{where}: video {rec.video} not found (looked for {' and '.join(found)})")

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        where = f"{self.path}:{self.lines[i]}"
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            rec = parse_record(f.readline(), where)
        c = self.cfg
        try:
            frames = read_seconds(self.video_path(rec, where), rec.start,
                                  min(c.chunk_seconds, math.floor(rec.end - rec.start + 1e-6)))
        except VideoError as e:
            raise DataError(f"{where}: {e}") from None
        if not frames:
            raise DataError(f"{where}: {rec.video} has no whole second from {rec.start:g} s on")
        return build_sample(self.tok, frames, words_by_second(rec.words, rec.start, len(frames)), rec.start,
                            [rec.previous] if rec.previous.strip() else [], c.text_sink, c.text_window,
                            (c.min_pixels, c.max_pixels), asked=questions_by_second(rec.questions, rec.start,
                                                                                    len(frames)))


def read_seeks(path):
    """The byte offsets in a seeks file: one JSON list of non-negative integers."""
    try:
        with open(path) as f:
            seeks = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the seek index ({e})") from None
    if not isinstance(seeks, list) or not all(isinstance(s, int) and s >= 0 for s in seeks):
        raise DataError(f"{path}: a seek index is one JSON list of byte offsets (non-negative integers)")
    return seeks


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
    """Chunks number `indices` of a split, collated. `cfg` holds train.TrainConfig's fields. With `jsonl` (a
    JsonlSamples) the chunks are its records in a cycle, built now; otherwise they are synthetic: training
    chunks follow chunk_schedule(step) and end with a question at cfg.question_rate, validation chunks at
    `question_rate`."""
    if jsonl is not None:
        return collate_chunks([jsonl[i % len(jsonl)] for i in indices], tok.pad_id, cfg)
    train = split == "train"
    chunk, overlap, stream_seconds = chunk_schedule(step if train else None, cfg)
    rate = cfg.question_rate if train else question_rate
    samples = [synthetic_sample(tok, split, i, chunk, overlap, stream_seconds, cfg.text_sink, cfg.text_window,
                                world_config(split, cfg), rate, (cfg.min_pixels, cfg.max_pixels)) for i in indices]
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
        c = self.cfg
        step, micro = self.first + i // c.grad_accum, i % c.grad_accum
        first = (step * c.grad_accum + micro) * c.batch_size * self.world + self.rank * c.batch_size
        try:
            batch = make_batch(self.tok, "train", range(first, first + c.batch_size), c, step, jsonl=self.jsonl)
        except DataError as e:  # the DataLoader would wrap it in the worker's traceback: carry the one line out
            return {"error": str(e)}
        return with_positions(batch, self.model_cfg)


def ignore_ctrl_c(worker_id):
    """Ctrl-C reaches every process of the terminal's group: the workers leave it to the training process, which
    saves after the step in progress (train.py) and then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def micro_batches(tok, cfg, model_cfg, jsonl, first_step, rank, world, pin_memory=False):
    """The MicroBatches of a run, in order, built ahead by cfg.workers DataLoader processes; a record that fails
    in a worker raises its DataError here, in the training process."""
    loader = torch.utils.data.DataLoader(MicroBatches(tok, cfg, model_cfg, jsonl, first_step, rank, world),
                                         batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if cfg.workers else None, worker_init_fn=ignore_ctrl_c)
    for batch in loader:
        if "error" in batch:
            raise DataError(batch["error"])
        yield batch


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
