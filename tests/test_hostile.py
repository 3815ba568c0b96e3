"""Hostile inputs, tried as an attacker or a careless user would: every case must end in one line
(no traceback) and lose nothing (every file that was there before is byte-identical after, the shipped checkpoint
included). The classes: an output over an input, training data outside its root or silently wrong, sizes that
would allocate before a check, and Ctrl-C.

Each case runs a script's main(argv) in-process; only Ctrl-C of stream.py runs a child process (a real SIGINT)."""
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest
from PIL import Image

import checkpoint as ckpt
import cli
import eval as evaluate
import layout
import safeio
import stream
import train
from data import DataError, make_tokenizer
from records import JsonlSamples
from tools import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints", "tiny")


# -----------------------------------------------------------------------------
# what every case checks: one line, nothing lost


def snapshot(*folders):
    """{path: sha256} of every file under the folders (symlinks as their target's text)."""
    out = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                p = os.path.join(root, name)
                out[p] = (os.readlink(p) if os.path.islink(p) else
                          hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def one_line(fn, argv, capsys, pattern, watch=()):
    """fn(argv) must exit non-zero with one line on stderr (or as the exit message) that matches `pattern`, and
    leave every file under `watch` and checkpoints/ byte for byte as it was."""
    before = snapshot(*watch, SHIPPED)
    with pytest.raises(SystemExit) as e:
        fn(argv)
    after = snapshot(*watch, SHIPPED)
    assert {p: h for p, h in after.items() if p in before} == before, "an input changed"
    err = capsys.readouterr().err
    said = err + ("" if isinstance(e.value.code, int) or e.value.code is None else str(e.value.code))
    lines = [line for line in said.splitlines() if line.strip()]
    assert e.value.code not in (0, None), said
    assert "Traceback" not in said and len(lines) == 1, said
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A working folder with a GIF video, a frame folder, a copy of the shipped checkpoint and a victim file. Each
    case must leave all of it (and checkpoints/) as it was: one_line compares the bytes before and after."""
    class quiet(evaluate.tqdm):  # eval.py's progress bars would be lines on stderr
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "disable": True})
    monkeypatch.setattr(evaluate, "tqdm", quiet)
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(6)]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    (tmp_path / "frames").mkdir()
    for i, f in enumerate(frames):
        f.save(tmp_path / "frames" / f"{i}.png")
    shutil.copytree(SHIPPED, tmp_path / "ck")
    (tmp_path / "victim.txt").write_text("precious\n")
    return tmp_path


def config(world, **change):
    """Rewrite the copied checkpoint's config.json with `change` (the world's snapshot is taken before)."""
    path = world / "ck" / "config.json"
    d = json.loads(path.read_text())
    d.update(change)
    path.write_text(json.dumps(d))


# -----------------------------------------------------------------------------
# 1. outputs never overwrite inputs


def stream_argv(w, *extra):
    return ["--video", str(w / "v.gif"), "--model", str(w / "ck"), *extra]


OUTPUT_CASES = {
    "jsonl is the video": (lambda w: stream_argv(w, "--jsonl", str(w / "v.gif")), r"--jsonl .*v.gif is .*an input"),
    "vtt is the weights": (lambda w: stream_argv(w, "--vtt", str(w / "ck" / "model.safetensors")),
                           r"--vtt .* is inside .*ck, an input"),
    "vtt is a symlink to the video": (lambda w: (os.symlink(w / "v.gif", w / "link.vtt"),
                                                 stream_argv(w, "--vtt", str(w / "link.vtt")))[1], r"is .*an input"),
    "vtt is a hard link to the video": (lambda w: (os.link(w / "v.gif", w / "hard.vtt"),
                                                   stream_argv(w, "--vtt", str(w / "hard.vtt")))[1], r"is .*an input"),
    "vtt in the shipped checkpoint": (lambda w: ["--video", str(w / "v.gif"), "--vtt",
                                                 os.path.join(SHIPPED, "model.safetensors")],
                                      r"is inside .*(checkpoints/tiny|checkpoints/ folder)"),
    "vtt and jsonl one file": (lambda w: stream_argv(w, "--vtt", str(w / "o.txt"), "--jsonl", str(w / "o.txt")),
                               r"--vtt and --jsonl are one file"),
    "jsonl inside a frame folder": (lambda w: ["--video", str(w / "frames"), "--model", str(w / "ck"), "--jsonl",
                                               str(w / "frames" / "0.png")], r"is .*an input|inside"),
    "jsonl via ../ onto the video": (lambda w: stream_argv(w, "--jsonl", str(w / "frames" / ".." / "v.gif")),
                                     r"is .*an input"),
    "jsonl an empty path": (lambda w: stream_argv(w, "--jsonl", ""), r"--jsonl: an empty path"),
    "vtt is a link to a device": (lambda w: (os.symlink("/dev/null", w / "n.vtt"),
                                             stream_argv(w, "--vtt", str(w / "n.vtt")))[1], r"is a device, a pipe"),
}


def test_system_files_are_never_outputs():
    """An output is written beside its path and renamed onto it: /dev/stdout would be replaced for every process
    (as root), so the system's folders are refused by the check alone (asked here without running anything)."""
    for path in ("/dev/stdout", "/dev/null", "/proc/self/fd/1"):
        assert "is a device, a pipe or a link to one" in cli.file_problem(path)


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_stream_output_over_an_input_is_refused(world, capsys, case):
    argv, pattern = OUTPUT_CASES[case]
    one_line(stream.main, argv(world), capsys, pattern, [world])


