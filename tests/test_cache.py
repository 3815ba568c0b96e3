"""cache.py and stream.py: the streaming cache against a fresh forward over exactly the kept tokens.

The "after eviction" tests use a 1-layer language model on purpose: a cached key/value of layer 0 depends only
on its token and its position, so after eviction + contiguous re-indexing the next logits must equal a fresh
forward over the kept tokens exactly. With more layers the kept K/V also remember the evicted context (that is
the point of the cache), and only the no-eviction comparison can be exact.
"""
import pytest
import torch

from layout import Kind, end_ids, prefix_segments, round_segments
from stream import POLICIES, make_streamer

from conftest import frames, kernel_device, kernel_dtype, script, tiny_model

def fresh_logits(model, s, pixels):
    """A forward from scratch over exactly the kept tokens, with positions as a fresh prompt."""
    ids, kinds, rounds = s.cache.tokens()
    vid = ids == s.tok.video_pad_id
    kept_rounds = sorted({int(r) for r in rounds[vid]})
    pv = torch.cat([pixels[r][0] for r in kept_rounds])
    grid = torch.cat([pixels[r][1] for r in kept_rounds])
    with torch.no_grad():
        return model(ids[None], pixel_values_videos=pv, video_grid_thw=grid)[:, -1]


def run_and_compare(model, tok, seconds, **kw):
    from processor import preprocess_video
    s = make_streamer(model, tok, **kw)
    pixels, errs = {}, []
    for t in range(seconds):
        f = frames(t)
        pv, grid, _ = preprocess_video(f, min_pixels=28 * 28 * 4)
        pixels[t] = (pv, grid)
        s.step(f, force_text=script(t))
        ref = fresh_logits(model, s, pixels)
        errs.append((ref - s.last_logits[:, -1]).abs().max().item())
        assert ref.abs().max() > 0.1
    return s, max(errs)


def test_no_eviction_equals_full_forward(tok):
    model = tiny_model(tok, layers=3)
    s, err = run_and_compare(model, tok, 8, vision_window=100, text_sink=1000, text_window=1000)
    assert err <= 1e-4, err
    assert s.cache.max_position() + 1 == s.cache.next_pos.item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the flash kernel for a chunk on a cache runs on CUDA only"))])
def test_chunk_on_cache_equals_one_forward(tok, device):
    """A prompt fed as two chunks (the second attends to the cache bottom-right causally) gives the logits of one
    forward; on a GPU in bf16 this is the flash kernel for the chunk against the plain causal one."""
    from cache import KVCache
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = tiny_model(tok, layers=3).to(device, dtype)
    ids = torch.randint(0, 250, (1, 300), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        whole = model(ids).float()
        cache = KVCache(model.cfg, 1, 300, device, dtype)
        first = model(ids[:, :170], cache=cache).float()
        second = model(ids[:, 170:], cache=cache).float()
    err = (torch.cat([first, second], 1) - whole).abs().max() / whole.abs().max()
    assert err <= (1e-5 if device == "cpu" else 2e-2), err


def test_contiguous_rope_after_eviction_equals_fresh_forward(tok):
    model = tiny_model(tok, layers=1, seed=1)
    s, err = run_and_compare(model, tok, 14, vision_window=3, text_sink=4, text_window=6,
                             previous_text="Red scores! Red 1, Blue 0.")
    assert err <= 1e-4, err
    ids, kinds, rounds = s.cache.tokens()
    assert sorted({int(r) for r in rounds[kinds >= 4]}) == [11, 12, 13]  # only the vision window is left
    assert int((kinds == Kind.PREV_BODY).sum()) == 10                          # head 4 + tail 6
    # the previous-text tail is the most recent commentary that left the window, in order
    body = tok.decode(ids[kinds == Kind.PREV_BODY][4:])
    assert body.endswith(" " + script(9))


def test_ask_equals_generate_over_the_kept_tokens(tok):
    """Streamer.ask (a question on top of the cache) answers what greedy generation from a fresh prompt of the
    kept tokens + the question answers (no eviction, so the comparison is exact)."""
    from processor import preprocess_video
    from layout import question_segments
    model = tiny_model(tok, layers=3)
    s = make_streamer(model, tok, vision_window=100, text_sink=1000, text_window=1000)
    pixels = {}
    for t in range(5):
        pixels[t] = preprocess_video(frames(t), min_pixels=28 * 28 * 4)[:2]
        s.step(frames(t), force_text=script(t))
    ids, _, _ = s.cache.tokens()
    prompt = torch.cat([ids] + [torch.tensor(seg) for seg, _ in s.pending]
                       + [torch.tensor(question_segments(tok, "What is the score?")[0][0])])[None]
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, pixel_values_videos=torch.cat([p for p, _ in pixels.values()]),
                             video_grid_thw=torch.cat([g for _, g in pixels.values()]))[0, prompt.shape[1]:]
    assert s.ask("What is the score?", max_new_tokens=6) == tok.decode(ref.tolist()).strip()


