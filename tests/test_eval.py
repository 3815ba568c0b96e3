"""eval.py: the metrics on hand-made transcripts; each task end to end at a tiny size on the CPU; results kept as
they go; every bad flag refused in one line."""
import argparse
import json
import re

import pytest
import torch

from cli import SHIPPED
from conftest import refused
from eval import main, run_policy
from metrics import kept_line, score_transcript, slices
from stream import POLICIES
from world import QUESTIONS, SportsStream, WorldConfig, answer, parse_event, split_seed


def truth(n=400, seed=3):
    w = SportsStream(WorldConfig(seed=seed))
    return [w.text(t) for t in range(n)]


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_perfect_transcript_scores_one():
    tr = truth()
    m = score_transcript(tr, tr)
    assert m["f1"] == m["f1_tol1"] == m["silence_acc"] == 1.0
    assert m["goals"] > 0 and m["score_acc"] == 1.0
    assert all(s["f1"] == 1.0 for s in slices(tr, tr))


def test_shifted_and_wrong_transcripts():
    tr = truth()
    late = [""] + tr[:-1]  # every sentence one second late
    m = score_transcript(tr, late)
    assert m["f1_tol1"] > 0.97 and m["f1"] < 0.2  # right at +-1 s, (almost) never at the exact second
    assert m["score_acc"] == 1.0
    silent = [""] * len(tr)
    m = score_transcript(tr, silent)
    assert m["f1"] == 0.0 and m["silence_acc"] == 1.0 and m["score_acc"] == 0.0
    wrong_score = [t.replace("Red 1,", "Red 7,") for t in tr]
    m = score_transcript(tr, wrong_score)
    assert m["f1"] == 1.0 and m["score_acc"] < 1.0
    assert parse_event("Red scores! Red 2, Blue 0.") == ("goal", "Red", (2, 0))
    assert parse_event("Blue shoots!") == ("shot", "Blue", None)
    assert parse_event("something else") is None


def test_goal_steps_count_each_misreading_once():
    """One goal misread (Red's count +5) and every later sentence consistent with the mistake: score accuracy
    loses every goal from there, goal steps only the one."""
    tr = truth(1200)
    goals = [t for t in range(len(tr)) if parse_event(tr[t]) and parse_event(tr[t])[0] == "goal"]
    assert len(goals) >= 3
    bump = lambda t, text: text if t < goals[1] or not text.startswith(("Red scores", "Blue scores")) else \
        re.sub(r"Red (\d+),", lambda m: f"Red {int(m.group(1)) + 5},", text)
    pred = [bump(t, text) for t, text in enumerate(tr)]
    m = score_transcript(tr, pred)
    assert m["goal_step"] == pytest.approx((len(goals) - 1) / len(goals))
    assert m["score_acc"] == pytest.approx(1 / len(goals))
    assert score_transcript(tr, tr)["goal_step"] == 1.0 and score_transcript(tr, [""] * len(tr))["goal_step"] == 0
    # one sentence a goal: two Red goals a second apart, one said; a sentence just before a slice is not in it
    two = [""] * 20
    two[10], two[11] = "Red scores! Red 1, Blue 0.", "Red scores! Red 2, Blue 0."
    one = two[:11] + [""] * 9
    assert score_transcript(two, one)["goal_step"] == 0.5
    assert score_transcript(two, one[1:] + [""], 11, 20)["goal_step"] == 0.0
    assert score_transcript(two, [""] + one[:-1], 11, 20)["goal_step"] == 1.0  # said a second late, inside


def test_kept_line_counts_the_streams_that_keep_the_score():
    runs = [dict(seed=7, score_acc=0.5), dict(seed=8, score_acc=1.0), dict(seed=9, score_acc=0.95),
            dict(seed=10, score_acc=None), dict(seed=11)]  # no goal, or stopped in its first second: not counted
    assert kept_line(runs) == "2 of 3; below: 7: 0.50"
    assert kept_line(runs[1:]) == "2 of 2"
    assert kept_line(runs[3:]) == "no stream had a goal"
    stopped = [dict(seed=7, score_acc=1.0, seconds=40, failed=dict(reason="time limit", second=40)),
               dict(seed=8, score_acc=0.2, seconds=90, failed=dict(reason="out of memory", second=90))]
    assert kept_line(stopped) == "1 of 2; below: 8: 0.20 (stopped at 90 s); of those kept, 7: 1.00 (stopped at 40 s)"