EVAL_TRAIN_CASES = {
    "eval --out is the model": (evaluate.main, lambda w: ["--video", str(w / "v.gif"), "--model", str(w / "ck"),
                                                          "--out", str(w / "ck")], r"--out .*ck is .*an input"),
    "eval --out in the frame folder": (evaluate.main, lambda w: ["--video", str(w / "frames"), "--model",
                                                                 str(w / "ck"), "--out", str(w / "frames" / "r")],
                                       r"--out .* is inside .*frames"),
    "eval --out in checkpoints/": (evaluate.main, lambda w: ["--out", os.path.join(SHIPPED, "x")], r"checkpoints/"),
    "eval --out holds another checkpoint": (evaluate.main, lambda w: (shutil.copytree(w / "ck", w / "ck2"), [
        "--video", str(w / "v.gif"), "--model", str(w / "ck"), "--out", str(w / "ck2")])[1], r"holds a checkpoint"),
    "train --out holds the data": (train.main, lambda w: ["--data", str(w / "d" / "a.jsonl"), "--out", str(w / "d")],
                                   r"--out .*d holds .*a.jsonl"),
    "train --out is the video root": (train.main, lambda w: ["--data", str(w / "d" / "a.jsonl"), "--video-root",
                                                             str(w / "frames"), "--out", str(w / "frames")],
                                      r"--out .*frames is .*an input"),
    "train --out is --init": (train.main, lambda w: ["--init", str(w / "ck"), "--out", str(w / "ck"),
                                                     "--overwrite"], r"--out .*ck is .*an input"),
    "train --data an empty path": (train.main, lambda w: ["--data", "", "--out", str(w / "r")], r"--data: an empty"),
    "train --init an empty path": (train.main, lambda w: ["--init", "", "--out", str(w / "r")], r"--init: an empty"),
    "train --out in checkpoints/": (train.main, lambda w: ["--out", os.path.join(SHIPPED, "run")], r"checkpoints/"),
    "demo --out without .gif": (demo.main, lambda w: ["--out", str(w / "demo")], r"give a name ending in .gif"),
    "demo --out in checkpoints/": (demo.main, lambda w: ["--out", os.path.join(SHIPPED, "d.gif")], r"checkpoints/"),
    "layout.py on the shipped checkpoint": (layout.main, lambda w: [SHIPPED], r"shipped checkpoint"),
    "layout.py on a folder that is no checkpoint": (layout.main, lambda w: [str(w / "frames")],
                                                    r"frames holds no config.json: not a checkpoint folder"),
    "eval --seconds 1e11": (evaluate.main, lambda w: ["--seconds", str(10**11), "--out", str(w / "r")],
                            r"--seconds: must be at most 1,000,000"),
    "eval --streams a million": (evaluate.main, lambda w: ["--streams", str(10**6), "--batch", "--out", str(w / "r")],
                                 r"--streams: must be at most 1,024"),
    "eval --video with frames of two sizes in a second": (evaluate.main, lambda w: (
        Image.new("RGB", (64, 48)).save(w / "frames" / "1.png"),
        ["--video", str(w / "frames"), "--model", str(w / "ck"), "--out", str(w / "r")])[1],
        r"frames: second 0: video frames differ in size: \[\(16, 16\), \(64, 48\)\] .*the commentary of the 0 s"),
    "eval --policies with one twice": (evaluate.main, lambda w: ["--policies", "streaming", "full", "streaming",
                                                                 "--out", str(w / "r")], r"names streaming twice"),
}


