"""--data in StreamingVLM's training format (Inf-Stream-Train, LiveCC's JSONL with a seeks file beside it): how words
and questions map to seconds, seeks versus a scan, lazy per-chunk decoding, the one-line errors, and a short run.
Videos are written with PyAV, each frame a colour that encodes its index (test_video.colour), so a test can tell
which source frames a chunk was made of."""
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

import video
from data import DataError, build_sample, make_tokenizer
from records import JsonlSamples, parse_record, questions_by_second, words_by_second
from test_video import colour, index_of

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = SimpleNamespace(chunk_seconds=4, text_sink=16, text_window=16, min_pixels=4 * 28 * 28, max_pixels=4 * 28 * 28)
WORDS = [[0.2, 0.6, "Red"], [0.6, 1.4, "shoots"], [2.1, 2.5, "and"], [2.5, 2.9, "scores!"]]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def encode(path, rate, seconds, gop=None, size=(64, 48)):
    """An mp4 of `seconds` at `rate` fps; frame i has colour(i % 512); `gop` frames between keyframes."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = *size, "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
        img = np.empty((size[1], size[0], 3), np.uint8)
        for i in range(int(seconds * rate)):
            img[:] = colour(i % 512)
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    return str(path)


def authors_line(video, start, end, words=WORDS, previous="Kick-off.", qa=None):
    stream = {"type": "text_stream", "text_stream": words}
    if qa:
        stream["qa_stream"] = qa
    return [{"role": "user", "content": [
                {"type": "video", "video": video, "video_start": start, "video_end": end},
                {"type": "text", "text": "Commentate.", "previous": previous, "title": "t", "category": "c"}]},
            {"role": "assistant", "content": [stream]}]


def write_jsonl(path, records, seeks=True):
    """The records one a line, and (seeks=True) the authors' <stem>_seeks.jsonl of their byte offsets."""
    lines = [(r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records]
    with open(path, "w") as f:
        f.writelines(lines)
    if seeks:
        offsets = [sum(len(x.encode()) for x in lines[:i]) for i in range(len(lines))]
        with open(str(path).replace("_with_seeks", "").rsplit(".jsonl", 1)[0] + "_seeks.jsonl", "w") as f:
            json.dump(offsets, f)
    return str(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("v") / "clip.mp4", 10, 12)


def same(a, b):
    return (a.ids.tolist() == b.ids.tolist() and a.labels.tolist() == b.labels.tolist()
            and a.pixel_values.equal(b.pixel_values) and a.grid_thw.equal(b.grid_thw))


# -----------------------------------------------------------------------------
# words, questions and seconds


def test_words_go_to_the_first_second_that_ends_after_them():
    words = [(0.0, 0.3, "early"), (1.0, 1.5, " a "), (1.5, 1.6, "b"), (2.0, 2.6, "c"), (1.7, 2.0, "d"),
             (8.0, 9.0, "late")]
    # seconds from 0.5 end at 1.5, 2.5, 3.5: "early" ended before the start (first second), "a" ends on the edge,
    # "c" ends after 2.5 and holds back "d" (in order, as the authors walk them), "late" is past the chunk
    assert words_by_second(words, 0.5, 3) == [" early a", " b", " c d"]
    assert words_by_second([], 0, 2) == ["", ""]


def test_questions_go_after_the_second_they_fall_in():
    qs = [(1.5, "Who?", "Red."), (2.0, "Score?", "1-0."), (0.0, "Before?", "-"), (5.0, "After?", "-")]
    assert questions_by_second(qs, 0.0, 3) == {1: [("Who?", "Red."), ("Score?", "1-0.")]}


def test_qa_stream_entry_becomes_a_question_turn(tok, clip):
    line = authors_line(clip, 0.0, 3.0, qa=[[0, 1.5, "Who shot?", "Red."]])
    rec = parse_record(json.dumps(line), "x:1")
    assert rec.questions == [(1.5, "Who shot?", "Red.")] and rec.previous == "Kick-off."
    sample = JsonlSamples(write_jsonl(os.path.join(os.path.dirname(clip), "qa_with_seeks.jsonl"), [line]), tok,
                          CFG, log=lambda m: None)[0]
    text = tok.decode(sample.ids)
    turn = "<|im_start|>user\nWho shot?<|im_end|>\n<|im_start|>assistant\n Red.<|im_end|>"
    assert text.index("Time=1.0-2.0s") < text.index(turn) < text.index("Time=2.0-3.0s")
    supervised = tok.decode([i for i in sample.labels.tolist() if i >= 0])
    assert supervised == " Red ...<|im_end|> shoots ...<|im_end|> Red.<|im_end|> and scores! ...<|im_end|>"


def test_fractional_start_counts_seconds_from_it(tok, clip):
    secs = video.read_seconds(clip, 2.5, 2)
    assert [[index_of(f) for f in s] for s in secs] == [[25, 30], [35, 40]]  # on screen at 2.5, 3.0, 3.5, 4.0
    words = [[2.6, 3.0, "one"], [3.1, 3.5, "two"], [3.6, 4.4, "three"]]
    line = authors_line(clip, 2.5, 4.5, words, previous="")
    s = JsonlSamples(write_jsonl(os.path.join(os.path.dirname(clip), "frac_with_seeks.jsonl"), [line]), tok, CFG,
                     log=lambda m: None)[0]
    assert same(s, build_sample(tok, secs, [" one two", " three"], 2.5, [], 16, 16, (CFG.min_pixels,) * 2))
    assert "Time=2.5-3.5s" in tok.decode(s.ids) and "Time=3.5-4.5s" in tok.decode(s.ids)


def test_our_format_and_theirs_make_the_same_chunk(tok, clip, tmp_path):
    ours = {"video": clip, "start": 1, "end": 5, "words": WORDS[1:], "previous": "Kick-off."}
    root = os.path.dirname(clip)  # records name videos inside the video root only
    a = JsonlSamples(write_jsonl(tmp_path / "ours.jsonl", [ours], seeks=False), tok, CFG, root, log=lambda m: None)
    b = JsonlSamples(write_jsonl(tmp_path / "b_with_seeks.jsonl", [authors_line(clip, 1.0, 5.0, WORDS[1:])]), tok,
                     CFG, root, log=lambda m: None)
    assert same(a[0], b[0])


# -----------------------------------------------------------------------------
# the index: seeks file or scan, zero-byte videos


def test_seeks_and_scan_give_the_same_samples(tok, clip, tmp_path):
    recs = [authors_line(clip, s, s + 4) for s in (0.0, 3.5, 7.0)]
    path = write_jsonl(tmp_path / "d_with_seeks.jsonl", recs)
    said = []
    seeked = JsonlSamples(path, tok, CFG, os.path.dirname(clip), log=said.append)
    assert said == [] and len(seeked) == 3
    os.remove(tmp_path / "d_seeks.jsonl")
    with open(path, "a") as f:  # LiveCC keeps its seek index as the file's last line: not a record
        f.write("\n" + json.dumps([0, 1, 2]) + "\n")
    scanned = JsonlSamples(path, tok, CFG, os.path.dirname(clip), log=said.append)
    assert said == [f"{path}: no d_seeks.jsonl beside it; scanning the file for line offsets"]
    assert list(scanned.offsets) == list(seeked.offsets) and len(scanned) == 3
    assert all(same(seeked[i], scanned[i]) for i in range(3))


def test_zero_byte_videos_are_skipped_and_counted(tok, clip, tmp_path):
    open(tmp_path / "empty.mp4", "w").close()
    shutil.copy(clip, tmp_path / "clip.mp4")  # a video inside the root (the JSONL's folder)
    recs = [authors_line("empty.mp4", 0, 4), authors_line("clip.mp4", 0, 4), authors_line("empty.mp4", 2, 6)]
    said = []
    data = JsonlSamples(write_jsonl(tmp_path / "z_with_seeks.jsonl", recs), tok, CFG, log=said.append)
    assert said == [f"{tmp_path}/z_with_seeks.jsonl: skipped 2 zero-byte videos"]
    assert len(data) == 1 and list(data.lines) == [2]


def test_video_root(tok, clip, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [authors_line("clip.mp4", 0, 4)])
    with pytest.raises(DataError, match=r"r.jsonl:1: video clip.mp4 not found \(looked for .*/clip.mp4\)"):
        JsonlSamples(path, tok, CFG, log=lambda m: None)
    assert len(JsonlSamples(path, tok, CFG, video_root=os.path.dirname(clip), log=lambda m: None)) == 1


# -----------------------------------------------------------------------------
# errors: one line, naming the file and line


@pytest.mark.parametrize("line, why", [
    ("{not json", r"bad.jsonl:2: not JSON \(Expecting property name"),
    ([{"role": "user", "content": []}], r"bad.jsonl:2: not a valid record \(a list line is \[user, assistant\]"),
    ([{"role": "user", "content": [{"type": "video", "video": "clip.mp4", "video_start": 0, "video_end": 4}]},
      {"role": "assistant", "content": [{"type": "text"}]}], r"bad.jsonl:2: no 'text_stream' where"),
    ({"video": "clip.mp4", "start": 3, "end": 3.5, "words": []}, r"bad.jsonl:2: start 3 s, end 3.5 s do not span"),
    ({"video": "clip.mp4", "start": 0, "end": 4, "words": [[1, "a"]]}, r"bad.jsonl:2: .*a word is \[start, end"),
    (authors_line("gone.mp4", 0, 4), r"bad.jsonl:2: video gone.mp4 not found"),
])
def test_a_bad_line_is_named(tok, clip, tmp_path, line, why):
    shutil.copy(clip, tmp_path / "clip.mp4")  # a copy: a symlink out of the root is refused
    path = write_jsonl(tmp_path / "bad.jsonl", [authors_line("clip.mp4", 0, 4), line])
    with pytest.raises(DataError, match=why) as e:
        JsonlSamples(path, tok, CFG, log=lambda m: None)
    assert "\n" not in str(e.value)


def test_bad_seeks_file(tok, clip, tmp_path):
    shutil.copy(clip, tmp_path / "clip.mp4")
    path = write_jsonl(tmp_path / "s_with_seeks.jsonl", [authors_line("clip.mp4", 0, 4)] * 2)
    for seeks, why in [("[0, 7]", "offset 7 (record 2) is not the start of a line"),
                       ('{"a": 1}', "a seek index is one JSON list"), ("[0,", "cannot read the seek index")]:
        (tmp_path / "s_seeks.jsonl").write_text(seeks)
        with pytest.raises(DataError, match=r"s_seeks.jsonl: " + re.escape(why)):
            JsonlSamples(path, tok, CFG, log=lambda m: None)


# -----------------------------------------------------------------------------
# lazy decoding


@pytest.mark.parametrize("rate", [30, 25, 10])
def test_read_seconds_is_a_read_from_the_start(tmp_path, rate):
    path = encode(tmp_path / "v.mp4", rate, 16, gop=rate // 2)
    full = [[index_of(f) for f in s] for s in video.seconds_of(video.open_video(path))]
    for start in (0, 1, 5, 13):
        assert [[index_of(f) for f in s] for s in video.read_seconds(path, start, 3)] == full[start:start + 3]
    assert len(video.read_seconds(path, 14, 10)) == 2  # the video ends first


def test_only_the_chunk_is_decoded(tok, tmp_path, monkeypatch):
    """A 24 s chunk 5 minutes into a 10-minute video decodes about 24 s of frames, not the video: the reader seeks
    (to the keyframe before start - 1 s) and stops after the chunk."""
    path = encode(tmp_path / "long.mp4", 5, 600, gop=10)
    decoded, real = [], video._decode

    def counting(*a):
        for frame in real(*a):
            decoded.append(frame.pts)
            yield frame
    monkeypatch.setattr(video, "_decode", counting)
    cfg = SimpleNamespace(**{**vars(CFG), "chunk_seconds": 24})
    data = JsonlSamples(write_jsonl(tmp_path / "l_with_seeks.jsonl", [authors_line(path, 300.0, 330.0)]), tok, cfg)
    assert len(data[0].grid_thw) == 24
    assert 24 * 5 <= len(decoded) <= (24 + 1) * 5 + 10 + 2, len(decoded)  # + the 1 s margin, a keyframe gap, 2


def test_memory_does_not_grow_with_the_video(tmp_path):
    """Peak RSS (ru_maxrss) of a process that builds chunks from a 1-minute and from a 20-minute video."""
    peaks = {}
    for minutes in (1, 20):
        path = encode(tmp_path / f"v{minutes}.mp4", 5, minutes * 60, gop=10, size=(160, 120))
        out = subprocess.run([sys.executable, "-c", RSS, path, str(minutes * 60)], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        peaks[minutes] = json.loads(out)["grew_kb"]
    assert peaks[20] < peaks[1] + 20_000, peaks  # 20 minutes of 160x120 frames, 2 a second, are 138 MB


RSS = """
import json, resource, sys
from types import SimpleNamespace
from data import make_tokenizer
from records import JsonlSamples
path, seconds = sys.argv[1], int(sys.argv[2])
line = lambda s: [{"role": "user", "content": [{"type": "video", "video": path, "video_start": s,
                  "video_end": s + 24}]}, {"role": "assistant", "content": [{"type": "text_stream",
                  "text_stream": [[s + 0.5, s + 1.0, "hi"]]}]}]
with open(path + ".jsonl", "w") as f:
    f.writelines(json.dumps(line(s)) + "\\n" for s in (0, seconds // 2, seconds - 30))
cfg = SimpleNamespace(chunk_seconds=24, text_sink=16, text_window=16, min_pixels=3136, max_pixels=3136)
data = JsonlSamples(path + ".jsonl", make_tokenizer(), cfg, log=lambda m: None)
data[0]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for i in range(len(data)):
    data[i]
print(json.dumps(dict(before_kb=before, grew_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)))
"""


# -----------------------------------------------------------------------------
# train.py --data


def run_train(tmp_path, data, *extra):
    from train import main
    return main(["--data", data, "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2",
                 "--eval-every", "2", "--eval-chunks", "1", "--chunk-seconds", "3", "--text-sink", "16",
                 "--text-window", "16", "--overlap", "1", "--workers", "1", *extra])


def test_train_two_steps_on_the_authors_format(tmp_path, clip, capsys):
    shutil.copy(clip, tmp_path / "clip.mp4")  # a copy: a symlink out of the root is refused
    recs = [authors_line("clip.mp4", s, s + 3, qa=[[0, s + 2.5, "Who shot?", "Red."]]) for s in (0.0, 4.5, 8.0)]
    history = run_train(tmp_path, write_jsonl(tmp_path / "train_with_seeks.jsonl", recs))
    assert len(history) == 2 and all(h == h for h in history)
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_resume_on_other_data_contents_is_refused(tmp_path, clip):
    """--resume compares the --data file's contents (size, its ends' hash), not only its path: a file rewritten
    between the parts would silently train the rest of the schedule on other records."""
    shutil.copy(clip, tmp_path / "clip.mp4")
    path = write_jsonl(tmp_path / "r_with_seeks.jsonl", [authors_line("clip.mp4", s, s + 3) for s in (0.0, 4.5)])
    run_train(tmp_path, path, "--stop-at", "1")
    write_jsonl(tmp_path / "r_with_seeks.jsonl", [authors_line("clip.mp4", s, s + 3) for s in (1.0, 5.5)])
    with pytest.raises(SystemExit, match=r"--resume with other settings .*r_with_seeks.jsonl's contents \(\d+ bytes"):
        run_train(tmp_path, path, "--resume")


def test_train_stops_with_one_line_on_a_broken_video(tmp_path, clip):
    """A record whose video exists but does not decode passes the check at the start and fails in a DataLoader
    worker: the run stops with that record's file:line, not the worker's traceback."""
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 100)
    shutil.copy(clip, tmp_path / "clip.mp4")
    path = write_jsonl(tmp_path / "b_with_seeks.jsonl", [authors_line("clip.mp4", 0, 3),
                                                         authors_line("broken.mp4", 0, 3)])
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, path)
    assert str(e.value).startswith(f"{path}:2: {tmp_path}/broken.mp4: cannot open it")
    assert "\n" not in str(e.value)


def test_train_names_a_malformed_line(tmp_path, clip):
    shutil.copy(clip, tmp_path / "clip.mp4")
    path = write_jsonl(tmp_path / "m_with_seeks.jsonl", [authors_line("clip.mp4", 0, 3), "[1, 2"])
    with pytest.raises(SystemExit, match=r"m_with_seeks.jsonl:2: not JSON"):
        run_train(tmp_path, path)


def test_train_names_a_video_whose_frames_differ_in_size(tmp_path):
    """Frames the processor refuses (here a frame folder whose second 0 holds two sizes) fail in a DataLoader
    worker: one line with the record's file:line and the video, not the worker's traceback."""
    from PIL import Image
    (tmp_path / "frames").mkdir()
    for i in range(8):
        Image.new("RGB", (64, 48) if i == 1 else (16, 16)).save(tmp_path / "frames" / f"{i}.png")
    path = write_jsonl(tmp_path / "f_with_seeks.jsonl", [authors_line("frames", 0, 3)])
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, path)
    assert re.fullmatch(rf"{path}:1: video frames: video frames differ in size: .*", str(e.value)), str(e.value)
