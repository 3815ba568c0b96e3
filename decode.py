"""
The fast path of the streaming loop, beside the plain one in stream.py: a decode step of fixed shape captured
in a CUDA graph (GraphDecoder) and greedy decoding one step ahead of the host (decode_ahead).
Streamer(decode="graphs" or "compiled") switches them on; the tokens are the plain loop's. FixedStep is the same step
for every row of a batch of streams (serve.StreamBatch, which decodes one step ahead with it too).

Why: a 7B decode step reads ~15 GB of weights, about 5 ms on an H100, but the eager step launches ~600 small
kernels from Python, one after the other, and that launch overhead, not the GPU, sets the pace (~40 ms per
token eager). A CUDA graph records the kernels once and replays them with one launch. Graphs need:
- static shapes: attention always runs over the whole buffer capacity, with a mask that hides the slots past
  the current length (cost: reading the empty slots, small next to the weights);
- static addresses: the token, its position and its write index live in fixed device tensors that we fill
  before each replay; the K/V buffers are the cache's own, which eviction compacts in place. When the cache
  grows (capacity doubles while warming up) the graph is captured again;
- no host work inside: the M-RoPE axis table is made once, the K/V write is index_copy_ with a device index;
- no host sync between tokens: the token, position and write index are set with fill_ (a kernel argument), not
  copied from host memory, so the CPU can queue token n+1 while the GPU still runs token n;
- greedy decoding without waiting: the graph also takes the argmax, and a step can be fed that argmax on the
  device (token_id=None). The host queues step n+1 first and only then reads token n back (a pinned copy and an
  event per step), so the readback and the graph launch (~1 ms of CPU for ~600 nodes at 7B) overlap the GPU's
  work instead of leaving it idle. If token n ends the reply, step n+1 was wasted and the caller drops it.

compile=True also runs the step through torch.compile before capturing it: the ~20 small kernels per layer
(norms, rotary, residual adds, softmax, SiLU) fuse into a few, which is most of what separates the replayed
eager step (~10 ms at 7B) from the ~5 ms it takes to read the weights once. The cache buffers reach the
compiled step as one view per layer, made outside it: indexing cache.k[layer] inside would make the compiler
treat the K/V write as a mutation of the whole buffer and copy all of it on every token.

The fast path also fuses the model's projections (VLM.fuse: one q/k/v and one gate/up matmul per layer, 84
fewer launches a step at 7B and larger matrix-vector products) and, on a GPU, runs the decode attention through
the split-KV kernel below (VLM.use_decode_attention), and each second's prefill over the cache through cuDNN and
FlashAttention-2 (prefill.py, VLM.use_attention), unless the caller decided otherwise before (model.fuse(False),
model.use_decode_attention(None), model.use_attention(None) keep the references; the benchmarks run both ways).

The step reuses the model's own layers (Attention, MLP, norms), so it computes exactly what the eager path
does; only the cache adapter (cache.DecodeSlots) and the mask differ. tests/test_decode.py runs the same step eagerly on
the CPU against model.forward, and on a GPU compares the replayed graph with the eager step.

References: gpt-fast (static KV cache + CUDA graphs for decode), PyTorch's torch.cuda.graphs.
"""
import functools

import torch

from cache import DecodeSlots
from layout import Kind, check_text
from prefill import capture, prefill_kernel_for
from rope import mrope_cos_sin

try:  # the split-KV decode kernel needs Triton (it comes with CUDA builds of PyTorch)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# -----------------------------------------------------------------------------
# Split-KV ("flash-decoding") attention for one decoded token
#
# Why: the reference (model.decode_attention) is two batched matmuls with M = 7 (the query heads of one KV head);
# cuBLAS runs the probabilities x V product on a handful of thread blocks, and with the masked softmax between
# them a layer's attention over a 13.5k cache takes ~35 us where reading its 30 MB of K/V takes ~11 us. Here
# each (batch, KV head, slice of the cache) is one program: it reads its slice of K and V once for all G query
# heads (tl.dot on a 16-row tile), keeps a running max and sum (online softmax) and writes an unnormalised
# partial output; the slices are then merged by their log-sum-exp (Dao et al., "Flash-Decoding", 2023). On an
# H100 at 7B (bench_stream --profile) it takes 14.7 us a layer (with the fused projections, decode went from 7.66
# to 6.52 ms a token in the same run). The decode step's buffers are the cache's whole capacity (a graph needs
# fixed shapes) while the mask shows only the first length + 1 slots, so blocks that see no key skip their K/V.