@pytest.mark.parametrize("case", EVAL_TRAIN_CASES)
def test_other_outputs_over_an_input_are_refused(world, capsys, case):
    (world / "d").mkdir(exist_ok=True)
    (world / "d" / "a.jsonl").write_text("{}\n")
    main, argv, pattern = EVAL_TRAIN_CASES[case]
    one_line(main, argv(world), capsys, pattern, [world])


def test_planted_symlinks_are_replaced_never_followed(world):
    """stream.json.tmp (layout.py), a --vtt and a Results .jsonl that are symlinks to a victim: the outputs are
    written, the victim is untouched."""
    victim = world / "victim.txt"
    os.symlink(victim, world / "ck" / "stream.json.tmp")
    layout.main([str(world / "ck"), "--layout", "nanostream"])
    assert json.loads((world / "ck" / "stream.json").read_text())["layout"] == "nanostream"
    os.symlink(victim, world / "subs.vtt")
    out = stream.Outputs(vtt=str(world / "subs.vtt"))
    out.write(0, "Red shoots!", 1.0, None)   # the files are made at the first second
    out.close()
    assert (world / "subs.vtt").read_text().startswith("WEBVTT\n\n") and not os.path.islink(world / "subs.vtt")
    os.symlink(victim, world / "video.jsonl")
    res = cli.Results(str(world), "video")
    res.log(t=0)
    res.save({})
    assert victim.read_text() == "precious\n"


def test_exclusive_open_refuses_a_link_and_a_file(tmp_path):
    os.symlink(tmp_path / "target", tmp_path / "link")
    (tmp_path / "file").write_text("mine")
    for name in ("link", "file"):
        with pytest.raises(FileExistsError):
            safeio.open_exclusive(str(tmp_path / name))
    assert not os.path.exists(tmp_path / "target") and (tmp_path / "file").read_text() == "mine"


def test_a_second_run_on_one_out_is_refused_naming_the_holder(world, capsys):
    with safeio.RunLock(str(world / "runs")):
        one_line(evaluate.main, ["--video", str(world / "v.gif"), "--model", str(world / "ck"), "--out",
                                 str(world / "runs")], capsys, rf"in use by process {os.getpid()}", [world])
        one_line(train.main, ["--out", str(world / "runs"), "--steps", "1"], capsys, rf"process {os.getpid()}",
                 [world])
    with safeio.RunLock(str(world / "runs")):  # released: the next run takes it
        pass


def test_train_out_that_a_save_could_not_swap_is_refused(world, capsys):
    """A save renames a new folder onto --out: a link there would be replaced (its folder left empty), and a file
    at a save's own temporary names would stop the first save after the training it follows."""
    (world / "real").mkdir()
    os.symlink(world / "real", world / "lnk")
    one_line(train.main, ["--out", str(world / "lnk"), "--steps", "1"], capsys, r"lnk is a link", [world])
    (world / ".tmp-pl").write_text("mine")
    one_line(train.main, ["--out", str(world / "pl"), "--steps", "1"], capsys, r"\.tmp-pl is in the way", [world])


