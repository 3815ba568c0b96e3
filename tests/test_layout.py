"""layout.py: the per-second prompt text, byte for byte, for our layout and for the StreamingVLM authors' inference.

The golden strings are written out by hand from how mit-han-lab/streaming-vlm's inference.py builds its prompt
(the Qwen2.5-VL chat template over a "previous text" turn, then per second a user turn `Time=a-bs` + the video,
the query after the first second's video only, and the assistant header; each reply ends with <|im_end|> and the
next turn starts on a new line). The Streamer's cache, decoded back to text, must equal them."""
import json

import pytest

from layout import LAYOUTS, StreamLayout
from stream import make_streamer, streamer_kwargs

from conftest import frames, tiny_model

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
PREV = "<|im_start|>previous text\n<|im_end|>\n"


def turn(t, n, query=""):
    return (f"<|im_start|>user\nTime={t}.0-{t + 1}.0s<|vision_start|>" + "<|video_pad|>" * n
            + f"<|vision_end|>{query}<|im_end|>\n<|im_start|>assistant\n")


GOLDEN = {  # the prompt when the model starts to speak at second 2, after replies R0 and R1 (silence)
    # 56 x 56 frames are kept at 56 x 56: 2 x 2 merged tokens
    "nanostream": SYS + PREV + turn(0, 4) + " Red scores! Red 1, Blue 0. ...<|im_end|>\n"
                  + turn(1, 4) + " ...<|im_end|>\n" + turn(2, 4),
    # the authors' 78,400-pixel minimum resizes them to 280 x 280: 10 x 10 merged tokens; a query at second 0
    "streamingvlm": SYS + PREV + turn(0, 100, "Commentate on this match") + " Red scores! Red 1, Blue 0. ...<|im_end|>\n"
                    + turn(1, 100) + " ...<|im_end|>\n" + turn(2, 100),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_prompt_text_of_the_first_three_seconds(tok, name):
    model = tiny_model(tok, layers=1)
    kw = streamer_kwargs(LAYOUTS[name])
    kw.update(temperature=0.0, repetition_penalty=1.0)  # the text is forced; sampling plays no part
    s = make_streamer(model, tok, **kw)
    for t, reply in enumerate(["Red scores! Red 1, Blue 0.", "", ""]):
        s.step(frames(t), force_text=reply)
    text = tok.decode(s.cache.ids[:s.cache.length].tolist())
    assert text.endswith(" ...")  # second 2's forced silence, fed; its <|im_end|> is not
    assert text[:-len(" ...")] == GOLDEN[name]


def test_layout_round_trips_through_stream_json(tmp_path):
    LAYOUTS["streamingvlm"].save(tmp_path, trained_steps=3)
    d = json.loads((tmp_path / "stream.json").read_text())
    assert d["trained_steps"] == 3 and d["query"] == "Commentate on this match"
    assert StreamLayout.from_dict(d) == LAYOUTS["streamingvlm"]
    assert StreamLayout.from_dict({"text_sink": 64}) == StreamLayout(text_sink=64)  # older files: the rest defaults
    assert StreamLayout.from_dict({"text_sink": 64}).evict_every == 1  # as they were served: every second
    for bad in ({"evict_every": 0}, {"evict_every": 2.5}, {"vision_window": 0}):
        with pytest.raises(ValueError, match="stream.json"):
            StreamLayout.from_dict(bad)


def test_layout_cli_replaces_the_layout_and_keeps_the_training_notes(tmp_path, capsys):
    from layout import main
    (tmp_path / "stream.json").write_text(json.dumps(dict(text_sink=64, frame_size=56, train_goal_rate=[0.01, 0.1])))
    (tmp_path / "config.json").write_text("{}")   # a checkpoint folder (layout.py reads nothing else of it)
    for _ in range(2):  # twice: a stream.json that layout.py wrote is replaced the same way
        main([str(tmp_path), "--layout", "streamingvlm"])
    d = json.loads((tmp_path / "stream.json").read_text())
    assert d["text_sink"] == 512 and d["query"] == "Commentate on this match" and d["layout"] == "streamingvlm"
    assert d["frame_size"] == 56 and d["train_goal_rate"] == [0.01, 0.1]
    assert "keeping its notes: frame_size, train_goal_rate" in capsys.readouterr().out


def test_every_layout_setting_is_a_flag_of_every_serving_script():
    """One set of layout flags: each StreamLayout field is a flag of stream.py, eval.py and tools/bench_stream.py,
    it overrides the checkpoint's stream.json (layout_of), and --layout picks a named layout under the flags."""
    from dataclasses import fields
    import eval as evaluate
    import stream
    from layout import layout_flags, layout_of
    from tools import bench_stream
    assert set(layout_flags()) == {f.name for f in fields(StreamLayout)}
    for parser, required in ((stream.build_parser(), ["--video", "v.mp4"]), (evaluate.build_parser(), []),
                             (bench_stream.build_parser(), [])):
        args = parser.parse_args(required + ["--vision-window", "8", "--text-sink", "32", "--query", "Q",
                                             "--top-p", "0.5", "--min-pixels", "3136"])
        got = layout_of({"vision_window": 4, "text_window": 100}, args)
        assert got == StreamLayout(vision_window=8, text_sink=32, text_window=100, query="Q", top_p=0.5,
                                   min_pixels=3136)
        args = parser.parse_args(required + ["--layout", "streamingvlm", "--text-window", "7"])
        assert layout_of({"text_window": 100}, args) == StreamLayout(**{**vars(LAYOUTS["streamingvlm"]),
                                                                         "text_window": 7})


@pytest.mark.parametrize("argv", [["--vision-window", "0"], ["--top-p", "2"], ["--temperature", "-1"],
                                  ["--layout", "bogus"], ["--fps", "x"]])
def test_a_bad_layout_flag_is_one_line(argv, capsys):
    import stream
    with pytest.raises(SystemExit):
        stream.build_parser().parse_args(["--video", "v.mp4"] + argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and argv[0] in err
