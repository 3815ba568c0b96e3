"""
A streaming second's prefill over its KV cache, fast on a GPU: the second's new tokens (775 for a 720p second at
2 fps, 2,980 at 8 fps) attend to everything the cache keeps (~13k tokens at 2 fps, ~48k at 8 fps) and to each
other, causally. That is most of the attention work of a stream: at 8 fps ~57 TFLOP a second at 7B.

The model's reference (model.causal_attention) runs it as one SDPA call with a lower-right causal mask, which
PyTorch sends to FlashAttention-2: ~220 TFLOP/s on an H100. cuDNN's fused attention, written for Hopper, runs the
same work 1.4-1.7x faster (tools/bench_attention.py measures both), but it builds an execution plan for every new
shape (40-80 ms), and a stream's cache length changes every second. So the keys are cut in two:

    keys:  [ ------------ head ------------ | --- tail --- | ---- new tokens ---- ]
            a length planned before, within     the rest of     the second's own
            `slack` (2,048) of the cache's      the cache
            -> cuDNN, no mask                   -> FlashAttention-2, causal from the bottom right

Every new token sees the whole head, so the head needs no mask, and any head no longer than the cache is exact: over
a stream whose cache length moves within a range, one or two head lengths serve every second, each planned once; the
tail and the new tokens go to FlashAttention-2, which needs no plans. Softmax over two disjoint sets of keys is
their softmaxes mixed by their log-sum-exps (the combine step of FlashAttention's split-KV and of ring attention):

    out = (e^lse1 * out1 + e^lse2 * out2) / (e^lse1 + e^lse2) = lerp(out1, out2, sigmoid(lse2 - lse1))

Measured (tools/bench_attention.py, one layer, H200): 775 new tokens on 13,277 cached 0.50 ms against SDPA's 0.72
(1.43x); 2,980 on 47,800, 3.98 against 6.89 ms (1.73x). For a prompt without a cache cuDNN's causal kernel is no
faster than FlashAttention-2 (8,192 tokens: 0.81 ms both), so a prompt stays one FlashAttention-2 call.

The model takes it through VLM.use_attention; the fast streaming path (decode.take_fast_defaults) picks it on a GPU
where both kernels run. tests/test_prefill.py checks it against causal_attention with plain math standing in for
the two kernels (CPU), and with the real kernels on a GPU.

References: FlashAttention-2 (Dao, 2023); cuDNN's fused flash attention (NVIDIA cuDNN frontend, SDPA);
log-sum-exp merging as in FlashAttention's split-KV decoding and Ring Attention (Liu et al., 2023).
"""
import functools

import torch
import torch.nn.functional as F

from model import causal_attention


def merge(o1, lse1, o2, lse2):
    """Two attention outputs over disjoint keys, (B, H, N, D), with their log-sum-exps (B, H, N): the output over
    all the keys. Each part must have seen at least one key (a finite log-sum-exp)."""
    acc = torch.promote_types(o1.dtype, torch.float32)              # fp32 or better
    w2 = torch.sigmoid(lse2.to(acc) - lse1.to(acc))[..., None]     # part 2's share of the softmax mass
    return torch.lerp(o1.to(acc), o2.to(acc), w2).to(o1.dtype)


def flash(q, k, v):
    """FlashAttention-2, causal from the bottom right (its rule when Nq < Nk), and its log-sum-exp (B, H, Nq);
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) (grouped-query attention as is, no copies)."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))   # the kernel's (B, N, H, D) layout
    out, lse = torch.ops.aten._flash_attention_forward(qt, kt, vt, None, None, qt.shape[1], kt.shape[1], 0.0, True,
                                                       False, scale=q.shape[-1] ** -0.5)[:2]
    return out.transpose(1, 2), lse


def cudnn(q, k, v, causal=False, bias=None):
    """cuDNN's fused attention and its log-sum-exp (B, H, Nq); bias: added to the scores, (B or 1, 1, Nq, Nk)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, causal, False,
                                                             scale=q.shape[-1] ** -0.5)
    return out[0], out[1].view(q.shape[:3])


