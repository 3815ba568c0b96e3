"""tools/bench_flexprefill.py on the CPU: the kernel table at a smoke size, and the long-prefill check end to end."""
import json
import re

import pytest
import torch

from tools.bench_flexprefill import main
from tools.long_prefill import MeasuredFlexPrefill, stream_questions
from flexprefill import FlexPrefill, FlexPrefillConfig
from test_eval import ckpt, refused  # noqa: F401  (ckpt: a fixture, a 2-step checkpoint)
from world import ALL_QUESTIONS, QUESTIONS, SportsStream, WorldConfig, answer, split_seed


def test_kernel_table_smoke(tmp_path):
    """At N = 1024 with min_budget 256 the selection is sparse (density < 1) on both inputs, and the table's
    max_err is the error of sparse against dense attention recomputed here from scratch: the obvious selection
    (test_flexprefill.reference_select), masked softmax in fp64 on it and dense, so that a sparse path that
    silently ran dense (error 0) or a selection that dropped the wrong blocks fails. Each query's error is within
    what the attention mass it dropped allows: |sparse - dense| <= 2 * dropped mass * max |v|."""
    from test_flexprefill import attention_reference, reference_select
    from tools.bench_flexprefill import planted_inputs, random_inputs
    rows = main(["--device", "cpu", "--lengths", "1024", "--heads", "4", "1", "--iters", "1", "--warmup", "0",
                 "--min-budget", "256", "--dtype", "float32", "--json", str(tmp_path / "k.json")])
    assert [r["input"] for r in rows] == ["random", "planted"]
    assert json.load(open(tmp_path / "k.json"))["rows"] == rows
    assert [json.loads(x) for x in open(tmp_path / "k.jsonl")] == rows  # each row as it was measured
    cfg = FlexPrefillConfig()
    for row, make in zip(rows, (random_inputs, planted_inputs)):
        q, k, v = make(1024, 4, 1, 128, torch.Generator().manual_seed(0))
        sel = reference_select(q, k, cfg.gamma, cfg.tau, 256, None, 128)[0]
        causal = torch.ones(8, 8, dtype=torch.bool).tril()
        assert (sel <= causal).all() and 0 < row["density"] < 1
        assert row["density"] == pytest.approx((sel.sum((-2, -1)) / causal.sum()).float().mean().item(), abs=1e-6)
        sparse, dense = attention_reference(q, k, v, sel, 128), attention_reference(q, k, v, None, 128)
        err = (sparse - dense).abs()
        assert err.max() > 1e-3, "sparse equals dense: the selection dropped nothing that mattered"
        assert row["max_err"] == pytest.approx(err.max().item(), abs=1e-4)
        assert row["mean_err"] == pytest.approx(err.mean().item(), abs=1e-5)
        # the dropped attention mass of each query, from dense softmax probabilities (fp64)
        p = (q.double() @ k.double().transpose(-1, -2) / 128 ** 0.5).masked_fill(~causal.repeat_interleave(
            128, 0).repeat_interleave(128, 1), float("-inf")).softmax(-1)
        kept = sel[0].repeat_interleave(128, -2).repeat_interleave(128, -1)
        dropped = (p[0] * ~kept).sum(-1)  # (heads, N)
        assert (err[0].amax(-1) <= 2 * dropped * v.abs().max() + 1e-9).all()


def test_measured_flexprefill_is_flexprefill_plus_a_record():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 1024, 32, generator=g) for h in (4, 2, 2))
    cfg = FlexPrefillConfig(min_budget=256, min_len=512)
    measured = MeasuredFlexPrefill(cfg)
    assert torch.equal(measured(q, k, v), FlexPrefill(cfg)(q, k, v))
    assert len(measured.density) == len(measured.rel_err) == 1 and 0 < measured.density[0] < 1
    measured(q[:, :, :256], k[:, :, :256], v[:, :, :256])  # under min_len: dense, and nothing to record
    assert len(measured.density) == 1


