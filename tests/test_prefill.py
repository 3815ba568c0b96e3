"""prefill.py: the prefill over a cache cut into a cuDNN head and a FlashAttention-2 tail equals causal attention.
On the CPU plain math stands in for the two kernels (the cut, the query padding and the log-sum-exp merge are ours);
on a GPU the real kernels run against SDPA, inside the 7B-shaped attention and inside the streaming loop."""
import pytest
import torch

from conftest import tiny_model
from model import causal_attention, exact_causal
from prefill import CachedPrefill, RaggedPrefill, merge, prefill_kernel_for, ragged_kernels_run


def math_attention(q, k, v, causal=False):
    """Attention and its log-sum-exp (B, H, Nq), written out, causal from the bottom right when asked: what the
    kernels return."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.arange(nk) > torch.arange(nq)[:, None] + nk - nq, float("-inf"))
    return s.softmax(-1) @ v, s.logsumexp(-1)


def math_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """FlashAttention-2's variable-length mode written out: each packed sequence on its own, causal from its bottom
    right; out (total_q, H, D), log-sum-exp (total_q, H)."""
    assert cu_q.dtype == cu_k.dtype == torch.int32   # what the kernel takes
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        part = lambda x, cu: x[cu[i]:cu[i + 1]].transpose(0, 1)[None]   # (1, H, n, D)
        o, lse = math_attention(part(q, cu_q), part(k, cu_k), part(v, cu_k), True)
        assert o.shape[2] <= max_q and part(k, cu_k).shape[2] <= max_k
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def math_prefill(heads=None, **kw):
    """CachedPrefill on the CPU with plain math for both kernels; the head's key counts go to the list `heads`."""
    def head(q, k, v):
        heads is None or heads.append(k.shape[2])
        return math_attention(q, k, v)
    return CachedPrefill(head_kernel=head, tail_kernel=lambda q, k, v: math_attention(q, k, v, True),
                         varlen_kernel=math_varlen, device_type="cpu", **kw)


