"""
Many live streams on one model: every second, the work of all streams runs as one batch.

A Streamer (stream.py) is the one-stream reference: its step() runs the vision tower, evicts, prefills the second's
turn and decodes the reply. Served one process a stream, N streams time-slice the GPU, each reading the model's
weights for itself. StreamBatch keeps a Streamer per stream, with all its state (StreamingCache: sink, windows,
contiguous RoPE, evict_every; pending tokens; sampling generator; its own second t), and runs their seconds together:

  1. one vision-tower call for every stream's frames (the tower packs any number of videos into one sequence;
     attention never crosses one);
  2. each stream evicts in its own cache (the bookkeeping its own, on the host while the GPU runs the tower; the K/V
     of every evicting row moved at once, one kernel: cache.fused_move);
  3. one prefill for every stream's new turn: rows padded to the longest turn, each row attending to its own cache;
  4. decode steps batched over the streams still speaking: a stream whose reply ended leaves the batch (or, with
     decode="graphs", one fixed-shape step over every row, silent rows writing to a scratch slot: decode.FixedStep,
     which a CUDA graph captures once and replays, decode="compiled" compiling it first; greedy and forced replies
     then decode one step ahead of the host: decode_ahead).

The caches share storage: one (layers, rows, kv heads, capacity, head dim) buffer per tensor, and each stream's
StreamingCache holds views of its row, so its bookkeeping is the plain cache's, unchanged, and its eviction too: the
same move inside the row, made for all rows at once (move_rows). RowSlots is the adapter an attention layer writes
through: each row's new keys and values go to that row's next free slots. In a prefill, each row's queries attend to
that row's cache up to themselves: the reference, RowAttention, runs the model's own prompt attention (dense SDPA, or
FlexPrefill) row by row, so each stream's attention is the one it would run alone; on a GPU one call per layer over
every row computes the same (one call fills the GPU where a row alone leaves a quarter of it idle: see the numbers
above PackedRowAttention): prefill.RaggedPrefill (cuDNN over a head every row's cache holds, FlashAttention-2 over the
ragged rest) or, before a head is planned, PackedRowAttention (FlexAttention, a BlockMask skipping what no query
sees). A decode step reads its rows with a mask that shows each query its own row's keys. A new stream's Streamer
allocates no cache of its own: its cache works in its row from the start (adopt_row).

    row 0: [sys prev ... kept tokens 0 ......... | new turn 0 ]  . . . . . . .
    row 1: [sys prev ... kept tokens 1 ... | new turn 1 ......... ] . . . . .
    row 2: [sys prev ... kept 2 | new turn 2 | pad ]  . . . . . . . . . . . .     padding: attends to nothing

Streams are independent: they join and leave between seconds (add, remove), may differ in frame rate and size,
and their windows and sampling come from their own Streamer. A batched second gives each stream the tokens its
Streamer would give alone (tests/test_serve.py: greedy commentary equal, logits within float tolerance).

The command line (python stream.py --video A --video B --out DIR) is serve_cli.py's.

Only the loops that evict batch (the streaming and native policies of stream.POLICIES): the sliding windows change
the loop itself (reset, recompute), and full attention's cache grows without bound where a batch sizes its rows up
front; they stream one video at a time.
"""
import contextlib
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from cache import StreamingCache, can_fuse, fused_move, to_device
from decode import FixedStep, take_fast_defaults
from layout import Kind, check_text
from model import exact_causal
from prefill import CachedPrefill, RaggedPrefill
from rope import apply_rope, mrope_cos_sin
from stream import POLICIES, PhaseTimer, Streamer

# the policies that batch: those of the plain Streamer loop that evict (the sliding windows change the loop itself;
# full attention's cache grows without bound, and a batch's rows are sized up front)
BATCHED = [name for name, p in POLICIES.items() if p.loop is Streamer and p.evict]

# -----------------------------------------------------------------------------
# Shared cache storage: a row per stream