class CachedPrefill:
    """causal_attention(q, k, v) with the cache's head through `head_kernel` (cuDNN) and the rest through
    `tail_kernel` (FlashAttention-2), merged. Any head no longer than the cache is exact, so the head is one
    already planned where one is within `slack` keys of the cache's length; else the cache's length rounded down to
    `step`, planned once that length has come back in more than `patience` calls, a call being one layer's (64: ~2
    seconds of a 28-layer stream; while the cache fills, each length passes by for a second or less, and a plan
    costs 40-80 ms). The head's queries are padded to a multiple
    of `qstep` (their rows are dropped; the head has no mask, so they change nothing), so that a second a few text
    tokens longer reuses a plan. The kernels (and the device type they run on) are arguments so that a CPU test can
    put plain math in their place."""
    exact_causal = True   # computes causal attention, no approximation (serve.py and VLM.forward ask)

    def __init__(self, step=512, slack=2048, qstep=64, patience=64, head_kernel=cudnn, tail_kernel=flash,
                 device_type="cuda"):
        self.step, self.slack, self.qstep, self.patience = step, slack, qstep, patience
        self.head_kernel, self.tail_kernel, self.device_type = head_kernel, tail_kernel, device_type
        self.plans = {}   # (batch, heads, padded queries, key layout) -> the head lengths planned for it
        self.seen = {}    # (the same, a head length) -> calls that wanted it so far

    def head_for(self, q, k):
        """The head's length for this call: 0 (no head), a planned one, or a new one that has earned its plan."""
        nq, cached = q.shape[2], k.shape[2] - q.shape[2]
        key = (tuple(q.shape[:2]), nq + -nq % self.qstep, k.stride())
        planned = self.plans.setdefault(key, [])
        best = max((h for h in planned if h <= cached), default=0)
        if cached - best < self.slack:
            return best
        want = cached // self.step * self.step
        if want <= best:   # (a slack below the step) nothing longer to plan
            return best
        self.seen[key, want] = self.seen.get((key, want), 0) + 1
        if self.seen[key, want] > self.patience:
            planned.append(want)
            return want
        return best

    def __call__(self, q, k, v):
        # the kernels' log-sum-exps carry no gradient, so training takes the model's reference; so does a model
        # moved off the GPU
        if q.device.type != self.device_type or (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
            return causal_attention(q, k, v)
        nq, head = q.shape[2], self.head_for(q, k)
        if not head:   # a prompt, a short cache, or none planned yet: the reference (SDPA's flash kernel)
            return causal_attention(q, k, v)
        qh = F.pad(q, (0, 0, 0, -nq % self.qstep)).contiguous()  # (B, H, padded queries, D); one layout, one plan
        o1, lse1 = self.head_kernel(qh, k[:, :, :head], v[:, :, :head])
        o2, lse2 = self.tail_kernel(q, k[:, :, head:], v[:, :, head:])
        return merge(o1[:, :, :nq], lse1[:, :, :nq], o2, lse2)

    def __repr__(self):
        return f"CachedPrefill(step={self.step}, slack={self.slack}, qstep={self.qstep}, patience={self.patience})"


def prefill_kernel_for(device, dtype=torch.bfloat16, head_dim=128):
    """CachedPrefill where this GPU and this PyTorch run both kernels, else None: a CPU, a GPU before Ampere, a build
    without cuDNN attention."""
    device = torch.device(device)
    if (device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16)
            or torch.cuda.get_device_capability(device) < (8, 0)):   # FlashAttention-2 needs Ampere or newer
        return None
    return CachedPrefill() if kernels_run(device, dtype, head_dim) else None


@functools.cache
def kernels_run(device, dtype, head_dim):
    """Both kernels, tried once per device, dtype and head size on a tiny input and checked against
    causal_attention (each try builds a cuDNN plan; every fast-path model and benchmark variant asks)."""
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, 2, 16, head_dim, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(1, 1, 56, head_dim, generator=g, device=device, dtype=dtype) for _ in range(2))
    fn = CachedPrefill(step=16, slack=1, patience=0)
    try:   # a head of 32 cached keys (queries padded to 64); a tail of 8 cached and 16 new ones, bottom-right causal
        err = (fn(q, k, v).float() - causal_attention(q, k, v).float()).abs().max().item()
    except (RuntimeError, TypeError, NotImplementedError):
        return False   # a kernel this build or card lacks (or whose plan fails): the reference stays
    return err < 0.05
