"""
The streaming loop: a VLM that watches a video second by second, forever, and comments when something happens.

Every second t (one "round"), Streamer.step:
  1. takes that second's frames (2 at 2 fps = one temporal patch) and runs the vision tower on them only;
  2. evicts once (cache.py): rounds older than the vision window leave, their replies join the previous text (the
     tower needs no cache, so on a GPU the host does this bookkeeping while the tower runs);
  3. prefills the user turn `Time=t.0-t+1.0s` + vision block + the assistant header on top of the cache;
  4. decodes until <|im_end|> or a cap (20 tokens); saying nothing is " ..." + <|im_end|>;
  5. hands the reply back to the cache: its closing " ..." is not commentary, and the newline after it is fed
     with the next second.
The token layout is layout.py's, the same the training chunks are built from (data.py).

The fast path sits beside this plain one (decode.py): Streamer(decode="graphs") decodes with a fixed-shape
step captured in a CUDA graph, greedily one step ahead of the host, and on a GPU replays each second's prefill from
a graph too (prefill.GraphPrefill); decode="compiled" also compiles the step and the vision blocks.
Streamer.prepare() resizes a second's frames on the CPU and can run on a thread while step() works on the second
before. Both are tested to give the plain loop's tokens.

The paper's baselines are policies of this loop, all in one table (POLICIES): full attention and native RoPE are
settings of the cache; the sliding windows with and without overlap change the loop, so they are two small
subclasses of Streamer.

Several videos at once (--video A --video B --out DIR) run through serve.py, which batches their seconds and is
tested against this loop, one stream at a time.

Reference: StreamingVLM, arXiv 2510.09608, section 2 (inference) and mit-han-lab/streaming-vlm.
Run: python stream.py --video clip.mp4 --vtt clip.vtt
"""
import contextlib
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

import cache as caches
from checkpoint import checkpoint_settings, load_checkpoint
from cli import Parser, at_least, default_model, device_name, file_problem, inputs_of, stop_on_ctrl_c
from decode import GraphDecoder, decode_ahead
from layout import (FPS, FRAME_PIXELS, MAX_TEXT_CHARS, SILENCE, SYSTEM_PROMPT, Kind, add_layout_flags, check_text,
                    end_ids, layout_of, prefix_segments, prompt_text, question_segments, reply_ids, split_reply,
                    stop_ids, user_ids)
from model import sample_next
from prefill import GraphPrefill
from processor import patchify_video, resize_video
from safeio import replace_file, same_file
from video import is_live, open_video, seconds_of

DECODERS = ("plain", "graphs", "compiled")


class PhaseTimer:
    """with timer("prefill"): ... adds the block's wall time to timer.phases["prefill"]. On a GPU it waits for the
    queued work at both ends, so a phase counts its own kernels (the waits cost a little: off unless asked)."""

    def __init__(self, enabled, device):
        self.enabled, self.sync, self.phases = enabled, enabled and device.type == "cuda", {}

    @contextlib.contextmanager
    def __call__(self, phase):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"phase:{phase}"):  # a profiler, if one runs, groups the kernels by phase
            yield
        if self.sync:
            torch.cuda.synchronize()
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0


class Prepared(NamedTuple):
    """One second's frames resized on the CPU (Streamer.prepare), ready for the device."""
    clip: torch.Tensor   # uint8 (frames, h, w, 3)
    grid: torch.Tensor   # (1, 3) video_grid_thw
    secs: torch.Tensor   # (1,) seconds per temporal patch