def test_half_the_events_found():
    tr = truth()
    events = [t for t in range(len(tr)) if tr[t]]
    pred = [tr[t] if t in events[::2] else "" for t in range(len(tr))]
    m = score_transcript(tr, pred)
    n = len(events)
    k = len(events[::2])
    assert m["f1"] == pytest.approx(2 * k / (n + k))  # precision 1, recall k/n


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from train import main as train
    out = tmp_path_factory.mktemp("ckpt")
    train(["--out", str(out), "--steps", "2", "--batch-size", "1", "--chunk-seconds", "4", "--overlap", "2",
           "--text-sink", "8", "--text-window", "8", "--eval-chunks", "1", "--workers", "0"])
    return out


def test_stream_task_end_to_end(ckpt, tmp_path):
    res = main(["stream", "--model", str(ckpt), "--seconds", "6", "--reset-every", "3", "--out", str(tmp_path)])
    assert list(res["policies"]) == [name for name, p in POLICIES.items() if p.paper]  # the default: the paper's
    saved = json.load(open(tmp_path / "stream.json"))
    assert saved["policies"]["streaming"]["runs"][0]["failed"] is None
    assert saved["policies"]["full"]["runs"][0]["seconds"] == 6
    assert len(saved["policies"]["streaming"]["slices"]) == 5
    rows = {p: v["summary"] for p, v in saved["policies"].items()}
    # one JSON line per policy and second, in order, with the world's own sentence beside the model's
    logged = lines(tmp_path / "stream.jsonl")
    assert [(x["policy"], x["t"]) for x in logged] == [(p, t) for p in res["policies"] for t in range(6)]
    w = SportsStream(WorldConfig(seed=split_seed("eval", 0)))
    assert all(x["truth"] == w.text(x["t"]) and x["seed"] == split_seed("eval", 0) for x in logged)
    # each policy's mean_ms is the mean of the latencies it logged a second (the warm-up second left out), and its
    # x_streaming that mean over the streaming policy's, so that a row divided by the wrong base fails here
    logged_ms = {p: [x["ms"] for x in logged if x["policy"] == p and x["t"] >= 1] for p in rows}
    for p, r in rows.items():
        assert len(logged_ms[p]) == 5 and r["mean_ms"] == pytest.approx(sum(logged_ms[p]) / 5, abs=0.1), p
        assert r["x_streaming"] == round(r["mean_ms"] / rows["streaming"]["mean_ms"], 2), p


def test_results_are_written_as_they_go(ckpt, tmp_path, monkeypatch):
    """A run killed at its fourth second keeps the three seconds it measured."""
    import stream
    step = stream.Streamer.step

    def dies_at_three(self, frames, force_text=None):
        if self.t == 3:
            raise KeyboardInterrupt
        return step(self, frames, force_text)
    monkeypatch.setattr(stream.Streamer, "step", dies_at_three)
    with pytest.raises(KeyboardInterrupt):
        main(["stream", "--model", str(ckpt), "--seconds", "10", "--policies", "native", "--out", str(tmp_path)])
    assert [x["t"] for x in lines(tmp_path / "stream.jsonl")] == [0, 1, 2]
    assert not (tmp_path / "stream.json").exists()  # the summary is whole or absent


def test_seed_chooses_the_held_out_streams(ckpt, tmp_path):
    main(["--model", str(ckpt), "--seconds", "3", "--policies", "streaming", "--seed", "5", "--streams", "2",
          "--out", str(tmp_path)])
    logged = lines(tmp_path / "stream.jsonl")
    assert [x["seed"] for x in logged] == [split_seed("eval", 5)] * 3 + [split_seed("eval", 6)] * 3
    for x in logged:
        assert x["truth"] == SportsStream(WorldConfig(seed=x["seed"])).text(x["t"])


def test_prefetching_frames_on_a_thread_changes_nothing(tok):
    """eval.py's loop with the resize of second t+1 on a thread during second t against the plain loop: the cache
    (whose vision window holds the last seconds' K/V) must come out identical, so every second got its own frames."""
    from conftest import frames, tiny_model
    model = tiny_model(tok, layers=2)
    caches = []
    for prefetch in (True, False):
        args = argparse.Namespace(prefetch=prefetch, time_limit=0, reset_every=100)
        r = run_policy(model, tok, "streaming", 6, frames, args, force=lambda t: "", vision_window=3)
        assert len(r["resize"]) == (6 if prefetch else 0)
        c = r["streamer"].cache
        caches.append(c.k[:, :, :, :c.length])
    assert torch.equal(caches[0], caches[1])


