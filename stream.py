"""
The streaming loop: a VLM that watches a video second by second, forever, and comments when something happens.

Every second t (one "round"):
  1. evict once (cache.py): rounds older than the vision window leave, their replies join the previous text;
  2. take that second's frames (2 at 2 fps = one temporal patch) and run the vision tower on them only;
  3. prefill the user turn `Time=t-t+1s` + vision block + the assistant header on top of the cache;
  4. decode until <|im_end|> or a cap (20 tokens); saying nothing is " ..." + <|im_end|>.

Two overlaps keep the GPU busy (both tested against the plain path): Streamer.prepare() resizes a second's frames
on the CPU and can run on a thread while step() works on the second before (eval.py does so); and with a graph
decoder, greedy decoding runs one step ahead of the host (_decode_ahead, decode.py's token_id=None).

The token layout of a round is defined once, here (round_ids / prefix_ids), and used both by this loop and by
the training data builder, so training and inference see byte-identical sequences:

  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n                       (SYS)
  <|im_start|>previous text\\n  HEAD(text_sink) TAIL(text_window)  <|im_end|>\\n          (PREV_*)
  per second: <|im_start|>user\\nTime=12.0-13.0s<|vision_start|>[video_pad]*N<|vision_end|><|im_end|>\\n
              <|im_start|>assistant\\n  { " Red scores! Red 3, Blue 2."}  " ..." <|im_end|> \\n

The original repository has four train/inference mismatches in this layout (an extra space before the vision
block in training, "\\n\\n" vs "\\n" after "assistant", a query only at inference, a 508/510 vs 512/511 split of
the previous text); here there is one layout.

Reference: StreamingVLM, arXiv 2510.09608, section 2; ../shared/docs/STREAMINGVLM_NOTES.md sections 1-2.
Run: python stream.py --model out/tiny --video clip.gif
"""
import argparse
import json
import os
import sys
import time
from typing import NamedTuple

import torch

from cache import END, PREV_BODY, PREV_END, PREV_HEAD, REPLY, SYS, USER, POLICIES, StreamingCache
from decode import GraphDecoder
from model import VLM, pick_device_dtype, sample_next
from processor import Tokenizer, patchify_video, resize_video

SYSTEM_PROMPT = "You are a helpful assistant."
SILENCE = " ..."
FPS = 2
FRAME_PIXELS = (28 * 28 * 4, 768 * 28 * 28)  # default (min, max) pixels of a frame after resizing

# -----------------------------------------------------------------------------
# The token layout (one definition for training and inference)