@pytest.mark.parametrize("policy", ["streaming", "native", "recompute"])
def test_ask_leaves_the_stream_as_it_was(tok, policy):
    """With eviction, before the first second and twice in a row: after ask() the cache and the next second's
    logits are those of a stream that was never asked."""
    model = tiny_model(tok, layers=2)
    kw = dict(policy=policy, vision_window=3, text_sink=4, text_window=6)
    a, b = make_streamer(model, tok, **kw), make_streamer(model, tok, **kw)
    for t in range(8):
        if t in (0, 5):
            a.ask("What is the score?", max_new_tokens=4)
            a.ask("Who scored first?", max_new_tokens=4)
        for x, y in zip(a.cache.tokens(), b.cache.tokens()):
            assert torch.equal(x, y)
        assert a.pending == b.pending and torch.equal(a.cache.next_pos, b.cache.next_pos)
        a.step(frames(t), force_text=script(t))
        b.step(frames(t), force_text=script(t))
        assert torch.equal(a.last_logits, b.last_logits)


def test_prepared_frames_equal_frames(tok):
    """step(prepare(frames)) (the resize done ahead, as eval.py does on a thread) is step(frames)."""
    model = tiny_model(tok, layers=2)
    a, b = make_streamer(model, tok), make_streamer(model, tok)
    for t in range(4):
        a.step(frames(t), force_text=script(t))
        b.step(b.prepare(frames(t)), force_text=script(t))
        assert torch.equal(a.last_logits, b.last_logits)


def test_layout_round_trips_with_training_builder(tok):
    """Teacher-forced streaming with no eviction holds exactly the ids the training builder writes."""
    model = tiny_model(tok)
    s = make_streamer(model, tok, policy="full")
    for t in range(5):
        s.step(frames(t), force_text=script(t))
    expect = [i for ids, _ in prefix_segments(tok) for i in ids]
    for t in range(5):
        for ids, _ in round_segments(tok, t, 4, script(t)):
            expect += ids
    ids, _, _ = s.cache.tokens()
    tail = [i for ids, _ in s.pending for i in ids]  # not yet fed: fed with the next second
    assert ids.tolist() + tail == expect
    assert tail == end_ids(tok)[-2:]


def test_long_stream_is_flat(tok):
    """5,000 seconds: cache length, largest position and allocated memory stop growing after warm-up. Compared
    as maxima over 200 s spans from second 1,000 on (the commentary repeats every 15 s; and before second
    1,000 the "Time=..." stamps still gain digits)."""
    model = tiny_model(tok, layers=1)
    s = make_streamer(model, tok, vision_window=4, text_sink=8, text_window=16, max_new_tokens=3)
    spans = {1000: [], 4800: []}
    for t in range(5000):
        s.step(frames(t % 7), force_text=script(t))
        for start, rows in spans.items():
            if start <= t < start + 200:
                rows.append((s.cache.length, s.cache.max_position(), s.cache.nbytes(), s.cache.capacity))
    early, late = [tuple(map(max, zip(*rows))) for rows in spans.values()]
    assert early == late, (early, late)
    assert early[0] < 300 and early[1] < 300  # bounded by the windows, not by the 5,000 s stream


