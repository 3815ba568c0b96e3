"""
The KV caches, and the protocol every cache follows with model.forward.

The protocol (one forward of T new tokens, with a cache):
  1. stage:  pos = cache.add_tokens(ids, ...)  records the tokens' bookkeeping and hands out their M-RoPE
             positions (3, B, T). The cache owns positions: nothing else assigns `next_pos`.
  2. write:  model.forward(ids, position_ids=pos, cache=cache); each attention layer calls
             cache.update(layer, k, v, raw_k), which stores the new keys/values at slots [length, length + T)
             and returns all keys/values so far (the new ones last).
  3. commit: forward ends with cache.commit(T): the staged tokens become part of `length`.
A forward without position_ids stages its tokens itself (KVCache: plain prompts and generate). Between commits
`added` counts what was staged, so a mismatch between what was staged and what was forwarded fails loudly.

KVCache is the plain growing cache of model.generate. StreamingCache is StreamingVLM's (arXiv 2510.09608),
which lets a VLM watch a stream forever at constant memory and latency. What it keeps (the paper's Fig. 3,
defaults in brackets):
  attention sink   the system prompt, the "previous text" header and the first `text_sink` [512] tokens of
                   the previous text; never evicted;
  long text window the last `text_window` [512] tokens of commentary whose rounds have left the vision window;
  vision window    the last `vision_window` [16] rounds (seconds): their user turn, vision tokens and reply.
Once per round (not per token; or every `evict_every` rounds, as a training chunk cut into segments does) the
oldest round leaves the vision window: its reply tokens, with their K/V,
move to the end of the previous text, the rest of the round is dropped, and the previous text is cut back to
head + tail. Then comes *contiguous RoPE*: every kept token gets the 3-D M-RoPE position it would have if the
kept sequence were a fresh prompt (a vision block advances the position by max(h, w) after the merge), so the
largest position stays bounded however long the stream runs.

Design choices:
- Fixed-capacity buffers (layers, 1, Hkv, capacity, D) written by index; eviction is one gather per layer per
  second into the same buffers (on a GPU: one Triton kernel for all layers, fused_move, ~10x faster: an H100 moved
  a 7B stream's 13.3k kept tokens in 0.9 ms instead of 9.0). Capacity doubles if a round does not fit, which only
  happens while warming up.
- We keep the *rotated* keys (what attention reads on every decode step, so nothing is rotated per token)
  and also the *raw*, un-rotated keys. On eviction the survivors are rotated afresh from the raw keys at their
  new positions. Re-rotating rotated bf16 keys by -delta would be cheaper in memory, but each re-rotation
  rounds again and a text token is shifted once per second for minutes: the error would random-walk. From raw
  keys the cached key is bit-identical to the one a fresh prefill at the new position computes.
- Per-token bookkeeping lives on the CPU: token id, segment kind (layout.Kind), round, and the position relative
  to its "unit" (a text token, or a whole vision block) from which contiguous positions are re-derived.
- Two of the paper's baselines are settings of this cache: full attention (evict=False) and native RoPE (evict,
  but reindex=False keeps the old, growing positions: the paper's Table 4 ablation). The other two, sliding
  windows with and without overlap, change the loop rather than the cache. All five are named in one table,
  stream.POLICIES.
- DecodeSlots is the cache as a fixed-shape decode step sees it (decode.py): whole-capacity views written at a
  device index, so the step can be captured in a CUDA graph.
"""
import torch

from layout import Kind, cut_previous
from rope import apply_rope, inv_freq, mrope_axis, mrope_cos_sin, mrope_positions

