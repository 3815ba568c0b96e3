"""
Frame sources, one second at a time: a folder of images, a GIF, or anything PyAV opens (a file, an rtsp:// or
http:// URL, a v4l2 camera such as /dev/video0).

Which frames a second is made of. StreamingVLM's streaming inference (mit-han-lab/streaming-vlm,
streaming_vlm/inference/inference.py) asks its reader (livecc_utils' decord reader in its strict-fps mode) once a
second for the frames of [s, s+1] and keeps the last FPS (2) of them. That reader
  - stamps every frame with the time it stops being shown: its pts plus its duration, from the stream's start;
  - takes the frames whose stop time lies inside the second;
  - lays sample instants 1/FPS apart, starting at the first of those stop times and ending at the last;
  - for each instant, takes the first frame whose stop time reaches it; and repeats the last frame taken until
    the count is even.
So, but for what happens exactly on a second's boundary (below), sample 0 of second s is the frame on screen
at instant s, and sample k is the first frame that stops at or after (the stop time of sample 0) + k/FPS. For a
constant r fps from t = 0 that is frames floor(s*r) and floor(s*r) + ceil(r/2): 30 fps -> 30s, 30s+15; 25 fps
-> 25s, 25s+13; 29.97 fps -> floor(29.97s), that + 15.

We use this rule with one change. Their window is closed at both ends, so at 30 or 25 fps, where a frame stops
exactly on every whole second, the seconds after the first hold three instants (s, s+1/2, s+1); padded to four
and cut to the last two, such a second is its last frame twice. We take the window (s, s+1], open at its start:
the same frames as theirs for the first second at any rate and for every second at 29.97 fps, and no frame is
used twice unless the source shows fewer than FPS frames a second (then the frame on screen is held, which is
what their padding does). A second that nothing stops inside (a frame shown for several seconds) is the frame
on screen, repeated.

Time comes from the container as exact fractions: a frame stops where the next one starts (the last one after
its own duration). A stream whose frames carry no timestamps at all (a raw .h264) is timed by frame index and
the stream's rate. A folder of images is taken as FPS frames a second, in natural order (frame2 < frame10); a GIF
is timed by its per-frame delays (100 ms where a frame has none, as browsers do).

Training reads a chunk of a long video at a time (read_seconds): it seeks to the keyframe before the chunk and
decodes only the chunk's seconds, with the same rule, time counted from the chunk's start (which may be
fractional). Times keep their origin at the stream's start, so a chunk read this way is the same frames as the
same seconds of a read from the beginning.

Every failure is a VideoError, "<source>: <what went wrong>", raised after the seconds that could be read were
yielded, so a caller keeps the part of a broken file that was good. Sizes are checked before they cost memory or
time: a frame larger than MAX_FRAME_PIXELS, a frame shown longer than MAX_GAP_S or past the container's stated
duration.
"""
import itertools
import os
import re
from fractions import Fraction

from PIL import Image, ImageSequence

from cli import is_live  # a URL or a camera (cli.py, whose inputs_of asks it too)
from layout import FPS
from processor import to_rgb_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
GIF_DEFAULT_MS = 100  # a GIF frame without a delay is shown this long (the browsers' convention)
URL_TIMEOUT_S = 30    # a network source silent this long is an error rather than a hang
MAX_FRAME_PIXELS = 7680 * 4320  # 8K: a larger frame (a GIF declaring 65535 x 65535) is refused before it is decoded
MAX_GAP_S = 3600      # a frame shown longer than this (a timestamp 1e9 s ahead) is an error, not decades of frames


class VideoError(ValueError):
    """A frame source that cannot be read, or stopped being readable: "<source>: <what went wrong>"."""