def test_native_rope_positions_grow_and_streaming_stay_bounded(tok):
    model = tiny_model(tok, layers=1)
    maxpos, kept = {}, {}
    for policy in ("streaming", "native"):
        s = make_streamer(model, tok, policy=policy, vision_window=3, text_sink=4, text_window=4)
        for t in range(60):
            s.step(frames(t % 5), force_text=script(t))
        maxpos[policy] = s.cache.max_position()
        kept[policy] = s.cache.tokens()
    assert maxpos["native"] > 3 * maxpos["streaming"]
    for a, b in zip(kept["native"], kept["streaming"]):  # both keep the same tokens; only positions differ
        assert torch.equal(a, b)


def test_reset_and_recompute_policies(tok):
    model = tiny_model(tok, layers=2)
    s = make_streamer(model, tok, policy="reset", reset_every=5)
    for t in range(11):
        s.step(frames(t), force_text=script(t))
        _, kinds, rounds = s.cache.tokens()
        assert set(rounds[kinds >= 4].tolist()) == set(range(t - t % 5, t + 1))  # start over every 5 s
    # recompute: re-prefilled from frames every second, so it equals a fresh forward even with 2 layers
    s, err = run_and_compare(model, tok, 8, policy="recompute", vision_window=3, text_sink=4, text_window=4)
    assert err <= 1e-4
    ref = make_streamer(model, tok, policy="streaming", vision_window=3, text_sink=4, text_window=4)
    for t in range(8):
        ref.step(frames(t), force_text=script(t))
    assert torch.equal(ref.cache.tokens()[0], s.cache.tokens()[0])


def test_decoding_loop_generates_and_stops(tok):
    model = tiny_model(tok)
    s = make_streamer(model, tok, max_new_tokens=5)
    for t in range(3):
        text = s.step(frames(t))
        assert isinstance(text, str)
    kinds = s.cache.tokens()[1]
    assert (kinds == Kind.REPLY).sum() <= 3 * 5


def test_one_table_of_policies(tok):
    """stream.POLICIES is the one list: the paper's five are in it, make_streamer builds each entry's loop with its
    cache settings, and an unknown name is refused."""
    assert {"streaming", "native", "full", "reset", "recompute"} <= {n for n, p in POLICIES.items() if p.paper}
    model = tiny_model(tok, layers=1)
    for name, p in POLICIES.items():
        s = make_streamer(model, tok, name, reset_every=7)
        assert type(s) is p.loop and (s.cache.evict_rounds, s.cache.reindex) == (p.evict, p.reindex)
        assert getattr(s, "reset_every", 7) == 7
    with pytest.raises(ValueError, match="unknown policy"):
        make_streamer(model, tok, "bogus")


def test_evict_every_lets_rounds_leave_in_groups(tok):
    """evict_every=3: rounds leave only at rounds 3, 6, 9, ..., so vision_window to vision_window + 2 seconds stay
    in view; at those rounds the cache holds the very tokens the once-a-second cache does; and the contiguous positions
    still make the next logits those of a fresh forward over the kept tokens (1 layer: exact)."""
    model = tiny_model(tok, layers=1, seed=1)
    kw = dict(vision_window=3, text_sink=4, text_window=6)
    grouped, every = make_streamer(model, tok, evict_every=3, **kw), make_streamer(model, tok, **kw)
    seen = set()
    for t in range(14):
        grouped.step(frames(t), force_text=script(t))
        every.step(frames(t), force_text=script(t))
        _, kinds, rounds = grouped.cache.tokens()
        kept = sorted({int(r) for r in rounds[kinds >= Kind.USER]})
        assert kept == list(range(max(0, t - t % 3 - 2), t + 1))  # the last eviction was at round t - t % 3
        seen.add(len(kept))
        if t % 3 == 0:
            assert torch.equal(grouped.cache.tokens()[0], every.cache.tokens()[0])
    assert seen == {1, 2, 3, 4, 5}  # warm-up, then vision_window .. vision_window + 2 rounds (the one being said too)
    _, err = run_and_compare(model, tok, 14, evict_every=3, previous_text="Red scores! Red 1, Blue 0.", **kw)
    assert err <= 1e-4, err