try:  # eviction's fused kernel needs Triton (it comes with CUDA builds of PyTorch)
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class KVCache:
    """The plain growing cache: preallocated (layers, B, Hkv, max_len, D) buffers written by index, for a batch of
    prompts (model.generate). Padding masks are the caller's (forward's attention_mask covers past + new)."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.cfg = cfg
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length, self.added, self.max_len = 0, 0, max_len
        self.next_pos = torch.zeros(batch_size, dtype=torch.long)  # the next M-RoPE position of each row

    def add_tokens(self, input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                   attention_mask=None):
        """Stage a (B, T) chunk; returns its position ids (3, B, T). attention_mask (B, T) marks padded slots."""
        T = input_ids.shape[1]
        if self.length + self.added + T > self.max_len:
            raise RuntimeError(f"KVCache is full: {self.length} + {T} tokens > max_len {self.max_len}")
        pos, self.next_pos = mrope_positions(input_ids, self.cfg, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                             attention_mask, self.next_pos)
        self.added += T
        return pos

    def update(self, layer, k, v, raw_k=None):
        """Called by each attention layer: store this chunk's keys/values (and raw keys, when the cache keeps
        them), return all of them."""
        n, T = self.length, k.shape[2]
        self.k[layer, :, :, n:n + T] = k
        self.v[layer, :, :, n:n + T] = v
        if getattr(self, "raw_k", None) is not None:
            self.raw_k[layer, :, :, n:n + T] = raw_k
        return self.k[layer, :, :, :n + T], self.v[layer, :, :, :n + T]

    def commit(self, T):
        assert T == self.added, f"forwarded {T} tokens but add_tokens staged {self.added}"
        self.length += T
        self.added = 0


class StreamingCache(KVCache):
    """A KVCache (update and commit are its) that stages tokens with their kind and round, keeps raw keys too,
    and evicts once a round."""

    def __init__(self, cfg, evict=True, reindex=True, text_sink=512, text_window=512, vision_window=16,
                 capacity=1024, device="cpu", dtype=torch.float32, evict_every=1):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        # evict: drop rounds that left the vision window (their replies move to the previous text); reindex:
        # contiguous RoPE, re-derive the kept tokens' positions after an eviction
        self.evict_rounds, self.reindex = evict, reindex
        self.text_sink, self.text_window, self.vision_window = text_sink, text_window, vision_window
        # rounds leave in groups, at rounds that are multiples of evict_every: 1 is the paper's once a second; N is
        # what a training chunk cut into N s segments does (reuse.py), the window then holding vision_window to
        # vision_window + N - 1 seconds, so that a model trained that way is served with the K/V it was trained on
        self.evict_every = evict_every
        # on the device, made once: a host tensor there would be a copy that waits for the GPU at every eviction
        self.inv_freq = inv_freq(cfg.head_dim, cfg.rope_theta).to(self.device)
        self.axis = mrope_axis(cfg.mrope_section, self.device)
        self.length, self.capacity, self.added = 0, 0, 0
        self.next_pos = torch.zeros(1, dtype=torch.long)  # the next free M-RoPE position
        self.next_unit = 0
        self._allocate(capacity)

    def _allocate(self, capacity):
        c = self.cfg
        shape = (c.num_hidden_layers, 1, c.num_key_value_heads, capacity, c.head_dim)
        new = {n: torch.zeros(shape, device=self.device, dtype=self.dtype) for n in ("k", "v", "raw_k")}
        meta = dict(ids=torch.zeros(capacity, dtype=torch.long), kind=torch.zeros(capacity, dtype=torch.long),
                    round=torch.zeros(capacity, dtype=torch.long), unit=torch.zeros(capacity, dtype=torch.long),
                    rel=torch.zeros(3, capacity, dtype=torch.long), pos=torch.zeros(3, capacity, dtype=torch.long))
        n = self.length
        for name, buf in new.items():
            if n:
                buf[..., :n, :] = getattr(self, name)[..., :n, :]
            setattr(self, name, buf)
        for name, buf in meta.items():
            if n:
                buf[..., :n] = getattr(self, name)[..., :n]
            setattr(self, name, buf)
        self.capacity = capacity

    # ---- adding tokens -------------------------------------------------------------------------------------

    def add_tokens(self, ids, kind, round_, video_grid_thw=None, second_per_grid_ts=None):
        """Record the bookkeeping of `ids` (list or 1-D tensor) about to be forwarded, and return their position
        ids (3, 1, T) for model.forward. The forward writes the K/V (update) and commits (advance)."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        T, n = len(ids), self.length + self.added  # several segments may be recorded before one forward
        if n + T > self.capacity:
            self._allocate(max(2 * self.capacity, n + T))
        if T == 1 and int(ids[0]) not in (self.cfg.image_token_id, self.cfg.video_token_id):
            return self._add_text_token(n, ids, kind, round_)
        pos, nxt = mrope_positions(ids[None], self.cfg, video_grid_thw=video_grid_thw,
                                   second_per_grid_ts=second_per_grid_ts, start=self.next_pos)
        pos = pos[:, 0]
        unit, self.rel[:, n:n + T] = units(ids, pos, self.cfg)
        unit += self.next_unit
        self.unit[n:n + T] = unit
        self.ids[n:n + T] = ids
        self.kind[n:n + T] = torch.as_tensor(kind)    # an int, or one per token (re-prefilling a window)
        self.round[n:n + T] = torch.as_tensor(round_)
        self.pos[:, n:n + T] = pos
        self.next_unit = int(unit[-1]) + 1
        self.next_pos = nxt
        self.added += T
        return pos[:, None]

    def _add_text_token(self, n, ids, kind, round_):
        """add_tokens for one text token (each decode step's, for every stream of a batch: kept cheap on the host):
        a unit of its own at the next position on all three axes, which is what mrope_positions and units give it."""
        self.ids[n], self.kind[n], self.round[n], self.unit[n] = ids[0], kind, round_, self.next_unit
        self.rel[:, n], self.pos[:, n] = 0, self.next_pos
        pos = self.pos[:, n:n + 1].clone()
        self.next_unit, self.next_pos, self.added = self.next_unit + 1, self.next_pos + 1, self.added + 1
        return pos[:, None]                                                           # (3, 1, 1)

    def drop_last(self):
        """Forget the last committed token, a reply token (a decode step queued ahead whose token went unused)."""
        assert self.length > 0 and self.kind[self.length - 1] == Kind.REPLY
        self.rewind(1)

    def rewind(self, n):
        """Forget the last n committed tokens, all text (one unit and one position each): a step queued ahead and
        dropped, or a question and its answer (Streamer.ask). Their K/V stay past `length`, where the next write
        overwrites them."""
        assert self.added == 0 and 0 <= n <= self.length
        vision = torch.tensor([self.cfg.image_token_id, self.cfg.video_token_id])
        assert not torch.isin(self.ids[self.length - n:self.length], vision).any(), "rewind crosses a vision block"
        self.length -= n
        self.next_unit -= n
        self.next_pos = self.next_pos - n

    def relabel(self, start, end, kind):
        """Change the kind of the cached tokens [start, end), e.g. a reply's closing ' ...' from REPLY to END."""
        self.kind[start:end] = kind

    # ---- eviction and contiguous RoPE ------------------------------------------------------------------------

    def evict(self, current_round):
        """Once per round, before round `current_round` is added: StreamingVLM's eviction (at every evict_every-th
        round; never when the cache was made with evict=False)."""
        keep = self.evict_tokens(current_round)
        if keep is not None:
            self.move_kv(keep)

    def evict_tokens(self, current_round):
        """evict's bookkeeping (the host's half): the kept tokens' ids, kinds, rounds and positions move to the
        front. Returns the kept slots' old indices, whose K/V move_kv then moves, or None when nothing leaves."""
        if not self.evict_rounds or current_round % self.evict_every:
            return None
        L = self.length
        keep, body = kept_after_eviction(self.kind[:L], self.round[:L], current_round, self.vision_window,
                                         self.text_sink, self.text_window)
        if len(keep) == L and bool((keep == torch.arange(L)).all()):
            return None
        self.kind[body] = Kind.PREV_BODY
        n = len(keep)
        for name in ("ids", "kind", "round", "unit"):
            buf = getattr(self, name)
            buf[:n] = buf[keep]
        self.rel[:, :n] = self.rel[:, keep]
        self.pos[:, :n] = self.pos[:, keep]
        self.length = n
        if self.reindex:
            self.pos[:, :n], self.next_pos = contiguous_positions(self.unit[:n], self.rel[:, :n])
        return keep

    def move_kv(self, keep, fused=None):
        """evict's device half: the K/V of slots `keep` to the front; with reindex, the keys rotated afresh from
        the raw ones at their new, contiguous positions (serve.move_rows does the same for many caches at once).
        fused (default: on a GPU with Triton) runs fused_move, one kernel for all layers, the same values."""
        n = len(keep)
        if self.reindex:   # (copies that do not wait for the GPU: the vision tower may still be running)
            cos, sin = mrope_cos_sin(to_device(self.pos[:, None, :n], self.device), self.inv_freq,
                                     self.cfg.mrope_section, self.dtype, self.axis)
        if can_fuse(self.k) if fused is None else fused:
            rotation = (cos[:, 0], sin[:, 0]) if self.reindex else ()
            return fused_move(self.k, self.v, self.raw_k, [0], [keep], *rotation)
        dev_keep = to_device(keep, self.device)
        for layer in range(self.cfg.num_hidden_layers):  # one layer at a time: a small temporary
            self.v[layer, :, :, :n] = self.v[layer, :, :, dev_keep]
            self.raw_k[layer, :, :, :n] = self.raw_k[layer, :, :, dev_keep]
            if self.reindex:
                self.k[layer, :, :, :n] = apply_rope(self.raw_k[layer, :, :, :n], cos, sin)
            else:
                self.k[layer, :, :, :n] = self.k[layer, :, :, dev_keep]

    def clear(self):
        self.length, self.next_unit, self.added = 0, 0, 0
        self.next_pos = torch.zeros(1, dtype=torch.long)

    # ---- views -------------------------------------------------------------------------------------------------

    def tokens(self):
        """The kept sequence, in order: (ids, kinds, rounds) as 1-D tensors."""
        return self.ids[:self.length].clone(), self.kind[:self.length].clone(), self.round[:self.length].clone()

    def max_position(self):
        return int(self.pos[:, :self.length].max()) if self.length else 0

    def nbytes(self):
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in ("k", "v", "raw_k"))