def inputs(nq, cached, seed=0, hq=4, hkv=2, d=16, capacity=512):
    """q (1, hq, nq, D) and k, v (1, hkv, cached + nq, D), the latter views of a buffer of `capacity` slots, as a
    streaming cache's are (the same strides at every length)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, nq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, hkv, capacity, d, generator=g, dtype=torch.float64)[:, :, :cached + nq] for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("nq, cached", [(5, 37), (16, 100), (3, 0), (64, 7), (1, 300), (40, 0)])
@pytest.mark.parametrize("step", [1, 8, 32, 1000])   # the head: all of the cache, some of it, none of it
def test_head_and_tail_are_causal_attention(nq, cached, step):
    q, k, v = inputs(nq, cached, seed=nq + cached)
    heads = []
    fn = math_prefill(heads, step=step, slack=1, qstep=8, patience=0)
    assert torch.allclose(fn(q, k, v), causal_attention(q, k, v), atol=1e-12)
    assert heads == ([cached // step * step] if cached >= step else [])   # the cut happened where it should


def test_heads_are_planned_when_they_recur_and_reused_within_the_slack():
    calls = []
    fn = math_prefill(calls, step=8, slack=12, qstep=8, patience=2)
    for nq, cached in [(5, 30), (5, 30), (5, 30), (5, 31), (6, 25), (5, 19), (5, 50), (5, 48), (5, 49), (5, 51)]:
        q, k, v = inputs(nq, cached, seed=cached)
        assert torch.allclose(fn(q, k, v), causal_attention(q, k, v), atol=1e-12)
    # 30 rounds down to 24, planned on its third call; 31 and 25 (6 queries pad to 8 as well) reuse it; 19 is
    # below it, and 16 would not recur: tail only; 50 and 48 are past the slack: they want 48 and use 24 meanwhile;
    # 49 wants 48 the third time: planned; 51 uses it
    assert calls == [24, 24, 24, 24, 24, 48, 48] and fn.plans[(1, 4), 8, k.stride()] == [24, 48]


def test_training_takes_the_reference():
    # the kernels' log-sum-exps carry no gradient: with grad on, the plain causal attention runs, and its gradient
    heads = []
    fn = math_prefill(heads, step=8, slack=1, patience=0)
    q, k, v = (x.detach().requires_grad_() for x in inputs(5, 30))
    fn(q, k, v).square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    causal_attention(q, k, v).square().sum().backward()
    assert heads == [] and all(torch.equal(a, x.grad) for a, x in zip(grads, (q, k, v)))
    with torch.no_grad():   # inference on the same tensors cuts them
        fn(q, k, v)
    assert heads == [24]


def ragged_inputs(rows, starts, lengths, R=4, hq=6, hkv=2, S=400, d=16):
    g = torch.Generator().manual_seed(sum(starts))
    q = torch.randn(len(rows), hq, max(lengths), d, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, R, hkv, S, d, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("rows, starts, lengths, head", [
    ([0, 1, 2], [300, 117, 64], [13, 5, 26], 64),   # ragged turns over ragged caches, rows in order (views)
    ([2, 0], [129, 256], [1, 40], 128),             # rows out of order (the cache rows gathered)
    ([1, 2, 3], [150, 140, 199], [3, 30, 8], 128),  # rows that follow each other from 1 (a view)
    ([3, 1], [30, 200], [7, 9], 0),                 # a cache shorter than the step: FlexAttention's fallback
])
def test_ragged_prefill_is_row_by_row_causal_attention(rows, starts, lengths, head):
    """RaggedPrefill (a head for every row in one call, the tails packed end to end) gives what each row's causal
    attention gives alone (serve.RowAttention, the reference), zeros for padding; plain math for the kernels."""
    from serve import PackedRowAttention, RowAttention
    q, k, v = ragged_inputs(rows, starts, lengths)
    heads = []
    planner = math_prefill(heads, step=64, slack=1, qstep=8, patience=0)
    fn = RaggedPrefill(planner, rows, starts, lengths, PackedRowAttention(rows, starts, lengths))
    want = RowAttention(causal_attention, rows, starts, lengths)(q, k, v)
    got = fn(q, k, v)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-6
    assert all(not got[i, :, n:].any() for i, n in enumerate(lengths))
    assert heads == ([head] if head else [])   # the head every row's cache holds, one call
    shifted = RowAttention(causal_attention, rows, [s + 1 for s in starts], lengths)(q, k, v)
    assert (shifted - want).abs().max() > 1e-3   # a query seeing one key more would differ: the test can fail


def test_merge_weighs_parts_by_their_mass():
    o1, o2 = torch.zeros(1, 1, 2, 3), torch.ones(1, 1, 2, 3)
    lse = torch.tensor([[[0.0, 1.0]]])
    out = merge(o1, lse, o2, torch.zeros(1, 1, 2))   # equal mass in row 0, e times more for part 1 in row 1
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([0.5, 1 / (1 + torch.e)]))


def test_the_fast_path_takes_it_only_where_it_runs(tok):
    from decode import take_fast_defaults
    assert prefill_kernel_for("cpu") is None and exact_causal(math_prefill()) and exact_causal(causal_attention)
    model = tiny_model(tok)
    take_fast_defaults(model)   # on a CPU: the reference stays, still open to a choice made on a GPU later
    assert model.prompt_kernel is None and model.model.layers[0].self_attn.attn_fn is causal_attention


def stream_logits(model, tok, seconds, graphs=None, plans=(16, 48, 0), capacity=96):
    """Each second's prefill logits (what the reply's first token is picked from), streaming with the model's
    attention a CachedPrefill (math_prefill on the CPU, the real kernels on a GPU; plans: its step, slack and
    patience) and, with graphs=True / False, GraphPrefill replaying / running its fixed-shape step; replies
    teacher-forced (some silent, so the cache's length moves)."""
    from conftest import frames, script
    from prefill import GraphPrefill
    from stream import make_streamer
    planner = prefill_kernel_for("cuda") if model.device.type == "cuda" else math_prefill()
    planner.step, planner.slack, planner.patience = plans
    model.use_attention(planner)
    s = make_streamer(model, tok, max_new_tokens=6, text_sink=4, text_window=8, vision_window=3, capacity=capacity,
                      decode="graphs", prefill_graphs=False)
    if graphs is not None:
        s.prefiller = GraphPrefill(model, s.cache, graphs=graphs)
    logits, prefill = [], s.prefill

    def recorded(*args, **kw):   # this Streamer's prefill, its logits kept (decode overwrites last_logits)
        out = prefill(*args, **kw)
        logits.append(out[:, -1].float().cpu())
        return out
    s.prefill = recorded
    for t in range(seconds):
        s.step(frames(t), force_text=script(t))
    return torch.cat(logits), s.prefiller


@pytest.mark.parametrize("plans, capacity", [((16, 48, 0), 96), ((16, 10 ** 6, 10 ** 6), 180)])
def test_fixed_shape_prefill_is_the_forward_it_replaces(tok, plans, capacity):
    # GraphPrefill's step run eagerly: the cache's slots written by index, the attention over whole buffers with the
    # tail's length on the device; second by second the same logits as model.forward (so the same K/V went in).
    # First heads planned as the cache grows; then none planned (h = 0), the cache growing at second 9, after steps
    # were made for its old buffers
    model = tiny_model(tok, layers=2, seed=3)
    ref, _ = stream_logits(model, tok, 14, plans=plans, capacity=capacity)
    ours, prefiller = stream_logits(model, tok, 14, graphs=False, plans=plans, capacity=capacity)
    heads = {h for _, _, h in prefiller.steps}   # the steps kept since the cache last grew
    assert prefiller.runs >= 4 and heads and (heads == {0}) == (plans[1] > 1000), (prefiller.runs, heads)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_fixed_shape_prefill_leaves_other_attention_to_the_forward(tok):
    # the graph is CachedPrefill's split; under the reference (or FlexPrefill) every second runs model.forward
    from conftest import frames, script
    from prefill import GraphPrefill
    from stream import make_streamer
    model = tiny_model(tok, layers=2, seed=3).use_attention(None)
    s = make_streamer(model, tok, max_new_tokens=6, text_sink=4, text_window=8, vision_window=3, capacity=96,
                      decode="graphs", prefill_graphs=False)
    s.prefiller = GraphPrefill(model, s.cache, graphs=False)
    for t in range(6):
        s.step(frames(t), force_text=script(t))
    assert s.prefiller.runs == 0 and not s.prefiller.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_prefill_replays_the_forward(tok):
    # the real kernels, captured and replayed: logits within bf16 tolerance of the eager fast path, and the reply's
    # first token (greedy) the same but for near ties
    model = tiny_model(tok, layers=2, seed=3).to("cuda", torch.bfloat16)
    ref, _ = stream_logits(model, tok, 14)
    ours, prefiller = stream_logits(model, tok, 14, graphs=True)
    assert prefiller.captures >= 1 and prefiller.runs > prefiller.captures, (prefiller.captures, prefiller.runs)
    scale = ref.abs().max()
    torch.testing.assert_close(ours / scale, ref / scale, atol=2e-2, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN and FlashAttention-2 need a GPU")
@pytest.mark.parametrize("nq, cached", [(775, 13277), (64, 600), (100, 5000)])
def test_real_kernels_match_sdpa(nq, cached):
    fn = prefill_kernel_for("cuda")
    assert fn is not None, "this GPU runs SDPA's flash kernel; cuDNN attention should be there too"
    fn.slack, fn.patience = 1, 0
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(1, 28, nq, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4, cached + nq + 300, 128, generator=g, device="cuda", dtype=torch.bfloat16)[:, :, :-300]
            for _ in range(2))   # views of a longer buffer, as a streaming cache's are
    ref = causal_attention(q.double(), k.double(), v.double())
    ours, sdpa = fn(q, k, v).double(), causal_attention(q, k, v).double()
    # within what bf16 SDPA itself is off by (x2 plus one bf16 step of the output scale)
    assert (ours - ref).abs().max() <= 2 * (sdpa - ref).abs().max() + 2 ** -8 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN and FlashAttention-2 need a GPU")
def test_streaming_with_it_equals_the_reference(tok):
    # bf16 on the GPU, a tiny model streaming (the cache past the head's step from the second round on), replies
    # teacher-forced so both runs see the same tokens: logits within bf16 tolerance of the SDPA run
    from conftest import frames
    from stream import make_streamer
    model = tiny_model(tok, layers=2, seed=2).to("cuda", torch.bfloat16)
    logits = []
    for attn in (None, CachedPrefill(step=32, slack=1, patience=0)):
        model.use_attention(attn)
        s = make_streamer(model, tok, max_new_tokens=6, text_sink=4, text_window=8, vision_window=3, capacity=64)
        per_round = []
        for t in range(6):
            s.step(frames(t), force_text="Red scores!")
            per_round.append(s.last_logits[:, -1].float().cpu())
        logits.append(torch.cat(per_round))
    assert any(h for heads in attn.plans.values() for h in heads)   # a head was planned, so the head kernel ran
    scale = logits[0].abs().max()
    torch.testing.assert_close(logits[1] / scale, logits[0] / scale, atol=2e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN and FlashAttention-2 need a GPU")
@pytest.mark.parametrize("rows", [[0, 1, 2], [2, 0, 1]])
def test_real_ragged_kernels_match_sdpa_row_by_row(rows):
    from serve import RowAttention
    assert ragged_kernels_run(torch.device("cuda"), torch.bfloat16, 128)
    planner = prefill_kernel_for("cuda")
    planner.slack, planner.patience = 1, 0
    starts, lengths = [13277, 12900, 12001], [775, 770, 790]
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(3, 28, 790, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(3, 4, 14400, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ours = RaggedPrefill(planner, rows, starts, lengths, fallback=None)(q, k, v).double()
    ref = RowAttention(causal_attention, rows, starts, lengths)(q.double(), k.double(), v.double())
    sdpa = RowAttention(causal_attention, rows, starts, lengths)(q, k, v).double()
    assert planner.plans and all(not ours[i, :, n:].any() for i, n in enumerate(lengths))
    assert (ours - ref).abs().max() <= 2 * (sdpa - ref).abs().max() + 2 ** -8 * ref.abs().max()
