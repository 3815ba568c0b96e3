"""stream.py's command line on a real video file: WebVTT and JSON lines written as it goes, the checkpoint's
layout honoured, bad flags refused in one line."""
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("ck")
    tok.tok.save(str(folder / "tokenizer.json"))
    model = tiny_model(tok, layers=1)
    model.tokenizer_path = str(folder / "tokenizer.json")
    model.save_pretrained(str(folder))
    (folder / "stream.json").write_text(json.dumps(dict(text_sink=7, text_window=9, vision_window=3)))
    return folder


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        g = torch.Generator().manual_seed(0)
        for _ in range(35):  # 3.5 s at 10 fps: three whole seconds
            img = torch.randint(0, 255, (48, 64, 3), generator=g, dtype=torch.uint8).numpy()
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    return path


def stream(*args):
    return subprocess.run([sys.executable, "stream.py", *map(str, args)], capture_output=True, text=True)


def test_subtitles_and_json_lines(checkpoint, mp4, tmp_path):
    vtt, jsonl = tmp_path / "out.vtt", tmp_path / "out.jsonl"
    r = stream("--model", checkpoint, "--video", mp4, "--vtt", vtt, "--jsonl", jsonl, "--max-new-tokens", 3)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [x["t"] for x in lines] == [0, 1, 2]
    assert all({"text", "latency_ms", "cache_tokens", "max_position"} <= set(x) for x in lines)
    text = vtt.read_text()
    assert text.startswith("WEBVTT\n\n")
    cues = re.findall(r"(\d\d:\d\d:\d\d\.\d\d\d) --> (\d\d:\d\d:\d\d\.\d\d\d)\n(.+)\n\n", text)
    said = [x for x in lines if x["text"]]
    assert len(cues) == len(said) and [c[2] for c in cues] == [x["text"] for x in said]
    for (start, end, _), x in zip(cues, said):
        assert start == f"00:00:0{x['t']}.000" and end == f"00:00:0{x['t'] + 1}.000"
    assert "'text_sink': 7, 'text_window': 9, 'vision_window': 3" in r.stdout  # the checkpoint's layout


def test_flags_override_the_layout_and_bad_ones_fail_in_one_line(checkpoint, mp4):
    r = stream("--model", checkpoint, "--video", mp4, "--seconds", 1, "--vision-window", 5, "--max-new-tokens", 2,
               "--evict-every", 4)
    assert r.returncode == 0 and "'vision_window': 5, 'evict_every': 4" in r.stdout
    for bad in (["--seconds", "-1"], ["--max-new-tokens", "0"], ["--vision-window", "0"], ["--evict-every", "0"],
                ["--top-p", "0"],
                ["--repetition-penalty", "0"], ["--device", "gpu0"]):
        r = stream("--model", checkpoint, "--video", mp4, *bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and bad[0] in r.stderr, r.stderr


def test_bad_inputs_are_refused_before_the_model_loads_or_outputs_are_made(checkpoint, mp4, tmp_path):
    vtt, jsonl = tmp_path / "out.vtt", tmp_path / "out.jsonl"
    r = stream("--model", checkpoint, "--video", tmp_path / "missing.mp4", "--vtt", vtt, "--jsonl", jsonl)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.mp4: no such file" in r.stderr
    assert f"model {checkpoint}" not in r.stdout and not vtt.exists() and not jsonl.exists()
    (tmp_path / "a_file").write_text("")
    r = stream("--model", checkpoint, "--video", mp4, "--jsonl", tmp_path / "a_file" / "out.jsonl")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--jsonl" in r.stderr and "cannot write" in r.stderr
    r = stream("--model", checkpoint / "config.json", "--video", mp4)
    assert r.returncode == 1 and "pass the folder, not a file in it" in r.stderr
