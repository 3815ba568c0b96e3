"""serve.py: streams batched together say what each says alone (the shipped tiny model, CPU, greedy).

The reference is the one-stream Streamer (stream.py): every stream of a batch must produce its exact commentary, and
its cache must hold the same tokens at the same positions with the same keys and values (up to float rounding: a
batched matmul sums in another order)."""
import json

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import stream
from cache import StreamingCache
from checkpoint import load_checkpoint
from cli import SHIPPED
from layout import layout_of
from model import causal_attention
from prefill import CachedPrefill
from serve import PackedRowAttention, RowAttention, StreamBatch, adopt_row, move_rows
from world import SportsStream, WorldConfig, split_seed

SEEDS = (0, 4, 5)   # held-out streams with events in their first seconds (seconds 5 and 8; 2; 1 and 3)


@pytest.fixture(scope="module")
def shipped():
    model, tok, st = load_checkpoint(SHIPPED, "cpu")
    return model, tok, stream.streamer_kwargs(layout_of(st))


def worlds():
    return [SportsStream(WorldConfig(seed=split_seed("eval", s), size=56)) for s in SEEDS]


def test_a_batch_says_what_each_stream_says_alone(shipped):
    """Three streams of 10, 6 and 8 s; the third joins at the batch's second 3, the second leaves after its 6 s."""
    model, tok, kw = shipped
    lengths, joins = [10, 6, 8], [0, 0, 3]
    alone = []
    for w, n in zip(worlds(), lengths):
        s = stream.make_streamer(model, tok, **kw, capacity=1024)
        alone.append([s.step(w.second(t).frames) for t in range(n)])
    batch, said = StreamBatch(model, tok, rows=3, capacity=1024), [[], [], []]
    for T in range(max(j + n for j, n in zip(joins, lengths))):
        join_and_leave(batch, T, joins, lengths, kw)
        ready = {i: worlds()[i].second(T - joins[i]).frames for i in batch.streams}
        for i, text in batch.step(ready).items():
            said[i].append(text)
    assert alone == said
    assert sum(bool(x) for texts in said for x in texts) >= 4, "the streams must say something to compare"


def join_and_leave(batch, T, joins, lengths, kw):
    """At batch second T, stream i joins if it starts now (joins[i]) and leaves once it has had its lengths[i]."""
    for i, (j, n) in enumerate(zip(joins, lengths)):
        if T == j:
            batch.add(i, **kw)
        if T == j + n:
            batch.remove(i)


def nine_seconds_beside_alone(model, tok, kw, rows, decode, prefill="packed"):
    """The three held-out streams for 9 s (an eviction at second 8 included) in a batch of `rows` rows and each
    alone, asserting every second that the batch says what each says alone; returns (batch, the lone streamers)."""
    ws, batch = worlds(), StreamBatch(model, tok, rows=rows, capacity=1024, decode=decode, prefill=prefill)
    for i in range(3):
        batch.add(i, **kw)
    alone = [stream.make_streamer(model, tok, **kw, capacity=1024) for _ in ws]
    for t in range(9):
        said = batch.step({i: w.second(t).frames for i, w in enumerate(ws)})
        assert said == {i: s.step(w.second(t).frames) for i, (s, w) in enumerate(zip(alone, ws))}
    return batch, alone


@pytest.mark.parametrize("decode, prefill", [("plain", "packed"), ("graphs", "packed"), ("plain", "rows"),
                                             ("compiled", "rows")])
def test_batched_cache_rows_hold_the_lone_caches(shipped, decode, prefill):
    """After 9 s (an eviction at second 8 included), each row holds its lone cache's tokens, positions and K/V, and
    said the same; decode="graphs" runs the fixed-shape step over every row (eagerly on a CPU), silent rows writing
    to their scratch slot, as a CUDA graph replays it; prefill="rows" attends row by row (RowAttention) instead of in
    one call (PackedRowAttention). Four rows for three streams: one row is never used."""
    model, tok, kw = shipped
    batch, alone = nine_seconds_beside_alone(model, tok, kw, rows=4, decode=decode, prefill=prefill)
    assert all(layer.self_attn.attn_fn is causal_attention for layer in model.model.layers)  # restored after
    for i, s in enumerate(alone):
        a, b = s.cache, batch.streams[i].cache
        n = a.length
        assert n == b.length and torch.equal(a.ids[:n], b.ids[:n]) and torch.equal(a.pos[:, :n], b.pos[:, :n])
        assert a.max_position() < 300  # evicted and re-indexed: contiguous RoPE at work
        for name in ("k", "v", "raw_k"):
            x, y = getattr(a, name)[..., :n, :], getattr(b, name)[..., :n, :]
            assert (x - y).abs().max() <= 1e-4 * max(1.0, x.abs().max()), name
            assert not torch.equal(batch.k[:, i], batch.k[:, (i + 1) % 3])  # rows are not shared by mistake