@pytest.mark.parametrize("state", ["{}", "[]", '{"step": -5, "history": [], "processes": 1, "config": {}}',
                                   '{"step": 3, "history": "abc", "processes": 1, "config": {}}'])
def test_resume_from_a_train_state_it_did_not_write_is_one_line(world, capsys, state):
    """An emptied or hand-edited train_state.json: refused by name, not a silent restart from step 0 or a crash."""
    shutil.copytree(world / "ck", world / "run")
    (world / "run" / "train_state.json").write_text(state)
    one_line(train.main, ["--out", str(world / "run"), "--resume", "--steps", "9"], capsys,
             r"--resume: .*train_state.json is not a train state this code wrote", [world])


def test_a_file_in_the_lock_s_place_is_refused_not_truncated(world, capsys):
    """The lock file is truncated when taken: a video or a hard link to a victim at .NAME.lock stays whole."""
    shutil.copy(world / "v.gif", world / ".a.lock")
    os.link(world / "victim.txt", world / ".b.lock")
    for name in ("a", "b"):
        one_line(evaluate.main, ["--video", str(world / "v.gif"), "--model", str(world / "ck"), "--out",
                                 str(world / name)], capsys, r"\.lock is in the way of the lock file", [world])


def test_a_full_disk_at_a_save_is_one_line_and_leaves_nothing(world, capsys, monkeypatch):
    """safetensors failing mid-write (as on a full disk): one line, no half-written folder beside --out."""
    import checkpoint
    from safetensors import SafetensorError
    def full(*args):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(SystemExit) as e:   # (the progress bar is on stderr here: the message is the exit's)
        train.main(["--out", str(world / "run"), "--steps", "1", "--batch-size", "1", "--eval-every", "1",
                    "--eval-chunks", "1", "--chunk-seconds", "2", "--overlap", "1", "--stream-seconds", "60",
                    "--text-sink", "0", "--text-window", "0", "--workers", "0", "--layers", "1", "--width", "64"])
    assert re.fullmatch(r"cannot save the checkpoint beside .*run \(Error while serializing: .*No space left on "
                        r"device \(os error 28\)\); .*run is as it was", str(e.value)), str(e.value)
    assert "Traceback" not in capsys.readouterr().err
    assert not os.path.exists(world / ".tmp-run") and not os.path.exists(world / "run")


def test_a_private_out_folder_stays_private(tmp_path, capsys):
    """train.py --out on an existing 0700 folder: the checkpoint swapped in is 0700 too."""
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    train.main(["--out", str(out), "--steps", "1", "--batch-size", "1", "--eval-every", "1", "--eval-chunks", "1",
                "--chunk-seconds", "2", "--overlap", "1", "--stream-seconds", "60", "--text-sink", "0",
                "--text-window", "0", "--workers", "0", "--layers", "1", "--width", "64"])
    assert os.path.isfile(out / "model.safetensors") and stat.S_IMODE(os.stat(out).st_mode) == 0o700


# -----------------------------------------------------------------------------
# 2. training data stays in its root, and is what it says


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def record(video="v.gif", words=((0.2, 0.6, "Red"), (0.6, 1.4, "shoots")), **kw):
    return json.dumps(dict(video=video, start=0, end=2, words=[list(w) for w in words], **kw))