if triton is not None:
    @triton.jit
    def _split_kv_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, m_ptr, l_ptr, N, chunk,
                         sqb, sqh, skb, skh, skn, svb, svh, svn, smb, SCALE: tl.constexpr,
                         HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // HKV, bh % HKV
        g, d = tl.arange(0, GP), tl.arange(0, D)
        q = tl.load(q_ptr + b * sqb + h * sqh + g[:, None] * D + d[None, :], mask=g[:, None] < G, other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)              # running max of the scores, per query head
        l_i = tl.zeros([GP], tl.float32)                            # running sum of exp(score - max)
        acc = tl.zeros([GP, D], tl.float32)                         # running sum of exp(score - max) * v
        for start in range(split * chunk, split * chunk + chunk, BLOCK):
            n = start + tl.arange(0, BLOCK)
            ok = n < N
            if HAS_MASK:
                ok = ok & (tl.load(mask_ptr + b * smb + n, mask=n < N, other=0) != 0)
            # a block with no visible key (the buffer's unused tail past the cache's length) reads no K/V
            if tl.max(ok.to(tl.int32), 0) > 0:
                k = tl.load(k_ptr + b * skb + h * skh + n[:, None] * skn + d[None, :], mask=(n < N)[:, None],
                            other=0.0)
                if IEEE:  # fp32 inputs: full-precision products (tf32 would miss the fp32 reference by ~1e-3)
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
                else:
                    s = tl.dot(q, tl.trans(k)) * SCALE                  # (GP, BLOCK) fp32
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing visible yet: keep exp() finite
                alpha, p = tl.exp(m_i - m_safe), tl.exp(s - m_safe[:, None])
                v = tl.load(v_ptr + b * svb + h * svh + n[:, None] * svn + d[None, :], mask=(n < N)[:, None],
                            other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                l_i = l_i * alpha + tl.sum(p, 1)
                m_i = m_new
        row = (bh * tl.num_programs(1) + split) * GP + g
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=(g < G)[:, None])   # (the padding rows: never)
        tl.store(m_ptr + row, m_i, mask=g < G)
        tl.store(l_ptr + row, l_i, mask=g < G)

    @triton.jit
    def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, splits, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      SP: tl.constexpr, SB: tl.constexpr):
        # one program per (batch x KV head, query head): its row of every slice, weighted by exp(slice max - max)
        bh, g = tl.program_id(0), tl.program_id(1)
        s, d = tl.arange(0, SP), tl.arange(0, D)
        m = tl.load(m_ptr + (bh * splits + s) * GP + g, mask=s < splits, other=float("-inf"))   # (SP,)
        m_max = tl.max(m, 0)            # finite: every query sees a key (a slice that saw none has max -inf)
        l = tl.load(l_ptr + (bh * splits + s) * GP + g, mask=s < splits, other=0.0)
        denom = tl.sum(l * tl.exp(m - m_max), 0)
        o = tl.zeros([D], tl.float32)
        for first in range(0, splits, SB):   # SB slices' (SB, D) partial outputs at a time
            sb = first + tl.arange(0, SB)
            row = (bh * splits + sb) * GP + g
            w = tl.exp(tl.load(m_ptr + row, mask=sb < splits, other=float("-inf")) - m_max)   # (SB,)
            acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=(sb < splits)[:, None], other=0.0)
            o += tl.sum(acc * w[:, None], 0)
        tl.store(out_ptr + (bh * G + g) * D + d, (o / denom).to(out_ptr.dtype.element_ty))