class RowSlots:
    """The cache adapter of one batched forward: write each row's first `lengths[i]` new keys/values at slots
    [starts[i], starts[i] + lengths[i]) of cache row rows[i]. A prefill reads back the whole buffers (RowAttention
    picks each row's part); a decode step (gather=True) reads its rows' (a copy, unless the step holds every row)."""

    def __init__(self, k, v, raw_k, rows, starts, lengths, gather=False):
        self.k, self.v, self.raw_k = k, v, raw_k  # (layers, R, Hkv, capacity, D)
        dev = k.device
        # flat (row, slot, source position) triples of the real (unpadded) new tokens
        # (copied without waiting for the GPU: the host prepares the prefill while the GPU still runs the tower)
        self.row = to_device(torch.repeat_interleave(torch.as_tensor(rows), torch.as_tensor(lengths)), dev)
        self.src = to_device(torch.cat([torch.arange(n) for n in lengths]), dev)
        self.slot = to_device(torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]), dev)
        self.batch = to_device(torch.repeat_interleave(torch.arange(len(rows)), torch.as_tensor(lengths)), dev)
        self.rows = to_device(torch.as_tensor(rows), dev)
        self.gather = gather and not (len(rows) == k.shape[1] and rows == list(range(len(rows))))

    def update(self, layer, k, v, raw_k):
        # k (B, Hkv, T, D) -> the (n, Hkv, D) real tokens, written at (row, :, slot)
        for buf, new in ((self.k, k), (self.v, v), (self.raw_k, raw_k)):
            buf[layer][self.row, :, self.slot] = new[self.batch, :, self.src]
        if self.gather:
            return self.k[layer][self.rows], self.v[layer][self.rows]
        return self.k[layer], self.v[layer]


class RowAttention:
    """A padded prefill's attention, row by row: the real queries of batch row i (lengths[i] of them) attend to cache
    row rows[i]'s slots [0, starts[i] + lengths[i]) through `inner`, the model's own prompt attention (dense SDPA, or
    FlexPrefill), exactly as that stream alone would; padding queries give zeros (their outputs are never read)."""

    def __init__(self, inner, rows, starts, lengths):
        self.inner, self.rows, self.starts, self.lengths = inner, rows, starts, lengths

    def __call__(self, q, k, v):   # q (B, Hq, T, D); k, v (R, Hkv, capacity, D): every cache row
        out = torch.zeros_like(q)
        for i, (row, start, n) in enumerate(zip(self.rows, self.starts, self.lengths)):
            out[i:i + 1, :, :n] = self.inner(q[i:i + 1, :, :n], k[row:row + 1, :, :start + n],
                                             v[row:row + 1, :, :start + n])
        return out


# One call per layer instead of one per row: at 16 streams of 720p (~775 new tokens a row over ~13.8k cached), a
# row's prompt attention is 4 * 775 * 13.8k * 128 * 28 heads = 153 GFLOP against 2 * 13.8k * 4 KV heads * 128 * 2 B =
# 28 MB of K/V (~5k FLOP a byte): compute-bound, so the loop's cost is neither bytes nor its 16 x 28 launches (~10 ms
# of host time, queued ahead of the GPU) but occupancy: one row is 7 query blocks x 28 heads = 196 tiles on an H100's
# 132 SMs, two waves for 1.5 waves of work (~74% busy); all rows in one call are 3,136 tiles (~99%). FlexAttention
# does it without copying K/V and without a dense mask: queries padded per cache row, the cache rows read in place
# (GQA in the kernel), a BlockMask that skips every tile no query of the row sees. Its kernel is ~FA2-class (this repo
# measured ~1.5x cuDNN's time per tile, flexprefill.GUARDED; prefill.RaggedPrefill is cuDNN's, in one call too), so
# the win is the waves and the launches, not the tile: tools/bench_serve.py --prefill packed|flex|rows measures each.
BLOCK = 128