class Streamer:
    """The StreamingVLM loop over a stream: call step(frames) once per second; it returns the commentary. evict and
    reindex are the cache's (cache.StreamingCache: evict=False is full attention, reindex=False native RoPE)."""

    def __init__(self, model, tok, evict=True, reindex=True, text_sink=512, text_window=512, vision_window=16,
                 max_new_tokens=20, temperature=0.0, top_p=1.0, repetition_penalty=1.0, previous_text="",
                 frame_pixels=FRAME_PIXELS, seed=0, fps=FPS, decode="plain", capacity=1024, readback=False,
                 timed=False, system_prompt=SYSTEM_PROMPT, query="", evict_every=1, prefill_graphs=True):
        if decode not in DECODERS:
            raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODERS)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.tok = model, tok
        self.system_prompt, self.query = system_prompt, query  # layout.StreamLayout: the checkpoint's prompt
        self.text_sink, self.text_window, self.vision_window = text_sink, text_window, vision_window
        self.sampling = dict(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty)
        self.greedy = temperature == 0 and repetition_penalty == 1.0
        self.max_new_tokens, self.fps = max_new_tokens, fps
        self.pixels = dict(min_pixels=frame_pixels[0], max_pixels=frame_pixels[1])
        self.generator = torch.Generator().manual_seed(seed)
        self.previous_ids = tok.encode(previous_text) if previous_text else []
        self.silence, self.end, self.stops = tok.encode(SILENCE), end_ids(tok), stop_ids(tok)
        self.cache = caches.StreamingCache(model.cfg, evict, reindex, text_sink, text_window, vision_window, capacity,
                                           device=model.device, dtype=model.dtype, evict_every=evict_every)
        # the fast path: a graph-captured decode step (compiled too, and the vision blocks, with "compiled")
        self.decoder = (GraphDecoder(model, self.cache, graphs=model.device.type == "cuda",
                                     compile=decode == "compiled") if decode != "plain" else None)
        self.compile_vision = decode == "compiled"
        # ...and each second's prefill replayed from a graph where the model's prefill attention is CachedPrefill and
        # the cache evicts (its length then stays in a band, where the same graph serves second after second)
        self.prefiller = (GraphPrefill(model, self.cache) if decode != "plain" and prefill_graphs and evict
                          and model.device.type == "cuda" else None)
        # readback: a forced (teacher-forced) reply still reads each token's greedy choice back to the host, as real
        # decoding must before it can feed the token; without it the CPU queues forced tokens ahead of the GPU
        self.readback = readback
        self.timer = PhaseTimer(timed, model.device)  # seconds per phase of step(), when timed
        self.forwards = 0  # decode forwards run so far (a step queued ahead and then dropped counts: it ran)
        self.t = 0
        self.restart()

    def restart(self):
        """Forget everything: an empty cache, and the system prompt and previous text to feed first."""
        self.cache.clear()
        self.pending = prefix_segments(self.tok, self.previous_ids, self.text_sink, self.text_window,
                                       self.system_prompt)

    @property
    def phases(self):
        return self.timer.phases

    def prepare(self, frames):
        """The CPU part of a second's preprocessing (the resize). Thread-safe: a loop can prepare second t+1 on a
        thread while step() runs second t, and pass the result to step() instead of the frames."""
        return Prepared(*resize_video(frames, fps=self.fps, **self.pixels))

    @torch.no_grad()
    def step(self, frames, force_text=None):
        """Feed one second of frames (or what prepare() made of them); returns the commentary ('' for silence).
        force_text teacher-forces the reply (for tests and scoring) instead of decoding."""
        timer = self.timer
        with timer("preprocess"):  # resize on the CPU (unless prepared ahead), patches on the model's device
            vision = self.vision_input(frames)
        with timer("vision"):  # the tower needs no cache: on a GPU it runs while the host does eviction's bookkeeping
            feats = self.encode(vision)
        with timer("evict"):
            self.cache.evict(self.t)
        with timer("prefill"):
            logits = self.prefill(self.turn(vision[1]), [vision], feats)
        with timer("decode"):
            out = self.decode(logits, self.forced(force_text))
        return self.hand_back(out)

    def vision_input(self, frames):
        """(pixel values on the model's device, grid, seconds per grid) of a second's frames or of prepare()'s."""
        clip, grid, secs = frames if isinstance(frames, Prepared) else self.prepare(frames)
        return patchify_video(clip, self.model.device), grid, secs

    def encode(self, vision):
        """The vision tower's output for a second's frames (vision_input's), ahead of the prefill that places it."""
        pixels, grid, _ = vision
        return self.model.visual(pixels, grid, compiled=self.compile_vision)

    def turn(self, grid):
        """What this second prefills, as [(ids, kind, round)]: the pending end of the last reply (or the prefix), the
        user turn with the vision block of `grid` (and the query, at second 0) and the assistant header."""
        query = self.query if self.t == 0 else ""
        return self.after_pending(user_ids(self.tok, self.t, int(grid.prod()) // 4, query))

    def forced(self, text):
        """The tokens that teacher-force a reply of `text` (None: decode)."""
        return None if text is None else reply_ids(self.tok, text) + self.end[:-1]

    def skip(self):
        """Let a second go by unseen (a live loop that fell behind): the next step is second t + 1."""
        self.t += 1

    def after_pending(self, user_turn):
        """[(ids, kind, round)]: what is still to be fed (the end of the last reply, or the prefix), then a user
        turn of round self.t. The end of a reply belongs to the round before."""
        t = self.t
        pending = [(ids, kind, t - 1 if kind == Kind.END else t) for ids, kind in self.pending]
        return pending + [(user_turn, Kind.USER, t)]

    def stage(self, segments, grid=None, secs=None):
        """Stage [(ids, kind, round)] in the cache, which hands out their M-RoPE positions (the video grids and
        seconds place the vision blocks); returns ids (1, T) on the model's device and positions (3, 1, T)."""
        pos = torch.cat([self.cache.add_tokens(ids, kind, r, grid, secs) for ids, kind, r in segments if len(ids)], 2)
        ids = torch.cat([torch.as_tensor(ids, dtype=torch.long) for ids, _, _ in segments])[None]
        return caches.to_device(ids, self.model.device), pos

    def prefill(self, segments, vision=(), feats=None):
        """Stage [(ids, kind, round)] in the cache, then run them in one forward with the frames of `vision`
        [(pixel_values, grid, seconds per grid)] (feats: the tower's output for them, when encode ran it already);
        returns the last logits."""
        grid = torch.cat([g for _, g, _ in vision]) if vision else None
        ids, pos = self.stage(segments, grid, torch.cat([s for _, _, s in vision]) if vision else None)
        pixels = (dict(pixel_values_videos=torch.cat([p for p, _, _ in vision]), video_grid_thw=grid)
                  if vision and feats is None else {})
        logits = self.prefiller(ids, pos, feats) if self.prefiller is not None else None  # None: runs eagerly
        if logits is None:
            logits = self.model(ids, **pixels, position_ids=pos, cache=self.cache, logits_to_keep=1,
                                compile_vision=self.compile_vision, video_embeds=feats)
        self.last_logits = logits
        return logits

    def decode(self, logits, forced=None):
        """The reply's tokens, each fed to the cache except the last (the stop, or the cap's last token)."""
        cap = len(forced) if forced is not None else self.max_new_tokens
        if self.decoder is not None and (self.greedy or forced is not None):
            steps = self.decoder.steps
            out, self.last_logits = decode_ahead(self.decoder, self.cache, logits, forced, cap, self.stops, self.t,
                                                 self.readback)
            self.forwards += self.decoder.steps - steps
            return out
        out = []
        while True:  # the obvious loop: pick a token, feed it, repeat; the host waits for every step
            out.append(forced[len(out)] if forced is not None else self.pick(logits, out))
            if out[-1] in self.stops or len(out) == cap:
                return out
            check_text(out[-1], self.model.cfg)
            pos = self.cache.add_tokens(out[-1:], Kind.REPLY, self.t)
            ids = torch.tensor([out[-1:]], device=self.model.device)
            logits = self.last_logits = (self.decoder(out[-1], pos)[:, None] if self.decoder is not None
                                         else self.model(ids, position_ids=pos, cache=self.cache))
            self.forwards += 1

    def pick(self, logits, out):
        if self.greedy:  # argmax on the device: one int crosses to the host, not the vocabulary
            return int(logits[0, -1].argmax())
        seen = torch.cat([self.cache.ids[:self.cache.length], torch.tensor(out, dtype=torch.long)])[None]
        return int(sample_next(logits[:, -1].float().cpu(), seen, generator=self.generator, **self.sampling))

    def hand_back(self, out):
        """The reply's text; its closing ' ...' is relabelled END in the cache, and whatever of the end tokens
        was not fed is fed with the next second."""
        content, tail = split_reply(out, self.silence, self.stops)
        fed, first = len(out) - 1, self.cache.length - (len(out) - 1)  # out[-1] was never fed
        self.cache.relabel(first + len(content), first + fed, Kind.END)
        tail = tail[:fed - len(content)]
        self.pending = [(self.end[len(tail):] if self.end[:len(tail)] == tail else self.end, Kind.END)]
        self.t += 1
        return self.tok.decode(content).strip()

    @torch.no_grad()
    def ask(self, question, max_new_tokens=12):
        """Ask a question about the stream so far (world.QUESTIONS) on top of the compact cache, after the last
        step(), and return the greedy answer: what the streaming memory (sink, text window, vision window) knows.
        The cache is rewound afterwards, so the stream goes on as if nothing was asked."""
        length, pending = self.cache.length, self.pending
        try:
            logits = self.prefill(self.after_pending(question_segments(self.tok, question)[0][0]))
            out = []
            while True:
                out.append(int(logits[0, -1].argmax()))
                # a vision placeholder cannot be fed as text: it ends the answer (which is then wrong)
                if (out[-1] in self.stops or len(out) == max_new_tokens
                        or out[-1] in (self.model.cfg.image_token_id, self.model.cfg.video_token_id)):
                    break
                p = self.cache.add_tokens(out[-1:], Kind.REPLY, self.t)
                logits = self.model(torch.tensor([out[-1:]], device=self.model.device), position_ids=p,
                                    cache=self.cache)
        finally:  # whatever happened, the stream goes on from where it was
            self.cache.rewind(self.cache.length - length)
            self.pending = pending
        return self.tok.decode([i for i in out if i not in self.stops]).strip()

# -----------------------------------------------------------------------------
# The sliding-window baselines: they change the loop, not the cache


class ResetStreamer(Streamer):
    """Sliding window without overlap: start over with an empty cache every `reset_every` seconds."""

    def __init__(self, model, tok, reset_every=100, **kw):
        super().__init__(model, tok, **kw)
        self.reset_every = reset_every

    def step(self, frames, force_text=None):
        if self.t > 0 and self.t % self.reset_every == 0:
            self.restart()
        return super().step(frames, force_text)


class RecomputeStreamer(Streamer):
    """Sliding window with overlap: every second, re-prefill everything the StreamingVLM cache keeps, vision
    included, from scratch (the cost the cache's reuse of K/V saves)."""

    def __init__(self, model, tok, **kw):
        super().__init__(model, tok, **kw)
        self.vision = {}  # round -> (pixel_values, grid, seconds per grid) of the rounds still kept

    def encode(self, vision):
        return None  # prefill runs the tower on every kept second's frames

    def prefill(self, segments, vision=(), feats=None):
        if not vision:  # a question (ask): no frames to re-run
            return super().prefill(segments, vision)
        ids, kinds, rounds = self.cache.tokens()
        kept = sorted({int(r) for r, k in zip(rounds, kinds) if k == Kind.USER})
        self.vision = {r: self.vision[r] for r in kept} | {self.t: vision[-1]}
        self.cache.clear()
        return super().prefill([(ids, kinds, rounds)] + segments, [self.vision[r] for r in sorted(self.vision)])


# -----------------------------------------------------------------------------
# The policies: one table. A new policy is one entry here (plus its class, if it changes the loop); eval.py, stream.py
# --policy and the tests take the names from this table.


@dataclass(frozen=True)
class Policy:
    loop: type              # Streamer, or a subclass that changes the loop
    evict: bool             # the cache drops rounds that left the vision window (their replies join the previous text)
    reindex: bool           # contiguous RoPE: the kept tokens get fresh positions after an eviction
    about: str              # one line for --help and the README
    paper: bool = True      # one of the paper's five, which eval.py runs by default
    takes: tuple = ()       # make_streamer keywords only this loop takes


POLICIES = {
    "streaming": Policy(Streamer, True, True, "StreamingVLM: attention sink, text and vision windows, contiguous RoPE"),
    "native": Policy(Streamer, True, False, "the same cache with the original, growing positions (native RoPE)"),
    "full": Policy(Streamer, False, False, "full attention: nothing is ever evicted"),
    "reset": Policy(ResetStreamer, False, False, "sliding window without overlap: start over every reset_every s",
                    takes=("reset_every",)),
    "recompute": Policy(RecomputeStreamer, True, True, "sliding window with overlap: re-prefill the kept window "
                        "(vision included) every second"),
}


def make_streamer(model, tok, policy="streaming", **kw):
    """A streamer running one of POLICIES; kw are Streamer's (windows, sampling, decode path, ...) and, for the
    policies that take them, their own (reset_every); those of other policies are ignored."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    p = POLICIES[policy]
    others = {k for q in POLICIES.values() for k in q.takes} - set(p.takes)
    return p.loop(model, tok, evict=p.evict, reindex=p.reindex, **{k: v for k, v in kw.items() if k not in others})

# -----------------------------------------------------------------------------
# Checkpoints and the command line


def streamer_kwargs(layout):
    """Streamer keyword arguments of a StreamLayout."""
    kw = {k: v for k, v in vars(layout).items() if k not in ("min_pixels", "max_pixels")}
    return dict(kw, frame_pixels=(layout.min_pixels, layout.max_pixels))


def timestamp(seconds):
    """WebVTT time, HH:MM:SS.mmm."""
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


class Outputs:
    """--vtt (a cue for each second that says something) and --jsonl (one object a second), written and flushed
    as the stream goes, so a crash loses nothing already said. Each is a new file renamed into place
    (safeio.replace_file) when the first second is written: a symlink planted at the path is replaced, never
    written through, and a run that fails before its first second leaves the files of the run before as they were."""

    def __init__(self, vtt=None, jsonl=None):
        self.paths, self.vtt, self.jsonl, self.opened = (vtt, jsonl), None, None, False
        self.seconds = 0  # seconds written whole so far

    def _open(self):
        vtt, jsonl = self.paths
        self.opened = True
        self.vtt = replace_file(vtt) if vtt else None
        self.jsonl = replace_file(jsonl) if jsonl else None
        if self.vtt:
            self.vtt.write("WEBVTT\n\n")

    def write(self, t, text, ms, s):
        if not self.opened:
            self._open()
        if self.vtt and text:
            self.vtt.write(f"{timestamp(t)} --> {timestamp(t + 1)}\n{text}\n\n")
            self.vtt.flush()
        if self.jsonl:
            self.jsonl.write(json.dumps(dict(t=t, text=text, latency_ms=round(ms, 1), cache_tokens=s.cache.length,
                                             max_position=s.cache.max_position())) + "\n")
            self.jsonl.flush()
        self.seconds = t + 1

    def close(self):
        for f in (self.vtt, self.jsonl):
            if f:
                f.close()


def run(s, frames, args, out):
    """Stream the seconds of `frames` through s, printing and writing each; with --realtime, pace by the wall
    clock (second t is ready at t + 1 s) and skip the seconds the model fell behind on. A Ctrl-C lets the second in
    progress finish and be written, then stops. Returns (seen, skipped, stopped by Ctrl-C)."""
    start, seen, skipped = time.monotonic(), 0, 0
    # Ctrl-C: the second in progress is finished and written, then we stop (signals reach the main thread only)
    with stop_on_ctrl_c(threading.current_thread() is threading.main_thread()) as stop:
        for t, second in enumerate(frames):
            if stop or (args.seconds and t >= args.seconds):
                break
            seen, skipped = _second(s, t, second, args, out, start, seen, skipped)
    return seen, skipped, bool(stop)


def _second(s, t, second, args, out, start, seen, skipped):
    """Second t of run() (with --realtime, dropped when a whole second behind). Returns the new (seen, skipped)."""
    if args.realtime:
        late = time.monotonic() - start - (t + 1)
        if late < 0:
            time.sleep(-late)
        elif late >= 1:  # a whole second behind: drop this one to catch up
            s.skip()
            return seen, skipped + 1
    t0 = time.perf_counter()
    text = s.step(second)
    ms = (time.perf_counter() - t0) * 1000
    out.write(t, text, ms, s)
    print(f"[{timestamp(t)}] {text or '...':<60s} ({ms:.0f} ms, cache {s.cache.length} tokens, "
          f"max pos {s.cache.max_position()})", flush=True)
    return seen + 1, skipped


def open_seconds(path, fps):
    """The seconds of a video source (video.open_video), or exit with its one-line error."""
    try:
        return seconds_of(open_video(path, fps), fps)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def build_parser():
    ap = Parser(prog="stream.py", description="Stream a video (a file, a URL, a camera, a GIF or a folder of frames) "
                "through a checkpoint: live commentary, optionally WebVTT subtitles and JSON lines.")
    ap.add_argument("--model", default=default_model(), help="checkpoint folder (config.json, model.safetensors, "
                    "tokenizer.json, stream.json); default: the shipped checkpoints/tiny if it exists, else out/tiny, "
                    f"what `python train.py` writes; now {default_model()}")
    ap.add_argument("--video", required=True, action="append", help="a video file or anything PyAV opens (rtsp://..., "
                    "/dev/video0), a GIF, or a folder of frames; repeat it to stream several together (serve.py)")
    ap.add_argument("--out", help="folder for OUT/<name>.vtt and OUT/<name>.jsonl of every --video, <name> its file "
                    "stem (default with several videos: out/stream)")
    ap.add_argument("--vtt", help="write WebVTT subtitles here (a cue for each second that says something)")
    ap.add_argument("--jsonl", help="write one JSON line a second here (t, text, latency_ms, cache_tokens, "
                    "max_position)")
    ap.add_argument("--realtime", action="store_true", help="pace by the wall clock; skip seconds when behind")
    ap.add_argument("--policy", default="streaming", choices=list(POLICIES), help="default streaming; "
                    + "; ".join(f"{name}: {p.about}" for name, p in POLICIES.items()))
    ap.add_argument("--seconds", type=at_least(0), default=0, help="stop after this many seconds (default 0: the "
                    "whole video)")
    add_layout_flags(ap)
    ap.add_argument("--previous-text", default="", help="context the commentary continues from",
                    type=prompt_text(MAX_TEXT_CHARS, " (layout.MAX_TEXT_CHARS)"))
    ap.add_argument("--flexprefill", action="store_true", help="block-sparse prefill for long chunks")
    ap.add_argument("--fp8", action="store_true", help="every Linear in FP8 with row-wise scales (quantize.py): "
                    "for Hopper GPUs' FP8 tensor cores (not yet timed there), an approximation of the model")
    ap.add_argument("--device", type=device_name, help="cuda, cpu, ... (default: cuda when there is one; printed "
                    "with the reason)")
    return ap


def check_outputs(ap, args):
    """Before anything loads, one line for an output that cannot be written or that would destroy an input: the
    video, the model's folder or a file in it (the weights are memory-mapped), the shipped checkpoint."""
    inputs = inputs_of(args, "video", "model")
    for flag in ("vtt", "jsonl"):
        if getattr(args, flag) and (problem := file_problem(getattr(args, flag), inputs)):
            ap.error(f"--{flag} {problem}")
    if args.vtt and args.jsonl and same_file(args.vtt, args.jsonl):
        ap.error(f"--vtt and --jsonl are one file ({args.jsonl}): give each its own")


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if len(args.video) > 1 or args.out:  # several streams in one batch: serve.py (it builds on this file)
        import serve
        return serve.main(args, ap)
    args.video = args.video[0]
    check_outputs(ap, args)
    settings = checkpoint_settings(args.model)
    try:
        layout = layout_of(settings, args)
    except ValueError as e:
        ap.error(str(e))
    out = None
    try:
        s, frames = _load(args, settings, layout)
        out = Outputs(args.vtt, args.jsonl)
        seen, skipped, stopped = run(s, frames, args, out)
    except KeyboardInterrupt:  # Ctrl-C while loading, or twice (the second in progress is dropped)
        seen, skipped, stopped = None, 0, True
    except (ValueError, OSError) as e:  # the video reader's errors name the file
        sys.exit(f"error: {e}")
    finally:
        if out is not None:
            out.close()
    if stopped:
        print(f"stopped at second {out.seconds if out else 0}; outputs complete up to it", file=sys.stderr)
        sys.exit(130)  # the status of a process ended by SIGINT
    print(f"{seen} seconds streamed" + (f", {skipped} skipped to keep up (--realtime)" if skipped else ""))


def _load(args, settings, layout):
    """(streamer, the video's seconds): a file is opened first, so a missing or broken one costs a line, not a
    model load; a camera or a live URL once the model is ready (opened early, it would buffer or drop frames, or
    time out, while the model loads)."""
    frames = None if is_live(args.video) else open_seconds(args.video, layout.fps)
    print(f"model {args.model}")
    model, tok, settings = load_checkpoint(args.model, args.device, args.flexprefill, settings, args.fp8)
    frames = open_seconds(args.video, layout.fps) if frames is None else frames
    print(f"layout: {vars(layout)}")
    decode = "graphs" if model.device.type == "cuda" else "plain"  # CUDA-graph decode on a GPU
    s = make_streamer(model, tok, args.policy, **streamer_kwargs(layout), previous_text=args.previous_text,
                      decode=decode)
    return s, frames


if __name__ == "__main__":
    main()