def open_video(path, fps=FPS):
    """Frames (PIL RGB) of a source, `fps` per second by the rule above. Returns an iterator; a source that
    cannot be opened raises VideoError here, one that breaks later raises it where the iteration stops."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _folder_frames(path)
    if is_live(path):
        return _av_source(path, fps)
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file or folder")
    if path.lower().endswith(IMAGE_EXTS):
        raise VideoError(f"{path}: an image, not a video (a folder of images is read as {fps} frames a second)")
    if path.lower().endswith(".gif"):
        return _gif_source(path, fps)
    return _av_source(path, fps)


def seconds_of(frames, fps=FPS):
    """Group a frame iterator into lists of `fps` frames: one list per second; a short tail is dropped."""
    chunk = []
    for f in frames:
        chunk.append(f)
        if len(chunk) == fps:
            yield chunk
            chunk = []


def read_seconds(path, start, n, fps=FPS):
    """Seconds [start, start + n) of a local video as n lists of `fps` frames (PIL RGB), chosen by the rule above
    with time counted from `start` (seconds from the stream's start; fractional is fine); fewer lists when the
    video ends first. A file PyAV reads is entered by seeking, and decoding stops after the last second asked for,
    so memory and time do not grow with the video's length; a folder of images or a GIF is read from its start."""
    path = os.fspath(path)
    start = Fraction(str(start))  # exact: 12.3 is 123/10, so a frame stopping at 13.3 s is in the first second
    if start < 0 or n < 0:
        raise VideoError(f"{path}: cannot read {n} seconds from {float(start)} s")
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file or folder")
    if os.path.isdir(path):  # a folder's frames are FPS a second: frame i stops at (i + 1) / FPS
        timed = ((Fraction(i + 1, fps), f) for i, f in enumerate(_folder_frames(path)))
    elif path.lower().endswith(".gif"):
        timed = _gif_timed(path, _gif_open(path, fps))
    else:
        timed = _av_timed(path, _av_open(path), start)
    later = ((stop - start, frame) for stop, frame in timed if stop > start)  # frames gone by `start` are not seen
    frames = (_rgb(f) if hasattr(f, "to_image") else f for f in _per_second(later, fps))
    return list(itertools.islice(seconds_of(frames, fps), n))  # the generators (and the file) close on return


def _per_second(timed, fps):
    """(stop time, frame) pairs, stop times increasing -> `fps` frames for every second (module docstring).
    Frames go out as soon as they are chosen, so a live source is not held back by a second."""
    step = Fraction(1, fps)
    sec, n, first_stop, last = 0, 0, None, None  # the second being filled, frames chosen for it, ...
    for stop, frame in timed:
        while stop > sec + 1:  # `frame` is still on screen when second `sec` is over: finish that second
            yield from [last if n else frame] * (fps - n)
            sec, n = sec + 1, 0
        while n < fps and (n == 0 or stop >= first_stop + n * step):
            first_stop = stop if n == 0 else first_stop
            yield frame
            last, n = frame, n + 1
        if stop == sec + 1:  # nothing later can stop inside this second: finish it now, not at the next frame
            yield from [last] * (fps - n)
            sec, n = sec + 1, 0


# -----------------------------------------------------------------------------
# folders and GIFs (PIL)


def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _folder_frames(path):
    names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTS)), key=_natural_key)
    if not names:
        raise VideoError(f"{path}: holds no {'/'.join(IMAGE_EXTS)} images")
    return (_read_image(os.path.join(path, n)) for n in names)


def check_size(path, width, height):
    if width * height > MAX_FRAME_PIXELS:
        raise VideoError(f"{path}: frames of {width} x {height} pixels are larger than the limit of "
                         f"{MAX_FRAME_PIXELS:,} (video.MAX_FRAME_PIXELS, 8K)")


def _read_image(file):
    try:
        with Image.open(file) as im:
            check_size(file, *im.size)  # from the header, before the pixels are decoded
            im.load()  # read the pixels before the file closes (to_rgb_image may return `im` itself)
            return to_rgb_image(im)
    except VideoError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise VideoError(f"{file}: cannot read the image ({e})") from None


def _gif_source(path, fps):
    return _per_second(_gif_timed(path, _gif_open(path, fps)), fps)


def _gif_open(path, fps):
    try:
        im = Image.open(path)
        n_frames = getattr(im, "n_frames", 1)
    except (OSError, ValueError, EOFError, IndexError, Image.DecompressionBombError) as e:  # (IndexError: cut short)
        raise VideoError(f"{path}: cannot read the GIF ({e or type(e).__name__})") from None
    check_size(path, *im.size)
    if n_frames == 1 and not im.info.get("duration"):
        im.close()
        raise VideoError(f"{path}: a one-frame GIF with no frame delay has no length to read at {fps} frames a "
                         "second (give the frame a delay, or pass the image to the processor as an image)")
    return im


def _gif_timed(path, im):
    stop, i = Fraction(0), 0
    with im:
        try:
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                stop += Fraction(frame.info.get("duration") or GIF_DEFAULT_MS) / 1000
                rgb = to_rgb_image(frame)
                yield stop, (rgb.copy() if rgb is frame else rgb)  # the iterator reuses `frame` for the next one
        except (OSError, ValueError, EOFError, IndexError, Image.DecompressionBombError) as e:
            raise VideoError(f"{path}: cannot read frame {i} of the GIF ({e or type(e).__name__})") from None


# -----------------------------------------------------------------------------
# everything else (PyAV)


def _av_source(path, fps):
    return (_rgb(f) for f in _per_second(_av_timed(path, _av_open(path)), fps))