@functools.cache
def compiled_flex():
    """flex_attention compiled once per process, shapes static: a new padded query length (a multiple of BLOCK) or
    capacity recompiles, a new block mask does not."""
    return torch.compile(flex_attention, dynamic=False)


@torch._dynamo.config.patch(recompile_limit=64)   # one graph per padded query length (flexprefill._flex's reason)
def flex(q, k, v, block_mask):
    """FlexAttention, compiled on a GPU; eager elsewhere (the unfused reference, exact enough for the CPU tests)."""
    fn = compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def kv_blocks(selected):
    """(R, 1, nqb, nkb) bool -> BlockMask.from_kv_blocks' (count, indices) int32: the selected key blocks first, in
    ascending order."""
    count = selected.sum(-1, dtype=torch.int32)
    return count, torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)


def packed_block_mask(starts, lengths, Tq, S):
    """The BlockMask of one packed prefill over every cache row: query q of row b (q < lengths[b]) sees the slots
    <= starts[b] + q, its row's cache and its own turn up to itself; starts, lengths (R,) on the device (0 for rows
    not in this prefill: they see nothing). Tiles where every query sees every key are full (no mask_mod)."""
    q0 = torch.arange(0, Tq, BLOCK, device=starts.device)[None, :, None]   # each query block's first query
    k0 = torch.arange(0, S, BLOCK, device=starts.device)[None, None, :]    # each key block's first slot
    start, n = starts[:, None, None], lengths[:, None, None]
    last_q = torch.minimum(q0 + BLOCK, n) - 1                              # the block's last real query
    seen = (q0 < n) & (k0 <= start + last_q)                               # some query sees some key
    full = (q0 + BLOCK <= n) & (k0 + BLOCK - 1 <= start + q0)              # every query sees every key

    def visible(b, h, q, kv):
        return (q < lengths[b]) & (kv <= starts[b] + q)
    return BlockMask.from_kv_blocks(*kv_blocks((seen & ~full)[:, None]), *kv_blocks(full[:, None]), BLOCK_SIZE=BLOCK,
                                    mask_mod=visible, seq_lengths=(Tq, S), compute_q_blocks=False)