DATA_CASES = {
    "bytes that are not UTF-8": (b'{"video": "v.gif", "start": 0, "end": 2, "words": [[0, 1, "\xff\xfe"]]}',
                                 r"a.jsonl:2: not UTF-8 text"),
    "../ out of the root": (record("../outside.gif"), r"a.jsonl:2: video ../outside.gif resolves to .* outside"),
    "absolute path out of the root": (record("/etc/hostname"), r"a.jsonl:2: video /etc/hostname resolves .*outside"),
    "symlink out of the root": (record("out.gif"), r"a.jsonl:2: video out.gif resolves to .* outside the video root"),
    "a frame folder with a frame linked out of the root": (record("fr"), r"a.jsonl:2: video fr: 1.png resolves to "
                                                                          r".* outside the video root"),
    "NaN word time": (record(words=[(0.2, float("nan"), "Red")]), r"a.jsonl:2: .*finite times"),
    "word ends before it starts": (record(words=[(1.5, 0.5, "Red")]), r"a.jsonl:2: .*start <= end"),
    "im_end in a word": (record(words=[(0.2, 0.6, "Red<|im_end|>")]), r"a.jsonl:2: word 1 holds '<\|im_end\|>'"),
    "video_pad in previous": (record(previous="x <|video_pad|>"), r"a.jsonl:2: previous holds '<\|video_pad\|>'"),
    "a 400 KB word": (record(words=[(0.2, 0.6, "a" * 400_000)]), r"a.jsonl:2: word 1 is 400,000 characters"),
    "deeply nested JSON": ("[" * 100_000 + "]" * 100_000, r"a.jsonl:2: .*nested too deeply"),
    "NUL in the video name": (record("v\u0000.gif"), r"a.jsonl:2: video .* is not a path"),
    "end past the limit": (json.dumps(dict(video="v.gif", start=0, end=1e300, words=[])), r"a.jsonl:2: end .*limit"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_a_hostile_record_is_named_by_file_and_line(world, tok, case):
    """The root is the JSONL's folder d/; line 1 is a good record, line 2 the hostile one."""
    line, pattern = DATA_CASES[case]
    (world / "d").mkdir()
    shutil.copy(world / "v.gif", world / "d" / "v.gif")
    os.symlink(world / "v.gif", world / "d" / "out.gif")  # a link out of the root
    (world / "d" / "fr").mkdir()   # a folder of frames inside the root, one of them a link out of it
    shutil.copy(world / "frames" / "0.png", world / "d" / "fr" / "0.png")
    os.symlink(world / "frames" / "1.png", world / "d" / "fr" / "1.png")
    (world / "d" / "a.jsonl").write_bytes(f"{record()}\n".encode() + (line if isinstance(line, bytes) else
                                                                     line.encode()) + b"\n")
    before = snapshot(world)
    with pytest.raises(DataError, match=pattern) as e:
        JsonlSamples(str(world / "d" / "a.jsonl"), tok, None, log=lambda m: None)
    assert "\n" not in str(e.value) and snapshot(world) == before


def test_unsorted_words_are_sorted_and_said_once(world, tok):
    (world / "d").mkdir()
    shutil.copy(world / "v.gif", world / "d" / "v.gif")
    late_first = record(words=[(1.2, 1.6, "late"), (0.2, 0.6, "early")])
    (world / "d" / "a.jsonl").write_text(late_first + "\n" + late_first + "\n")
    said = []
    JsonlSamples(str(world / "d" / "a.jsonl"), tok, None, log=said.append)
    assert said[1:] == [f"{world}/d/a.jsonl: the words of 2 records were not in time order and are sorted by end "
                    "time (first: line 1)"]


def test_a_seeks_file_that_does_not_cover_the_data_is_an_error(world, tok):
    (world / "d").mkdir()
    shutil.copy(world / "v.gif", world / "d" / "v.gif")
    n = len(record()) + 1  # bytes a line
    (world / "d" / "a.jsonl").write_text((record() + "\n") * 3)
    for seeks, missing in [([0, n], 2 * n), ([0, 2 * n], n)]:  # the last record left out; the middle one
        pattern = rf"a_seeks.jsonl does not cover .*a.jsonl: the record at byte {missing} is not in it"
        (world / "d" / "a_seeks.jsonl").write_text(json.dumps(seeks))
        with pytest.raises(DataError, match=pattern):
            JsonlSamples(str(world / "d" / "a.jsonl"), tok, None, log=lambda m: None)


# -----------------------------------------------------------------------------
# 3. sizes and numbers checked before anything is allocated


def bomb_gif(path, width, height):
    """A 4-frame 8x8 GIF whose header declares a `width` x `height` screen."""
    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(4)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=500, loop=0)
    b = bytearray(path.read_bytes())
    b[6:10] = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    path.write_bytes(bytes(b))


LIMIT_CASES = {
    "min_pixels 1e10": (dict(stream=dict(min_pixels=10**10)), r"min_pixels is 1e\+10; the limit is 12,845,056"),
    "min_pixels over max_pixels": (dict(stream=dict(min_pixels=50_000, max_pixels=40_000)),
                                   r"min_pixels \(50,000\) must not exceed max_pixels \(40,000\)"),
    "a 20k-character system prompt": (dict(stream=dict(system_prompt="x" * 20_000)),
                                      r"system_prompt is 20,000 characters; the limit is 10,000"),
    "vision_window 1e20": (dict(stream=dict(vision_window=1e20)), r"vision_window is 1e\+20; the limit is 3,600"),
    "ten million layers": (dict(config=dict(num_hidden_layers=10**7)), r"num_hidden_layers = 10000000 .*1,024"),
    "zero heads": (dict(config=dict(num_attention_heads=0)), r"num_attention_heads = 0 must be an integer in \[1,"),
    "negative hidden size": (dict(config=dict(hidden_size=-256)), r"hidden_size = -256 must be"),
    "rope_theta -1": (dict(config=dict(rope_theta=-1)), r"rope_theta = -1 must be a positive finite number"),
    "rms_norm_eps NaN": (dict(config=dict(rms_norm_eps=float("nan"))), r"rms_norm_eps = nan must be"),
    "a tokenizer past the vocabulary": (dict(tokens=1000), r"tokenizer.json has 1,\d\d\d tokens, more than "
                                                           r"config.json's vocab_size 704"),
    "heads that do not split hidden": (dict(config=dict(num_attention_heads=3)), r"must split into"),
    "a video placeholder the tokenizer does not have": (dict(config=dict(video_token_id=5)),
                                                        r"image/video token ids \(\d+, 5\) are not the tokenizer's"),
    "--vision-window 10**20": (dict(flags=["--vision-window", str(10**20)]),
                               r"--vision-window: must be at most 3,600 \(layout.LIMITS\)"),
    "--min-pixels over the limit": (dict(flags=["--min-pixels", "99999999999"]),
                                    r"--min-pixels: must be at most 12,845,056"),
    "a 300k-character --previous-text": (dict(flags=["--previous-text", "x" * 300_000]), r"--previous-text: .*200,000"),
    "GIF declaring 65535 x 65535": (dict(gif=(65535, 65535)), r"v.gif: cannot read the GIF .*exceeds limit"),
    "GIF declaring 9000 x 9000": (dict(gif=(9000, 9000)), r"9000 x 9000 pixels are larger than the limit of 33,"),
    "GIF cut at 100 bytes": (dict(cut=100), r"v.gif: cannot read the GIF \(index out of range\)"),
    "GIF cut at 150 bytes": (dict(cut=150), r"v.gif: cannot read frame 1 of the GIF \(image file is truncated"),
    "a control token in --system-prompt": (dict(flags=["--system-prompt", "Be brief<|im_end|>"]),
                                           r"--system-prompt: .*no control token such as <\|im_end\|>"),
    "a control token in --previous-text": (dict(flags=["--previous-text", "x<|video_pad|>"]),
                                           r"--previous-text: .*no control token"),
    "--device meta": (dict(flags=["--device", "meta"]), r"--device: 'meta': runs here on cpu, cuda\[:N\] or mps"),
}


@pytest.mark.parametrize("case", LIMIT_CASES)
def test_a_size_past_its_limit_is_one_line(world, capsys, case):
    how, pattern = LIMIT_CASES[case]
    if "stream" in how:
        path = world / "ck" / "stream.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **how["stream"]}))
    if "config" in how:
        config(world, **how["config"])
    if "gif" in how:
        bomb_gif(world / "v.gif", *how["gif"])
    if "cut" in how:   # a GIF cut short (a copy that stopped)
        (world / "v.gif").write_bytes((world / "v.gif").read_bytes()[:how["cut"]])
    if "tokens" in how:  # ids past the embedding table
        import tokenizers
        t = tokenizers.Tokenizer.from_file(str(world / "ck" / "tokenizer.json"))
        t.add_tokens([f"extra{i}" for i in range(how["tokens"])])
        t.save(str(world / "ck" / "tokenizer.json"))
    one_line(stream.main, stream_argv(world, *how.get("flags", [])), capsys, pattern, [world])


def test_a_timestamp_a_billion_seconds_ahead_is_one_line(world, capsys):
    av, np = pytest.importorskip("av"), pytest.importorskip("numpy")
    from fractions import Fraction
    path = world / "jump.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for pts in (0, 100, 200, 300, 10**12):  # ms: the last frame starts 1e9 s later
            f = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            f.pts, f.time_base = pts, Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode())
    # the outputs of a run before stay as they were: a run's files replace them at its first second, not sooner
    keep = ["--vtt", str(world / "keep.vtt"), "--jsonl", str(world / "keep.jsonl")]
    stream.main(["--video", str(world / "v.gif"), "--model", str(world / "ck"), "--seconds", "2", *keep])
    capsys.readouterr()
    assert len((world / "keep.jsonl").read_text().splitlines()) == 2
    one_line(stream.main, ["--video", str(path), "--model", str(world / "ck"), *keep], capsys,
             r"jump.mkv: the timestamps jump from 0.300 s to 1000000000.000 s at frame 4; .*MAX_GAP_S", [world])