def test_seconds_of_several_temporal_patches_keep_contiguous_positions(tok):
    """At 4 frames a second a second is two temporal patches (t positions 0 and 1) of one merged token each
    (28 x 28 frames: h = w = 0): the block is as wide as its temporal extent, not its spatial one. After every
    eviction the kept tokens sit at the positions rope.mrope_positions gives them as a fresh prompt (the rule
    tests/test_model.py pins to transformers), and with 1 layer the logits equal a fresh forward over them."""
    from processor import patchify_video
    from rope import mrope_positions
    model = tiny_model(tok, layers=1, seed=1)
    s = make_streamer(model, tok, vision_window=2, text_sink=4, text_window=6, fps=4, frame_pixels=(28 * 28, 28 * 28))
    seconds = {}
    for t in range(6):
        second = s.prepare(frames(t, size=28) + frames(100 + t, size=28))
        seconds[t] = second
        assert second.grid.tolist() == [[2, 2, 2]] and second.secs.tolist() == [0.5]
        s.step(second, force_text=script(t))
        ids, kinds, rounds = s.cache.tokens()
        kept = sorted({int(r) for r in rounds[ids == tok.video_pad_id]})
        grid = torch.cat([seconds[r].grid for r in kept])
        secs = torch.cat([seconds[r].secs for r in kept])
        want, nxt = mrope_positions(ids[None], model.cfg, video_grid_thw=grid, second_per_grid_ts=secs)
        assert torch.equal(s.cache.pos[:, :s.cache.length], want[:, 0]) and torch.equal(s.cache.next_pos, nxt)
        with torch.no_grad():
            fresh = model(ids[None], pixel_values_videos=torch.cat([patchify_video(seconds[r].clip) for r in kept]),
                          video_grid_thw=grid, second_per_grid_ts=secs)[:, -1]
        assert (fresh - s.last_logits[:, -1]).abs().max() <= 1e-4
    assert kept == [4, 5]  # rounds left, so positions were re-laid


def test_one_text_token_is_staged_as_the_general_path_stages_it(tok):
    """A decode step's single text token takes add_tokens' cheap path (_add_text_token); its bookkeeping (ids, kinds,
    rounds, units, relative and absolute positions, the next ones) is what staging it with its neighbours gives."""
    from cache import StreamingCache
    cfg = tiny_model(tok).cfg
    text = [int(t) for t in tok.encode(" a goal") if t not in (cfg.image_token_id, cfg.video_token_id)][:3]
    head = text + [cfg.video_token_id] * 4 + text       # a vision block of 1 x 4 x 4 patches (4 merged tokens)
    grid, tail = torch.tensor([[1, 4, 4]]), text + text
    one, many = StreamingCache(cfg, capacity=4), StreamingCache(cfg, capacity=4)
    one.add_tokens(head, Kind.USER, 0, grid, torch.tensor([1.0]))
    positions = [one.add_tokens([t], Kind.REPLY, 0) for t in tail]
    many.add_tokens(head, Kind.USER, 0, grid, torch.tensor([1.0]))
    want = many.add_tokens(tail, Kind.REPLY, 0)
    assert torch.equal(torch.cat(positions, 2), want)
    n = len(head) + len(tail)
    for name in ("ids", "kind", "round", "unit", "rel", "pos"):
        assert torch.equal(getattr(one, name)[..., :n], getattr(many, name)[..., :n]), name
    assert (one.next_pos, one.next_unit, one.added) == (many.next_pos, many.next_unit, many.added)


def test_eviction_moves_slots_right_while_the_previous_text_grows():
    """Why fused_move sets slots aside: while the previous text is shorter than text_sink + text_window, the replies
    that join it push its closing tokens (PREV_END) right, behind them (keep[j] < j); once it is full, nothing moves
    right. The kernel's in-place order holds only for slots moving left or staying."""
    from cache import kept_after_eviction
    # head 0-3, previous text 4-9, its end 10-11; rounds 0-3 of 10 slots each from 12 (user turn 5, reply 5)
    kind = torch.tensor([Kind.SYS] * 2 + [Kind.PREV_HEAD] * 2 + [Kind.PREV_BODY] * 6 + [Kind.PREV_END] * 2 +
                        ([Kind.USER] * 5 + [Kind.REPLY] * 5) * 4)
    rnd = torch.tensor([0] * 12 + [r for r in range(4) for _ in range(10)])
    grows, _ = kept_after_eviction(kind, rnd, current_round=2, vision_window=1, text_sink=2, text_window=20)
    full, _ = kept_after_eviction(kind, rnd, current_round=2, vision_window=1, text_sink=2, text_window=4)
    moves_right = lambda keep: bool((keep < torch.arange(len(keep))).any())
    assert moves_right(grows) and not moves_right(full)