# -----------------------------------------------------------------------------
# Eviction's fast path: one kernel moves (and rotates) every layer's kept K/V
#
# Why: the reference (move_kv) gathers into temporaries and rotates with ~5 elementwise ops, each a pass over the
# kept keys in memory; an H100 took ~9 ms for one 7B stream's 13k kept tokens (~8 ms a row for 16 rows at once), ~10x
# what reading and writing the bytes once costs. Here a program per (row, layer, KV head) walks the kept slots in
# order, a block of BLOCK at a time: it loads the block's V, raw K (and K, without reindex) from their old slots
# keep[j] and the block's cos/sin, then stores them at slots j, the keys rotated in registers. In place: a slot that
# moves left or stays (keep[j] >= j) is read before any store reaches it (a later block reads only slots past every
# earlier block's stores; a barrier between a block's loads and its stores orders the block itself). A slot that moves
# right (keep[j] < j: while the previous text grows, its two closing tokens land behind the replies that joined it)
# could be overwritten first: those few are copied out before the kernel, which skips them, and written after it.
# The rotation rounds each product and the sum
# to nearest as apply_rope's bf16 ops do, with fused multiply-adds off (they would skip a rounding): the moved keys
# are the reference's bit for bit (tests/test_cache.py, on an H100).


if triton is not None:
    @triton.jit
    def _round(x, like):   # fp32 -> like's dtype (to nearest, ties to even) -> fp32: one of apply_rope's bf16 ops
        return x.to(like.dtype, fp_downcast_rounding="rtne").to(tl.float32)

    # the integer arguments are not specialised on (divisible by 16 or not): a new value would compile again
    @triton.jit(do_not_specialize=["s_layer", "s_row", "s_head", "s_slot", "s_idx", "s_cos"])
    def _move_kernel(k_ptr, v_ptr, raw_ptr, rows_ptr, idx_ptr, count_ptr, cos_ptr, sin_ptr, s_layer, s_row, s_head,
                     s_slot, s_idx, s_cos, H: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
                     ROTATE: tl.constexpr):
        e, lh = tl.program_id(0), tl.program_id(1)       # an evicting row; a (layer, KV head)
        base = (lh // H).to(tl.int64) * s_layer + tl.load(rows_ptr + e).to(tl.int64) * s_row + (lh % H) * s_head
        n, d = tl.load(count_ptr + e), tl.arange(0, HALF)
        for start in range(0, n, BLOCK):
            j = start + tl.arange(0, BLOCK)
            old = tl.load(idx_ptr + e * s_idx + j, mask=j < n, other=-1)   # -1: a slot moving right, skipped here
            ok = ((j < n) & (old >= 0))[:, None]
            src = base + tl.maximum(old, 0)[:, None] * s_slot + d[None, :]
            dst = base + j[:, None] * s_slot + d[None, :]
            v1, v2 = tl.load(v_ptr + src, mask=ok), tl.load(v_ptr + src + HALF, mask=ok)
            x1, x2 = tl.load(raw_ptr + src, mask=ok), tl.load(raw_ptr + src + HALF, mask=ok)
            if ROTATE:  # apply_rope on the two halves: x * cos + rotate_half(x) * sin, rounded op by op
                cs = e * s_idx * s_cos + j[:, None] * s_cos + d[None, :]
                c, s = tl.load(cos_ptr + cs, mask=ok).to(tl.float32), tl.load(sin_ptr + cs, mask=ok).to(tl.float32)
                # (a product of two bf16 values is exact in fp32: rounding it once is what PyTorch's bf16 op computes)
                k1 = _round(_round(x1.to(tl.float32) * c, x1) - _round(x2.to(tl.float32) * s, x1), x1).to(x1.dtype)
                k2 = _round(_round(x2.to(tl.float32) * c, x1) + _round(x1.to(tl.float32) * s, x1), x1).to(x1.dtype)
            else:
                k1, k2 = tl.load(k_ptr + src, mask=ok), tl.load(k_ptr + src + HALF, mask=ok)
            tl.debug_barrier()   # every load of this block before any store
            tl.store(v_ptr + dst, v1, mask=ok)
            tl.store(v_ptr + dst + HALF, v2, mask=ok)
            tl.store(raw_ptr + dst, x1, mask=ok)
            tl.store(raw_ptr + dst + HALF, x2, mask=ok)
            tl.store(k_ptr + dst, k1, mask=ok)
            tl.store(k_ptr + dst + HALF, k2, mask=ok)


def can_fuse(k):
    """Whether fused_move runs on these buffers: CUDA, Triton, a 16-bit dtype (the rounding it reproduces)."""
    return k.is_cuda and triton is not None and k.dtype in (torch.bfloat16, torch.float16)


def fused_move(k, v, raw_k, rows, keeps, cos=None, sin=None, block=32):
    """move_kv's result for cache rows rows[i] of k, v, raw_k ((layers, R, Hkv, slots, D), the same strides, unit
    stride along D): row rows[i] keeps its slots keeps[i] (in order, each once) at the front; with cos, sin ((E, n, D),
    E = len(rows), n >= every keep's length: mrope_cos_sin at the new positions) the keys are rotated afresh from the
    raw ones, else K moves as V does. One kernel for every row, layer and KV head, and the slots moving right aside."""
    L, _, H, _, D = k.shape
    assert k.stride() == v.stride() == raw_k.stride() and k.stride(-1) == 1, "K, V, raw K: one layout, unit D stride"
    n = max(len(keep) for keep in keeps)
    idx = torch.zeros(len(keeps), n, dtype=torch.int32)
    for i, keep in enumerate(keeps):
        idx[i, :len(keep)] = keep
    counts = torch.tensor([len(keep) for keep in keeps], dtype=torch.int32)
    right = (idx < torch.arange(n)) & (torch.arange(n) < counts[:, None])   # (E, n) the slots that move right
    e, j = right.nonzero(as_tuple=True)
    if len(e):   # copied out now, before the kernel can overwrite them, and written back after it
        row, src, to, e = (to_device(x, k.device) for x in (torch.tensor(rows)[e], idx[e, j].long(), j, e))
        aside = [x[:, row, :, src] for x in (k, v, raw_k)]                      # (m, layers, Hkv, D) each
        idx[right] = -1
    dev_rows, idx, counts = (to_device(x, k.device) for x in (torch.tensor(rows, dtype=torch.int32), idx, counts))
    rotate = cos is not None
    if rotate:   # the first half of each (D-wide) row: rotate_half's two halves share their angles
        assert cos.shape[:2] == (len(keeps), n) and cos.is_contiguous() and sin.is_contiguous()
    _move_kernel[(len(keeps), L * H)](k, v, raw_k, dev_rows, idx, counts, cos if rotate else k, sin if rotate else k,
                                      k.stride(0), k.stride(1), k.stride(2), k.stride(3), n, D,
                                      H=H, HALF=D // 2, BLOCK=block, ROTATE=rotate, num_stages=1,
                                      enable_fp_fusion=False)   # no fused multiply-adds: apply_rope's roundings
    if len(e):
        v[:, row, :, to], raw_k[:, row, :, to] = aside[1], aside[2]
        k[:, row, :, to] = (apply_rope(aside[2], cos[e, to][:, None, None], sin[e, to][:, None, None]) if rotate
                            else aside[0])


def to_device(x, device):
    """A host tensor copied to a GPU without waiting for the GPU's queued work (pinned, non-blocking), so that the
    host can prepare the next kernels while the GPU runs earlier ones (serve.StreamBatch evicts during the tower)."""
    if x.device.type != "cpu" or device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def units(ids, pos, cfg):
    """Each token's unit (a text token is one, a run of vision pads is one), numbered from 0, and its position
    relative to the start of its unit: what contiguous_positions re-lays after an eviction.
    ids (T,), pos (3, T) -> unit (T,), rel (3, T)."""
    vis = torch.isin(ids, torch.tensor([cfg.image_token_id, cfg.video_token_id]))
    starts = ~(vis & torch.cat([torch.tensor([False]), vis[:-1]]))
    unit = starts.cumsum(0) - 1
    first = torch.zeros_like(ids).scatter_reduce(0, unit, torch.arange(len(ids)), "amin",
                                                 include_self=False)  # index of each unit's first token
    unit_start = pos[:, first[unit]].min(0).values  # a vision block starts at (cur, cur, cur)
    return unit, pos - unit_start


def kept_after_eviction(kind, rnd, current_round, vision_window, text_sink, text_window):
    """StreamingVLM's eviction, on a kept sequence's kinds and rounds (1-D tensors): when round `current_round`
    arrives, the rounds up to current_round - vision_window leave; their replies join the previous text, which is
    cut back to head + tail. Returns (indices kept, in order; those of them that are previous text)."""
    idx = torch.arange(len(kind))
    old = (kind >= Kind.USER) & (rnd <= current_round - vision_window)
    body = torch.cat([idx[kind == Kind.PREV_BODY], idx[old & (kind == Kind.REPLY)]])  # replies join previous text
    body = cut_previous(body, text_sink, text_window)
    keep = torch.cat([idx[kind <= Kind.PREV_HEAD], body, idx[kind == Kind.PREV_END], idx[(kind >= Kind.USER) & ~old]])
    return keep, body


def contiguous_positions(unit, rel):
    """Positions of a kept sequence as a fresh prompt: units (text tokens, vision blocks) laid end to end, each
    as wide as its largest relative position + 1 (a vision block: max(h, w) after the merge).
    unit (n,) ids, a unit's tokens adjacent, rel (3, n) -> positions (3, n), next free position (1,)."""
    new_unit = torch.cat([torch.tensor([True]), unit[1:] != unit[:-1]])
    u = new_unit.cumsum(0) - 1                                               # 0, 1, 2, ... per unit
    width = torch.zeros(int(u[-1]) + 1, dtype=torch.long).scatter_reduce(0, u, rel.max(0).values + 1, "amax")
    start = width.cumsum(0) - width                                          # exclusive cumsum
    return start[u] + rel, width.sum().view(1)


class DecodeSlots:
    """The cache as a fixed-shape step sees it (a decode step, decode.py; a second's prefill, prefill.GraphPrefill):
    each layer writes its new keys/values at the device indices `index` and reads the whole capacity-long buffers
    back; the step's mask (decode) or key count (prefill) hides the slots past the current length. Views are made
    once, outside any compiled code."""

    def __init__(self, cache, index):
        self.k, self.v, self.raw_k = (list(getattr(cache, n).unbind(0)) for n in ("k", "v", "raw_k"))
        self.index = index

    def update(self, layer, k, v, raw_k):
        self.k[layer].index_copy_(2, self.index, k)      # (1, Hkv, capacity, D), slots `index` <- (1, Hkv, T, D)
        self.v[layer].index_copy_(2, self.index, v)
        self.raw_k[layer].index_copy_(2, self.index, raw_k)
        return self.k[layer], self.v[layer]
