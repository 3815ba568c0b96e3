"""
Frame sources, one second at a time: a folder of images, a GIF, or anything PyAV opens (a file, a URL, a camera).

A stream is read at FPS (2) frames a second: the frame showing at each instant k / FPS is kept (the last one at or
before it), and the frames are grouped into seconds of FPS frames each, one temporal patch of the vision tower.
"""
import os

from layout import FPS


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
