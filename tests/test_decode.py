"""decode.py: the static-shape decode step (captured in a CUDA graph on a GPU) against the eager model.forward.

On the CPU the step runs eagerly: same kernels minus the graph, so the comparison checks the static-shape
logic (masked attention over the whole buffer, index writes, positions). On a GPU the replayed graph is also
compared with the eager path in bf16."""
import pytest
import torch

from test_cache import frames, tiny_model, tok  # noqa: F401  (tok is a fixture)
from stream import Streamer


def run(model, tok, seconds, **kw):
    s = Streamer(model, tok, max_new_tokens=6, **kw)
    out, logits = [], []
    for t in range(seconds):
        out.append(s.step(frames(t)))
        logits.append(s.last_logits[:, -1].float().cpu())
    return s, out, torch.cat(logits)


@pytest.mark.parametrize("policy", ["streaming", "native", "full"])
def test_static_step_equals_eager_forward(tok, policy):
    # small windows and a small starting capacity: eviction, re-indexing and buffer growth all happen
    model = tiny_model(tok, layers=2, seed=1)
    kw = dict(policy=policy, text_sink=4, text_window=8, vision_window=3, capacity=64)
    ref, out_ref, logits_ref = run(model, tok, 10, **kw)
    fast, out_fast, logits_fast = run(model, tok, 10, graphs=True, **kw)
    assert fast.decoder is not None and fast.cache.capacity > 64
    assert out_fast == out_ref
    assert sum(len(o) for o in out_ref) > 0  # the random model says things: decode steps really ran
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.cache.k[:, :, :, :fast.cache.length], ref.cache.k[:, :, :, :ref.cache.length])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager(tok):
    model = tiny_model(tok, layers=2, seed=2).to("cuda", torch.bfloat16)
    kw = dict(text_sink=4, text_window=8, vision_window=3, capacity=64)
    ref, out_ref, logits_ref = run(model, tok, 10, **kw)
    fast, out_fast, logits_fast = run(model, tok, 10, graphs=True, **kw)
    assert fast.decoder.captures >= 1
    assert out_fast == out_ref
    torch.testing.assert_close(logits_fast, logits_ref, atol=2e-2, rtol=2e-2)
