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
where both kernels run. At 7B the kernels of a 2-fps second's prefill take ~32 ms of an H100, but launching them
one by one from Python takes the host longer, so the streaming loop replays the whole prefill from a CUDA graph
(GraphPrefill, below), its attention this same split with the cache's length read on the device.
tests/test_prefill.py checks both against causal_attention and model.forward with plain math standing in for the
kernels (CPU), and with the real kernels on a GPU.

References: FlashAttention-2 (Dao, 2023); cuDNN's fused flash attention (NVIDIA cuDNN frontend, SDPA);
log-sum-exp merging as in FlashAttention's split-KV decoding and Ring Attention (Liu et al., 2023).
"""
import collections
import functools
import sys

import torch
import torch.nn.functional as F

from cache import DecodeSlots, to_device
from model import causal_attention


def merge(o1, lse1, o2, lse2):
    """Two attention outputs over disjoint keys, (..., D) (say (B, H, N, D)), with their log-sum-exps (...): the
    output over all the keys. Each part must have seen at least one key (a finite log-sum-exp)."""
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


def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """FlashAttention-2 over sequences packed end to end (its variable-length mode), each causal from its own bottom
    right: q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_q / cu_k (n + 1,) int32 offsets of each sequence, max_q /
    max_k the longest's lengths. Returns out (total_q, Hq, D) and the log-sum-exp (total_q, Hq)."""
    out, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                       scale=q.shape[-1] ** -0.5)[:2]
    return out, lse.transpose(0, 1)   # the kernel's is (Hq, total_q)


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
                 varlen_kernel=flash_varlen, device_type="cuda"):
        self.step, self.slack, self.qstep, self.patience = step, slack, qstep, patience
        self.head_kernel, self.tail_kernel, self.device_type = head_kernel, tail_kernel, device_type
        self.varlen_kernel = varlen_kernel   # RaggedPrefill's tails
        self.plans = {}   # (batch, heads, padded queries, key layout) -> the head lengths planned for it
        self.seen = {}    # (the same, a head length) -> calls that wanted it so far

    def head_for(self, q, k):
        """The head's length for this call: 0 (no head), a planned one, or a new one that has earned its plan."""
        return self.plan(self.shape_key(q.shape[:2], q.shape[2], k.stride()), k.shape[2] - q.shape[2])

    def shape_key(self, batch_heads, nq, k_stride):
        """What a cuDNN plan depends on: batch and query heads, the padded query count, the key layout."""
        return tuple(batch_heads), nq + -nq % self.qstep, tuple(k_stride)

    def planned(self, key, cached):
        """The longest head planned for calls of this shape that `cached` keys can hold (0: none)."""
        return max((h for h in self.plans.get(key, ()) if h <= cached), default=0)

    def plan(self, key, cached):
        """head_for's choice for a call of this shape (key: shape_key's) over `cached` keys."""
        planned = self.plans.setdefault(key, [])
        best = self.planned(key, cached)
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
        head = self.head_for(q, k)
        if not head:   # a prompt, a short cache, or none planned yet: the reference (SDPA's flash kernel)
            return causal_attention(q, k, v)
        o1, lse1 = self.over_head(q, k[:, :, :head], v[:, :, :head])
        o2, lse2 = self.tail_kernel(q, k[:, :, head:], v[:, :, head:])
        return merge(o1, lse1, o2, lse2)

    def over_head(self, q, k, v):
        """The head kernel's attention of q (B, H, T, D) over all of k, v (the head's keys, no mask) and its
        log-sum-exp (B, H, T); the queries padded to a multiple of qstep for it (one layout, one plan), the padded
        rows dropped."""
        T = q.shape[2]
        o, lse = self.head_kernel(F.pad(q, (0, 0, 0, -T % self.qstep)).contiguous(), k, v)
        return o[:, :, :T], lse[:, :, :T]

    def takes_batches(self, device, dtype, head_dim):
        """Whether RaggedPrefill runs on these kernels: the real ones where they take a batch here (tried once);
        plain math standing in for them (the CPU tests) always."""
        if self.varlen_kernel is not flash_varlen:
            return True
        return self.device_type == "cuda" and ragged_kernels_run(device, dtype, head_dim)   # (a CPU device: False)

    def __repr__(self):
        return f"CachedPrefill(step={self.step}, slack={self.slack}, qstep={self.qstep}, patience={self.patience})"