class PackedRowAttention:
    """RowAttention's result in one FlexAttention call per layer (the dense prompt attention only): batch row i's
    queries go to cache row rows[i] of a (R, Hq, Tq, D) query tensor, Tq the padded length rounded up to BLOCK, and
    attend to every cache row in place under packed_block_mask, built at the first layer and shared by all."""

    def __init__(self, rows, starts, lengths):
        self.rows, self.starts, self.lengths, self.mask, self.dev_rows = rows, starts, lengths, None, None

    def __call__(self, q, k, v):
        # q (B, Hq, T, D); k, v (R, Hkv, S, D): every cache row, and its scratch slot
        (_, H, T, D), (R, S), dev = q.shape, (k.shape[0], k.shape[2]), q.device
        Tq = -(-T // BLOCK) * BLOCK
        if self.mask is None:  # made at the first layer, shared by all (and the rows' index on the device with it)
            per_row = lambda x: torch.zeros(R, dtype=torch.long).index_put_((torch.tensor(self.rows),), torch.tensor(x))
            self.mask = packed_block_mask(to_device(per_row(self.starts), dev), to_device(per_row(self.lengths), dev),
                                          Tq, S)
            self.dev_rows = to_device(torch.as_tensor(self.rows), dev)
        packed = q.new_zeros(R, H, Tq, D)
        packed[self.dev_rows, :, :T] = q
        # padding queries see nothing: zeros, as RowAttention's
        return flex(packed, k, v, self.mask)[self.dev_rows, :, :T]


@contextlib.contextmanager
def row_attention(model, rows, starts, lengths, mode="rows"):
    """The model's prompt attention (VLM.use_attention) over the rows of one batched prefill, restored after. Where it
    is the dense causal attention and `mode` is not "rows", one call per layer: prefill.RaggedPrefill (a cuDNN head
    for every row, FlashAttention-2 over the ragged tails) where the model prefills through a CachedPrefill whose
    kernels take a batch, else (or mode "flex") PackedRowAttention. Otherwise RowAttention (FlexPrefill picks its
    blocks from each row's own queries and keys, so it runs row by row)."""
    inner, chosen = model.model.layers[0].self_attn.attn_fn, model.prompt_kernel
    if mode != "rows" and exact_causal(inner):
        attn = PackedRowAttention(rows, starts, lengths)
        if (mode == "packed" and isinstance(inner, CachedPrefill)
                and inner.takes_batches(model.device, model.dtype, model.cfg.head_dim)):
            attn = RaggedPrefill(inner, rows, starts, lengths, fallback=attn)
    else:
        attn = RowAttention(inner, rows, starts, lengths)
    model.use_attention(attn)
    try:
        yield
    finally:
        model.use_attention(inner).prompt_kernel = chosen   # as it was, "nobody chose" included


def row_mask(starts, T, capacity, device):
    """(B, 1, T, capacity) bool for a decode step (T = 1): the query of row i sees the slots <= starts[i] + t, its
    cache and itself."""
    last = torch.as_tensor(starts)[:, None] + torch.arange(T)[None, :]             # (B, T)
    return (torch.arange(capacity)[None, None, :] <= last[..., None])[:, None].to(device)


@torch.no_grad()
def batched_forward(model, ids, pos, slots, mask, lengths, video_embeds=None):
    """model.forward over padded rows that each continue their own cache row: ids (B, T), pos (3, B, T), slots a
    RowSlots, mask None (a prefill, under row_attention) or (B, 1, 1, capacity) (a decode step); returns the logits
    of each row's last real token, (B, vocab)."""
    x = model.embed(ids, video_embeds=video_embeds)
    cos, sin = model.rope(pos, x.dtype)
    for layer in model.model.layers:
        x = layer(x, cos, sin, mask, slots)
    x = x[torch.arange(len(lengths), device=x.device), torch.as_tensor(lengths, device=x.device) - 1]
    x = model.model.norm(x)
    return model.lm_head(x) if model.lm_head is not None else x @ model.model.embed_tokens.weight.T

# -----------------------------------------------------------------------------
# The batch


def move_rows(k, v, raw_k, rows, caches, keeps, fused=None):
    """StreamingCache.move_kv for many cache rows at once: cache row rows[i] of k, v, raw_k ((layers, R, Hkv, slots, D))
    keeps its slots keeps[i], caches[i] holding the new positions (after evict_tokens). The reference (_move_rows) is
    one gather per tensor and layer for all rows: fewer launches than row by row, the same bytes, bandwidth-bound in
    its temporaries (an H100 took ~150 ms a second for 16 rows of 7B at 720p). fused (default: on a GPU with Triton)
    runs cache.fused_move, one kernel that reads and writes each kept byte once. Same values as move_kv."""
    fused = can_fuse(k) if fused is None else fused
    for rotate in (True, False):   # reindexing streams rotate their keys afresh; native RoPE keeps the old ones
        group = [(r, c, keep) for r, c, keep in zip(rows, caches, keeps) if c.reindex == rotate and len(keep)]
        if group:
            rows_, caches_, keeps_ = zip(*group)
            cos, sin = _new_rotation(caches_, keeps_, k.device, k.dtype) if rotate else (None, None)
            if fused:
                fused_move(k, v, raw_k, list(rows_), list(keeps_), cos, sin)
            else:
                _move_rows(k, v, raw_k, rows_, keeps_, cos, sin)


def _new_rotation(caches, keeps, dev, dtype):
    """cos, sin (E, n, D) of each cache's kept tokens at their new positions, rows padded to the longest keep."""
    n = max(len(keep) for keep in keeps)
    pos = torch.stack([torch.nn.functional.pad(c.pos[:, :len(keep)], (0, n - len(keep)))
                       for c, keep in zip(caches, keeps)], 1)                                            # (3, E, n)
    c = caches[0]
    cos, sin = mrope_cos_sin(to_device(pos, dev), c.inv_freq.to(dev), c.cfg.mrope_section, dtype, c.axis.to(dev))
    return cos[:, 0], sin[:, 0]


@torch.no_grad()
def _move_rows(k, v, raw_k, rows, keeps, cos, sin):
    # rows padded to the longest keep by repeating their last kept slot: the copies land past the row's new length,
    # where nothing is read
    dev, n = k.device, max(len(keep) for keep in keeps)
    idx = torch.stack([torch.cat([keep, keep[-1:].expand(n - len(keep))]) for keep in keeps]).to(dev)  # (E, n)
    row, to = torch.as_tensor(rows, device=dev)[:, None], torch.arange(n, device=dev)[None, :]          # (E, 1), (1, n)
    if cos is not None:
        cos, sin = cos[:, :, None], sin[:, :, None]                                                      # (E, n, 1, D)
    for layer in range(k.shape[0]):   # indexed (E, n, Hkv, D): the advanced indices' dims come first
        v[layer][row, :, to] = v[layer][row, :, idx]
        raw = raw_k[layer][row, :, idx]
        raw_k[layer][row, :, to] = raw
        k[layer][row, :, to] = apply_rope(raw, cos, sin) if cos is not None else k[layer][row, :, idx]


def adopt_row(cache, k, v, raw_k):
    """Let a StreamingCache built with capacity 0 work in k, v, raw_k (views of a batch row, (layers, 1, Hkv, capacity,
    D)): its host-side bookkeeping grows to their capacity (from a cache of that capacity whose K/V sit on the meta
    device, which holds no memory), its K/V are the views."""
    capacity = k.shape[3]
    sized = StreamingCache(cache.cfg, capacity=capacity, device="meta")
    for name in ("ids", "kind", "round", "unit", "rel", "pos"):
        setattr(cache, name, getattr(sized, name))
    cache.k, cache.v, cache.raw_k, cache.capacity = k, v, raw_k, capacity


class StreamBatch:
    """Streams stepped together: add(name, **Streamer keywords), then step({name: frames}) once a second for the
    streams that have a second ready; it returns {name: commentary}. Streams may join (add) and leave (remove)
    between seconds."""

    def __init__(self, model, tok, rows, capacity, readback=False, decode="plain", prefill=None,
                 compile_vision=False, timed=False):
        if decode not in ("plain", "graphs", "compiled"):
            raise ValueError(f"decode={decode!r}: expected plain, graphs or compiled")
        if prefill not in ("packed", "flex", "rows", None):
            raise ValueError(f"prefill={prefill!r}: expected packed, flex or rows")
        # packed: a prefill's attention in one call per layer (the default on a GPU: RaggedPrefill where the kernels
        # run, else PackedRowAttention's FlexAttention, which an H100 ran in 528 ms of prefill a second for 16 streams
        # of 7B against 592 row by row); flex: always FlexAttention; rows: row by row (RowAttention, the default on a
        # CPU, where FlexAttention runs unfused)
        self.prefill_mode = prefill or ("packed" if model.device.type == "cuda" else "rows")
        # the vision tower compiled and replayed from a CUDA graph per set of grids (VisionTower's fast path, what
        # the single stream's decode="compiled" takes): the same key while the batch's streams stay the same
        self.compile_vision = compile_vision
        self.model, self.tok, self.capacity = model, tok, capacity
        # readback: a teacher-forced step still reads its argmax back to the host, as greedy decoding must (benchmarks)
        self.readback = readback
        c, dev = model.cfg, model.device
        if dev.type == "cuda":   # fused projections, split-KV decoding, the cuDNN prefill, unless chosen before
            take_fast_defaults(model)
        # a slot past every cache's capacity: the scratch slot where a silent row's fixed-shape decode step writes
        shape = (c.num_hidden_layers, rows, c.num_key_value_heads, capacity + 1, c.head_dim)
        self.k, self.v, self.raw_k = (torch.zeros(shape, device=dev, dtype=model.dtype) for _ in range(3))
        self.fixed = (FixedStep(model, self.k, self.v, self.raw_k, compile=decode == "compiled")
                      if decode != "plain" else None)
        self.streams, self.row_of = {}, {}   # name -> Streamer; name -> its row
        self.timer = PhaseTimer(timed, dev)  # seconds per phase of step(), summed over the seconds, when timed

    def add(self, name, **kw):
        """A new stream in a free row; kw are Streamer's (windows, sampling, fps, pixels, evict, reindex, ...)."""
        if name in self.streams:
            raise ValueError(f"a stream named {name!r} is already in the batch")
        free = sorted(set(range(self.k.shape[1])) - set(self.row_of.values()))
        if not free:
            raise ValueError(f"the batch is full ({self.k.shape[1]} streams)")
        # built with no cache slots (a cache of the row's size would take a row's K/V on the device for a moment, ~1 GB
        # at 7B: enough to fail a full GPU), then working in its row of the shared buffers
        s, row = Streamer(self.model, self.tok, capacity=0, decode="plain", **kw), free[0]
        adopt_row(s.cache, *(getattr(self, n)[:, row:row + 1, :, :self.capacity] for n in ("k", "v", "raw_k")))
        self.streams[name], self.row_of[name] = s, row
        return s

    def remove(self, name):
        """The stream leaves; its row is free for the next one."""
        del self.streams[name], self.row_of[name]

    def _check_room(self, s, n):
        if s.cache.length + n > self.capacity:
            raise RuntimeError(f"a stream needs {s.cache.length + n} cache slots, the batch has {self.capacity}: "
                               "size it for the steady state (eval.steady_capacity)")

    @torch.no_grad()
    def step(self, frames, force=None):
        """One second of the streams named in `frames` ({name: that stream's frames, or Streamer.prepare's}); force
        ({name: text}) teacher-forces their replies. Returns {name: commentary ('' for silence)}."""
        names, timer = list(frames), self.timer
        ss = [self.streams[n] for n in names]
        with timer("preprocess"):  # patches on the device (resized on the CPU, unless prepared ahead)
            vision = [s.vision_input(frames[n]) for n, s in zip(names, ss)]
        with timer("vision"):  # 1. one tower call for every stream's frames
            feats = self.model.visual(torch.cat([p for p, _, _ in vision]), torch.cat([g for _, g, _ in vision]),
                                      compiled=self.compile_vision)
        with timer("evict"):  # 2. evict, each in its own cache (on the host while the GPU runs the tower, which needs
            # no cache); the K/V of every evicting row move together
            moves = [(self.row_of[n], s.cache, s.cache.evict_tokens(s.t)) for n, s in zip(names, ss)]
            moves = [m for m in moves if m[2] is not None]
            if moves:
                move_rows(self.k, self.v, self.raw_k, *zip(*moves))
        with timer("prefill"):  # 3. one forward for every stream's new turn
            logits = self.prefill(names, ss, vision, feats)
        with timer("decode"):  # 4. the replies, batched over the streams still speaking
            forced = [s.forced((force or {}).get(n)) for n, s in zip(names, ss)]
            outs = self.decode(names, ss, logits, forced)
        return {n: s.hand_back(out) for n, s, out in zip(names, ss, outs)}

    def prefill(self, names, ss, vision, feats):
        """Every stream's new turn in one forward, rows padded to the longest; returns (B, vocab) logits."""
        staged, starts = [], []
        for s, (_, grid, secs) in zip(ss, vision):
            segments = s.turn(grid)
            self._check_room(s, sum(len(ids) for ids, _, _ in segments))
            starts.append(s.cache.length)
            staged.append(s.stage(segments, grid, secs))
        lengths = [ids.shape[1] for ids, _ in staged]
        T = max(lengths)
        pad = lambda x, value: torch.nn.functional.pad(x, (0, T - x.shape[-1]), value=value)
        ids = torch.cat([pad(i, self.tok.pad_id) for i, _ in staged])                     # (B, T)
        pos = torch.cat([pad(p, 0) for _, p in staged], 1)                               # (3, B, T)
        rows = [self.row_of[n] for n in names]
        slots = RowSlots(self.k, self.v, self.raw_k, rows, starts, lengths)
        with row_attention(self.model, rows, starts, lengths, self.prefill_mode):
            logits = batched_forward(self.model, ids, pos, slots, None, lengths, video_embeds=feats)
        for s, n in zip(ss, lengths):
            s.cache.commit(n)
        return logits

    def decode(self, names, ss, logits, forced):
        """The replies, decoded together: each stream picks its token (its own sampling state), the streams still
        speaking are fed theirs in one step. As Streamer.decode: every token but the last (the stop or the cap's
        last) is fed. With a fixed-shape step and every reply greedy or forced, one step ahead (decode_ahead)."""
        if self.fixed is not None and all(s.greedy or f is not None for s, f in zip(ss, forced)):
            return self.decode_ahead([self.row_of[n] for n in names], ss, logits, forced)
        outs = [[] for _ in ss]
        live = list(range(len(ss)))
        last = {i: logits[i][None, None] for i in live}   # (1, 1, vocab), as Streamer.pick reads it
        while live:
            for i in list(live):
                s, out, f = ss[i], outs[i], forced[i]
                out.append(f[len(out)] if f is not None else s.pick(last[i], out))
                if out[-1] in s.stops or len(out) == (len(f) if f is not None else s.max_new_tokens):
                    live.remove(i)
                else:
                    check_text(out[-1], self.model.cfg)
            if not live:
                break
            step = self.decode_step([names[i] for i in live], [ss[i] for i in live], [outs[i][-1] for i in live])
            if self.readback:
                step.argmax(-1).tolist()
            for j, i in enumerate(live):
                ss[i].cache.commit(1)
                ss[i].forwards += 1
                last[i] = step[j][None, None]
        for i, s in enumerate(ss):   # as Streamer's: the logits after the last token fed (tests compare them)
            s.last_logits = last[i]
        return outs

    def decode_ahead(self, rows, ss, logits, forced):
        """decode()'s tokens one step ahead of the host (decode.decode_ahead's scheme, for every row at once): while
        step k runs, step k + 1 is queued, each greedy row fed step k's argmax on the device; then step k's tokens are
        read back, one copy for all rows. A reply that ended at step k drops the step queued ahead from its cache."""
        cfg, read = self.model.cfg, self.readback or any(f is None for f in forced)
        first = logits.argmax(-1).tolist() if read else None                      # the prefill's tokens
        outs = [[f[0] if f is not None else first[i]] for i, f in enumerate(forced)]
        caps = [len(f) if f is not None else s.max_new_tokens for s, f in zip(ss, forced)]
        last = list(logits)   # each row's logits after its last fed token (Streamer.last_logits; tests compare them)
        live = [i for i, s in enumerate(ss) if outs[i][0] not in s.stops and caps[i] > 1]
        for i in live:
            check_text(outs[i][0], cfg)
        step, k = self._queue(rows, ss, {i: outs[i][0] for i in live}) if live else None, 1   # step 1: known tokens
        while live:
            # step k is queued (each live row fed its out[k - 1]); queue step k + 1 for the rows whose out[k] is fed
            # unless it stops them: the forced token, or (None) step k's argmax on the device
            # (a cache with no slot left queues nothing ahead: its token is fed, and the batch is found too small,
            # only if it does not stop, as in the step-by-step loop)
            ahead = {i: forced[i][k] if forced[i] is not None else None for i in live
                     if k + 1 < caps[i] and ss[i].cache.length < self.capacity}
            after = self._queue(rows, ss, ahead) if ahead else None
            tops = self.fixed.read(2 if ahead else 1) if read else None               # step k's argmax, every row
            for i in list(live):
                s, out = ss[i], outs[i]
                out.append(forced[i][k] if forced[i] is not None else tops[rows[i]])
                last[i] = step[rows[i]]
                if out[-1] in s.stops or len(out) == caps[i]:
                    live.remove(i)
                    if i in ahead:   # the step queued ahead fed a token that ends up unused
                        s.cache.drop_last()
                else:
                    check_text(out[-1], cfg)   # it stays fed: it must be text
                    if i not in ahead:
                        self._check_room(s, 1)   # no slot for it: the step-by-step loop stops here too
                    if forced[i] is None:
                        s.cache.ids[s.cache.length - 1] = out[-1]   # what step k + 1 was fed (placeholder 0)
            step, k = after, k + 1
        for s, x in zip(ss, last):
            s.last_logits = x[None, None]
        return outs

    def _queue(self, rows, ss, feed):
        """Queue one fixed-shape step: stream ss[i] (cache row rows[i]) is fed feed[i] (None: the previous step's argmax
        on the device), every other row is silent. Returns the step's logits (R, vocab)."""
        fed = []   # (row, token, position, slot, take) of each fed row
        for i, tok in feed.items():
            s = ss[i]
            self._check_room(s, 1)
            token = tok if tok is not None else 0
            fed.append((rows[i], token, int(s.cache.add_tokens([token], Kind.REPLY, s.t)[0, 0, 0]), s.cache.length,
                        int(tok is None)))
            s.cache.commit(1)
            s.forwards += 1
        return self._fixed(fed)

    def _fixed(self, fed):
        """The fixed-shape step over every row: the rows of fed [(row, token, position, slot, take)] speak, the others
        are silent (token 0 at position 0, written to the scratch slot). Returns its logits (R, vocab)."""
        R = self.k.shape[1]
        columns = [0] * R, [0] * R, [self.capacity] * R, [0] * R   # token, position, slot, take
        for r, *values in fed:
            for column, value in zip(columns, values):
                column[r] = value
        return self.fixed(*columns)

    def decode_step(self, names, ss, tokens):
        """Feed each named stream its token in one step; returns their next logits (len(names), vocab). plain: a
        forward over the speaking rows; graphs: the fixed-shape step over every row (FixedStep); compiled: that step
        compiled."""
        for s in ss:
            self._check_room(s, 1)
        staged = [s.cache.add_tokens([tok], Kind.REPLY, s.t) for s, tok in zip(ss, tokens)]   # (3, 1, 1) each
        starts, rows = [s.cache.length for s in ss], [self.row_of[n] for n in names]
        if self.fixed is not None:
            fed = [(r, tok, int(p[0, 0, 0]), start, 0) for r, tok, p, start in zip(rows, tokens, staged, starts)]
            return self._fixed(fed)[torch.as_tensor(rows, device=self.model.device)]
        ids = torch.tensor([[tok] for tok in tokens], device=self.model.device)
        slots = RowSlots(self.k, self.v, self.raw_k, rows, starts, [1] * len(rows), gather=True)
        mask = row_mask(starts, 1, self.k.shape[3], self.model.device)
        return batched_forward(self.model, ids, torch.cat(staged, 1), slots, mask, [1] * len(rows))


def main(args, ap):
    """stream.py's path for several videos (or --out): serve_cli.main (the command line; it imports this file)."""
    import serve_cli
    return serve_cli.main(args, ap)