def test_a_run_stopped_in_its_first_second_has_no_scores(ckpt, tmp_path):
    """An empty transcript is not a perfect one: a policy stopped before its first second reports no F1 (it used
    to report F1 1.0, as a negative --time-limit did)."""
    res = main(["stream", "--model", str(ckpt), "--seconds", "50", "--time-limit", "1e-9", "--policies", "full",
                "--out", str(tmp_path)])
    row = res["policies"]["full"]["summary"]
    assert row["failed"] == "TimeoutError at 0 s"
    assert row["f1"] is None and row["f1_1s"] is None and row["silence"] is None and row["p50_ms"] is None


def test_stream_task_reports_timeouts(ckpt, tmp_path):
    res = main(["stream", "--model", str(ckpt), "--seconds", "50", "--time-limit", "0.5", "--policies", "full",
                "--out", str(tmp_path)])
    row = res["policies"]["full"]["summary"]
    assert row["failed"].startswith("TimeoutError at") and row["failed"] != "TimeoutError at 0 s"
    assert row["f1"] is not None


def test_questions_task_asks_at_every_fifth_of_the_stream(ckpt, tmp_path):
    res = main(["questions", "--model", str(ckpt), "--seconds", "10", "--policies", "streaming", "reset",
                "--reset-every", "4", "--teacher-forced", "--out", str(tmp_path)])
    logged = lines(tmp_path / "questions.jsonl")
    assert len(logged) == 2 * 5 * len(QUESTIONS)
    assert sorted({x["t"] for x in logged}) == [1, 3, 5, 7, 9]
    w = SportsStream(WorldConfig(seed=split_seed("eval", 0)))
    for x in logged:  # the truth is the world's answer after second t, and right means equal to it
        first = w.first_goal(x["t"])
        assert x["truth"] == answer(x["question"], w.score(x["t"]), first[1] if first else None)
        assert x["right"] == (x["answer"] == x["truth"])
    summary = res["policies"]["reset"]["summary"]
    assert summary["asked"] == 15 and summary["right"] == pytest.approx(sum(x["right"] for x in logged[15:]) / 15,
                                                                        abs=1e-3)
    assert json.load(open(tmp_path / "questions.json"))["policies"]["streaming"]["rows"] == logged[:15]


def gif(path, seconds):
    from PIL import Image
    frames = [Image.new("RGB", (56, 56), (40 * i, 120, 60)) for i in range(2 * seconds)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=500, loop=0)  # 2 frames a second


def test_video_flag_streams_a_gif(ckpt, tmp_path):
    gif(tmp_path / "clip.gif", 3)
    main(["--model", str(ckpt), "--video", str(tmp_path / "clip.gif"), "--out", str(tmp_path)])
    out = json.load(open(tmp_path / "video.json"))
    assert [c["t"] for c in out["commentary"]] == [0, 1, 2] and out["error"] is None
    assert [x["t"] for x in lines(tmp_path / "video.jsonl")] == [0, 1, 2]


def test_a_video_that_breaks_is_one_line_after_saving(ckpt, tmp_path, capsys):
    """A folder of frames whose fifth image is not an image: the seconds before it are commented and saved, then
    one line names the bad file (no traceback)."""
    from PIL import Image
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (56, 56), (50 * i, 0, 0)).save(folder / f"f{i}.png")
    (folder / "f4.png").write_bytes(b"not a png")
    for i in range(5, 8):
        Image.new("RGB", (56, 56), (0, 50 * i, 0)).save(folder / f"f{i}.png")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(ckpt), "--video", str(folder), "--out", str(tmp_path / "out")])
    message = str(e.value.code)
    assert "\n" not in message and str(folder / "f4.png") in message
    out = json.load(open(tmp_path / "out" / "video.json"))
    assert out["seconds"] >= 1 and str(folder / "f4.png") in out["error"]
    assert len(lines(tmp_path / "out" / "video.jsonl")) == out["seconds"]


def test_an_unreadable_video_is_one_line(ckpt, tmp_path):
    (tmp_path / "clip.gif").write_bytes(b"GIF89a but not really")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(ckpt), "--video", str(tmp_path / "clip.gif"), "--out", str(tmp_path)])
    assert str(e.value.code).startswith(str(tmp_path / "clip.gif")) and "\n" not in str(e.value.code)
    assert json.load(open(tmp_path / "video.json"))["seconds"] == 0


