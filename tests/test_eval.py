"""eval.py: the metrics on hand-made transcripts, and each task end to end at a tiny size on the CPU."""
import json

import pytest
import torch

from eval import main, parse_event, score_transcript, slices
from world import SportsStream, WorldConfig
from test_cache import tok  # noqa: F401  (a fixture)


def truth(n=400, seed=3):
    w = SportsStream(WorldConfig(seed=seed))
    return [w.text(t) for t in range(n)]


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
           "--text-sink", "8", "--text-window", "8", "--eval-chunks", "1"])
    return out


def test_stream_task_end_to_end(ckpt, tmp_path):
    res = main(["stream", "--model", str(ckpt), "--seconds", "12", "--reset-every", "5", "--out", str(tmp_path)])
    assert set(res["policies"]) == {"streaming", "native", "full", "reset", "recompute"}
    saved = json.load(open(tmp_path / "stream.json"))
    assert saved["policies"]["streaming"]["runs"][0]["failed"] is None
    assert len(saved["policies"]["full"]["runs"][0]["texts"]) == 12


def test_prefetching_frames_on_a_thread_changes_nothing(tok):
    """eval.py's loop with the resize of second t+1 on a thread during second t against the plain loop: the cache
    (whose vision window holds the last seconds' K/V) must come out identical, so every second got its own frames."""
    import argparse
    from eval import run_policy
    from test_cache import frames, tiny_model
    model = tiny_model(tok, layers=2)
    caches = []
    for prefetch in (True, False):
        args = argparse.Namespace(prefetch=prefetch, time_limit=0)
        r = run_policy(model, tok, "streaming", 6, frames, args, force=lambda t: "", vision_window=3)
        assert len(r["resize"]) == (6 if prefetch else 0)
        c = r["streamer"].cache
        caches.append(c.k[:, :, :, :c.length])
    assert torch.equal(caches[0], caches[1])


def test_stream_task_reports_timeouts(ckpt, tmp_path):
    res = main(["stream", "--model", str(ckpt), "--seconds", "50", "--time-limit", "0.0001", "--policies", "full",
                "--out", str(tmp_path)])
    assert res["policies"]["full"]["summary"]["failed"].startswith("TimeoutError at")


def test_efficiency_task_end_to_end(tmp_path):
    # with --hf: transformers' Qwen2.5-VL (the same random weights) on the same per-second loop
    res = main(["efficiency", "--preset", "tiny", "--seconds", "4", "--warmup", "1", "--height", "56", "--width",
                "84", "--policies", "streaming", "full", "--max-new-tokens", "4", "--hf", "--out", str(tmp_path)])
    assert res["policies"]["streaming"]["summary"]["ms_per_token"] > 0
    hf = res["policies"]["transformers"]
    assert len(hf["latency"]) == 4 and hf["summary"]["failed"] == "-" and hf["summary"]["ms_per_token"] > 0
    assert res["policies"]["full"]["summary"]["hf_ms_per_token_ratio"] > 0
    # the same loop: transformers' growing cache holds about what our never-evicting policy holds
    assert abs(hf["summary"]["cache"] - res["policies"]["full"]["summary"]["cache"]) <= 8


def test_efficiency_reports_a_failure_in_the_first_second(tmp_path):
    res = main(["efficiency", "--preset", "tiny", "--seconds", "3", "--height", "56", "--width", "84",
                "--policies", "streaming", "--max-new-tokens", "4", "--time-limit", "1e-9", "--out", str(tmp_path)])
    row = res["policies"]["streaming"]["summary"]
    assert row["failed"] == "TimeoutError at 0 s" and row["ms_per_token"] is None


def test_video_flag_streams_a_gif(ckpt, tmp_path):
    from PIL import Image
    frames = [Image.new("RGB", (56, 56), (40 * i, 120, 60)) for i in range(6)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=500, loop=0)  # 2 frames a second, 3 s
    main(["--model", str(ckpt), "--video", str(gif), "--out", str(tmp_path)])
    out = json.load(open(tmp_path / "video.json"))
    assert [c["t"] for c in out["commentary"]] == [0, 1, 2]


def test_bad_decode_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["efficiency", "--decode", "eager,fast"])
    assert "--decode takes eager, graphs, compiled" in capsys.readouterr().err


def test_missing_checkpoint_says_how_to_make_one(tmp_path, capsys):
    with pytest.raises(SystemExit, match="python train.py"):
        main(["stream", "--model", str(tmp_path / "nothing")])


def test_flexprefill_task_end_to_end(ckpt, tmp_path):
    res = main(["flexprefill", "--model", str(ckpt), "--seconds", "20", "--min-budget", "128", "--streams", "2",
                "--out", str(tmp_path)])
    summary, rows = res["long_prefill"]["summary"], res["long_prefill"]["rows"]
    assert summary["questions"] == len(rows) == 6  # 2 streams x the three whole-video questions
    assert {r["question"] for r in rows} == {"score", "goals", "first"}
    from world import answer, split_seed
    for r in rows:  # the truth is the world's answer after the prefilled seconds, and right means equal to it
        w = SportsStream(WorldConfig(seed=split_seed("eval", r["stream"])))
        first = w.first_goal(19)
        assert r["truth"] == answer(r["question"], w.score(19), first[1] if first else None)
        assert r["dense_right"] == (r["dense"] == r["truth"]) and r["same"] == (r["dense"] == r["flexprefill"])
        assert r["streaming_right"] == (r["streaming"] == r["truth"])
    assert summary["dense_right"] == sum(r["dense_right"] for r in rows) / 6
    assert 0 < summary["density"] <= 1 and summary["attn_rel_err"] >= 0 and summary["dense_ms"] > 0
    assert json.load(open(tmp_path / "long_prefill.json"))["summary"]["tokens"] == summary["tokens"]
    assert res["kernel"]  # the CPU smoke run of the kernel benchmark
