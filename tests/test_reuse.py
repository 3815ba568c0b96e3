"""reuse.py: training on the cache that streaming leaves. A chunk cut into segments, each forwarded on the K/V of the
ones before, must attend to exactly what a StreamingCache holds at that second (tokens, positions, logits), checked
against the cache and against eviction written out by hand; padding and the pre-roll change nothing they should not."""
import pytest
import torch

from data import IGNORE, build_sample, make_tokenizer, synthetic_sample
from world import SportsStream, WorldConfig


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_segments_attend_to_exactly_the_streaming_cache(tok):
    """--segment-seconds: each segment of a chunk, on the K/V the ones before it leave (data.collate_chunks,
    reuse.ReusedKV), gives the logits of a StreamingCache that is fed the segments in turn and evicts as each
    arrives; and a later segment's loss reaches the first segment's forward through the reused K/V."""
    from types import SimpleNamespace
    from cache import StreamingCache
    from conftest import tiny_model
    from data import collate_chunks, with_positions
    from validate import outputs
    s = synthetic_sample(tok, "train", 3, chunk_seconds=8, overlap=4, text_sink=8, text_window=16,
                         world=dict(event_rate=0.5, goal_rate=0.1))
    model = tiny_model(tok)
    cfg = SimpleNamespace(segment_seconds=3, vision_window=2, text_sink=8, text_window=16)
    batch = with_positions(collate_chunks([s], tok.pad_id, cfg), model.cfg)
    got = [logits for logits, _, _ in outputs(model, batch, "cpu")]
    assert len(got) == 3  # seconds 0-2, 3-5, 6-7
    cache = StreamingCache(model.cfg, text_sink=8, text_window=16, vision_window=2)
    bounds = [0, 3, 6, 8]
    with torch.no_grad():
        for i, logits in enumerate(got):
            a, b = bounds[i], bounds[i + 1]
            part = slice(int((s.round < a).sum()) if a else 0, int((s.round < b).sum()))  # the prefix goes first
            pix = s.pixel_values[int(s.grid_thw[:a].prod(-1).sum()):int(s.grid_thw[:b].prod(-1).sum())]
            if a:
                cache.evict(a)
            pos = cache.add_tokens(s.ids[part], s.kind[part], s.round[part], video_grid_thw=s.grid_thw[a:b])
            want = model(s.ids[None, part], pixel_values_videos=pix, video_grid_thw=s.grid_thw[a:b],
                         position_ids=pos, cache=cache)
            assert torch.allclose(logits, want, atol=1e-5), (i, (logits - want).abs().max())
    assert cache.length == batch["then"]["then"]["attention_mask"].shape[1]  # the reused prefix + the last segment
    assert (cache.kind[:cache.length] == 2).sum() > 0  # evicted replies sit in the previous text
    # the system prompt is only in the first segment: its embeddings reach the last one's loss through reused K/V
    only_first = sorted(set(s.ids[s.kind == 0].tolist()) - set(s.ids[s.round >= 3].tolist()))
    grad = torch.autograd.grad(got[2].sum(), model.model.embed_tokens.weight)[0]
    assert only_first and (grad[only_first].abs().sum(-1) > 0).all()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # the GPU's mixed precision: keys fp32, values bf16
        mixed = outputs(model, batch, "cpu")[2][0].float()
    assert (mixed - got[2]).abs().max() < 0.06 * got[2].abs().max()  # bf16 rounding (3% here), not another sum
    model.checkpointing = True  # activation checkpointing (training mode) recomputes the layers in backward
    model.train()
    again = torch.autograd.grad(outputs(model, batch, "cpu")[2][0].sum(), model.model.embed_tokens.weight)[0]
    assert torch.allclose(again, grad, atol=1e-5)


def evict_by_hand(tokens, now, window, sink, text_window):
    """tokens: [(sample index, kind, round)] as a cache holds them. When round `now` arrives, the rounds up to
    now - window leave: their replies go to the end of the previous text, the rest of those rounds is dropped,
    and the previous text keeps its first `sink` and last `text_window` tokens. Returns the tokens kept, in order
    (system prompt and previous-text header, previous text, its closing, the rounds still in view)."""
    from layout import Kind
    prefix, body, closing, recent = [], [], [], []
    for i, kind, rnd in tokens:
        if kind in (Kind.SYS, Kind.PREV_HEAD):
            prefix.append((i, kind, rnd))
        elif kind == Kind.PREV_BODY:
            body.append((i, kind, rnd))
        elif kind == Kind.PREV_END:
            closing.append((i, kind, rnd))
        elif rnd > now - window:
            recent.append((i, kind, rnd))
    for i, kind, rnd in tokens:
        if kind == Kind.REPLY and rnd <= now - window:
            body.append((i, Kind.PREV_BODY, rnd))
    if len(body) > sink + text_window:
        body = body[:sink] + body[len(body) - text_window:]
    return prefix + body + closing + recent


