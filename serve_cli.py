"""
The command line of serve.py: python stream.py --video A --video B ... --out DIR streams the videos as one batch.

stream.py hands several videos (or --out) to serve.main, which runs main here: each video gets a row of one
StreamBatch, sized by the first second of the largest frames, and its commentary goes to DIR/<name>.vtt and .jsonl.
A video that ends, breaks or reaches --seconds leaves the batch with a line that names it; the others go on. Kept
apart from serve.py so that the batch itself reads on its own.
"""
import itertools
import os
import queue
import sys
import threading
import time

from checkpoint import checkpoint_settings, load_checkpoint
from cli import file_problem, is_live, output_problem, stop_on_ctrl_c
from eval import steady_capacity
from layout import layout_of
from safeio import RunLock
from serve import BATCHED, StreamBatch
from stream import POLICIES, Outputs, open_seconds, streamer_kwargs, timestamp


def stems(videos):
    """{name: source}: each video's file stem (a camera or URL: its last path part), refused when two collide or when
    a source has no name to give its outputs."""
    names = {}
    for v in videos:
        name = os.path.splitext(os.path.basename(v.rstrip("/")))[0]
        if not name or name in (".", ".."):
            raise ValueError(f"--video {v}: has no file name to name its outputs after")
        if name in names:
            raise ValueError(f"--video {names[name]} and --video {v} share the name {name!r}: their outputs would "
                             "collide (rename or link one of them)")
        names[name] = v
    return names


class ReadAhead:
    """A source's seconds read (decoded, then resized by `prepare`: Streamer.prepare) on a thread of its own, up to
    `depth` seconds ahead of the batch. Read in turn on the batch's thread, N sources would add N decodes and resizes
    to every batch second; here they overlap the GPU's work, as a live server reads each camera on its own. next()
    gives the seconds in order, then raises what the reader raised (its error, or StopIteration at its end) at the
    second where it raised it."""

    def __init__(self, seconds, prepare, depth=2):
        self.queue = queue.Queue(maxsize=depth)
        self.end = None
        threading.Thread(target=self._read, args=(seconds, prepare), daemon=True).start()

    def _read(self, seconds, prepare):
        try:
            for frames in seconds:
                self.queue.put((prepare(frames), None))
            self.queue.put((None, StopIteration()))
        except Exception as e:   # handed to the batch's thread, which names the stream and lets it leave
            self.queue.put((None, e))

    def __iter__(self):
        return self

    def __next__(self):
        if self.end is None:
            second, self.end = self.queue.get()
            if self.end is None:
                return second
        raise self.end


def next_seconds(sources, batch, limit):
    """{name: frames} of the next second of every stream in the batch; a stream whose reader ends, fails or reaches
    --seconds leaves with a line that names it."""
    ready = {}
    for name in list(batch.streams):
        s = batch.streams[name]
        try:
            if limit and s.t >= limit:
                raise StopIteration
            ready[name] = next(sources[name])
        except StopIteration:
            print(f"{name}: ended after {s.t} s")
            batch.remove(name)
        except (ValueError, OSError) as e:  # the readers' errors name the file
            print(f"{name}: left at second {s.t}: {e}")
            batch.remove(name)
    return ready


def keep_pace(batch, frames, start, counts):
    """--realtime: wait until the earliest stream's second is due (second t is ready at start + t + 1 s), then drop
    the seconds of the streams a whole second behind (they skip them, as the single-stream loop does)."""
    due = start + min(batch.streams[n].t for n in frames) + 1
    if (wait := due - time.monotonic()) > 0:
        time.sleep(wait)
    for name in list(frames):
        s = batch.streams[name]
        if time.monotonic() - start - (s.t + 1) >= 1:
            s.skip()
            counts[name][1] += 1
            del frames[name]


def run_many(batch, sources, args, outputs):
    """Step the batch until every stream has ended, paced by the wall clock with --realtime. Ctrl-C lets the second
    in progress finish and be written, then stops. Returns ({name: [seconds seen, skipped]}, stopped by Ctrl-C)."""
    start, counts = time.monotonic(), {name: [0, 0] for name in batch.streams}
    with stop_on_ctrl_c(threading.current_thread() is threading.main_thread()) as stop:
        while not stop and (frames := next_seconds(sources, batch, args.seconds)):
            if args.realtime:
                keep_pace(batch, frames, start, counts)
            if not frames:  # every stream skipped this second
                continue
            t0 = time.perf_counter()
            said = batch.step(frames)
            ms = (time.perf_counter() - t0) * 1000
            for name, text in said.items():
                s = batch.streams[name]
                counts[name][0] += 1
                outputs[name].write(s.t - 1, text, ms, s)
                print(f"{name} [{timestamp(s.t - 1)}] {text or '...':<50s} ({ms:.0f} ms for {len(said)} streams, "
                      f"cache {s.cache.length} tokens, max pos {s.cache.max_position()})", flush=True)
    return counts, bool(stop)