def split_kv_attention(q, k, v, mask=None, programs=264, block=64):
    """model.decode_attention on CUDA with Triton, same arguments: q (B, Hkv, G, D), k and v (B, Hkv, N, D) with
    unit stride along D (a power of two), mask (B or 1, 1, 1, N) bool or None -> (B, Hkv, G, D). Partial outputs
    per slice of the cache in fp32, merged by log-sum-exp (every query must see at least one key, as a decoded
    token sees itself). programs: how many programs to aim for (two per multiprocessor: decode_kernel_for)."""
    (B, Hkv, G, D), N = q.shape, k.shape[2]
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "K/V need unit stride along the head dimension"
    q = q.contiguous()
    splits = max(1, min(triton.cdiv(programs, B * Hkv), triton.cdiv(N, block)))  # each at least a block of keys
    chunk = triton.cdiv(triton.cdiv(N, splits), block) * block
    splits = triton.cdiv(N, chunk)
    GP = max(16, triton.next_power_of_2(G))                          # tl.dot wants 16 rows or more
    acc = torch.empty(B * Hkv, splits, GP, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B * Hkv, splits, GP, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    if mask is not None:
        mask = mask.expand(B, 1, 1, N).reshape(B, N).to(torch.uint8)  # (a bool view does not compile)
    _split_kv_kernel[(B * Hkv, splits)](
        q, k, v, mask if mask is not None else q, acc, m, l, N, chunk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0) if mask is not None else 0,
        SCALE=D ** -0.5,  # a constant: a float argument reaches a compiled graph's launch as fp64
        HKV=Hkv, G=G, GP=GP, D=D, BLOCK=block, HAS_MASK=mask is not None, IEEE=q.dtype == torch.float32)
    # merge the slices in one more kernel (a handful of torch ops would be several launches a layer): each weighted
    # by exp(its max - the overall max), out = sum(w * acc) / sum(w * l)
    out = torch.empty(B, Hkv, G, D, device=q.device, dtype=q.dtype)
    # SP (a constant of the kernel) from the most slices there can be, not from this cache's: a compiled step whose
    # cache grew would otherwise recompile each time the count crossed a power of two
    SP = triton.next_power_of_2(max(1, triton.cdiv(programs, B * Hkv)))
    _merge_kernel[(B * Hkv, G)](acc, m, l, out, splits, G=G, GP=GP, D=D, SP=SP, SB=16)
    return out


def decode_kernel_for(device):
    """split_kv_attention sized for this GPU (two programs per multiprocessor), or None without CUDA or Triton.
    The count is read here, outside any compiled code."""
    device = torch.device(device)
    if device.type != "cuda" or triton is None:
        return None
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return functools.partial(split_kv_attention, programs=2 * sms)


def take_fast_defaults(model):
    """Where nobody chose (model.fuse / use_decode_attention / use_attention not called), the fast path takes the
    fused projections and, on a GPU, split-KV decoding (decode graphs here, and serve.FixedStep's) and the prefill
    over the cache through cuDNN and FlashAttention-2 (prefill.py)."""
    if model.fusion is None:
        model.fuse()
    if model.decode_kernel is None and decode_kernel_for(model.device) is not None:
        model.use_decode_attention(decode_kernel_for(model.device))
    if model.prompt_kernel is None and (kernel := prefill_kernel_for(model.device, model.dtype,
                                                                     model.cfg.head_dim)) is not None:
        model.use_attention(kernel)