def test_long_prefill_end_to_end(ckpt, tmp_path):  # noqa: F811
    res = main(["--long-prefill", "--model", str(ckpt), "--device", "cpu", "--seconds", "12", "--min-budget", "128",
                "--streams", "2", "--seed", "3", "--out", str(tmp_path)])
    (summary,), rows = res["summary"], res["rows"]  # one line a length
    assert summary["questions"] == len(rows) == 12  # 2 streams x the three whole-video and three timed questions
    assert [r["question"] for r in rows[:6]] == ["score", "goals", "first", "score_at", "goals_before", "scorer_at"]
    assert {r["seed"] for r in rows} == {split_seed("eval", 3), split_seed("eval", 4)}
    for r in rows:  # the truth is the world's answer after the prefilled seconds, and right means equal to it
        w = SportsStream(WorldConfig(seed=r["seed"]))
        first = w.first_goal(11)
        if r["question"] in QUESTIONS:
            assert r["truth"] == answer(r["question"], w.score(11), first[1] if first else None)
        elif r["asked"] == QUESTIONS["first"]:  # who scored at a goal's second, with no goal yet
            assert r["question"] == "scorer_at" and r["truth"] == (f"{first[1]}." if first else "Nobody yet.")
        else:  # the second asked about is in the question, one of the 12 prefilled
            t = int(re.search(r" Time=(\d+)\.0-\d+\.0s\?$", r["asked"]).group(1))
            assert 0 <= t < 12
            teams = {g: team for g, e, team in w.events(0, 12) if e == "goal"}
            assert r["truth"] == {"score_at": answer("score", w.score(t), None),
                                  "goals_before": f"{len([g for g in teams if g < t])} goals.",
                                  "scorer_at": f"{teams.get(t)}."}[r["question"]]
        assert r["dense_right"] == (r["dense"] == r["truth"]) and r["same"] == (r["dense"] == r["flexprefill"])
        assert r["streaming_right"] == (r["streaming"] == r["truth"])
    assert summary["dense_right"] == pytest.approx(sum(r["dense_right"] for r in rows) / 12, abs=1e-3)
    assert 0 < summary["density"] <= 1 and summary["attn_rel_err"] >= 0 and summary["dense_ms"] > 0
    assert 0 <= summary["query_aware"] <= 1 and summary["speedup"] == round(
        summary["dense_ms"] / summary["flexprefill_ms"], 2)
    assert json.load(open(tmp_path / "long_prefill.json"))["summary"][0]["tokens"] == summary["tokens"]
    assert len(open(tmp_path / "long_prefill.jsonl").readlines()) == 12


def test_answer_on_a_prefilled_cache_is_generate_on_the_whole_prompt():
    """The fast path (the video prefilled once, each question a chunk on the cache, cut back after) answers as the
    obvious one: model.generate on the video and the question as one prompt, question after question."""
    from checkpoint import load_checkpoint
    from data import build_sample
    from layout import question_segments
    from tools.long_prefill import answer, prefill, stream_questions
    model, tok, _ = load_checkpoint("checkpoints/tiny", "cpu")
    world = SportsStream(WorldConfig(seed=split_seed("eval", 7)))
    secs = [world.second(t) for t in range(40)]
    sample = build_sample(tok, [s.frames for s in secs], [s.text for s in secs], 0, [])
    vision = dict(pixel_values_videos=sample.pixel_values, video_grid_thw=sample.grid_thw)
    cache = prefill(model, None, sample.ids[None], vision)
    for _, question, _ in stream_questions(world, 40):
        whole = torch.cat([sample.ids, torch.tensor(question_segments(tok, question)[0][0])])[None]
        out = model.generate(whole, max_new_tokens=12, stop_ids=[tok.im_end_id], **vision)[0, whole.shape[1]:]
        whole_answer = tok.decode([i for i in out.tolist() if i != tok.im_end_id]).strip()
        assert answer(model, tok, cache, question) == whole_answer
        assert cache.length == sample.ids.numel()  # cut back to the video


def test_long_prefill_without_a_checkpoint_is_one_line(tmp_path, capsys):
    err = refused(main, ["--long-prefill", "--model", str(tmp_path / "none")], capsys)
    assert "no checkpoint there" in err and "python train.py" in err