def check_args(ap, args):
    """One line, before anything loads, for what cannot work: --vtt/--jsonl beside --out, a loop that does not
    batch, two videos of one name, an --out that would land on an input (a video, the model) or cannot be written.
    Returns ({name: source}, the output folder)."""
    if args.vtt or args.jsonl:
        ap.error("--vtt and --jsonl write one video's commentary; with --out DIR (or several --video) each video's "
                 "goes to DIR/<name>.vtt and .jsonl: drop one of them")
    if args.policy not in BATCHED:
        ap.error(f"--policy {args.policy} does not batch (its loop or its cache's size is its own): stream one video "
                 f"without --out; several videos stream with {', '.join(BATCHED)}")
    try:
        names = stems(args.video)
    except ValueError as e:
        ap.error(str(e))
    out = args.out or "out/stream"
    inputs = [v for v in args.video if not is_live(v)] + [args.model]  # a camera or a URL is no file to clash with
    problems = [output_problem(out, inputs, holds=False, results=True)] + [
        file_problem(os.path.join(out, n + ext), inputs) for n in names for ext in (".vtt", ".jsonl")]
    if problem := next((p for p in problems if p), None):
        ap.error(f"--out {problem}")
    return names, out


def first_seconds(sources):
    """Each source with its first second read (it sizes the cache rows): {name: (first frames, the rest)}; a source
    without a whole second, or broken at its first, leaves with a line."""
    ready = {}
    for name, src in sources.items():
        try:
            first = next(src, None)
        except (ValueError, OSError) as e:
            print(f"{name}: left at second 0: {e}")
            continue
        if first is None:
            print(f"{name}: ended after 0 s (no whole second)")
            continue
        ready[name] = (first, itertools.chain([first], src))
    return ready


def main(args, ap):
    """stream.py's path for several videos (or --out): one batch, a row per video."""
    names, out = check_args(ap, args)
    settings = checkpoint_settings(args.model)
    try:
        layout = layout_of(settings, args)
    except ValueError as e:
        ap.error(str(e))
    try:
        with RunLock(out):  # one run at a time writes --out
            counts, outputs, stopped = serve_videos(args, names, out, settings, layout)
    except KeyboardInterrupt:  # Ctrl-C while loading, or twice
        print("stopped before the first second was written", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, RuntimeError) as e:  # the batch's own errors (a reader's leave with their stream)
        sys.exit(f"error: {e}")
    for n, (seen, skipped) in counts.items():
        print(f"{n}: {seen} seconds streamed" + (f", {skipped} skipped to keep up (--realtime)" if skipped else ""))
    if stopped:
        print("stopped: " + ", ".join(f"{n} at second {o.seconds}" for n, o in outputs.items())
              + "; outputs complete up to it", file=sys.stderr)
        sys.exit(130)  # the status of a process ended by SIGINT


def serve_videos(args, names, out, settings, layout):
    """Load, open, size the rows, stream; returns (counts, outputs, stopped by Ctrl-C). Outputs are closed here."""
    # files now (a missing one costs a line, not a model load), cameras and live URLs once the model is ready
    sources = {n: None if is_live(v) else open_seconds(v, layout.fps) for n, v in names.items()}
    print(f"model {args.model}")
    model, tok, settings = load_checkpoint(args.model, args.device, args.flexprefill, settings, args.fp8)
    sources = {n: src or open_seconds(names[n], layout.fps) for n, src in sources.items()}
    ready = first_seconds(sources)
    if not ready:
        sys.exit("error: none of the videos has a whole second to stream")
    # a cache row holds the steady state of the largest frames: each stream's first second sizes it
    capacity = max(steady_capacity(first, layout.fps, layout.text_sink, layout.text_window, layout.vision_window,
                                   (layout.min_pixels, layout.max_pixels), layout.evict_every)[1]
                   for first, _ in ready.values())
    decode = "graphs" if model.device.type == "cuda" else "plain"  # a CUDA graph's decode step on a GPU (as stream.py)
    batch, outputs, p = StreamBatch(model, tok, len(ready), capacity, decode=decode), {}, POLICIES[args.policy]
    os.makedirs(out, exist_ok=True)
    try:
        for n in ready:
            batch.add(n, evict=p.evict, reindex=p.reindex, previous_text=args.previous_text, **streamer_kwargs(layout))
            outputs[n] = Outputs(os.path.join(out, n + ".vtt"), os.path.join(out, n + ".jsonl"))
        print(f"layout: {vars(layout)}; {len(ready)} streams, a cache row of {capacity} tokens; commentary in {out}")
        sources = {n: ReadAhead(rest, batch.streams[n].prepare) for n, (_, rest) in ready.items()}
        counts, stopped = run_many(batch, sources, args, outputs)
    finally:
        for o in outputs.values():
            o.close()
    return counts, outputs, stopped