# -----------------------------------------------------------------------------
# 4. Ctrl-C: one line, exit 130, the outputs whole up to the second it names


def test_ctrl_c_in_stream_py_keeps_whole_outputs(world):
    frames = [Image.new("RGB", (16, 16), (4 * i, 0, 0)) for i in range(60)]
    frames[0].save(world / "long.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    out = world / "o.jsonl"
    child = subprocess.Popen([sys.executable, "stream.py", "--video", str(world / "long.gif"), "--jsonl", str(out),
                              "--vtt", str(world / "o.vtt")], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in child.stdout:  # the first second is out: interrupt the second one
        if line.startswith("[00:00:00"):
            break
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert child.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    n = int(re.fullmatch(r"stopped at second (\d+); outputs complete up to it", lines[0]).group(1))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert n >= 1 and [r["t"] for r in rows] == list(range(n))
    assert (world / "o.vtt").read_text().startswith("WEBVTT\n\n")


def test_ctrl_c_in_eval_py_is_one_line_and_keeps_the_lines(world, capsys, monkeypatch):
    real, calls = stream.Streamer.step, []

    def step(self, frames, force_text=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, frames, force_text)
    monkeypatch.setattr(stream.Streamer, "step", step)
    with pytest.raises(KeyboardInterrupt):  # main() says where it stopped; the command line then exits 130
        evaluate.main(["--video", str(world / "v.gif"), "--model", str(world / "ck"), "--out", str(world / "res")])
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"stopped at second 1; outputs complete up to it \(.*res\)", err), err
    assert [json.loads(x)["t"] for x in (world / "res" / "video.jsonl").read_text().splitlines()] == [0]


def test_links_planted_beside_a_checkpoint_are_removed_not_followed(tmp_path):
    """.tmp-ck and .old-ck as symlinks to a victim folder: a save's cleanup unlinks them and the victim stays."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    for kind in ("tmp", "old"):
        os.symlink(victim, ckpt.beside(str(tmp_path / "ck"), kind))
    ckpt.clean_leftovers(str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path)) == ["victim"] and (victim / "keep.txt").read_text() == "precious"