def prefix_segments(tok, previous_ids=(), text_sink=512, text_window=512):
    """System prompt and previous-text block as [(ids, kind)], the previous text cut to head + tail tokens."""
    body = list(previous_ids)
    if len(body) > text_sink + text_window:
        body = body[:text_sink] + body[len(body) - text_window:]
    return [(tok.encode(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"), SYS),
            (tok.encode("<|im_start|>previous text\n"), PREV_HEAD), (body, PREV_BODY),
            (tok.encode("<|im_end|>\n"), PREV_END)]


def user_ids(tok, t, n_vision):
    """The user turn of second t with n_vision video tokens, and the assistant header after it."""
    return (tok.encode(f"<|im_start|>user\nTime={t:.1f}-{t + 1:.1f}s<|vision_start|>") + [tok.video_pad_id] * n_vision
            + tok.encode("<|vision_end|><|im_end|>\n<|im_start|>assistant\n"))


def reply_ids(tok, text):
    """The commentary tokens of a reply ('' = silence, no tokens)."""
    return tok.encode(" " + text.strip()) if text.strip() else []


def end_ids(tok):
    """What closes every reply: ' ...' <|im_end|> and the newline."""
    return tok.encode(SILENCE) + [tok.im_end_id] + tok.encode("\n")


def round_segments(tok, t, n_vision, text):
    """One whole second as [(ids, kind)]: user turn, reply, end. Training supervises REPLY and the first
    len(end_ids) - 1 END tokens (' ...' and <|im_end|>, not the newline the next prompt starts with)."""
    return [(user_ids(tok, t, n_vision), USER), (reply_ids(tok, text), REPLY), (end_ids(tok), END)]


def question_segments(tok, question, answer=""):
    """A question about the whole stream after its last round (eval.py's whole-video task; training asks one at
    the end of some chunks) as [(ids, kind)]: user turn + assistant header, then the answer and <|im_end|>
    (REPLY: both supervised). A prompt for generation is the first segment."""
    return [(tok.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"), USER),
            (reply_ids(tok, answer) + [tok.im_end_id], REPLY)]


# -----------------------------------------------------------------------------
# Frame sources


def open_video(path, fps=FPS):
    """Frames (PIL RGB) of a folder of images (sorted; taken as `fps` frames a second), a GIF, or a video file
    through PyAV, resampled to `fps`. Returns an iterator."""
    from PIL import Image
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
        if not names:
            raise ValueError(f"{path} holds no .png/.jpg/.jpeg/.bmp/.webp images")
        return (Image.open(os.path.join(path, n)).convert("RGB") for n in names)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video file or frame folder: {path}")
    if path.lower().endswith(".gif"):
        return _resample(_gif_frames(path), fps)
    try:
        import av
    except ImportError:
        raise SystemExit(f"reading {path} needs PyAV (pip install av); a folder of images or a GIF needs nothing")
    return _resample(_av_frames(av, path), fps)


def _gif_frames(path):
    from PIL import Image, ImageSequence
    with Image.open(path) as im:
        t = 0.0
        for frame in ImageSequence.Iterator(im):
            yield t, frame.convert("RGB")
            t += frame.info.get("duration", 100) / 1000


def _av_frames(av, path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield float(frame.pts * stream.time_base), frame.to_image()


def _resample(timed, fps):
    """Keep the frame showing at each instant k/fps (the last one at or before it)."""
    k, last = 0, None
    for t, frame in timed:
        while last is not None and k / fps < t:
            yield last
            k += 1
        last = frame
    if last is not None:
        yield last


def seconds_of(frames, fps=FPS):
    """Group a frame iterator into lists of `fps` frames: one list per second; a short tail is dropped."""
    chunk = []
    for f in frames:
        chunk.append(f)
        if len(chunk) == fps:
            yield chunk
            chunk = []

# -----------------------------------------------------------------------------
# The loop


class Prepared(NamedTuple):
    """One second's frames resized on the CPU (Streamer.prepare), ready for the device."""
    clip: torch.Tensor   # uint8 (frames, h, w, 3)
    grid: torch.Tensor   # (1, 3) video_grid_thw
    secs: torch.Tensor   # (1,) seconds per temporal patch


class Streamer:
    """Runs one policy over a stream: call step(frames) once per second; it returns the commentary."""

    def __init__(self, model, tok, policy="streaming", text_sink=512, text_window=512, vision_window=16,
                 max_new_tokens=20, temperature=0.0, top_p=1.0, repetition_penalty=1.0, previous_text="",
                 frame_min_pixels=FRAME_PIXELS[0], frame_max_pixels=FRAME_PIXELS[1], seed=0, reset_every=None, fps=FPS,
                 graphs=False, compile=False, capacity=1024, readback=False):
        self.model, self.tok = model, tok
        self.policy = POLICIES[policy] if isinstance(policy, str) else policy
        if reset_every is not None:
            self.policy = type(self.policy)(**{**vars(self.policy), "reset_every": reset_every})
        self.text_sink, self.text_window, self.vision_window = text_sink, text_window, vision_window
        self.sampling = dict(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty)
        self.max_new_tokens, self.fps = max_new_tokens, fps
        self.decode_time, self.decode_tokens = 0.0, 0  # for per-token latency
        self.phases = {}  # seconds spent per phase of step(): evict, preprocess, prefill, decode
        self.pixels = dict(min_pixels=frame_min_pixels, max_pixels=frame_max_pixels)
        self.generator = torch.Generator().manual_seed(seed)
        self.previous_ids = tok.encode(previous_text) if previous_text else []
        self.silence, self.end = tok.encode(SILENCE), end_ids(tok)
        self.stops = {tok.im_end_id, tok.endoftext_id}
        self.vision_ids = {model.cfg.image_token_id, model.cfg.video_token_id}
        self.cache = StreamingCache(model.cfg, self.policy, text_sink, text_window, vision_window, capacity,
                                    device=model.device, dtype=model.dtype)
        # graphs=True: decode through decode.py's GraphDecoder (CUDA graph replay; eager on a CPU), same logits;
        # compile=True: the step is torch.compile'd too (fused kernels), then captured, and the vision blocks are
        # compiled
        self.decoder = (GraphDecoder(model, self.cache, graphs=model.device.type == "cuda", compile=compile)
                        if graphs or compile else None)
        self.compile = compile  # the vision blocks run compiled too
        self.greedy = temperature == 0 and repetition_penalty == 1.0
        # readback: a forced (teacher-forced) reply still reads each token's greedy choice back to the host, as real
        # decoding must before it can feed the token; without it the CPU queues forced tokens ahead of the GPU
        self.readback = readback
        self.vision = {}  # round -> (pixel_values, grid, seconds per grid); kept only for the recompute policy
        self.t = 0
        self._restart()

    def _restart(self):
        self.cache.clear()
        self.pending = prefix_segments(self.tok, self.previous_ids, self.text_sink, self.text_window)

    def prepare(self, frames):
        """The CPU part of a second's preprocessing (the resize). Thread-safe: a loop can prepare second t+1 on a
        thread while step() runs second t, and pass the result to step() instead of the frames."""
        return Prepared(*resize_video(frames, fps=self.fps, **self.pixels))

    @torch.no_grad()
    def step(self, frames, force_text=None):
        """Feed one second of frames (or what prepare() made of them); returns the commentary ('' for silence).
        force_text teacher-forces the reply (for tests and scoring) instead of decoding."""
        t, tok, cache, model = self.t, self.tok, self.cache, self.model
        if self.policy.reset_every and t > 0 and t % self.policy.reset_every == 0:
            self._restart()
        clock = self._clock()
        cache.evict(t)
        clock("evict")
        # resize on the CPU (PIL, as the reference processor; done ahead on a thread when `frames` is what
        # prepare() returned), normalise and cut patches on the model's device
        clip, grid, secs = frames if isinstance(frames, Prepared) else self.prepare(frames)
        pv = patchify_video(clip, model.device)
        clock("preprocess")
        n_vision = int(grid.prod()) // 4
        segments = self._after_pending(user_ids(tok, t, n_vision))
        vision = [(pv, grid, secs)]
        if self.policy.recompute:
            # sliding window with overlap: re-prefill everything kept, vision included, from scratch
            ids, kinds, rounds = cache.tokens()
            kept = sorted({int(r) for r, k in zip(rounds, kinds) if k == USER})
            vision = [self.vision[r] for r in kept] + vision
            self.vision = {r: self.vision[r] for r in kept} | {t: (pv, grid, secs)}
            cache.clear()
            segments = [(ids, kinds, rounds)] + segments
        logits = self.last_logits = self._prefill(segments, vision)
        clock("prefill")
        # decode: sample, stop at <|im_end|> or the cap; feed each token except the last
        first_reply = cache.length
        forced = (reply_ids(tok, force_text) + self.end[:-1]) if force_text is not None else None
        t_decode, steps0 = time.perf_counter(), self.decoder.steps if self.decoder else 0
        if self.decoder is not None and (self.greedy or forced is not None):
            out = self._decode_ahead(logits, forced, t)
        else:
            out = self._decode_plain(logits, forced, t)
        clock("decode")
        self.decode_time += time.perf_counter() - t_decode
        # forwards run in the decode loop (a step queued ahead and then dropped counts: it ran)
        self.decode_tokens += self.decoder.steps - steps0 if self.decoder else len(out) - 1
        # the reply is what comes before ' ...' (or before the stop / cap); the rest of what was fed is END
        content = out[:-1] if out[-1] in self.stops else out
        for i in range(len(content) - len(self.silence) + 1):
            if content[i:i + len(self.silence)] == self.silence:
                content = content[:i]
                break
        fed = len(out) - 1
        cache.relabel(first_reply + len(content), first_reply + fed, END)
        tail = out[len(content):fed]
        self.pending = [(self.end[len(tail):] if self.end[:len(tail)] == tail else self.end, END)]
        self.t += 1
        return tok.decode(content).strip()

    def _after_pending(self, user_turn):
        """[(ids, kind, round)]: what is still to be fed (the end of the last reply, or the prefix), then a user
        turn of round self.t. The end of a reply belongs to the round before."""
        t = self.t
        return [(ids, kind, t - 1 if kind == END else t) for ids, kind in self.pending] + [(user_turn, USER, t)]

    def _prefill(self, segments, vision=()):
        """Record [(ids, kind, round)] in the cache, bookkeeping first (it hands out the M-RoPE positions), then
        run them in one forward with the frames of `vision` [(pixel_values, grid, seconds per grid)]; returns the
        last position's logits."""
        cache, model = self.cache, self.model
        grid = torch.cat([g for _, g, _ in vision]) if vision else None
        secs = torch.cat([s for _, _, s in vision]) if vision else None
        pos = torch.cat([cache.add_tokens(ids, kind, r, grid, secs) for ids, kind, r in segments if len(ids)], 2)
        ids = torch.cat([torch.as_tensor(ids, dtype=torch.long) for ids, _, _ in segments])[None].to(model.device)
        pixels = (dict(pixel_values_videos=torch.cat([p for p, _, _ in vision]).to(model.device), video_grid_thw=grid)
                  if vision else {})
        return model(ids, **pixels, position_ids=pos, cache=cache, logits_to_keep=1, compile_vision=self.compile)

    @torch.no_grad()
    def ask(self, question, max_new_tokens=12):
        """Ask a question about the stream so far (world.QUESTIONS) on top of the compact cache, after the last
        step(), and return the greedy answer: what the streaming memory (sink, text window, vision window) knows.
        The cache is rewound afterwards, so the stream goes on as if nothing was asked."""
        t, cache, length, pending = self.t, self.cache, self.cache.length, self.pending
        logits = self._prefill(self._after_pending(question_segments(self.tok, question)[0][0]))
        out = []
        try:
            while True:
                out.append(int(logits[0, -1].argmax()))
                # a vision placeholder cannot be fed as text: it ends the answer (which is then wrong)
                if out[-1] in self.stops or out[-1] in self.vision_ids or len(out) == max_new_tokens:
                    break
                p = cache.add_tokens(out[-1:], REPLY, t)
                logits = self.model(torch.tensor([out[-1:]], device=self.model.device), position_ids=p, cache=cache)
        finally:  # whatever happened, the stream goes on from where it was
            cache.rewind(cache.length - length)
            self.pending = pending
        return self.tok.decode([i for i in out if i not in self.stops]).strip()

    def _decode_plain(self, logits, forced, t):
        """The obvious loop: pick a token, feed it, repeat; the host waits for every step."""
        cache, model, out = self.cache, self.model, []
        while True:
            if forced is not None:
                nxt = forced[len(out)]
                if self.readback:
                    int(logits[0, -1].argmax())
            elif self.greedy:  # argmax on the device: one int crosses to the host, not the vocabulary
                nxt = int(logits[0, -1].argmax())
            else:
                seen = torch.cat([cache.ids[:cache.length], torch.tensor(out, dtype=torch.long)])[None]
                nxt = int(sample_next(logits[:, -1].float().cpu(), seen, generator=self.generator, **self.sampling))
            out.append(nxt)
            if nxt in self.stops or len(out) == (len(forced) if forced else self.max_new_tokens):
                return out
            p = cache.add_tokens([nxt], REPLY, t)
            if self.decoder is not None:
                logits = self.last_logits = self.decoder(nxt, p)[:, None]
            else:
                logits = self.last_logits = model(torch.tensor([[nxt]], device=model.device), position_ids=p,
                                                  cache=cache)

    def _decode_ahead(self, logits, forced, t):
        """Greedy (or forced) decoding one step ahead of the host (decode.py): while step k runs, step k+1 is
        queued, fed on the device with step k's argmax, and only then is step k's token read back. Same tokens as
        _decode_plain; a step queued past the end of the reply is dropped from the cache."""
        cache, dec = self.cache, self.decoder
        cap = len(forced) if forced is not None else self.max_new_tokens
        first = int(logits[0, -1].argmax()) if forced is None or self.readback else None  # after the prefill
        out = [forced[0] if forced is not None else first]
        if out[0] in self.stops or cap == 1:
            return out
        last = [dec(out[0], cache.add_tokens(out[:1], REPLY, t))]  # step 1; logits of the kept steps
        while True:
            k = len(out)  # step k (fed out[k-1]) is queued; its token out[k] is not known yet
            ahead = k + 1 < cap  # out[k] will be fed unless it is the cap's last token (or a stop)
            if ahead:
                tok = forced[k] if forced is not None else None  # None: step k's argmax, on the device
                last.append(dec(tok, cache.add_tokens([tok if tok is not None else 0], REPLY, t)))
            read = dec.read(back=2 if ahead else 1) if forced is None or self.readback else None
            out.append(forced[k] if forced is not None else read)
            if out[-1] in self.vision_ids:  # the plain loop fails on these too (add_tokens wants their grid)
                raise ValueError(f"the model emitted a vision placeholder token ({out[-1]}) as text")
            if out[-1] in self.stops or len(out) == cap:
                if ahead:  # the step queued ahead fed a token that ends up unused
                    cache.drop_last()
                    last.pop()
                self.last_logits = last[-1][:, None]
                return out
            if forced is None:
                cache.ids[cache.length - 1] = out[-1]  # the step queued ahead was fed this token (placeholder 0)
            last = last[-2:]

    def _clock(self):
        """clock(phase) adds the time since the last call to self.phases[phase] (GPU work included)."""
        last = [time.perf_counter()]

        def clock(phase):
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.phases[phase] = self.phases.get(phase, 0.0) + now - last[0]
            last[0] = now
        return clock


def load_checkpoint(path, device=None, flexprefill=False):
    """(model, tokenizer, settings) from a checkpoint folder; settings are the windows it was trained for
    (stream.json, written by train.py), or {}. Exits with how to make one when there is none."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.exit(f"no checkpoint at {path}: make one with `python train.py` (or pass --model DIR)")
    device, dtype = pick_device_dtype(device)
    model = VLM.from_pretrained(path, device=device, dtype=dtype)
    if flexprefill:
        model.enable_flexprefill()
    settings = {}
    if os.path.isfile(os.path.join(path, "stream.json")):
        with open(os.path.join(path, "stream.json")) as f:
            settings = json.load(f)
    return model, Tokenizer.from_file(path), settings


def main():
    ap = argparse.ArgumentParser(description="Stream a video through a checkpoint and print live commentary.")
    ap.add_argument("--model", default="out/tiny", help="checkpoint folder (config.json, model.safetensors, "
                    "tokenizer.json); default: what `python train.py` writes")
    ap.add_argument("--video", required=True, help="a folder of frames, a GIF, or a video file (mp4 needs PyAV)")
    ap.add_argument("--policy", default="streaming", choices=sorted(POLICIES), help="cache policy (cache.py)")
    ap.add_argument("--seconds", type=int, default=0, help="stop after this many seconds (0 = the whole video)")
    ap.add_argument("--text-sink", type=int, default=512)
    ap.add_argument("--text-window", type=int, default=512)
    ap.add_argument("--vision-window", type=int, default=16, help="seconds of vision kept")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--previous-text", default="", help="context the commentary continues from")
    ap.add_argument("--max-pixels", type=int, default=768 * 28 * 28, help="per-frame pixel budget (smart_resize)")
    ap.add_argument("--flexprefill", action="store_true", help="block-sparse prefill for long chunks")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    model, tok, _ = load_checkpoint(args.model, args.device, args.flexprefill)
    device = model.device
    s = Streamer(model, tok, args.policy, args.text_sink, args.text_window, args.vision_window, args.max_new_tokens,
                 args.temperature, args.top_p, args.repetition_penalty, args.previous_text,
                 frame_max_pixels=args.max_pixels, graphs=device.type == "cuda")  # CUDA-graph decode on a GPU
    for t, frames in enumerate(seconds_of(open_video(args.video))):
        if args.seconds and t >= args.seconds:
            break
        t0 = time.perf_counter()
        text = s.step(frames)
        ms = (time.perf_counter() - t0) * 1000
        print(f"[{t:6d}s] {text or '...':<60s} ({ms:.0f} ms, cache {s.cache.length} tokens, "
              f"max pos {s.cache.max_position()})", flush=True)


if __name__ == "__main__":
    main()