def test_one_step_ahead_with_forced_greedy_and_short_replies(shipped):
    """decode_ahead (a fixed-shape step, each step queued before the last one's tokens are read back) mixes rows: one
    teacher-forced (a reply one second in two), one greedy with replies cut at 3 tokens, one greedy: each says what it
    says alone, and holds the same tokens, length and last logits (the step queued past a reply's end is dropped)."""
    model, tok, kw = shipped
    caps, ws = [20, 3, 20], worlds()
    batch = StreamBatch(model, tok, rows=3, capacity=1024, decode="graphs")
    alone = [stream.make_streamer(model, tok, **dict(kw, max_new_tokens=c), capacity=1024) for c in caps]
    for i, c in enumerate(caps):
        batch.add(i, **dict(kw, max_new_tokens=c))
    heard = []
    for t in range(9):
        force = {0: "Red scores, Red 1, Blue 0." if t % 2 else ""}
        said = batch.step({i: w.second(t).frames for i, w in enumerate(ws)}, force)
        assert said == {i: s.step(w.second(t).frames, force.get(i)) for i, (s, w) in enumerate(zip(alone, ws))}
        for i, s in enumerate(alone):
            a, b = s.cache, batch.streams[i].cache
            assert a.length == b.length and torch.equal(a.ids[:a.length], b.ids[:b.length]), (t, i)
            assert torch.allclose(s.last_logits, batch.streams[i].last_logits, atol=1e-4), (t, i)
        heard += [(i, text) for i, text in said.items() if text]
    assert {i for i, _ in heard} == {0, 1, 2}, heard   # every kind of row spoke at least once

def test_a_sampling_stream_takes_the_fixed_step_one_step_at_a_time(shipped):
    """A stream that samples (its own generator) keeps a batch with a fixed-shape step to the step-by-step loop (the host
    picks each token before the next step): the sampling stream and a greedy one beside it say what each says alone."""
    model, tok, kw = shipped
    kws = [dict(kw, temperature=0.8, seed=3), kw]
    batch, ws = StreamBatch(model, tok, rows=2, capacity=1024, decode="graphs"), worlds()
    alone = [stream.make_streamer(model, tok, **k, capacity=1024) for k in kws]
    for i, k in enumerate(kws):
        batch.add(i, **k)
    heard = []
    for t in range(6):
        said = batch.step({i: w.second(t).frames for i, w in enumerate(ws[:2])})
        assert said == {i: s.step(w.second(t).frames) for i, (s, w) in enumerate(zip(alone, ws))}
        heard += [i for i, text in said.items() if text]
    assert 0 in heard   # the sampling stream spoke