@pytest.mark.skipif(kernel_device() is None, reason="Triton is not installed (requirements-dev.txt)")
@pytest.mark.parametrize("rotate", [True, False])
def test_fused_eviction_is_the_reference_bit_for_bit(rotate):
    """cache.fused_move (one Triton kernel) leaves every row as the reference gathers leave it (serve._move_rows), bit
    for bit in 16 bits (the kernel rounds each product and sum to nearest, without fused multiply-adds, as apply_rope's
    ops do): a kept prefix, long and short shifts, a row that keeps everything, slots that move right (set aside
    around the kernel), a row that does not evict; and StreamingCache.move_kv fused equals move_kv unfused on a strided
    row view (a batch's row), there with the keep of a growing previous text. bf16 on a GPU; fp16 and a tenth of the
    slots through Triton's interpreter on a CPU (conftest)."""
    from cache import StreamingCache, fused_move
    from serve import _move_rows, adopt_row
    from model import PRESETS
    dev, dtype = kernel_device(), kernel_dtype()
    g = torch.Generator(device=dev).manual_seed(0)
    u, H = (100, 4) if dev == "cuda" else (10, 2)   # slots per unit of the layouts below (3,000 a row on a GPU)
    L, R, S, D = 3, 5, 30 * u, 128
    k, v, raw_k = (torch.randn(L, R, H, S, D, generator=g, device=dev).to(dtype) for _ in range(3))
    rows = [2, 0, 3, 4]
    keeps = [torch.cat([torch.arange(6 * u), torch.arange(14 * u, 29 * u)]),      # sink kept, a long shift
             torch.cat([torch.arange(10), torch.arange(11, S - 1, 2)]),           # short shifts, every other slot
             torch.arange(25 * u),                                                # keeps all it has
             # a growing previous text: replies 7u..7u+59 join it, its closing slots 6u, 6u+1 move right (to 6u+60..)
             torch.cat([torch.arange(6 * u), torch.arange(7 * u, 7 * u + 60), torch.tensor([6 * u, 6 * u + 1]),
                        torch.arange(7 * u + 60, S - 1)])]
    n = max(len(x) for x in keeps)
    angle = torch.rand(len(rows), n, D // 2, generator=g, device=dev) * 3000
    cos, sin = (f(torch.cat([angle, angle], -1)).to(dtype) for f in (torch.cos, torch.sin))
    ref = [x.clone() for x in (k, v, raw_k)]
    _move_rows(*ref, rows, keeps, *((cos, sin) if rotate else (None, None)))
    fused_move(k, v, raw_k, rows, keeps, *((cos, sin) if rotate else ()))
    def same(got, want, name):
        assert torch.equal(got, want), f"{name}: {(got != want).sum()} differ, by {(got.float() - want.float()).abs().max()}"
    for row, keep in zip(rows, keeps):
        for name, got, want in zip(("k", "v", "raw_k"), (k, v, raw_k), ref):
            same(got[:, row, :, :len(keep)], want[:, row, :, :len(keep)], name)
    assert all(torch.equal(got[:, 1], want[:, 1]) for got, want in zip((k, v, raw_k), ref))   # row 1 did not evict
    cfg = PRESETS["7B"]()
    cfg.num_hidden_layers, cfg.num_key_value_heads = L, H
    caches = []
    for fused in (True, False):
        c = StreamingCache(cfg, reindex=rotate, capacity=0, device=dev, dtype=dtype)
        adopt_row(c, *(x.clone()[:, 1:2, :, :S - 1] for x in (k, v, raw_k)))   # a row of a batch: strided views
        c.pos[:, :S - 1] = torch.randint(0, 4000, (3, S - 1), generator=torch.Generator().manual_seed(1))
        c.move_kv(keeps[3], fused=fused)
        caches.append(c)
    for name in ("k", "v", "raw_k"):
        same(*(getattr(c, name)[..., :len(keeps[3]), :] for c in caches), name)