class GraphDecoder:
    """decoder(token_id) -> logits (1, vocab) of the next token, for a StreamingCache that the caller has
    already told about the token (cache.add_tokens), exactly like model(...) with cache=cache would."""

    def __init__(self, model, cache, graphs=None, compile=False):
        self.model, self.cache = model, cache
        dev = model.device
        take_fast_defaults(model)
        self.graphs = dev.type == "cuda" if graphs is None else graphs
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)    # static inputs, filled per step
        self.pos = torch.zeros(3, 1, 1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph, self.key, self.logits, self.argmax, self.slot = None, None, None, None, None
        self.captures = 0
        self.compiled = compile
        self.tops = Readback((), dev)   # the last steps' argmax on the host
        self.prefill_top = Readback((), dev)   # decode_ahead's: the prefill's argmax, read while step 1 runs

    def _step(self):
        """The static-shape step: reads token/pos/index, writes K/V into the cache, returns logits (1, vocab)."""
        m, c = self.model, self.cache
        x = m.model.embed_tokens(self.token)                                        # (1, 1, hidden)
        cos, sin = mrope_cos_sin(self.pos, m.model.inv_freq, m.cfg.mrope_section, x.dtype, m.model.rope_axis)
        # key j is visible when it is already cached (j < index) or is this token (j == index)
        mask = (torch.arange(c.capacity, device=x.device) <= self.index)[None, None, None]  # (1, 1, 1, capacity)
        for layer in m.model.layers:
            x = layer(x, cos, sin, mask, self.slot)
        x = m.model.norm(x)
        logits = m.lm_head(x) if m.lm_head is not None else x @ m.model.embed_tokens.weight.T
        return logits[:, -1]

    def step(self):
        # the function, not a bound method, is what gets compiled and stored (a bound method kept on self would be a
        # reference cycle that holds the cache and the graph's memory until the next garbage collection)
        return _compiled_step()(self) if self.compiled else GraphDecoder._step(self)

    def _capture(self):
        # (1,): the argmax, what greedy decoding feeds next, taken inside the graph
        self.graph, (self.logits, self.argmax) = capture(self.step, lambda logits: (logits, logits.argmax(-1)))
        self.captures += 1

    @torch.no_grad()
    def __call__(self, token_id, position):
        """token_id: int, a token on the device (a 0-d tensor), or None for the previous step's argmax (taken on
        the device, no host round trip); position: (3, 1, 1) M-RoPE position from cache.add_tokens. Commits the
        token. Returns the logits; read() gives this step's argmax on the host."""
        c = self.cache
        assert c.added == 1, "call cache.add_tokens([token], ...) first"
        if not bool((position == position[0]).all()):
            raise ValueError(f"a decoded token is text, its three M-RoPE positions must be equal: {position.flatten()}")
        if token_id is None:
            if self.argmax is None:
                raise RuntimeError("token_id=None feeds the previous step's argmax, but no step has run")
            self.token.copy_(self.argmax.view(1, 1))  # queued after the previous step, before this one
        elif isinstance(token_id, torch.Tensor):
            self.token.copy_(token_id.view(1, 1))
        else:
            self.token.fill_(token_id)
        self.pos.fill_(int(position[0, 0, 0]))
        self.index.fill_(c.length)
        key = (c.k.data_ptr(), c.capacity)  # the cache reallocated: its buffers moved
        if key != self.key:
            self.slot, self.key, self.graph = DecodeSlots(c, self.index), key, None
        if not self.graphs:
            logits = self.step()
            self.argmax = logits.argmax(-1)
        else:
            if self.graph is None:
                # the warm-up run of a capture writes this token's K/V too; replaying rewrites the same values
                self._capture()
            self.graph.replay()
            logits = self.logits.clone()  # the graph's output buffer is overwritten by the next replay
        self.tops.push(self.argmax[0])
        c.commit(1)
        return logits

    @property
    def steps(self):
        return self.tops.steps

    def read(self, back=1):
        """The argmax of the step `back` steps ago (1 = the last one) on the host, waiting for that step only."""
        return int(self.tops.read(back))


class Readback:
    """The last two steps' argmax on the host: a pinned copy and an event per step, alternating (reading step n must
    not see step n + 1's copy land in the same buffer), so the host waits for the step it reads and no later one."""

    def __init__(self, shape, device):
        pinned = device.type == "cuda"
        self.host = torch.zeros(2, *shape, dtype=torch.long, pin_memory=pinned)
        self.events = [torch.cuda.Event() for _ in range(2)] if pinned else None
        self.steps = 0

    def push(self, argmax):
        """Queue the copy of this step's argmax (after the step, on the current stream)."""
        slot = self.steps % 2
        self.host[slot].copy_(argmax, non_blocking=self.events is not None)
        if self.events is not None:
            self.events[slot].record(torch.cuda.current_stream(argmax.device))
        self.steps += 1

    def read(self, back=1):
        """The argmax of the step `back` steps ago (1 = the last), waiting for that step only."""
        assert back in (1, 2) and self.steps >= back, "read() reaches the last two steps"
        slot = (self.steps - back) % 2
        if self.events is not None:
            self.events[slot].synchronize()
        return self.host[slot]


# One compiled step for all decoders of a process, made on first use: the first cache capacity it meets is
# compiled static; a second capacity (a cache that grew) recompiles once with the capacity as a symbolic size
# (torch.compile's automatic dynamic shapes), so the growing caches of long runs do not hit the recompile limit.
# Size the cache up front (Streamer(capacity=...)) to keep the faster static version, as the benchmark does.
@functools.cache
def _compiled_step():
    return torch.compile(GraphDecoder._step, fullgraph=True)


def decode_ahead(dec, cache, logits, forced, cap, stops, round_, readback=True):
    """Greedy (or forced) decoding one step ahead of the host: while step k runs, step k+1 is already queued,
    fed on the device with step k's argmax, and only then is step k's token read back. Same tokens as the plain
    loop (stream.py's Streamer.decode); a step queued past the end of the reply is dropped from the cache.
    logits: the prefill's; forced: tokens to teacher-force (or None); cap: the most tokens; readback: with forced
    tokens, still read each step's argmax back to the host, as real decoding must. Returns (tokens, last logits)."""
    top = logits[0, -1].argmax()    # the prefill's token, on the device
    dec.prefill_top.push(top)
    # step 1 too is queued before its token (the prefill's) is read back: the GPU goes on from the prefill to it
    # while the host waits for the prefill alone and launches the graph
    ahead = cap > 1 and (forced is None or forced[0] not in stops)
    if ahead:
        fed = forced[0] if forced is not None else top
        last = [dec(fed, cache.add_tokens([forced[0] if forced is not None else 0], Kind.REPLY, round_))]
    read = int(dec.prefill_top.read()) if forced is None or readback else None
    out = [forced[0] if forced is not None else read]
    if not ahead or out[0] in stops:
        if ahead:   # the step queued ahead fed a token that ends the reply (a stop)
            cache.drop_last()
        return out, logits
    fed_text(out[0], dec.model.cfg, cache)
    if forced is None:
        cache.ids[cache.length - 1] = out[0]   # step 1 was fed this token (placeholder 0)
    while True:
        k = len(out)  # step k (fed out[k-1]) is queued; its token out[k] is not known yet
        ahead = k + 1 < cap  # out[k] will be fed unless it is the cap's last token (or a stop)
        if ahead:
            tok = forced[k] if forced is not None else None  # None: step k's argmax, on the device
            last.append(dec(tok, cache.add_tokens([tok if tok is not None else 0], Kind.REPLY, round_)))
        read = dec.read(back=2 if ahead else 1) if forced is None or readback else None
        out.append(forced[k] if forced is not None else read)
        if out[-1] in stops or len(out) == cap:
            if ahead:  # the step queued ahead fed a token that ends up unused
                cache.drop_last()
                last.pop()
            return out, last[-1][:, None]
        fed_text(out[-1], dec.model.cfg, cache)  # it stays fed: it must be text (as the plain loop checks)
        if forced is None:
            cache.ids[cache.length - 1] = out[-1]  # the step queued ahead was fed this token (placeholder 0)
        last = last[-2:]


def fed_text(token, cfg, cache):
    """check_text for a token already fed by the step queued ahead: if it is no text, that step leaves the cache
    before the error goes up, so the cache is what the plain loop (which checks first) leaves."""
    try:
        check_text(token, cfg)
    except ValueError:
        cache.drop_last()
        raise


# -----------------------------------------------------------------------------
# The same for a batch of streams (serve.StreamBatch): one fixed-shape step over every cache row


class FixedStep:
    """One decode step for every row of a batch's shared cache (serve.StreamBatch) at a fixed shape, captured in a
    CUDA graph and replayed (GraphDecoder's idea, for R rows; decode="graphs"), compiled first with decode="compiled".
    A row that does not speak this step writes its K/V into its scratch slot (the buffers' last, past any cache's
    capacity) and sees only that slot; a speaking row writes at its cache's next slot and sees the slots up to it.
    A row's token is the host's, or (feed) the previous step's argmax taken on the device, so the host can queue step
    n + 1 before it reads step n's tokens back (read(), as GraphDecoder.read). Without a GPU the step runs eagerly."""

    def __init__(self, model, k, v, raw_k, compile=False):
        R, S, dev = k.shape[1], k.shape[3], model.device
        take_fast_defaults(model)   # fused projections, split-KV decoding on a GPU (unless the caller chose)
        # one view per layer, made here: indexing the whole buffer inside compiled code would make the compiler treat
        # a layer's write as a mutation of all of it (the reason above)
        self.model, self.k, self.v, self.raw_k = model, k.unbind(0), v.unbind(0), raw_k.unbind(0)  # (R, Hkv, S, D)
        # the static inputs, one (4, R) buffer filled by one copy per step: token, position, slot, feed (1: take the
        # row's token from the previous step's argmax)
        self.inputs = torch.zeros(4, R, dtype=torch.long, device=dev)
        self.inputs[2] = S - 1
        self.index = self.inputs[2]                                      # (R,) the slot each row writes
        self.top = torch.zeros(R, dtype=torch.long, device=dev)         # each row's argmax after the last step
        self.rows, self.keys = torch.arange(R, device=dev), torch.arange(S, device=dev)
        self.graphs = dev.type == "cuda"
        self.compiled = compile and self.graphs
        self.graph, self.logits = None, None
        self.tops = Readback((R,), dev)   # the last steps' argmax of every row on the host

    def update(self, layer, k, v, raw_k):  # the cache adapter: k (R, Hkv, 1, D) -> slot index[r] of row r
        for buf, new in ((self.k, k), (self.v, v), (self.raw_k, raw_k)):
            buf[layer][self.rows, :, self.index] = new[:, :, 0]
        return self.k[layer], self.v[layer]

    def _step(self):
        m, (token, position, index, feed) = self.model, self.inputs
        token = torch.where(feed != 0, self.top, token)[:, None]                        # (R, 1)
        x = m.model.embed_tokens(token)                                                  # (R, 1, hidden)
        pos = position[None, :, None].expand(3, -1, -1)                                  # text: three equal axes
        cos, sin = mrope_cos_sin(pos, m.model.inv_freq, m.cfg.mrope_section, x.dtype, m.model.rope_axis)
        # a silent row (writing the scratch slot, the last) sees only that slot: split-KV reads none of its K/V
        last = self.keys[-1]
        seen = (self.keys[None, :] <= index[:, None]) & ((index < last)[:, None] | (self.keys == last)[None, :])
        mask = seen[:, None, None]                                                       # (R, 1, 1, slots)
        for layer in m.model.layers:
            x = layer(x, cos, sin, mask, self)
        x = m.model.norm(x)
        return (m.lm_head(x) if m.lm_head is not None else x @ m.model.embed_tokens.weight.T)[:, -1]

    def step(self):
        # the function, not a bound method, is compiled (GraphDecoder.step's reason)
        return _compiled_fixed_step()(self) if self.compiled else FixedStep._step(self)

    def _capture(self):
        # the warm-up writes this step's K/V too, and replaying rewrites the same values
        self.graph, self.logits = capture(self.step, self._keep_argmax)

    def _keep_argmax(self, logits):
        self.top.copy_(logits.argmax(-1))   # each row's argmax: what a fed row takes in the next step
        return logits

    @torch.no_grad()
    def __call__(self, tokens, positions, slots, feed=None):
        """tokens, positions, slots, feed: a value per row (a silent row: 0, 0, the scratch slot, 0; a fed row: its
        token is ignored). Queues the step and returns its logits (R, vocab); read() gives its argmax."""
        host = torch.tensor([tokens, positions, slots, feed or [0] * len(tokens)], dtype=torch.long)
        if not self.graphs:
            self.inputs.copy_(host)
            logits = self._keep_argmax(self.step())
        else:   # pinned, without waiting: the previous step may still be running
            self.inputs.copy_(host.pin_memory(), non_blocking=True)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits.clone()   # the graph's output buffer is overwritten by the next replay
        self.tops.push(self.top)
        return logits

    def read(self, back=1):
        """Every row's argmax of the step `back` steps ago (1 = the last) on the host, waiting for that step only."""
        return self.tops.read(back).tolist()


@functools.cache
def _compiled_fixed_step():
    # static shapes: a batch's rows and capacity never change, and a batch of another size (bench_serve runs several)
    # gets kernels of its own, not a dynamic-shape version of the first
    return torch._dynamo.config.patch(recompile_limit=64)(torch.compile(FixedStep._step, fullgraph=True,
                                                                        dynamic=False))
