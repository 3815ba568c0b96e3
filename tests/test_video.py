"""Frame sources (video.py) and image modes (processor.to_rgb_image). Videos are written with PyAV, each frame a
solid colour that encodes its index, so a test can tell exactly which source frames a second was made of."""
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from processor import to_rgb_image
from video import VideoError, _timed_frames, open_video, seconds_of

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")

W, H = 64, 48


def colour(i):
    """Frame index -> an RGB colour with 32 levels between codes (lossy H.264 moves a channel by a few)."""
    return (i % 8 * 32 + 16, i // 8 % 8 * 32 + 16, i // 64 * 32 + 16)


def index_of(img):
    r, g, b = img.convert("RGB").getpixel((W // 2, H // 2))
    return sum(round((c - 16) / 32) * m for c, m in ((r, 1), (g, 8), (b, 64)))


def encode(path, rate, n, options=None):
    fmt = "h264" if str(path).endswith(".h264") else None
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(n):
            img = np.empty((H, W, 3), np.uint8)
            img[:] = colour(i)
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    return path


def chosen(path):
    return [[index_of(f) for f in sec] for sec in seconds_of(open_video(path))]


def rule(rate, n):
    """The reader's choice at a constant rate r from t=0, computed from frame indices alone: second s is frames
    floor(s*r) and floor(s*r) + ceil(r/2), while the video lasts."""
    out, s = [], 0
    while math.floor(s * rate) + math.ceil(rate / 2) < n:
        j = math.floor(s * rate)
        out.append([j, j + math.ceil(rate / 2)])
        s += 1
    return out


RATES = [30, Fraction(30000, 1001), 25]


@pytest.mark.parametrize("rate", RATES, ids=["30", "29.97", "25"])
def test_frames_per_second_follow_the_rule(tmp_path, rate):
    n = int(6 * rate) + 3
    got = chosen(encode(tmp_path / "v.mp4", rate, n))
    assert got == rule(rate, n) and len(got) == 6
    flat = [j for sec in got for j in sec]
    assert len(set(flat)) == len(flat)  # no frame used twice


def authors_choice(stops, s, fps=2):
    """The StreamingVLM reader restated on decord-style float32 stop times: the frames stopping in [s, s+1],
    instants every 1/fps from the first stop to the last, the first frame reaching each, padded to even, last 2."""
    idx = np.nonzero((s <= stops) & (stops <= s + 1))[0]
    instants = np.arange(stops[idx[0]], stops[idx[-1]] + 1e-6, 1 / fps)
    picks = [int(idx[np.argmax(stops[idx] >= t)]) for t in instants]
    picks += picks[-1:] * (len(picks) % 2)
    return picks[-fps:]


@pytest.mark.parametrize("rate", RATES, ids=["30", "29.97", "25"])
def test_same_frames_as_the_authors_reader(tmp_path, rate):
    path = encode(tmp_path / "v.mp4", rate, int(6 * rate) + 3)
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        packets = sorted((p.pts, p.duration) for p in c.demux(st) if p.pts is not None)
        stops = np.array([float((p + d - (st.start_time or 0)) * st.time_base) for p, d in packets], np.float32)
    ours = chosen(path)
    theirs = [authors_choice(stops, s) for s in range(len(ours))]
    assert ours[0] == theirs[0]
    if rate == 30 or rate == 25:  # a frame stops exactly on each second: their closed window repeats the last
        assert all(t == [round(rate * (s + 1)) - 1] * 2 for s, t in enumerate(theirs[1:], 1))
    else:
        assert ours == theirs


def test_raw_h264_without_timestamps_uses_the_rate(tmp_path):
    path = encode(tmp_path / "v.h264", 25, 80)
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).pts is None  # the case under test: no timestamps at all
    assert chosen(path) == rule(25, 80)


def gif(path, durations):
    frames = [Image.new("RGB", (W, H), colour(i)) for i in range(len(durations))]
    kw = {} if durations[0] is None else dict(duration=durations)
    frames[0].save(path, save_all=True, append_images=frames[1:], **kw)
    return path


def test_gif_frame_delays_including_the_last(tmp_path):
    # stops at 0.5, 0.75, 1.0, 2.0 s: second 0 is the frame showing at 0 and the first to stop at 0.5 + 0.5;
    # second 1 is the last frame, shown through all of it (its 1 s delay counts)
    assert chosen(gif(tmp_path / "a.gif", [500, 250, 250, 1000])) == [[0, 2], [3, 3]]
    assert chosen(gif(tmp_path / "b.gif", [1000])) == [[0, 0]]


def test_one_frame_gif_without_a_delay(tmp_path):
    path = gif(tmp_path / "c.gif", [None])
    with pytest.raises(VideoError, match=rf"^{path}: a one-frame GIF with no frame delay"):
        open_video(path)


@pytest.mark.parametrize("url", ["rtsp://127.0.0.1:9/live", "http://127.0.0.1:9/v.mp4", "/dev/video99"])
def test_urls_and_devices_go_to_pyav(url):
    with pytest.raises(VideoError, match=rf"^{url}: cannot open it \("):
        open_video(url)


def test_image_and_missing_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(VideoError, match=rf"^{tmp_path / 'x.png'}: an image, not a video"):
        open_video(tmp_path / "x.png")
    with pytest.raises(VideoError, match=rf"^{tmp_path / 'nope.mp4'}: no such file or folder$"):
        open_video(tmp_path / "nope.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoError, match=rf"^{tmp_path / 'junk.mp4'}: cannot open it"):
        open_video(tmp_path / "junk.mp4")


def test_no_video_stream(tmp_path):
    path = str(tmp_path / "a.wav")
    with av.open(path, "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with pytest.raises(VideoError, match=rf"^{path}: holds no video stream$"):
        open_video(path)


def test_corrupt_tail_keeps_the_seconds_before_it(tmp_path):
    path = encode(tmp_path / "v.mp4", 30, 300, options={"movflags": "faststart"})  # index first, frames after
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(VideoError, match=rf"^{path}: decoding stopped after \d+ frames"):
        for sec in seconds_of(open_video(path)):
            got.append([index_of(f) for f in sec])
    assert len(got) >= 2 and got == rule(30, 300)[: len(got)]


def fake_frames(pts_list, duration=1):
    return [SimpleNamespace(pts=p, time_base=Fraction(1, 10), duration=duration) for p in pts_list]


def test_bad_timestamps():
    stream = SimpleNamespace(average_rate=10, guessed_rate=None, time_base=Fraction(1, 10))
    out = []
    with pytest.raises(VideoError, match=r"^x.mp4: frame 2 has no timestamp"):
        out.extend(_timed_frames("x.mp4", stream, iter(fake_frames([0, 1, None, 3]))))
    assert [t for t, _ in out] == [Fraction(1, 10)]  # frame 0 stopped where frame 1 began; the rest is lost
    with pytest.raises(VideoError, match=r"^x.mp4: timestamps go backwards at frame 2"):
        list(_timed_frames("x.mp4", stream, iter(fake_frames([0, 5, 3]))))
    with pytest.raises(VideoError, match=r"^x.mp4: no video frames could be decoded$"):
        list(_timed_frames("x.mp4", stream, iter([])))
    no_rate = SimpleNamespace(average_rate=None, guessed_rate=None, time_base=None)
    with pytest.raises(VideoError, match=r"^x.mp4: its frames carry no timestamps and it states no frame rate"):
        list(_timed_frames("x.mp4", no_rate, iter(fake_frames([None, None]))))


# ---- folders of images, and image modes ---------------------------------------------------------------------


def test_folder_natural_order_16bit_and_a_broken_image(tmp_path):
    for i in range(5):  # frame2 must come before frame10; 16-bit grey levels i * 4096
        Image.fromarray(np.full((H, W), i * 4096, np.uint16)).save(tmp_path / f"frame{[0, 2, 10, 11, 12][i]}.png")
    (tmp_path / "frame13.png").write_bytes(b"broken")
    got = []
    with pytest.raises(VideoError, match=rf"^{tmp_path / 'frame13.png'}: cannot read the image"):
        for sec in seconds_of(open_video(tmp_path)):
            got.append([f.getpixel((0, 0))[0] for f in sec])
    assert got == [[0, 16], [32, 48]]  # 4096 / 257 = 15.9 -> 16; the fifth frame is a short tail


def rgb(img):
    out = to_rgb_image(img)
    assert out.mode == "RGB"
    return out.getpixel((0, 0))


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    mid = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert mid.mode == "I;16"
    assert rgb(mid) == (128, 128, 128)  # PIL's own convert would give white
    assert rgb(mid.convert("I")) == (128, 128, 128)
    assert rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16))) == (255, 255, 255)
    mid.save(tmp_path / "g.png")  # a real 16-bit PNG from disk
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode in ("I;16", "I") and rgb(im) == (128, 128, 128)


def test_palette_grey_alpha_and_cmyk_modes():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    assert [to_rgb_image(p).getpixel((x, 0)) for x in (0, 1)] == [(255, 0, 0), (0, 0, 255)]
    p.info["transparency"] = 0  # palette index 0 is transparent: white, like the other alpha modes
    assert [to_rgb_image(p).getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (0, 0, 255)]
    assert rgb(Image.new("L", (1, 1), 100)) == (100, 100, 100)
    assert rgb(Image.new("LA", (1, 1), (100, 0))) == (255, 255, 255)
    assert rgb(Image.new("LA", (1, 1), (100, 255))) == (100, 100, 100)
    assert rgb(Image.new("RGBA", (1, 1), (255, 0, 0, 255))) == (255, 0, 0)
    assert rgb(Image.new("RGBA", (1, 1), (255, 0, 0, 0))) == (255, 255, 255)
    assert rgb(Image.new("CMYK", (1, 1), (255, 0, 0, 0))) == (0, 255, 255)  # pure cyan
    assert rgb(Image.new("1", (1, 1), 1)) == (255, 255, 255)
    assert to_rgb_image(torch.full((1, 1, 3), 7, dtype=torch.uint8)).getpixel((0, 0)) == (7, 7, 7)