def test_authors_side_by_side_that_cannot_import_is_one_line(tmp_path, capsys):
    """--authors with a path that holds no FlexPrefill checkout (or one whose imports fail): one line says so and the
    table runs without the authors' columns."""
    rows = main(["--device", "cpu", "--lengths", "512", "--heads", "2", "1", "--iters", "1", "--warmup", "0",
                 "--min-budget", "128", "--inputs", "random", "--authors", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("not importable") == 1 and str(tmp_path) in out.splitlines()[0]
    assert len(rows) == 1 and "authors_ms" not in rows[0] and rows[0]["sel_diff"] == 0


FAKE_AUTHORS = '''
import torch
import torch.nn.functional as F


def get_active_blocks(q, k, v, block_size, gamma, min_budget, max_budget, tau=0, gqa_interleave=False):
    nb = -(-q.shape[1] // block_size)   # every causal block, as flat indices of the nb x nb grid, per (b, h)
    idx = torch.tensor([r * nb + c for r in range(nb) for c in range(r + 1)])
    return [[idx for _ in range(q.shape[2])] for _ in range(q.shape[0])]


def flex_prefill_attention(q, k, v, gamma, tau=0, min_budget=None, max_budget=None, gqa_interleave=False,
                           softmax_scale=None, block_size=128, return_computational_ratio=False):
    o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True)
    return o.transpose(1, 2)
'''


def test_authors_side_by_side_plumbing(tmp_path):
    """A stand-in for the authors' module with their API (B, N, H, D layout) that keeps every causal block and runs
    dense attention: their density is 1, they differ from us in exactly the blocks we drop (1 - our density), their
    error against dense is ~0, and x_authors is their time over ours."""
    ops = tmp_path / "flex_prefill" / "ops"
    ops.mkdir(parents=True)
    (ops / "flex_prefill_attention.py").write_text(FAKE_AUTHORS)
    rows = main(["--device", "cpu", "--lengths", "1024", "--heads", "4", "1", "--iters", "1", "--warmup", "0",
                 "--min-budget", "256", "--dtype", "float32", "--inputs", "planted", "--authors", str(tmp_path)])
    row = rows[0]
    assert row["authors_density"] == 1.0 and row["density"] < 1
    assert row["vs_authors"] == pytest.approx(1 - row["density"], abs=1e-6)
    assert row["authors_max_err"] < 1e-4 < row["max_err"]
    assert row["x_authors"] == pytest.approx(row["authors_ms"] / row["flexprefill_ms"])
    assert row["x_authors_sparse"] == pytest.approx(row["authors_ms"] / row["total_ms"])


def test_authors_that_fail_at_run_time_cost_their_columns_only(tmp_path, capsys):
    ops = tmp_path / "flex_prefill" / "ops"
    ops.mkdir(parents=True)
    broken = FAKE_AUTHORS.replace("nb = -(-", "raise RuntimeError('old triton')  #")
    (ops / "flex_prefill_attention.py").write_text(broken)
    rows = main(["--device", "cpu", "--lengths", "512", "--heads", "2", "1", "--iters", "1", "--warmup", "0",
                 "--min-budget", "128", "--inputs", "random", "--authors", str(tmp_path)])
    assert "failed on random N=512: RuntimeError: old triton" in capsys.readouterr().out
    assert "authors_ms" not in rows[0] and rows[0]["x_authors"] is None and rows[0]["sdpa_ms"] > 0


def test_timed_questions_ask_about_different_goals():
    w = SportsStream(WorldConfig(seed=split_seed("eval", 0), goal_rate=0.05))
    goals = [t for t, e, _ in w.events(0, 600) if e == "goal"]
    assert len(goals) >= 4
    asked = stream_questions(w, 600, timed=4)
    kinds = [k for k, _, _ in asked]
    assert kinds == ["score", "goals", "first"] + ["score_at"] * 4 + ["goals_before"] * 4 + ["scorer_at"] * 4
    for kind in ("score_at", "goals_before", "scorer_at"):
        seconds = [int(re.search(r"Time=(\d+)\.0", q).group(1)) for k, q, _ in asked if k == kind]
        assert len(set(seconds)) == 4 and set(seconds) <= set(goals)  # four different goals' seconds
    assert len(stream_questions(w, 600, timed=len(goals) + 5)) == 3 + 3 * len(goals)  # as many as there are
    assert [k for k, _, _ in stream_questions(w, 600)] == list(ALL_QUESTIONS)  # one of each kind by default


def test_long_training_sample_is_the_layout_the_check_asks_in(ckpt):  # noqa: F811
    """Training layout vs inference layout: a --long-seconds sample (data.long_sample) is the check's prompt (same
    tokens, same pixels), and its first question, asked on the check's prefilled cache, gets the logits the
    training forward gives it in place."""
    import random
    from checkpoint import load_checkpoint
    from data import chunk_at, long_sample
    from layout import layout_of, question_segments
    from stream import streamer_kwargs
    from tools.long_prefill import prefill, video_prompt
    from world import long_questions
    model, tok, st = load_checkpoint(ckpt, "cpu")
    world = dict(event_rate=0.3, goal_rate=0.1)
    s = long_sample(tok, "eval", 2, 20, 4, world, frame_pixels=streamer_kwargs(layout_of(st))["frame_pixels"])
    stream, _ = chunk_at("eval", 2, 20, 0, 20, world)
    _, ids, vision = video_prompt(model, tok, st, stream, 20)
    T = ids.shape[1]
    assert s.ids[:T].tolist() == ids[0].tolist() and torch.equal(s.pixel_values, vision["pixel_values_videos"])
    question, _ = long_questions(stream, 20, 4, random.Random("eval-2-long"))[0]
    q = torch.tensor([question_segments(tok, question)[0][0]])
    assert s.ids[T:T + q.shape[1]].tolist() == q[0].tolist()  # the first question right after the video
    with torch.no_grad():
        trained = model(s.ids[None], pixel_values_videos=s.pixel_values, video_grid_thw=s.grid_thw)[0, T:T + q.shape[1]]
        asked = model(q, cache=prefill(model, None, ids, vision))[0]
    torch.testing.assert_close(asked, trained, atol=1e-4, rtol=1e-4)
