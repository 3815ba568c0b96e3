"""data.py and train.py: the sample layout token by token, learning, resume, and 2-process DDP on CPU."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from data import IGNORE, build_sample, make_tokenizer, previous_ids, synthetic_sample
from layout import Kind, end_ids, prefix_segments, reply_ids, user_ids
from world import SportsStream, WorldConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "6", "--batch-size", "2", "--eval-every", "3", "--eval-chunks", "1", "--chunk-seconds", "6",
        "--overlap", "3", "--stream-seconds", "600", "--text-sink", "16", "--text-window", "24", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_sample_layout_token_by_token(tok):
    from PIL import Image
    frames = [[Image.new("RGB", (56, 56), (10 * k, 0, 0))] * 2 for k in range(3)]
    texts = ["Red shoots!", "", "Red scores! Red 1, Blue 0."]
    previous = ["Foul by Blue." for _ in range(20)]
    s = build_sample(tok, frames, texts, 100, previous, text_sink=5, text_window=7)
    body = sum((reply_ids(tok, t) for t in previous), [])
    assert len(body) > 12
    expect_ids, expect_labels = [], []
    for seg, _ in prefix_segments(tok, body[:5] + body[-7:], 5, 7):  # head 5 + tail 7 of the previous text
        expect_ids += seg
        expect_labels += [IGNORE] * len(seg)
    for k, text in enumerate(texts):
        u, r, e = user_ids(tok, 100 + k, 4), reply_ids(tok, text), end_ids(tok)
        assert tok.decode(u).startswith(f"<|im_start|>user\nTime={100 + k}.0-{101 + k}.0s<|vision_start|>")
        expect_ids += u + r + e
        expect_labels += [IGNORE] * len(u) + r + e[:-1] + [IGNORE]  # reply, " ..." and <|im_end|>; not "\n"
    assert s.ids.tolist() == expect_ids
    assert s.labels.tolist() == expect_labels
    assert tok.decode([i for i in s.labels.tolist() if i != IGNORE]) == \
        " Red shoots! ...<|im_end|> ...<|im_end|> Red scores! Red 1, Blue 0. ...<|im_end|>"
    assert s.grid_thw.tolist() == [[1, 4, 4]] * 3


def test_training_chunk_is_byte_identical_to_the_teacher_forced_stream(tok):
    """What training builds for a chunk (data.build_sample) is exactly what the streaming loop feeds its cache
    when forced to say the same commentary: the same ids, and the same frames resized to the same grids."""
    from conftest import tiny_model
    from stream import Streamer
    w = SportsStream(WorldConfig(seed=3, event_rate=0.5))
    secs = [w.second(t) for t in range(5)]
    assert any(s.text for s in secs) and not all(s.text for s in secs)
    sample = build_sample(tok, [s.frames for s in secs], [s.text for s in secs], 0, [], 16, 16)
    s = Streamer(tiny_model(tok), tok, evict=False, text_sink=16, text_window=16)  # full attention
    for sec in secs:
        assert s.step(sec.frames, force_text=sec.text) == sec.text
    ids, _, _ = s.cache.tokens()
    assert ids.tolist() + [i for seg, _ in s.pending for i in seg] == sample.ids.tolist()
    assert [s.prepare(sec.frames).grid.tolist() for sec in secs] == [[g] for g in sample.grid_thw.tolist()]


# ---- StreamingVLM's eviction written out by hand: the reference for the segment tests (cache.py and reuse.py
# share kept_after_eviction, contiguous_positions and units, so they cannot be each other's reference) ----------


def test_previous_text_is_all_commentary_before_the_chunk(tok):
    stream = SportsStream(WorldConfig(seed=5))
    t0 = 600
    prev = [text for _, text in stream.transcript(0, t0)]
    full = sum((reply_ids(tok, t) for t in prev), [])
    assert previous_ids(tok, prev, 32, 48) == full[:32] + full[-48:]
    assert previous_ids(tok, prev[:2], 32, 48) == sum((reply_ids(tok, t) for t in prev[:2]), [])


def test_chunks_overlap_on_the_stride(tok):
    starts = set()
    for i in range(30):
        s = synthetic_sample(tok, "train", i, chunk_seconds=6, overlap=3, stream_seconds=60, text_sink=8,
                             text_window=8)
        text = tok.decode(s.ids)
        t0 = int(text.split("Time=")[1].split(".")[0])
        starts.add(t0)
        assert text.count("Time=") == 6
    assert starts <= set(range(0, 60, 3)) and len(starts) > 5


def run_train(tmp_path, name, *extra):
    out = tmp_path / name
    from train import main
    return main(["--out", str(out), *FAST, *extra]), out


def test_training_lowers_the_loss_and_checkpoint_loads(tmp_path):
    history, out = run_train(tmp_path, "a")
    assert sum(history[-2:]) / 2 < 0.7 * sum(history[:2]) / 2, history
    from model import VLM
    m = VLM.from_pretrained(out, device="cpu")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "optimizer.safetensors", "stream.json",
                                       "tokenizer.json", "train_state.json"]
    # the cpu preset's decoder, and a streaming window no longer than a training chunk (6 s here, 16 s by default)
    assert (m.cfg.num_hidden_layers, m.cfg.hidden_size) == (2, 128)
    with open(out / "stream.json") as f:
        assert json.load(f)["vision_window"] == 6
    from checkpoint import stream_layout
    from dataclasses import replace
    from train import PRESETS
    assert stream_layout(PRESETS["gpu"]).vision_window == 16
    # served evicting as it trained: every second without segments, every N s on N s segments
    assert stream_layout(replace(PRESETS["gpu"], segment_seconds=0, segment_steps=0)).evict_every == 1
    assert stream_layout(replace(PRESETS["gpu"], segment_seconds=8)).evict_every == 8
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, torch_dtype=torch.float32)
    ids = torch.tensor([[m.cfg.eos_token_id, 5, 6, 7]])
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - m(ids)).abs().max() < 1e-4


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, _ = run_train(tmp_path, "full")
    first, out = run_train(tmp_path, "part", "--stop-at", "4")  # interrupted after step 4 of 6
    with pytest.raises(SystemExit, match="--lr 0.003 -> 0.001"):  # other settings would silently change the run
        run_train(tmp_path, "part", "--resume", "--lr", "1e-3")
    resumed, _ = run_train(tmp_path, "part", "--resume")
    assert len(resumed) == 6
    assert resumed[:4] == first
    assert torch.allclose(torch.tensor(resumed), torch.tensor(full), rtol=1e-5), (resumed, full)


PHASES = ["--steps", "5", "--segment-steps", "2", "--segment-seconds", "2", "--segment-chunk-seconds", "6",
          "--segment-batch-size", "1", "--segment-lr", "1e-3", "--vision-window", "2",
          "--segment-goal-rate", "0.01:0.02", "--segment-event-rate", "0.2"]


def test_a_run_in_two_phases_trains_chunks_then_segments_and_resumes_across_them(tok, tmp_path):
    """--segment-steps 2 of 5: steps 0-2 on plain chunks (batch 2), steps 3-4 on segments of their own chunks
    (batch 1), the learning rate warming up again to --segment-lr, the vision tower frozen; a checkpoint of the
    first phase is served evicting every second, of the second every 2 s (its segments); a run stopped at the
    boundary and resumed ends where the uninterrupted one does."""
    from data import MicroBatches, phase_at, unpack
    from reuse import segments
    from train import get_args, lr_at
    cfg = get_args(["--out", str(tmp_path / "x"), *FAST, *PHASES]).cfg
    assert [phase_at(s, cfg)[0] for s in range(5)] == [0, 0, 0, 3, 3]
    assert [phase_at(s, cfg)[1].segment_seconds for s in (2, 3)] == [0, 2]
    assert [phase_at(s, cfg)[1].goal_rate for s in (2, 3)] == [0.05, (0.01, 0.02)]  # the segments' own world
    assert [phase_at(s, cfg)[1].event_rate for s in (2, 3)] == [cfg.event_rate, 0.2]
    assert lr_at(2, cfg) == pytest.approx(3e-3 * 0.55)  # halfway down the first phase's cosine, then afresh:
    assert lr_at(3, cfg) == lr_at(4, cfg) == pytest.approx(1e-3)  # a 1-step warm-up, the cosine's first point
    ds = MicroBatches(tok, cfg, tiny_model_cfg(tok), None, 0, 0, 1)
    first, second = unpack(ds[2]), unpack(ds[3])
    assert "then" not in first and first["input_ids"].shape[0] == 2
    assert len(segments(second)) == 3 and second["input_ids"].shape[0] == 1
    full, out = run_train(tmp_path, "full", *PHASES)
    assert json.load(open(out / "stream.json"))["evict_every"] == 2
    assert json.load(open(out / "stream.json"))["train_goal_rate"] == [0.01, 0.02]
    assert json.load(open(out / "stream.json"))["train_event_rate"] == 0.2
    run_train(tmp_path, "part", *PHASES, "--stop-at", "3")
    assert json.load(open(tmp_path / "part" / "stream.json"))["evict_every"] == 1
    from safetensors.torch import load_file
    after, before = (load_file(d / "model.safetensors") for d in (out, tmp_path / "part"))
    vision = [k for k in after if k.startswith("visual.")]
    assert vision and all(torch.equal(after[k], before[k]) for k in vision)  # the segment phase froze the tower
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # the decoder trained on
    resumed, _ = run_train(tmp_path, "part", *PHASES, "--resume")
    assert torch.allclose(torch.tensor(resumed), torch.tensor(full), rtol=1e-5), (resumed, full)


def test_a_packed_batch_is_the_batch(tok, tmp_path):
    """A DataLoader worker packs each micro-batch into one buffer (data.pack); unpacked, every tensor (in every
    segment) equals the batch built directly, and validate.to_device gives the same tensors from either."""
    from data import MicroBatches, make_batch, pack, phase_at, unpack, with_positions
    from train import get_args
    from validate import to_device
    cfg = get_args(["--out", str(tmp_path / "x"), *FAST, *PHASES]).cfg
    ds = MicroBatches(tok, cfg, tiny_model_cfg(tok), None, 0, 0, 1)

    def same(a, b):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], dict):
                same(a[k], b[k])
            else:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for step in (0, 3):  # plain chunks, then chunks in segments (a nested "then" per segment)
        start, c = phase_at(step, cfg)
        first = (step - start) * c.batch_size + start * cfg.batch_size
        want = with_positions(make_batch(tok, "train", range(first, first + c.batch_size), c, step - start),
                              ds.model_cfg)
        got = unpack(ds[step])
        assert ("then" in want) == (step == 3)
        same({k: v for k, v in got.items() if k != "flat"}, want)
        same(to_device(got, "cpu"), to_device(want, "cpu"))
        assert unpack(pack(want))["flat"].numel() == got["flat"].numel()
    got["labels"] = got["labels"][:, ::2]  # a strided view of the buffer, put in after unpacking, is copied as itself
    assert torch.equal(to_device(got, "cpu")["labels"], want["labels"][:, ::2])


def tiny_model_cfg(tok):
    from model import tiny_config
    return tiny_config(tok, 4, 256)


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_saves_after_the_step_in_progress(tmp_path, monkeypatch, signals):
    """Ctrl-C during step 2 (of 6, checkpoints every 3): the step finishes, a checkpoint of step 2 is saved, the run
    stops with one line, and --resume then ends where the uninterrupted run ends. Two SIGINTs at once (what
    `timeout -s INT` sends: one to the process, one to its group) are still one Ctrl-C."""
    import signal
    import train
    full, _ = run_train(tmp_path, "full")
    real_step = train.train_step

    def step_then_ctrl_c(step, *a):
        out = real_step(step, *a)
        if step == 1:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    with pytest.raises(SystemExit, match="stopped by Ctrl-C after step 2: .* --resume continues"):
        run_train(tmp_path, "cut")
    assert json.load(open(tmp_path / "cut" / "train_state.json"))["step"] == 2
    monkeypatch.setattr(train, "train_step", real_step)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed, _ = run_train(tmp_path, "cut", "--resume")
    assert torch.allclose(torch.tensor(resumed), torch.tensor(full), rtol=1e-5), (resumed, full)


def test_a_second_ctrl_c_stops_at_once():
    """A Ctrl-C more than two seconds after the first raises KeyboardInterrupt (stop now, without saving)."""
    import signal
    import time
    import train
    with train.stop_on_ctrl_c(True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert len(stop) == 1
        time.sleep(2.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ddp_two_cpu_processes_match_one(tmp_path):
    one, _ = run_train(tmp_path, "one", "--steps", "3", "--batch-size", "2", "--segment-seconds", "2",
                      "--vision-window", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "two"), *FAST, "--steps", "3", "--batch-size", "1",
           "--segment-seconds", "2", "--vision-window", "1"]  # three forwards a micro-batch, each on the K/V of
    # the ones before, and one backward
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    two = json.load(open(tmp_path / "two" / "train_state.json"))["history"]
    assert torch.allclose(torch.tensor(two), torch.tensor(one), rtol=1e-4), (two, one)


def test_curriculum_ramps_chunks_and_world_knobs_apply_to_training_only(tok, tmp_path):
    from data import make_batch
    from train import get_args
    args = get_args(["--out", str(tmp_path / "x"), "--preset", "cpu", "--curriculum", "10", "--chunk-seconds", "24",
                     "--event-rate", "0.9", "--goal-rate", "0.05", "--stream-seconds", "300"]).cfg
    secs = lambda b: len(b["video_grid_thw"])  # one temporal grid per second
    assert secs(make_batch(tok, "train", [0], args, step=0)) == 2     # short chunks first
    assert secs(make_batch(tok, "train", [0], args, step=5)) == 13    # 2 + 22 * 5 // 10
    assert secs(make_batch(tok, "train", [0], args, step=10)) == 24   # then the configured length
    quiet = tok.encode(" ...")[0]
    def event_share(split):
        b = make_batch(tok, split, range(4), args, step=10)
        labels = b["labels"]
        first = (labels[:, 1:] != IGNORE) & (labels[:, :-1] == IGNORE)
        return (labels[:, 1:][first] != quiet).float().mean().item()
    assert event_share("train") > 0.7 > 0.3 > event_share("eval")     # the busy world trains, the default validates


def test_time_curriculum_starts_chunks_early_in_the_stream(tok, tmp_path):
    from data import make_batch
    from train import get_args
    args = get_args(["--out", str(tmp_path / "x"), "--preset", "cpu", "--time-curriculum", "100",
                     "--stream-seconds", "3600"]).cfg
    start = lambda b, i: int(re.search(r"Time=(\d+)", tok.decode(b["input_ids"][i].tolist())).group(1))
    early = make_batch(tok, "train", range(16), args, step=0)
    late = make_batch(tok, "train", range(16), args, step=100)
    assert max(start(early, i) for i in range(16)) < 60        # the first minute only
    assert max(start(late, i) for i in range(16)) > 600        # then anywhere in the stream


def test_first_token_hits_counts_events_and_quiet_seconds(tok):
    from validate import first_token_hits
    b = make_batch_for_hits(tok)
    labels = b["labels"]

    def oracle(**batch):  # logits that put all mass on the next label: every first reply token right
        nxt = torch.cat([labels[:, 1:], labels[:, -1:]], 1).clamp(min=0)
        return torch.nn.functional.one_hot(nxt, len(tok) + 1).float()

    numbers = {tok.encode(f" {n}")[0] for n in range(100)}
    ev_right, ev, quiet_right, quiet, score_right, scores = first_token_hits(oracle, b, "cpu", tok.encode(" ...")[0],
                                                                             numbers)
    assert (ev_right, quiet_right, score_right) == (ev, quiet, scores) and ev >= 1 and quiet >= 1 and ev + quiet == 24
    assert scores >= 2 and scores % 2 == 0  # two numbers per goal sentence

    def silent(**batch):  # always " ...": right exactly on the quiet seconds
        x = torch.zeros(*labels.shape, len(tok) + 1)
        x[..., tok.encode(" ...")[0]] = 1
        return x

    assert first_token_hits(silent, b, "cpu", tok.encode(" ...")[0], numbers) == (0, ev, quiet, quiet, 0, scores)


def make_batch_for_hits(tok):
    from data import collate
    s = synthetic_sample(tok, "train", 3, 24, 12, 600, 16, 16, dict(event_rate=0.5, goal_rate=0.2))
    return collate([s], tok.pad_id)


def test_goal_rate_range_draws_a_rate_per_stream(tok):
    from train import rate_or_range
    assert rate_or_range("0.02") == 0.02 and rate_or_range("0.005:0.05") == (0.005, 0.05)
    with pytest.raises(Exception):
        rate_or_range("0.05:0.005")
    world = dict(goal_rate=(0.005, 0.05))
    a = synthetic_sample(tok, "train", 7, 6, 3, 600, 16, 16, world)
    b = synthetic_sample(tok, "train", 7, 6, 3, 600, 16, 16, world)
    assert torch.equal(a.ids, b.ids)  # deterministic per index
    goals = [sum(t.startswith(("Red scores", "Blue scores")) for _, t in
                 SportsStream(WorldConfig(seed=1, goal_rate=r)).transcript(0, 3000)) for r in (0.005, 0.05)]
    assert goals[0] < goals[1]  # the knob really changes the world


@pytest.mark.parametrize("preroll", [0, 8])
def test_goal_gaps_counts_the_goals_a_chunk_supervises(tok, preroll, capsys):
    from tools.goal_gaps import goals_of, main
    world, total = dict(event_rate=0.3, goal_rate=(0.05, 0.2)), 0
    for i in range(6):
        s = synthetic_sample(tok, "train", i, 16, 8, 600, 16, 16, world, preroll=preroll)
        supervised = tok.decode([t for t in s.labels.tolist() if t != IGNORE])
        goals = goals_of("train", i, 16, 8, 600, world, preroll, segment_seconds=4)
        assert supervised.count(" scores!") == len(goals)
        assert all(gap > 0 for where, gap in goals if where != "none")
        assert all(gap < 4 for where, gap in goals if where == "same")  # one forward: a segment of 4 s
        total += len(goals)
    assert total >= 6
    main(["--preset", "gpu", "--step", "6100", "--chunks", "40"])
    out = capsys.readouterr().out
    assert "192 s chunks" in out and "earlier segment (reused K/V" in out and "own forward (fresh K/V)" in out


def test_questions_are_asked_only_when_the_chunk_can_answer(tok):
    """survives_cut agrees with the cut previous_ids really makes (each token tagged with its sentence, cut the same
    way, and the tags compared with previous_ids' output), and chunk_question asks exactly when the sentence its
    answer needs survives, with the world's answer."""
    import random
    from data import chunk_question, survives_cut
    from world import QUESTIONS, answer
    w = SportsStream(WorldConfig(seed=5, event_rate=0.4, goal_rate=0.05))
    events = w.transcript(0, 400)
    texts = [t for _, t in events]
    ids = [i for t in texts for i in reply_ids(tok, t)]
    tags = [k for k, t in enumerate(texts) for _ in reply_ids(tok, t)]  # the sentence of each token
    for sink, window in ((8, 16), (16, 64), (0, 5), (1000, 1000)):
        cut = previous_ids(tok, texts, sink, window)
        keep = range(len(ids)) if len(ids) <= sink + window else [*range(sink), *range(len(ids) - window, len(ids))]
        assert cut == [ids[i] for i in keep]  # the tagging follows previous_ids' cut
        for k in range(len(texts)):
            kept = sum(tags[i] == k for i in keep) == tags.count(k)
            assert survives_cut(tok, texts, k, sink, window) == kept, (sink, window, k)
    goals = [t for t, e, _ in w.events(0, 424) if e == "goal"]
    asked = refused = 0
    for i in range(60):
        q = chunk_question(tok, w, 400, 424, events, random.Random(i), 8, 16)
        kind = random.Random(i).choice(["score", "score", "goals", "first"])  # the draw chunk_question makes
        needed = goals[0] if kind == "first" else goals[-1]
        k = next((j for j, (t, _) in enumerate(events) if t == needed), None)  # None: the goal is in the chunk
        if k is not None and not survives_cut(tok, texts, k, 8, 16):
            assert q is None
            refused += 1
            continue
        asked += 1
        assert q[0] == QUESTIONS[kind]
        first = w.first_goal(423)
        assert q[1] == answer(kind, w.score(423), first[1] if first else None)
    assert asked and refused  # with an 8 + 16 token cut some questions cannot be answered, others can


def test_question_turn_ends_the_chunk_and_only_its_answer_is_supervised(tok):
    w = SportsStream(WorldConfig(seed=2, size=56))
    secs = [w.second(t) for t in range(3)]
    args = ([s.frames for s in secs], [s.text for s in secs], 0, [], 16, 16)
    plain = build_sample(tok, *args)
    asked = build_sample(tok, *args, question=("What is the score?", "Red 1, Blue 0."))
    n = len(plain.ids)
    assert torch.equal(asked.ids[:n], plain.ids) and torch.equal(asked.labels[:n], plain.labels)
    tail, labels = asked.ids[n:].tolist(), asked.labels[n:].tolist()
    prompt = tok.encode("<|im_start|>user\nWhat is the score?<|im_end|>\n<|im_start|>assistant\n")
    answer = reply_ids(tok, "Red 1, Blue 0.") + [tok.im_end_id]
    assert tail == prompt + answer and labels == [IGNORE] * len(prompt) + answer
    # to the cache the whole question turn is USER: evicted with its second, it never joins the previous text
    from cache import kept_after_eviction
    from test_reuse import evict_by_hand
    mid = build_sample(tok, *args, asked={0: [("What is the score?", "Red 1, Blue 0.")]})
    start = int((plain.round < 1).sum())  # where second 1 begins without the question
    question = torch.arange(start, start + len(prompt) + len(answer))
    assert mid.ids[question].tolist() == prompt + answer and (mid.kind[question] == Kind.USER).all()
    keep, body = kept_after_eviction(mid.kind, mid.round, 2, 1, 16, 16)  # at second 2, seconds 0-1 leave
    assert not set(question.tolist()) & set(keep.tolist())
    by_hand = evict_by_hand(list(zip(range(len(mid.ids)), mid.kind.tolist(), mid.round.tolist())), 2, 1, 16, 16)
    assert [i for i, _, _ in by_hand] == keep.tolist()  # the cache's eviction is the one written out by hand


def test_first_goal_and_answers():
    from world import answer
    w = SportsStream(WorldConfig(seed=4, goal_rate=0.02))
    goals = [(t, text.split()[0]) for t, text in w.transcript(0, 2000) if "scores!" in text]
    assert w.first_goal(goals[0][0] - 1) is None and w.first_goal(goals[0][0]) == goals[0]
    assert w.first_goal(1999) == goals[0]
    red = sum(team == "Red" for _, team in goals)
    assert w.score(1999) == (red, len(goals) - red)
    assert answer("goals", (3, 4), "Red") == "7 goals." and answer("first", (0, 0), None) == "Nobody yet."
    assert answer("score", (3, 4), "Red") == "Red 3, Blue 4."


def test_answer_right_reads_only_the_answer(tok):
    from data import collate
    from validate import answer_right
    w = SportsStream(WorldConfig(seed=2, size=56))
    secs = [w.second(t) for t in range(3)]
    args = ([s.frames for s in secs], [s.text for s in secs], 0, [], 16, 16)
    asked = collate([build_sample(tok, *args, question=("What is the score?", "Red 1, Blue 0."))], tok.pad_id)
    plain = collate([build_sample(tok, *args)], tok.pad_id)

    class Oracle:  # logits that put all mass on the next label (or on `wrong` at one answer position)
        cfg = type("cfg", (), {"video_token_id": tok.video_pad_id})

        def __init__(self, labels, wrong_at=None):
            self.labels, self.wrong_at = labels, wrong_at

        def __call__(self, input_ids, **kw):
            nxt = torch.cat([self.labels[0, 1:], torch.tensor([0])]).clamp(min=0)
            if self.wrong_at is not None:
                nxt[self.wrong_at] = (nxt[self.wrong_at] + 1) % len(tok)
            return torch.nn.functional.one_hot(nxt, len(tok)).float()[None]

    labels = asked["labels"]
    assert answer_right(Oracle(labels), asked, "cpu", tok.im_start_id) is True
    last = int((labels[0] != IGNORE).nonzero()[-1])  # <|im_end|> after the answer
    assert answer_right(Oracle(labels, wrong_at=last - 2), asked, "cpu", tok.im_start_id) is False
    assert answer_right(Oracle(plain["labels"]), plain, "cpu", tok.im_start_id) is None


def test_batches_carry_uint8_frames_and_fall_back_to_patches_when_sizes_differ(tok):
    """collate ships one size of frames as uint8 (patchified on the device: validate.to_device), and frames of
    several sizes as the float patches the vision tower takes; both give the same pixel values."""
    from data import collate
    from validate import to_device
    small = [SportsStream(WorldConfig(seed=1, size=56)).second(t) for t in range(2)]
    large = [SportsStream(WorldConfig(seed=1, size=84)).second(t) for t in range(2)]
    a, b = (build_sample(tok, [s.frames for s in secs], [s.text for s in secs], 0, []) for secs in (small, large))
    same = collate([a, a], tok.pad_id)
    assert same["video_frames"].dtype == torch.uint8 and "pixel_values_videos" not in same
    assert torch.equal(to_device(same, "cpu")["pixel_values_videos"], torch.cat([a.pixel_values] * 2))
    mixed = collate([a, b], tok.pad_id)
    assert "video_frames" not in mixed
    assert torch.equal(mixed["pixel_values_videos"], torch.cat([a.pixel_values, b.pixel_values]))
    # seconds of different sizes in one chunk (a video that changes resolution) keep patches, and split with them
    from reuse import split_chunk
    m = build_sample(tok, [small[0].frames, large[1].frames], [small[0].text, large[1].text], 0, [])
    first, rest = split_chunk(m, [1])
    assert m.frames is None and torch.equal(torch.cat([first.pixel_values, rest.pixel_values]), m.pixel_values)
    assert len(first.pixel_values) == int(m.grid_thw[0].prod())


def test_long_sample_is_the_stream_from_its_start_then_timed_questions(tok):
    """train.py --long-seconds: every round from second 0 (no previous text), then the questions, their answers
    supervised and equal to the world's (and the last minute's replies, the rest context); a micro-batch shares
    one length, so its padding is short and on the right; --curriculum grows the lengths."""
    import random
    from dataclasses import replace
    from data import LONG_SUPERVISED_SECONDS, chunk_at, long_range, long_sample, make_batch
    from train import get_args
    from world import long_questions
    world = dict(event_rate=0.3, goal_rate=0.05)
    s = long_sample(tok, "train", 5, 40, 3, world)
    prefix = sum(len(seg) for seg, _ in prefix_segments(tok, [], 512, 512))  # the system prompt, no previous text
    assert len(s.grid_thw) == 40 and int((s.round == -1).sum()) == prefix
    stream, t0 = chunk_at("train", 5, 40, 0, 40, world)
    rng = random.Random("train-5-long")
    asked = long_questions(stream, 40, 3, rng)
    supervised = tok.decode([t for t in s.labels.tolist() if t != IGNORE])
    assert t0 == 0 and supervised.endswith("".join(f" {a}<|im_end|>" for _, a in asked))
    # the answers and the last minute's replies are supervised, earlier replies are context only
    long = long_sample(tok, "train", 5, 100, 3, world)
    early = long.round < 100 - LONG_SUPERVISED_SECONDS
    assert (long.labels[early] == IGNORE).all() and (long.labels[~early & (long.kind != Kind.USER)] != IGNORE).any()
    text = tok.decode(s.ids.tolist())
    assert text.count("<|im_start|>user\nTime=") == 40 and all(q in text for q, _ in asked)
    assert text.index(asked[0][0]) > text.rindex("<|im_start|>user\nTime=")  # asked after the last second
    cfg = get_args(["--preset", "cpu", "--long-seconds", "20:30", "--long-questions", "2", "--out", "/none/x"]).cfg
    b = make_batch(tok, "train", [0, 1, 2], cfg)
    assert len(b["video_grid_thw"]) % 3 == 0 and 60 <= len(b["video_grid_thw"]) <= 90  # one length, 20-30 s, for all
    assert b["labels"].shape[0] == 3
    ramp = replace(cfg, long_seconds=(300, 2200), curriculum=100)  # --curriculum: lengths grow from a minute
    assert [long_range(s, ramp) for s in (0, 50, 100, None)] == [(60, 60), (180, 1130), (300, 2200), (300, 2200)]
    assert len(make_batch(tok, "train", [0], replace(ramp, long_seconds=(30, 40)), step=0)["video_grid_thw"]) == 30
    said = get_args(["--preset", "cpu", "--long-seconds", "30", "--long-questions", "8", "--said-at", "--goal-rate",
                     "0.05", "--event-rate", "0.3", "--out", "/none/x"]).cfg
    assert "What was said at Time=" in tok.decode(make_batch(tok, "train", [0], said)["input_ids"][0].tolist())
    assert "What was said" not in tok.decode(make_batch(tok, "train", [0], replace(said, said_at=False))["input_ids"][0]
                                             .tolist())
    v = make_batch(tok, "eval", [0], cfg)  # validation's plain streams ask nothing (its question ones are apart)
    assert "What" not in tok.decode(v["input_ids"][0].tolist())
    dense = long_sample(tok, "train", 0, 300, 1, dict(goal_rate=0.9, event_rate=0.05))  # ~270 goals at this rate
    assert max(int(n) for n in re.findall(r"(?:Red|Blue) (\d+)", tok.decode(dense.ids.tolist()))) < 100
    m = b["attention_mask"].bool()
    assert bool((m[:, 1:] <= m[:, :-1]).all())  # right-padded: causal attention needs no mask (model.right_padded)