class RaggedPrefill:
    """CachedPrefill for many streams in one call (serve.py): each stream's cache is a row of one buffer, k, v (R, Hkv,
    S, D); batch row i's lengths[i] new queries (q (B, Hq, T, D), padded to the longest) attend to cache row rows[i]'s
    slots [0, starts[i] + lengths[i]), causally. The rows' caches differ in length, so:

        head   one length for every row, no longer than the shortest cache (so exact for all): one cuDNN call over
               the batch, the cache rows read in place
        tails  each row's slots from the head on, its own length: FlashAttention-2's variable-length mode over the
               rows' tails and queries packed end to end (no padding; each causal from its own bottom right)

    `planner` is the model's CachedPrefill: its head plans and kernels outlive the second. With no head (a cache
    still filling, or none planned yet), `fallback` runs (serve.PackedRowAttention). Built for one batched forward:
    the packing's index tensors, made at the first layer, serve every layer."""

    def __init__(self, planner, rows, starts, lengths, fallback):
        self.planner, self.rows, self.starts, self.lengths = planner, rows, starts, lengths
        self.fallback, self.packing, self.dev_rows = fallback, {}, None

    def pack(self, head, dev):
        """For this head length: the packed queries' (batch row, position), the packed tail keys' (cache row, slot),
        and the varlen offsets and longest lengths (copied to the device once, without waiting for the GPU's queue)."""
        if head not in self.packing:
            keys = [s + n - head for s, n in zip(self.starts, self.lengths)]
            b = torch.repeat_interleave(torch.arange(len(self.rows)), torch.tensor(self.lengths))
            t = torch.cat([torch.arange(n) for n in self.lengths])
            row = torch.repeat_interleave(torch.tensor(self.rows), torch.tensor(keys))
            slot = torch.cat([torch.arange(head, head + n) for n in keys])
            offsets = lambda ns: F.pad(torch.tensor(ns).cumsum(0), (1, 0)).to(torch.int32)
            index = [to_device(x, dev) for x in (b, t, row, slot, offsets(self.lengths), offsets(keys))]
            self.packing[head] = index + [max(self.lengths), max(keys)]
        return self.packing[head]

    def __call__(self, q, k, v):
        # q (B, Hq, T, D) padded; k, v (R, Hkv, S, D): every cache row (and its scratch slot)
        p, (B, H, T, D) = self.planner, q.shape
        if q.device.type != p.device_type:
            return self.fallback(q, k, v)
        Tq = T + -T % p.qstep
        head = p.plan(("rows", B, H, Tq, k.stride()), min(self.starts))
        if not head:
            return self.fallback(q, k, v)
        b, t, row, slot, cu_q, cu_k, max_q, max_k = self.pack(head, q.device)
        if self.dev_rows is None:   # the batch's cache rows: a view when they follow each other, else a gather
            first = self.rows[0]
            self.dev_rows = (slice(first, first + B) if self.rows == list(range(first, first + B)) else
                             to_device(torch.tensor(self.rows), q.device))
        mine = lambda x: x[:, :, :head][self.dev_rows]   # (B, Hkv, head, D): the head's slots alone, if gathered
        o1, lse1 = p.over_head(q, mine(k), mine(v))                          # (B, H, T, D), (B, H, T)
        # packed: (total_q, H, D) queries, (total_k, Hkv, D) tail keys and values
        o2, lse2 = p.varlen_kernel(q.transpose(1, 2)[b, t], k[row, :, slot], v[row, :, slot], cu_q, cu_k,
                                    max_q, max_k)
        o = merge(o1.transpose(1, 2)[b, t], lse1.transpose(1, 2)[b, t], o2, lse2)   # (total_q, H, D)
        out = q.new_zeros(B, T, H, D)   # padding queries: zeros, as serve.RowAttention's
        out[b, t] = o
        return out.transpose(1, 2)