def _rgb(frame):
    """A decoded PyAV frame as a PIL RGB image, converted on this thread. Since PyAV 17 the conversion runs on a pool
    of slice threads, and in a DataLoader worker (a fork of the training process, which has threads of its own)
    they can wait forever on a lock the fork copied held (seen with PyAV 18.1). An older PyAV has no pool and takes
    no `threads`."""
    try:
        return frame.to_image(threads=1)
    except TypeError:
        return frame.to_image()


def _av_open(path):
    try:
        import av
    except ImportError:
        raise VideoError(f"{path}: reading it needs PyAV (pip install av); a folder of images or a GIF needs "
                         "nothing") from None
    try:
        if path.startswith("/dev/video"):
            container = av.open(path, format="v4l2")
        elif "://" in path:
            container = av.open(path, timeout=URL_TIMEOUT_S)
        else:
            container = av.open(path)
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: cannot open it ({getattr(e, 'strerror', None) or e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream")
    cc = container.streams.video[0].codec_context
    try:
        check_size(path, cc.width or 0, cc.height or 0)
    except VideoError:
        container.close()
        raise
    return container


def _av_timed(path, container, start=0):
    """(stop time, frame) of the container's first video stream; the container is closed at the end. With a
    `start` (s) the container first seeks to the keyframe at or before start - 1 s (the margin covers frames
    reordered around the keyframe; they are decoded and dropped), and times still count from the stream's start."""
    with container:
        stream = container.streams.video[0]
        origin = None  # None: time counts from the first decoded frame (a read from the beginning)
        if start > 0 and stream.start_time is not None and stream.time_base:
            origin = stream.start_time * stream.time_base
            container.seek(max(0, int((origin + start - 1) / stream.time_base)), stream=stream)
        yield from _timed_frames(path, stream, _decode(path, container, stream), origin)


def _decode(path, container, stream):
    import av
    n = 0
    try:
        for frame in container.decode(stream):
            n += 1
            yield frame
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: decoding stopped after {n} frames ({getattr(e, 'strerror', None) or e})") from None


def _timed_frames(path, stream, frames, origin=None):
    """Decoded frames -> (stop time, frame), times in exact seconds from `origin` (default: the first frame). A
    frame stops where the next one starts; the last one after its own duration (else the gap before it, else
    1 / rate)."""
    rate = stream.average_rate or stream.guessed_rate
    gap = 1 / Fraction(rate) if rate else None
    # the stream's stated length (plus a margin), when it states one: no frame may start or stop after it
    length, unit = getattr(stream, "duration", None), getattr(stream, "time_base", None)
    stated = length * unit + 1 if length and unit else None
    held, indexed = None, False  # held: (start, frame) waiting for the next frame's start
    for i, frame in enumerate(frames):
        if i == 0 and frame.pts is None:  # no timestamps at all (a raw .h264): frame i starts at i / rate
            if gap is None:
                raise VideoError(f"{path}: its frames carry no timestamps and it states no frame rate")
            indexed = True
        if indexed:
            start = i * gap
        elif frame.pts is None:
            raise VideoError(f"{path}: frame {i} has no timestamp (pts), though the frames before it had")
        else:
            start = frame.pts * (frame.time_base or stream.time_base)
            origin = start if origin is None else origin
            start -= origin
        if held is not None:
            if start < held[0]:
                raise VideoError(f"{path}: timestamps go backwards at frame {i} ({float(start):.3f} s after "
                                 f"{float(held[0]):.3f} s)")
            if start > held[0]:  # (a frame sharing its start with the next is never on screen: dropped)
                gap = start - held[0]
                check_gap(path, i, held[0], start, stated)
                yield start, held[1]
        held = (start, frame)
    if held is None:
        raise VideoError(f"{path}: no video frames could be decoded")
    last = held[1]
    length = last.duration * (last.time_base or stream.time_base) if last.duration else gap
    if not length:
        raise VideoError(f"{path}: cannot tell how long its only frame lasts (no duration, no frame rate)")
    check_gap(path, i, held[0], held[0] + length, stated)
    yield held[0] + length, last


def check_gap(path, i, shown, next_start, stated):
    """A VideoError when frame i - 1, shown at `shown` s, would stay on screen until `next_start` s: longer than
    MAX_GAP_S, or over 10 s and past the stream's `stated` length (s, None when it states none; a header a little
    off is common, a held frame past the end of the stream is not)."""
    held = next_start - shown
    if held > MAX_GAP_S or (stated is not None and held > 10 and next_start > stated):
        limit = f"the stream states {float(stated - 1):.3f} s" if stated is not None else f"the limit is {MAX_GAP_S} s"
        raise VideoError(f"{path}: the timestamps jump from {float(shown):.3f} s to {float(next_start):.3f} s at "
                         f"frame {i}; {limit} (video.MAX_GAP_S)")