def test_moving_many_rows_at_once_is_moving_each(shipped):
    """move_rows (the batch's eviction: every evicting row's K/V moved in one gather a layer) leaves each row as its
    cache's own move_kv leaves a copy of it: ragged keeps, rows out of order, contiguous RoPE and native RoPE mixed."""
    model, tok, kw = shipped
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    shape = (cfg.num_hidden_layers, 4, cfg.num_key_value_heads, 64, cfg.head_dim)
    k, v, raw_k = (torch.randn(shape, generator=g) for _ in range(3))
    rows, keeps, caches, alone = [3, 0, 2], [[0, 5, 9, 40], [1, 2, 3], [0, 7, 8, 9, 10, 63]], [], []
    for row, keep, reindex in zip(rows, keeps, [True, False, True]):
        for copy in (False, True):   # the row's cache, and a lone cache on a copy of the row
            c = StreamingCache(cfg, reindex=reindex, capacity=0)
            views = [x[:, row:row + 1] for x in (k, v, raw_k)]
            adopt_row(c, *([x.clone() for x in views] if copy else views))
            c.pos[:, :64] = torch.randint(0, 500, (3, 64), generator=g) if not copy else caches[-1].pos[:, :64]
            (alone if copy else caches).append(c)
    for c, a, keep in zip(caches, alone, keeps):
        a.move_kv(torch.tensor(keep))
    row1 = [x[:, 1].clone() for x in (k, v, raw_k)]
    move_rows(k, v, raw_k, rows, caches, [torch.tensor(keep) for keep in keeps])
    assert all(torch.equal(x[:, 1], y) for x, y in zip((k, v, raw_k), row1))   # a row that did not evict
    for c, a, keep in zip(caches, alone, keeps):
        n = len(keep)
        for name in ("k", "v", "raw_k"):
            assert torch.equal(getattr(c, name)[..., :n, :], getattr(a, name)[..., :n, :]), name
    assert not torch.equal(caches[0].k[..., :4, :], caches[0].raw_k[..., :4, :])   # the keys were rotated


@pytest.mark.parametrize("rows, starts, lengths", [
    ([0, 1, 2], [300, 17, 0], [130, 5, 260]),      # ragged turns over ragged caches; row 2 just joined (no cache yet)
    ([2, 0], [129, 256], [1, 128]),                 # row 1 left: its stale K/V must stay unseen; rows out of order
    ([3], [0], [7]),                                # a single stream, its first turn
])
def test_packed_prefill_attention_is_the_row_by_row_one(rows, starts, lengths):
    """PackedRowAttention (one FlexAttention call over every cache row) gives RowAttention's outputs (dense causal
    attention row by row, the reference) for each real query, and zeros for padding (fp32, random q, k, v, GQA)."""
    g = torch.Generator().manual_seed(0)
    R, Hq, Hkv, S, D, T = 4, 6, 2, 600, 16, max(lengths)
    q = torch.randn(len(rows), Hq, T, D, generator=g)
    k, v = torch.randn(2, R, Hkv, S, D, generator=g)
    want = RowAttention(causal_attention, rows, starts, lengths)(q, k, v)
    got = PackedRowAttention(rows, starts, lengths)(q, k, v)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    assert all(not got[i, :, n:].any() for i, n in enumerate(lengths))
    # a query that saw one more key, or one fewer, would differ: the test can fail
    shifted = RowAttention(causal_attention, rows, [s + 1 for s in starts], lengths)(q, k, v)
    assert (shifted - want).abs().max() > 1e-3