@pytest.mark.parametrize("argv, says", [
    (["--seconds", "0"], "--seconds: must be >= 1"),
    (["--streams", "0"], "--streams: must be >= 1"),
    (["--time-limit", "-1"], "--time-limit: must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--reset-every", "0"], "--reset-every: must be >= 1"),
    (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--seed", "-1"], "--seed: must be in [0, 1000000)"),
    (["--seed", "999999", "--streams", "2"], "leaves the held-out range"),
    (["efficiency"], "invalid choice: 'efficiency'"),
    (["efficiency", "--video", "x.mp4"], "invalid choice: 'efficiency'"),
    (["stream", "--video", "x.mp4"], "--video streams a video (the video task), not the stream task"),
    (["video"], "the video task needs --video"),
    (["--video", "nothere.mp4"], "--video nothere.mp4: no such file or folder"),
    (["--decode", "plain,fast"], "--decode: expected plain, graphs, compiled"),
    (["--decode", "plain,graphs"], "--decode takes one path here"),
    (["questions", "--batch"], "--batch runs the stream task's held-out streams together"),
])
def test_bad_flags_are_one_line_errors(ckpt, tmp_path, capsys, argv, says):
    assert says in refused(main, argv + ["--model", str(ckpt), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_missing_checkpoint_says_how_to_make_one(tmp_path, capsys):
    err = refused(main, ["stream", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")], capsys)
    assert "nothing: no checkpoint there" in err and "python train.py" in err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_run(ckpt, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    err = refused(main, ["--model", str(ckpt), "--out", str(tmp_path / "a_file" / "out")], capsys)
    assert "--out" in err and "a_file" in err and "cannot write there" in err


def test_default_model_is_the_shipped_one_from_any_folder(tmp_path, monkeypatch, capsys):
    import cli
    monkeypatch.chdir(tmp_path)  # found from the code's folder, not the working one
    main(["--seconds", "2", "--policies", "streaming"])
    assert capsys.readouterr().out.splitlines()[0].startswith(f"eval.py stream: model {cli.SHIPPED}")
    monkeypatch.setattr(cli, "SHIPPED", str(tmp_path / "no_shipped_model"))
    assert "--model out/tiny: no checkpoint there" in refused(main, ["--seconds", "2"], capsys)


def test_a_batch_scores_what_each_stream_scores_alone(tmp_path, capsys):
    """--batch steps the held-out streams together (serve.StreamBatch): the same commentary, second by second, and
    the same scores; only the timing columns differ. The shipped model, 24 s: events, a goal, evictions."""
    argv = ["--model", SHIPPED, "--seconds", "24", "--streams", "3", "--seed", "4", "--policies", "streaming", "native"]
    alone = main(argv + ["--out", str(tmp_path / "alone")])
    together = main(argv + ["--batch", "--out", str(tmp_path / "together")])
    said = lambda d: sorted((x["policy"], x["seed"], x["t"], x["text"]) for x in lines(tmp_path / d / "stream.jsonl"))
    assert said("together") == said("alone")
    stepped = {}  # batched: each second timed once for all three streams
    for x in lines(tmp_path / "together" / "stream.jsonl"):
        stepped.setdefault((x["policy"], x["t"]), set()).add(x["ms"])
    assert len(stepped) == 48 and all(len(ms) == 1 for ms in stepped.values())
    assert sum(bool(x[3]) for x in said("alone")) >= 10, "the streams must say something to compare"
    for policy in ("streaming", "native"):
        a, b = alone["policies"][policy], together["policies"][policy]
        assert "batch" not in a["summary"] and b["summary"]["batch"] == 3
        for key in ("f1", "f1_1s", "score", "goal_step", "silence", "max_pos"):
            assert a["summary"][key] == b["summary"][key], key
        assert a["slices"] == b["slices"]
        assert [r["cache_tokens"] for r in a["runs"]] == [r["cache_tokens"] for r in b["runs"]]
        # each stream's own scores, the same either way; the summary is their mean
        mine = lambda res: [(r["seed"], r["f1"], r["score_acc"], r["goal_step"]) for r in res["runs"]]
        assert mine(a) == mine(b)
        assert b["summary"]["f1"] == pytest.approx(sum(r["f1"] for r in b["runs"]) / 3, abs=1e-3)
        goals = [r["score_acc"] for r in b["runs"] if r["score_acc"] is not None]
        assert b["summary"]["score"] == pytest.approx(sum(goals) / len(goals), abs=1e-3)
    # the printed count of the streams that keep the score, one line a policy, the same either way
    kept = [x.split()[1:] for x in capsys.readouterr().out.splitlines()
            if x.startswith(("  streaming ", "  native ")) and (" of " in x or "no stream" in x)]
    assert len(kept) == 4 and kept[:2] == kept[2:]
    assert kept[0] == kept_line(alone["policies"]["streaming"]["runs"]).split()
