"""decode.py: the static-shape decode step (captured in a CUDA graph on a GPU) against the eager model.forward.

On the CPU the step runs eagerly: same kernels minus the graph, so the comparison checks the static-shape
logic (masked attention over the whole buffer, index writes, positions). On a GPU the replayed graph is also
compared with the eager path in bf16."""
import pytest
import torch

from stream import Streamer, make_streamer

from conftest import frames, kernel_device, tiny_model


def run(model, tok, seconds, force=None, **kw):
    s = make_streamer(model, tok, max_new_tokens=6, **kw)
    out, logits = [], []
    for t in range(seconds):
        out.append(s.step(frames(t), force_text=force))
        logits.append(s.last_logits[:, -1].float().cpu())
    return s, out, torch.cat(logits)


@pytest.mark.parametrize("policy", ["streaming", "native", "full"])
def test_static_step_equals_eager_forward(tok, policy):
    # small windows and a small starting capacity: eviction, re-indexing and buffer growth all happen
    model = tiny_model(tok, layers=2, seed=1)
    kw = dict(policy=policy, text_sink=4, text_window=8, vision_window=3, capacity=64)
    ref, out_ref, logits_ref = run(model, tok, 10, **kw)
    fast, out_fast, logits_fast = run(model, tok, 10, decode="graphs", **kw)
    assert fast.decoder is not None and fast.cache.capacity > 64
    assert out_fast == out_ref
    assert sum(len(o) for o in out_ref) > 0  # the random model says things: decode steps really ran
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.cache.k[:, :, :, :fast.cache.length], ref.cache.k[:, :, :, :ref.cache.length])


@pytest.mark.skipif(kernel_device() != "cpu", reason="the GPU runs its kernels in the tests above")
def test_static_step_with_the_gpu_kernels_through_triton_s_interpreter(tok, monkeypatch):
    """The GPU's fast path on a CPU: the static step with split-KV decode attention and evictions through fused_move
    (both Triton, run by its interpreter: conftest), on the cache's own strided buffers, says and keeps what the
    plain loop does."""
    import functools
    import cache
    from decode import split_kv_attention
    model = tiny_model(tok, layers=2, seed=1)
    kw = dict(policy="streaming", text_sink=4, text_window=8, vision_window=3, capacity=64)
    ref, out_ref, logits_ref = run(model, tok, 6, **kw)
    moves, fused_move = [], cache.fused_move
    monkeypatch.setattr(cache, "can_fuse", lambda k: True)   # what a GPU with Triton answers
    monkeypatch.setattr(cache, "fused_move", lambda *a: moves.append(1) or fused_move(*a))
    model.use_decode_attention(functools.partial(split_kv_attention, programs=8))   # a few slices a head
    try:
        fast, out_fast, logits_fast = run(model, tok, 6, decode="graphs", **kw)
    finally:
        model.use_decode_attention(None)
    assert out_fast == out_ref and sum(len(o) for o in out_ref) > 0 and moves   # it spoke, and evicted
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.cache.k[:, :, :, :fast.cache.length], ref.cache.k[:, :, :, :ref.cache.length])


def test_decoding_ahead_drops_the_step_past_a_stop(tok):
    """The decoder queues step k+1 before reading token k back; when token k ends the reply, step k+1 must leave
    no trace. A token the random model says mid-reply is made a stop token, so replies end before the cap."""
    from layout import Kind; REPLY = Kind.REPLY
    model = tiny_model(tok, layers=2, seed=1)
    kw = dict(text_sink=4, text_window=8, vision_window=3, capacity=64)
    probe = Streamer(model, tok, max_new_tokens=6, **kw)
    probe.step(frames(0))
    said = probe.cache.ids[:probe.cache.length][probe.cache.kind[:probe.cache.length] == REPLY].tolist()
    assert len(said) >= 2
    runs = []
    for decode in ("plain", "graphs"):
        s = Streamer(model, tok, max_new_tokens=6, decode=decode, **kw)
        s.stops = s.stops | {said[1]}
        texts = [s.step(frames(t)) for t in range(8)]
        runs.append((s, texts))
    (ref, out_ref), (fast, out_fast) = runs
    assert fast.decoder is not None and out_fast == out_ref
    for a, b in zip(ref.cache.tokens(), fast.cache.tokens()):
        assert torch.equal(a, b)
    assert int(ref.cache.next_pos) == int(fast.cache.next_pos)
    assert fast.forwards > ref.forwards  # steps queued ahead past a stop ran, and were dropped
    torch.testing.assert_close(fast.cache.k[:, :, :, :fast.cache.length], ref.cache.k[:, :, :, :ref.cache.length])