class DeviceBytes(TorchDispatchMode):
    """Counts the bytes of the tensors allocated on a (non-meta) device while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        factories = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                     torch.ops.aten.zeros.default, torch.ops.aten.full.default)
        if func in factories and out.device.type != "meta":
            self.bytes += out.nbytes
        return out


def test_a_stream_joins_without_a_cache_of_its_own(shipped):
    """StreamBatch.add allocates no K/V for the new stream (its cache's K/V are views of its row, from the start):
    what it allocates is its host-side bookkeeping, a small fraction of a row's K/V."""
    model, tok, kw = shipped
    batch = StreamBatch(model, tok, rows=2, capacity=1024)
    with DeviceBytes() as allocated:
        s = batch.add("a", **kw)
    row_bytes = s.cache.nbytes()
    assert row_bytes == 3 * batch.k[:, 0, :, :1024].numel() * batch.k.element_size()
    assert s.cache.k.untyped_storage().data_ptr() == batch.k.untyped_storage().data_ptr()
    assert allocated.bytes < row_bytes / 4, (allocated.bytes, row_bytes)
    with DeviceBytes() as alone:   # the same Streamer with a cache of its own allocates at least a row
        stream.Streamer(model, tok, capacity=1024, **kw)
    assert alone.bytes >= row_bytes


def frame_folder(path, world, seconds, broken_at=None):
    """A folder of PNG frames, 2 a second; with broken_at, the first frame of that second is not an image."""
    path.mkdir()
    for t in range(seconds):
        for k, f in enumerate(world.second(t).frames):
            name = path / f"frame{2 * t + k:04d}.png"
            if t == broken_at and k == 0:
                name.write_bytes(b"not an image")
            else:
                (f if isinstance(f, Image.Image) else Image.fromarray(f.numpy())).save(name)
    return str(path)


def lines(path):
    return [json.loads(x)["text"] for x in open(path)]


def test_several_videos_on_the_command_line(tmp_path, capsys):
    """stream.py --video A --video B --video C --out DIR: one JSON lines file per video, each equal to that video
    streamed alone; C breaks at its fifth second and leaves with a line naming it, A and B go on."""
    ws = worlds()
    a = frame_folder(tmp_path / "a", ws[0], 9)
    b = frame_folder(tmp_path / "b", ws[1], 5)
    c = frame_folder(tmp_path / "c", ws[2], 8, broken_at=4)
    stream.main(["--video", a, "--video", b, "--video", c, "--out", str(tmp_path / "out"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "c: left at second 4: " in printed and "frame0008.png: cannot read the image" in printed
    assert "a: ended after 9 s" in printed and "b: ended after 5 s" in printed
    for name, video in (("a", a), ("b", b)):
        stream.main(["--video", video, "--jsonl", str(tmp_path / f"{name}-alone.jsonl"), "--device", "cpu"])
        assert lines(tmp_path / "out" / f"{name}.jsonl") == lines(tmp_path / f"{name}-alone.jsonl")
    assert len(lines(tmp_path / "out" / "c.jsonl")) == 4
    assert any(lines(tmp_path / "out" / "a.jsonl"))
    assert (tmp_path / "out" / "a.vtt").read_text().startswith("WEBVTT")


def test_read_ahead_gives_the_seconds_then_what_the_reader_raised():
    """serve_cli.ReadAhead (each source read on a thread of its own): the seconds in order, prepared; the reader's
    error where it raised it, again on every later call; it reads ahead of the consumer, at most `depth` + 1."""
    import threading

    from serve_cli import ReadAhead
    pulled, gate = [], threading.Event()

    def source():
        for i in range(5):
            pulled.append(i)
            if i == 3:
                gate.wait(5)
                raise ValueError("clip.mp4: cannot decode second 3")
            yield i
    r = ReadAhead(source(), prepare=lambda x: 10 * x, depth=2)
    for _ in range(100):   # the thread fills the queue (2) and holds one more before anything is asked of it
        if len(pulled) == 3:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.05)
    assert pulled == [0, 1, 2]
    gate.set()
    assert [next(r) for _ in range(3)] == [0, 10, 20]
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot decode second 3"):
            next(r)
    assert list(ReadAhead(iter([1, 2]), prepare=str)) == ["1", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--video", "x/clip.mp4", "--video", "y/clip.gif"], "share the name 'clip'"),
    (["--video", "a.mp4", "--video", "b.mp4", "--vtt", "o.vtt"], "each video's goes to DIR/<name>.vtt"),
    (["--video", "a.mp4", "--video", "b.mp4", "--policy", "recompute"], "does not batch"),
    (["--video", "a.mp4", "--video", "b.mp4", "--policy", "full"], "does not batch"),
    (["--video", "a.mp4", "--video", "/"], "has no file name"),
    (["--video", "a.mp4", "--video", "b.mp4", "--out", "checkpoints/tiny"], "home of the shipped model"),
])
def test_several_videos_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        stream.main(argv + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_an_out_folder_over_a_video_is_refused(tmp_path, capsys):
    """--out is where the commentary goes: it may not be, or be inside, a video folder or the model's folder."""
    a = frame_folder(tmp_path / "a", worlds()[0], 2)
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    with pytest.raises(SystemExit):
        stream.main(["--video", a, "--video", a + "/../b", "--out", a, "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an input of this run" in err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_captured_batch_step_on_a_gpu():
    """On a GPU, decode="graphs" replays a captured CUDA graph: three streams (fp32, so that rounding cannot flip a
    greedy token) say what each says alone, and the graph was captured once and replayed."""
    from model import VLM
    from processor import Tokenizer
    model = VLM.from_pretrained(SHIPPED, device="cuda", dtype=torch.float32)
    tok = Tokenizer.from_file(SHIPPED)
    kw = stream.streamer_kwargs(layout_of(stream.checkpoint_settings(SHIPPED)))
    batch, _ = nine_seconds_beside_alone(model, tok, kw, rows=3, decode="graphs")
    assert batch.fixed.graph is not None


def test_a_video_without_a_whole_second_leaves_with_a_line(tmp_path, capsys):
    """A video shorter than a second, or broken at its first, leaves with a line; the others stream."""
    a = frame_folder(tmp_path / "a", worlds()[0], 3)
    short = tmp_path / "short"
    short.mkdir()
    worlds()[1].second(0).frames[0].save(short / "frame0.png")  # one frame at 2 fps: half a second
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "frame0.png").write_bytes(b"not an image")
    (broken / "frame1.png").write_bytes(b"not an image")
    stream.main(["--video", a, "--video", str(short), "--video", str(broken), "--out", str(tmp_path / "out"),
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "short: ended after 0 s" in printed and "broken: left at second 0: " in printed
    assert len(lines(tmp_path / "out" / "a.jsonl")) == 3 and not (tmp_path / "out" / "short.jsonl").exists()


def test_realtime_paces_several_streams(tmp_path, capsys):
    """--realtime with several videos: every second is streamed (the tiny model keeps up) and written."""
    a, b = frame_folder(tmp_path / "a", worlds()[0], 2), frame_folder(tmp_path / "b", worlds()[1], 2)
    stream.main(["--video", a, "--video", b, "--out", str(tmp_path / "out"), "--realtime", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "a: 2 seconds streamed" in printed and "b: 2 seconds streamed" in printed


def random_model(preset, device, dtype):
    """(model, tokenizer): a config with random weights and the toy tokenizer, as tools/bench_stream.py builds them."""
    from model import PRESETS, VLM, tiny_config
    from processor import Tokenizer, build_tokenizer
    torch.manual_seed(0)
    tok = Tokenizer(build_tokenizer(["a b c d e f g", " ...", " ..."], 300, qwen_ids=preset != "tiny"))
    cfg = tiny_config(tok) if preset == "tiny" else PRESETS[preset]()
    cfg.image_token_id, cfg.video_token_id = tok.image_pad_id, tok.video_pad_id
    cfg.vocab_size = max(cfg.vocab_size, len(tok))
    with torch.device(device):
        return VLM(cfg).to(dtype).init_weights(std=0.02).eval(), tok


@torch.no_grad()
def random_batch_beside_alone(model, tok, tol, side=224, prefill="rows", decode="graphs"):
    """Streams of 5, 3 and 4 s of side x side random frames, the third joining at the batch's second 1, as served
    (decode="graphs" or "compiled", the given prefill) beside each alone (the plain Streamer). Replies are
    teacher-forced (4 tokens; silence one second in two) so that both sides feed the same tokens. Every second, each stream's last
    logits are within `tol` (relative norm) of its lone Streamer's, their greedy token equal wherever the lone top
    two are clearly apart, and its cache row holds the same tokens with K/V within `tol`. Returns the batch."""
    from tools.bench_stream import fixed_reply
    kw = stream.streamer_kwargs(layout_of({}))
    g = torch.Generator().manual_seed(0)
    clip = [torch.randint(0, 255, (side, side, 3), generator=g, dtype=torch.uint8) for _ in range(16)]
    frames = lambda i, t: clip[(4 * i + 2 * t) % 16:(4 * i + 2 * t) % 16 + 2]   # 2 fps; the streams differ
    lengths, joins, reply = [5, 3, 4], [0, 0, 1], fixed_reply(tok, 4)
    batch = StreamBatch(model, tok, rows=3, capacity=2048, decode=decode, prefill=prefill)
    alone = [stream.Streamer(model, tok, **kw, capacity=2048) for _ in lengths]
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    checked, worst = 0, {"logits": 0.0, "k": 0.0, "v": 0.0}
    for T in range(max(j + n for j, n in zip(joins, lengths))):
        join_and_leave(batch, T, joins, lengths, kw)
        force = {i: reply if (T + i) % 2 == 0 else "" for i in batch.streams}
        said = batch.step({i: frames(i, T - joins[i]) for i in batch.streams}, force)
        for i, s in batch.streams.items():
            assert said[i] == alone[i].step(frames(i, T - joins[i]), force[i])
            a, b = s.last_logits[0, -1].float(), alone[i].last_logits[0, -1].float()
            worst["logits"] = max(worst["logits"], rel(a, b))
            assert rel(a, b) < tol, (T, i, rel(a, b))
            top = b.topk(2).values
            # a clear choice (random weights: logits ~ N(0, s), top two ~s/5 apart): rounding must not flip it
            if top[0] - top[1] > 0.02 * b.abs().max():
                assert int(a.argmax()) == int(b.argmax()), (T, i)
                checked += 1
            x, y = s.cache, alone[i].cache
            n = y.length
            assert x.length == n and torch.equal(x.ids[:n], y.ids[:n]) and torch.equal(x.pos[:, :n], y.pos[:, :n])
            for name in ("k", "v"):
                worst[name] = max(worst[name], rel(getattr(x, name)[..., :n, :], getattr(y, name)[..., :n, :]))
                assert worst[name] < tol, (T, i, name, worst[name])
    print(f"largest relative differences from each stream alone: {worst}; {checked} greedy choices compared")
    assert checked >= 3, "too few clear greedy choices to compare"
    return batch


@pytest.mark.parametrize("prefill", ["rows", "packed"])
def test_a_random_batch_beside_alone_on_the_cpu(prefill):
    """The GPU test below at the tiny size in fp32 on the CPU (its checks, exact to float rounding)."""
    random_batch_beside_alone(*random_model("tiny", "cpu", torch.float32), tol=1e-4, side=56, prefill=prefill)


def test_a_random_batch_through_the_ragged_prefill_beside_alone():
    """As above with the model's prompt attention a CachedPrefill (plain math for its kernels): the batch's prefill
    is then RaggedPrefill (a head for every row in one call, the tails packed), each stream alone CachedPrefill."""
    from test_prefill import math_prefill
    model, tok = random_model("tiny", "cpu", torch.float32)
    planner = math_prefill(step=16, slack=1, qstep=8, patience=0)
    model.use_attention(planner)
    random_batch_beside_alone(model, tok, tol=1e-4, side=56, prefill="packed")
    assert any(key[0] == "rows" and heads for key, heads in planner.plans.items())   # RaggedPrefill ran with a head


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("prefill, decode", [("rows", "graphs"), ("packed", "compiled"), ("flex", "graphs")])
def test_the_7b_batch_matches_each_stream_alone_on_a_gpu(prefill, decode):
    """The 7B config (random weights, bf16) as served, 224x224 frames: within bf16 tolerance of each stream alone.
    ~1 min on an H100 each (the 7B init, the graph capture; packed: one flex compile per padded prefill length;
    compiled: the decode step's compile)."""
    model, tok = random_model("7B", "cuda", torch.bfloat16)
    planner = CachedPrefill(step=64, slack=1, patience=0)   # heads from the first cache on (packed: RaggedPrefill)
    model.use_attention(planner)
    batch = random_batch_beside_alone(model, tok, tol=5e-2, prefill=prefill, decode=decode)
    assert batch.fixed.graph is not None
    assert any(key[0] == "rows" for key in planner.plans) == (prefill == "packed")   # RaggedPrefill's kernels ran


def test_a_live_source_is_no_input_to_protect():
    """cli.inputs_of (which paths --out must not touch) and video.is_live (what streams as it is made) are one rule:
    a URL with a scheme or a device is live; a path with '://' further in is a file, protected like any other."""
    import argparse

    import video
    from cli import inputs_of
    sources = ["rtsp://cam/1", "https://x/y.m3u8", "/dev/video0", "clip.mp4", "dir/a://b", "3rtsp://x"]
    args = argparse.Namespace(video=None, model="m", data=None)
    for s in sources:
        args.video = s
        assert (s in inputs_of(args, "video", "model", "data")) == (not video.is_live(s)), s
    assert [video.is_live(s) for s in sources] == [True, True, True, False, False, False]