class GraphPrefill:
    """A stream's second prefilled by replaying a CUDA graph: what model(ids, position_ids=pos, cache=cache,
    logits_to_keep=1, video_embeds=feats) computes with CachedPrefill as its attention (Streamer's fast path).

    Why: the eager prefill of a 720p second at 7B launches ~1,100 kernels from Python (per layer: norms,
    projections, rotary, cache writes, cuDNN and FlashAttention-2 and their merge, the MLP). An H100 runs them in
    ~32 ms, but the host takes ~45 ms to issue them, so the GPU waits. Replayed from a graph they go in one launch.

    A graph needs fixed shapes and fixed addresses. A second's new tokens (T) repeat from second to second (the
    same frames, the same turn template), but the cache's length L moves with the replies. So nothing recorded
    depends on L: the new K/V go to device indices L..L+T-1 (cache.DecodeSlots), the head is a length h <= L that
    CachedPrefill planned before (cuDNN over the buffer's first h slots), and the tail [h, L+T) goes to
    FlashAttention-2's variable-length mode, which reads its key count from a device tensor (cu_k) and scans the
    buffer up to its capacity only that far. ids, positions and the tower's output are copied into static buffers.

    One step per (T, video tokens, h), its graph captured the second time that key comes (a kind of second seen
    once, like the first with its system prompt, stays eager), at most `keep` of them, all in one memory pool (one
    replays at a time and its logits are copied out at once). A call goes eager (returns None) where CachedPrefill
    would plan a new head (so planning goes on as without graphs), where the model's attention is not a
    CachedPrefill (FlexPrefill, the reference) or its variable-length kernel does not run here, and for good once a
    capture fails (said in one line). graphs=False runs the same fixed-shape step eagerly: what the CPU tests check
    against model.forward."""

    def __init__(self, model, cache, graphs=True, keep=8):
        self.model, self.cache, self.graphs, self.keep = model, cache, graphs, keep
        self.steps = collections.OrderedDict()   # (T, video tokens, h) -> _FixedPrefill, oldest first
        self.seen, self.buffers, self.pool, self.off = set(), None, None, None
        self.runs = self.captures = 0

    @torch.no_grad()
    def __call__(self, ids, pos, feats):
        """ids (1, T) on the model's device, pos (3, 1, T) from cache.add_tokens, feats the tower's output:
        logits (1, 1, vocab) of the last new token, and the tokens committed; None where the caller runs forward."""
        planner, c = self.model.prompt_kernel, self.cache
        if (self.off or not isinstance(planner, CachedPrefill) or feats is None
                or ids.device.type != planner.device_type
                or not planner.takes_batches(ids.device, feats.dtype, self.model.cfg.head_dim)):
            return None
        T, L = ids.shape[1], c.length
        plan_key = planner.shape_key((1, self.model.cfg.num_attention_heads), T, c.k[0].stride())
        h = planner.planned(plan_key, L)
        if L - h >= planner.slack:   # the eager path would plan a longer head: let it
            return None
        if self.buffers != (c.k.data_ptr(), c.capacity):   # the cache grew, its buffers moved: steps made go
            self.steps.clear()
            self.buffers = (c.k.data_ptr(), c.capacity)
        key = (T, feats.shape[0], h)
        if key not in self.steps:
            if key not in self.seen:
                self.seen.add(key)
                return None
            self.steps[key] = _FixedPrefill(self.model, c, planner, T, feats, h)
            while len(self.steps) > self.keep:
                self.steps.popitem(last=False)
        step = self.steps[key]
        self.steps.move_to_end(key)
        step.fill(ids, pos, feats, L)
        if not self.graphs:
            logits = step.forward()
        else:
            if step.graph is None and not self.capture(key, step):
                return None   # (its K/V written by the warm-up are rewritten by the forward that runs instead)
            step.graph.replay()
            logits = step.logits.clone()   # the next replay overwrites the graph's output
        self.runs += 1
        c.commit(T)
        return logits

    def capture(self, key, step):
        """Record step's graph (its one warm-up: the eager forward of the key's first second met every kernel but
        the variable-length one); on failure, graphs are off for this stream from here on."""
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            step.graph, step.logits = capture(step.forward, lambda logits: logits, warmup=1, pool=self.pool)
        except (RuntimeError, TypeError, NotImplementedError) as e:
            self.off = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            print(f"prefill graphs off, the prefill runs eagerly: {self.off}", file=sys.stderr)
            del self.steps[key]
            return False
        self.captures += 1
        return True