def test_a_placeholder_said_first_leaves_the_cache_as_the_plain_loop_does(tok):
    """Decoding ahead feeds the prefill's token before reading it back: when that token is no text (a vision
    placeholder) the error must leave the cache as the plain loop's check-first leaves it."""
    model = tiny_model(tok, layers=2, seed=1)
    caches = []
    for decode in ("plain", "graphs"):
        s = Streamer(model, tok, decode=decode, text_sink=4, text_window=8, vision_window=3, capacity=64,
                     max_new_tokens=6)
        s.step(frames(0))
        logits = torch.zeros(1, 1, model.cfg.vocab_size)
        logits[0, -1, model.cfg.video_token_id] = 1.0              # the prefill "says" the video placeholder
        with pytest.raises(ValueError):
            s.decode(logits)
        caches.append((s.cache.length, s.cache.added, s.cache.ids[:s.cache.length].clone()))
    assert caches[0][:2] == caches[1][:2] and torch.equal(caches[0][2], caches[1][2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_replay_equals_eager(tok, compile):
    # fp32 on the GPU: the replayed graph (of the compiled step too) gives the eager tokens and logits
    model = tiny_model(tok, layers=2, seed=2).to("cuda")
    kw = dict(text_sink=4, text_window=8, vision_window=3, capacity=64)
    ref, out_ref, logits_ref = run(model, tok, 10, **kw)
    fast, out_fast, logits_fast = run(model, tok, 10, decode="compiled" if compile else "graphs", **kw)
    assert fast.decoder.captures >= 2  # captured, and again after the cache grew
    assert out_fast == out_ref and sum(len(o) for o in out_ref) > 0
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_replay_in_bf16(tok, compile):
    # bf16: fused kernels round differently and a random model's logits are near ties, so the replies are
    # teacher-forced (same tokens on both paths) and the logits compared within bf16 tolerance
    model = tiny_model(tok, layers=2, seed=2).to("cuda", torch.bfloat16)
    kw = dict(text_sink=4, text_window=8, vision_window=3, capacity=64)
    force = "Red scores! Red 1, Blue 0."
    ref, _, logits_ref = run(model, tok, 6, force=force, **kw)
    fast, _, logits_fast = run(model, tok, 6, force=force, decode="compiled" if compile else "graphs", **kw)
    assert fast.decoder.captures >= 1
    scale = logits_ref.abs().max()
    torch.testing.assert_close(logits_fast / scale, logits_ref / scale, atol=2e-2, rtol=0)


def test_compiled_step_equals_eager_forward(tok):
    # torch.compile'd step (inductor's fused kernels; on the CPU C++ ones) against the plain model.forward,
    # through eviction and one buffer growth (a recompile); the K/V writes must land in the cache itself
    model = tiny_model(tok, layers=2, seed=3)
    kw = dict(text_sink=4, text_window=8, vision_window=3, capacity=160)
    ref, out_ref, logits_ref = run(model, tok, 8, **kw)
    torch.compiler.reset()
    fast, out_fast, logits_fast = run(model, tok, 8, decode="compiled", **kw)
    assert fast.cache.capacity > 160
    # the decode step itself was compiled, and again after the growth (the vision blocks compile separately)
    from decode import GraphDecoder
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # no public API counts one function's graphs
    assert len(_debug_get_cache_entry_list(GraphDecoder._step.__code__)) >= 2
    assert out_fast == out_ref and sum(len(o) for o in out_ref) > 0
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.cache.k[:, :, :, :fast.cache.length], ref.cache.k[:, :, :, :ref.cache.length])


def test_compiled_prefill_equals_eager(tok):
    # VLM.compile_prefill: each layer's work around its attention compiled (dynamic shapes) for prefills; through
    # evictions, a growing buffer and the question path (short prefills), the tokens are the eager ones, the logits
    # and every cached key within fp32 rounding; one compiled graph a side serves every layer and length
    from model import DecoderLayer
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    kw = dict(text_sink=4, text_window=8, vision_window=3, capacity=64)
    ref, out_ref, logits_ref = run(tiny_model(tok, layers=3, seed=5), tok, 8, **kw)
    torch.compiler.reset()
    model = tiny_model(tok, layers=3, seed=5).compile_prefill()
    fast, out_fast, logits_fast = run(model, tok, 8, **kw)
    assert out_fast == out_ref and sum(len(o) for o in out_ref) > 0
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.cache.k[:, :, :, :fast.cache.length], ref.cache.k[:, :, :, :ref.cache.length],
                               atol=1e-5, rtol=1e-5)
    assert fast.ask("Score?") == ref.ask("Score?")
    for fn in (DecoderLayer.before_attention, DecoderLayer.after_attention):
        assert 1 <= len(_debug_get_cache_entry_list(fn.__code__)) <= 2   # long prefills; a question's few tokens
    model.compile_prefill(False)
    assert all(layer.compiled is None for layer in model.model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's compiled kernels")
def test_compiled_prefill_in_bf16_on_a_gpu(tok):
    # Triton's fused norm, rotary and SiLU round differently from eager bf16: teacher-forced replies, logits within
    # bf16 tolerance, on the GPU's fast path (cuDNN + FlashAttention-2 prefill, compiled decode)
    force, kw = "Red scores! Red 1, Blue 0.", dict(text_sink=4, text_window=8, vision_window=3, capacity=64)
    _, _, logits_ref = run(tiny_model(tok, layers=2, seed=2).to("cuda", torch.bfloat16), tok, 6, force=force,
                           decode="compiled", **kw)
    model = tiny_model(tok, layers=2, seed=2).to("cuda", torch.bfloat16).compile_prefill()
    _, _, logits_fast = run(model, tok, 6, force=force, decode="compiled", **kw)
    scale = logits_ref.abs().max()
    torch.testing.assert_close(logits_fast / scale, logits_ref / scale, atol=2e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's queue")
def test_eviction_and_prefill_never_wait_for_the_gpu(tok):
    # Streamer.step launches the tower, then evicts and prefills: for the host to do that work while the GPU runs
    # the tower, no copy or check in between may synchronize (torch's sync debug mode raises on one that does)
    s = Streamer(tiny_model(tok, layers=2, seed=2).to("cuda", torch.bfloat16), tok, max_new_tokens=6,
                 decode="graphs", text_sink=4, text_window=8, vision_window=3, capacity=256)
    for t in range(5):   # past the first evictions: every buffer and kernel is made
        s.step(frames(t), force_text="Red scores!")
    vision = s.vision_input(frames(5))
    feats = s.encode(vision)   # (the tower may wait for work queued before it; what follows must not wait for it)
    torch.cuda.set_sync_debug_mode("error")
    try:
        s.cache.evict(s.t)
        s.prefill(s.turn(vision[1]), [vision], feats)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("compile", [False, True])
def test_dropping_a_streamer_frees_its_cache_at_once(tok, compile):
    # eval.py measures each policy's peak memory after deleting the previous run: no reference cycle may keep
    # the cache (or, on a GPU, the graph's memory) alive until the next garbage collection
    import gc
    import weakref
    model = tiny_model(tok, layers=2, seed=4)
    s, _, _ = run(model, tok, 2, decode="compiled" if compile else "graphs", capacity=256)
    ref = weakref.ref(s.cache)
    gc.disable()
    try:
        del s
        assert ref() is None
    finally:
        gc.enable()