def positions_by_hand(ids, video_pad, h, w):
    """M-RoPE positions [(t, h, w)] of a token list as a fresh prompt: a text token takes (p, p, p) and moves p on
    by 1; a video block of one temporal patch, h x w merged tokens in rows, starts at p, its token in row r and
    column c takes (p, p + r, p + c), and the text after it starts at p + max(h, w)."""
    pos, p, j = [], 0, 0
    for i in ids:
        if i != video_pad:
            pos.append((p, p, p))
            p += 1
            continue
        pos.append((p, p + j // w, p + j % w))
        j += 1
        if j == h * w:
            p, j = p + max(h, w), 0
    return pos


def test_segments_keep_what_eviction_by_hand_keeps(tok):
    """Each later segment of a chunk in 3 s segments (reuse.evicted_prefixes) starts on the tokens evict_by_hand
    keeps, at the positions positions_by_hand gives them, and a StreamingCache fed the same segments holds the
    same; with a 1-layer model (a cached key/value then depends only on its token and position) each segment's
    logits are those of one plain forward over the hand-kept tokens and the segment at those positions."""
    from types import SimpleNamespace
    from cache import StreamingCache
    from conftest import tiny_model
    from data import collate_chunks, with_positions
    from layout import Kind
    from reuse import segments
    from validate import outputs
    s = synthetic_sample(tok, "train", 3, chunk_seconds=9, overlap=4, text_sink=4, text_window=6,
                         world=dict(event_rate=0.6, goal_rate=0.1))
    model = tiny_model(tok, layers=1)
    window, sink, text_window = 2, 4, 6
    cfg = SimpleNamespace(segment_seconds=3, vision_window=window, text_sink=sink, text_window=text_window)
    batch = with_positions(collate_chunks([s], tok.pad_id, cfg), model.cfg)
    parts = segments(batch)
    assert torch.equal(torch.cat([p["input_ids"][0] for p in parts]), s.ids)  # one row: no padding
    with torch.no_grad():
        got = [logits for logits, _, _ in outputs(model, batch, "cpu")]
    assert (s.grid_thw[:, 0] == 1).all()
    h, w = int(s.grid_thw[0, 1]) // 2, int(s.grid_thw[0, 2]) // 2
    patches = s.grid_thw.prod(-1).cumsum(0).tolist()
    pixels = lambda r: s.pixel_values[(patches[r - 1] if r else 0):patches[r]]
    cache = StreamingCache(model.cfg, text_sink=sink, text_window=text_window, vision_window=window)
    kept, frame = [], []  # frame: the chunk's tokens that the segment before read and wrote, in order
    for k, a in enumerate((0, 3, 6)):
        b = a + 3
        if a:
            kept = evict_by_hand(kept, a, window, sink, text_window)
            cache.evict(a)
        seg = list(range(int((s.round < a).sum()) if a else 0, int((s.round < b).sum())))  # the prefix goes first
        ids = [int(s.ids[i]) for i, _, _ in kept] + [int(s.ids[i]) for i in seg]
        pos = torch.tensor(positions_by_hand(ids, tok.video_pad_id, h, w)).T  # (3, kept + segment)
        if a:  # "keep" indexes [what the segment before kept | its own tokens]
            assert [frame[j] for j in parts[k]["keep"][0].tolist()] == [i for i, _, _ in kept]
            assert torch.equal(parts[k]["keep_pos"][:, 0], pos[:, :len(kept)])
        assert parts[k]["input_ids"][0].tolist() == ids[len(kept):]
        assert torch.equal(parts[k]["position_ids"][:, 0], pos[:, len(kept):])
        # the streaming cache, fed the segment after its eviction, holds the hand-kept tokens at their positions
        cache.add_tokens(s.ids[seg], s.kind[seg], s.round[seg], video_grid_thw=s.grid_thw[a:b])
        cache.commit(len(seg))
        assert cache.ids[:cache.length].tolist() == ids and torch.equal(cache.pos[:, :cache.length], pos)
        # one plain forward over the kept tokens and the segment, with the frames of the seconds they show
        shown = sorted({int(s.round[i]) for i, _, _ in kept if int(s.ids[i]) == tok.video_pad_id} | set(range(a, b)))
        with torch.no_grad():
            want = model(torch.tensor([ids]), pixel_values_videos=torch.cat([pixels(r) for r in shown]),
                         video_grid_thw=s.grid_thw[shown], position_ids=pos[:, None])[:, len(kept):]
        assert torch.allclose(got[k], want, atol=1e-4), (k, (got[k] - want).abs().max())
        frame = [i for i, _, _ in kept] + seg
        kept += [(i, int(s.kind[i]), int(s.round[i])) for i in seg]
    # the hand-kept previous text holds replies evicted from the chunk, and was cut back to head + tail
    body = [i for i, kind, _ in kept if kind == Kind.PREV_BODY]
    assert any(s.kind[i] == Kind.REPLY for i in body) and len(body) == sink + text_window


def test_segments_of_chunks_of_different_lengths_are_padded_away(tok):
    """A batch of a 5 s and a 6 s chunk (--data records differ) cut into 2 s segments: both rows get three
    segments (the longer one's last takes the rest), as each does alone, and each row's logits equal those of its
    batch of one, so the padding of the segments and of the reused prefixes is hidden."""
    from types import SimpleNamespace
    from conftest import tiny_model
    from data import collate_chunks, with_positions
    from validate import outputs
    rows = [synthetic_sample(tok, "train", i, chunk_seconds=n, overlap=2, text_sink=8, text_window=16,
                             world=dict(event_rate=0.5)) for i, n in ((1, 5), (2, 6))]
    model = tiny_model(tok)
    cfg = SimpleNamespace(segment_seconds=2, vision_window=2, text_sink=8, text_window=16)
    run = lambda samples: outputs(model, with_positions(collate_chunks(samples, tok.pad_id, cfg), model.cfg), "cpu")
    with torch.no_grad():
        both = run(rows)
        assert len(both) == 3
        for b, row in enumerate(rows):
            alone = run([row])
            for (got, _, ids), (want, _, _) in zip(both, alone):
                n = want.shape[1]
                assert (ids[b, n:] == tok.pad_id).all()  # what lies past the row's own tokens is padding
                assert torch.allclose(got[b, :n], want[0], atol=1e-4), (b, (got[b, :n] - want[0]).abs().max())


def test_preroll_streams_seconds_without_loss_or_gradient(tok):
    """--preroll 4: the chunk of 6 s comes with the 4 s before it, the same tokens as a 10 s chunk on the same
    stride, its labels cut away there; those segments run without autograd (nothing to learn) and leave their K/V:
    the later segments' logits are those of the plain 10 s chunk, and a loss on them still trains."""
    from types import SimpleNamespace
    from conftest import tiny_model
    from data import collate_chunks, with_positions
    from validate import outputs
    kw = dict(stream_seconds=60, text_sink=8, text_window=16, world=dict(event_rate=0.5, goal_rate=0.1))
    pre = synthetic_sample(tok, "train", 5, chunk_seconds=6, overlap=3, preroll=4, **kw)
    full = synthetic_sample(tok, "train", 5, chunk_seconds=10, overlap=7, **kw)  # the same stride, 3 s
    assert torch.equal(pre.ids, full.ids) and torch.equal(pre.frames, full.frames)
    assert torch.equal(pre.labels[pre.round >= 4], full.labels[full.round >= 4])
    assert (pre.labels[pre.round < 4] == IGNORE).all() and (full.labels[full.round < 4] != IGNORE).any()
    model = tiny_model(tok)
    cfg = SimpleNamespace(segment_seconds=2, vision_window=2, text_sink=8, text_window=16)
    got, want = (outputs(model, with_positions(collate_chunks([s], tok.pad_id, cfg), model.cfg), "cpu")
                 for s in (pre, full))
    assert [o[0].requires_grad for o in got] == [False, False, True, True, True]
    for (a, _, _), (b, _, _) in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)
    grad = torch.autograd.grad(sum(o[0].sum() for o in got[2:]), model.model.layers[0].mlp.up_proj.weight)[0]
    assert grad.abs().sum() > 0


def test_streaming_that_evicts_every_segment_keeps_what_training_segments_keep(tok):
    """A run on N s segments is served evicting every N s (checkpoint.stream_layout). Teacher-forced through a
    chunk, the Streamer then holds, every second, exactly the tokens at exactly the positions the training forward
    of that chunk in segments has in view at that second (reuse.evicted_prefixes), and until the
    first eviction its logits are the training forward's. After it the K/V differ in one place: the two closing
    tokens of the reply before an eviction (<|im_end|> and the newline, which streaming feeds with the next
    second's turn) are computed after the eviction in streaming and before it in training. Evicting every second
    instead keeps other tokens between the segments' starts."""
    from types import SimpleNamespace
    from conftest import tiny_model
    from data import collate_chunks, with_positions
    from reuse import segments
    from stream import Streamer
    from validate import outputs
    w = SportsStream(WorldConfig(seed=3, event_rate=0.5, goal_rate=0.1))
    secs = [w.second(t) for t in range(9)]
    sample = build_sample(tok, [s.frames for s in secs], [s.text for s in secs], 0, [], 8, 16)
    model = tiny_model(tok, layers=3)
    cfg = SimpleNamespace(segment_seconds=3, vision_window=2, text_sink=8, text_window=16)
    batch = with_positions(collate_chunks([sample], tok.pad_id, cfg), model.cfg)
    parts = segments(batch)
    with torch.no_grad():
        trained = torch.cat([logits[0] for logits, _, _ in outputs(model, batch, "cpu")])  # (tokens, vocab)
    read = [torch.zeros(0, dtype=torch.long)]  # the ids each segment reads before its own: "keep" of [read | own]
    for before, p in zip(parts, parts[1:]):
        read.append(torch.cat([read[-1], before["input_ids"][0]])[p["keep"][0]])
    round_end = [int((sample.round == t).nonzero().max()) for t in range(9)]  # its reply's closing tokens
    for every in (3, 1):
        s = Streamer(model, tok, text_sink=8, text_window=16, vision_window=2, evict_every=every)
        same = []
        for t, sec in enumerate(secs):
            s.step(sec.frames, force_text=sec.text)
            fed = round_end[t] - sum(len(ids) for ids, _ in s.pending)  # sample index of the last token fed
            if t < 3 and every == 3:
                assert (s.last_logits[0, -1] - trained[fed]).abs().max() <= 1e-4
            if t >= 3:  # what segment t // 3 sees at second t: its kept prefix, then its own tokens fed so far
                seg = parts[t // 3]
                n = fed + 1 - int((sample.round < t - t % 3).sum())
                ids, _, _ = s.cache.tokens()
                want_ids = torch.cat([read[t // 3], seg["input_ids"][0, :n]])
                want_pos = torch.cat([seg["keep_pos"][:, 0], seg["position_ids"][:, 0, :n]], 1)
                same.append(torch.equal(ids, want_ids) and torch.equal(s.cache.pos[:, :s.cache.length], want_pos))
        assert same == ([True] * 6 if every == 3 else [True, False, False] * 2)  # once a second: only at 3 and 6


def pinned(batch):
    """A batch in page-locked memory, as train.py's DataLoader hands it over (pin_memory)."""
    return {k: pinned(v) if isinstance(v, dict) else v.pin_memory() for k, v in batch.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("segments", [False, True])
def test_a_training_step_never_waits_for_the_gpu(tok, tmp_path, segments, packed):
    """train.train_step queues a whole step, plain chunks or chunks in segments, without reading anything back
    from the GPU (torch's sync debug mode raises on an op that would wait), so the host prepares the next step while
    the GPU computes this one; the numbers it returns are read later (train.read_step)."""
    import train
    from conftest import tiny_model
    from data import make_batch, pack, unpack, with_positions
    from parallel import Run
    args = train.get_args(["--preset", "gpu", "--out", str(tmp_path / "out"), "--text-window", "32"])
    args.cfg.steps, args.cfg.segment_steps, args.cfg.segment_seconds = 10, 0, 4 if segments else 0  # one phase
    model = tiny_model(tok).to("cuda")
    run, opt = Run(0, 1, torch.device("cuda"), True), train.make_optimizer(model, args.cfg)
    batch = with_positions(make_batch(tok, "train", range(4), args.cfg, step=500), model.cfg)
    if packed:  # as train.py's DataLoader hands it over (data.micro_batches): one pinned buffer
        batch = pack(batch)
        batch = unpack({"flat": batch["flat"].pin_memory(), "spec": batch["spec"]})
    else:
        batch = pinned(batch)
    train.train_step(0, model, model, opt, [batch], args, run)  # the optimizer state is made here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, norm, _ = train.train_step(1, model, model, opt, [batch], args, run)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    loss, norm = train.read_step(1, loss, norm, 0, args)
    assert 0 < loss < 20 and norm > 0