class _FixedPrefill:
    """GraphPrefill's step for one (T, video tokens, h): its static inputs, the cache's slots, its graph."""

    def __init__(self, model, cache, planner, T, feats, h):
        dev = feats.device
        self.model, self.planner, self.T, self.h, self.capacity = model, planner, T, h, cache.capacity
        self.ids = torch.zeros(1, T, dtype=torch.long, device=dev)
        self.pos = torch.zeros(3, 1, T, dtype=torch.long, device=dev)
        self.feats = torch.zeros_like(feats)
        self.offsets = torch.arange(T, device=dev)
        self.index = torch.zeros(T, dtype=torch.long, device=dev)       # the cache slots written: L .. L+T-1
        self.cu_q = torch.tensor([0, T], dtype=torch.int32, device=dev)
        self.cu_k = torch.zeros(2, dtype=torch.int32, device=dev)       # [0, L + T - h]: the tail's keys
        self.slots = DecodeSlots(cache, self.index)
        self.graph, self.logits = None, None

    def fill(self, ids, pos, feats, L):
        """This second's inputs into the static buffers, and its slots and key count from L (kernels that take L
        as an argument and copies that do not wait for the GPU: nothing here waits)."""
        self.ids.copy_(ids, non_blocking=True)
        self.pos.copy_(to_device(pos, self.pos.device), non_blocking=True)
        self.feats.copy_(feats)
        torch.add(self.offsets, L, out=self.index)
        self.cu_k[1:].fill_(L + self.T - self.h)

    def forward(self):
        """model.forward's prefill at fixed shapes: each layer's work around its attention as in
        DecoderLayer.forward_compiled, the K/V written at `index`, the attention over the whole buffers (attend)."""
        m = self.model
        x = m.embed(self.ids, video_embeds=self.feats)
        cos, sin = m.rope(self.pos, x.dtype)
        for i, layer in enumerate(m.model.layers):
            q, k, v, raw_k = layer.before_attention(x, cos, sin)
            k, v = self.slots.update(i, k, v, raw_k)                   # (1, Hkv, capacity, D) each
            x = layer.after_attention(x, self.attend(q, k, v))
        x = m.model.norm(x[:, -1:])
        return m.lm_head(x) if m.lm_head is not None else x @ m.model.embed_tokens.weight.T

    def attend(self, q, k, v):
        """CachedPrefill's split over buffers of the cache's capacity: q (1, H, T, D), k and v (1, Hkv, capacity, D)
        of which the first L + T slots hold keys. The head: cuDNN over slots [0, h); the tail: FlashAttention-2's
        variable-length mode over [h, L + T), causal from its bottom right, its length read from cu_k."""
        p, T, h = self.planner, self.T, self.h
        tail = lambda x: x[0, :, h:].transpose(0, 1)                   # (capacity - h, Hkv, D), a view
        o2, lse2 = p.varlen_kernel(q[0].transpose(0, 1), tail(k), tail(v), self.cu_q, self.cu_k, T,
                                   self.capacity - h)                  # (T, H, D), (T, H)
        o2, lse2 = o2.transpose(0, 1)[None], lse2.transpose(0, 1)[None]   # (1, H, T, D), (1, H, T)
        if not h:
            return o2
        return merge(*p.over_head(q, k[:, :, :h], v[:, :, :h]), o2, lse2)


def capture(step, then, warmup=2, pool=None):
    """A CUDA graph of then(step()) and its output (a decode step's logits and argmax, a prefill's logits). step is
    warmed up first on a side stream (lazy cuBLAS/SDPA initialisation must not happen during capture; a compiled step
    compiles and autotunes in its first call); `then` runs only in the graph; pool: a memory pool shared with other
    graphs that never replay at the same time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = then(step())
    return graph, out


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


@functools.cache
def ragged_kernels_run(device, dtype, head_dim):
    """RaggedPrefill's kernels (cuDNN over a batch, FlashAttention-2's variable-length mode), tried once on a tiny
    batch of three ragged rows against row-by-row causal_attention; False where either fails or is off."""
    if torch.device(device).type != "cuda" or not kernels_run(device, dtype, head_dim):
        return False
    g = torch.Generator(device).manual_seed(0)
    rows, starts, lengths = [2, 0, 1], [40, 33, 50], [16, 3, 9]
    q = torch.randn(3, 2, 16, head_dim, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(3, 1, 80, head_dim, generator=g, device=device, dtype=dtype) for _ in range(2))
    fn = RaggedPrefill(CachedPrefill(step=16, slack=1, patience=0), rows, starts, lengths, fallback=None)
    try:   # a head of 32 slots for every row; tails of 24, 4 and 27 keys
        out = fn(q, k, v)
        err = max((out[i, :, :n].float() - causal_attention(q[i:i + 1, :, :n], k[r:r + 1, :, :s + n],
                                                             v[r:r + 1, :, :s + n])[0].float()).abs().max().item()
                  for i, (r, s, n) in enumerate(zip(rows, starts, lengths)))
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        return False
    return err < 0.05
