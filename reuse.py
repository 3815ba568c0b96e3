"""
Training on the cache that streaming leaves (train.py --segment-seconds).

Why: a training chunk (data.py, as in StreamingVLM's SFT, arXiv 2510.09608) computes its previous text afresh,
as one block after the system prompt. Streaming does not: once a second leaves the vision window, its reply moves
into the previous text with the K/V it got inside its own round, with that round's frames in view (cache.py; the
authors' inference does the same, no re-encoding). Same tokens at the same positions, different K/V from layer 1
on. The authors serve their 7B model this way; a small model trained from scratch can learn to read only the
fresh kind, and then misreads the score it wrote minutes ago (this repo's tiny model did, see README).

What: cut a chunk into segments of `segment_seconds` and forward them in turn. The first is a plain forward (the
authors' layout). Each later one attends to the cache a StreamingCache holds when it has taken the segments
before, one forward each, and then, as the segment's first second arrives, evicts the rounds that left the
vision window (cache.kept_after_eviction): system prompt, previous text with the evicted replies appended (their
K/V from the forward of their own segment, keys rotated afresh at contiguous positions), and the rounds still in
the window. Streaming evicts once a second, a segment once: inside a segment nothing leaves, so a reply in its
k-th second (from 0) sees the rounds of the last vision_window + k seconds, not vision_window (8 s segments and a
16 s window: 16-23 s, inside the 24 s a plain training chunk shows). A Streamer that evicts every N s
(stream.json's evict_every, which train.py sets to --segment-seconds) keeps in view what N s segments kept, so a
model is served on the K/V it was trained on, but for the two closing tokens of the reply before an eviction
(<|im_end|> and the newline, fed with the next second's turn: after the eviction in streaming, before it here).
Segments of 1 s give streaming's K/V with that one difference; longer ones make, with far fewer forwards, the
approximation the authors' chunks make. So in a long chunk
the score sentences a later goal copies were all written in their own rounds, as at inference, minutes apart.
Every segment is supervised (but a pre-roll's, below), and the loss flows back through the reused K/V into the
forwards that made them.
Only the first segment's previous text is still fresh; train.py --preroll streams the seconds before the chunk
first, segments without labels forwarded without autograd, so that the previous text a supervised second reads
ends in replies reused as at inference.
tests/test_train.py checks every segment's logits against a StreamingCache fed the same tokens. A question asked
inside the chunk (--data) is filed as USER, so it leaves with its second and never joins the previous text, as
Streamer.ask rewinds it.

The bookkeeping per row (which tokens stay, their new positions) is made in the DataLoader workers
(evicted_prefixes, from data.with_positions); the GPU does one gather and one rotation per layer and segment.
"""
from dataclasses import replace

import torch

from cache import contiguous_positions, kept_after_eviction, units
from layout import IGNORE, Kind
from rope import apply_rope, mrope_cos_sin, mrope_positions

# -----------------------------------------------------------------------------
# the batches (DataLoader workers)


def split_chunk(s, cuts):
    """A data.Sample cut before each second in `cuts` (increasing): a list of len(cuts) + 1 parts, the prefix in
    the first."""
    bounds = [0, *cuts, len(s.grid_thw)]
    tok = [0] + [int((s.round < c).sum()) for c in cuts] + [len(s.ids)]   # rounds never decrease along a chunk
    frames = [2 * int(s.grid_thw[:c, 0].sum()) for c in bounds]            # 2 frames a temporal patch
    patches = [int(s.grid_thw[:c].prod(-1).sum()) for c in bounds]
    parts = []
    for i in range(len(bounds) - 1):
        t, f, p = slice(tok[i], tok[i + 1]), slice(frames[i], frames[i + 1]), slice(patches[i], patches[i + 1])
        parts.append(replace(s, ids=s.ids[t], labels=s.labels[t], kind=s.kind[t], round=s.round[t],
                             grid_thw=s.grid_thw[bounds[i]:bounds[i + 1]],
                             frames=None if s.frames is None else s.frames[f],
                             patches=None if s.patches is None else s.patches[p]))
    return parts


def segment_cuts(seconds, segment_seconds):
    """Where a batch of chunks `seconds` long is cut: at every multiple of segment_seconds short of the shortest
    chunk (a longer chunk's last segment takes the rest), so that every row has as many segments."""
    return list(range(segment_seconds, min(seconds), segment_seconds))


def evicted_prefixes(batch, model_cfg):
    """For a batch cut into segments (data.collate_chunks: each segment's batch under its predecessor's "then"),
    the first with its positions: for each later segment, which tokens each row keeps, "keep" (B, P), as indices
    into what the segment before read and wrote, laid end to end (its kept tokens, padded to its P, then its own
    padded tokens), at which contiguous positions, "keep_pos" (3, B, P), and the segment's own positions after
    them; its attention_mask grows to (B, P + T), 0 on padding. Each row carries its kept tokens forward, as
    StreamingCache.evict does (evicted replies become previous text), so a segment costs what it keeps, not all
    the segments before it, in the forward and in the backward."""
    window, text_sink, text_window = batch.pop("evict").tolist()
    B = len(batch["input_ids"])
    empty = dict(ids=torch.zeros(0, dtype=torch.long), pos=torch.zeros(3, 0, dtype=torch.long),
                 kind=torch.zeros(0, dtype=torch.long), round=torch.zeros(0, dtype=torch.long),
                 index=torch.zeros(0, dtype=torch.long))
    kept = [empty] * B  # each row's kept tokens: ids, positions, kinds, rounds, index into [kept | new] of a segment
    seg, read = batch, 0  # read: how many kept slots (padded) the segment in hand attends to before its own tokens
    while "then" in seg:
        T, nxt = seg["input_ids"].shape[1], seg["then"]
        starts = []
        for b, h in enumerate(kept):
            n = int(seg["attention_mask"][b, -T:].sum())
            ids, pos, kind, rnd, index = (torch.cat([h[k], new], -1) for k, new in (
                ("ids", seg["input_ids"][b, :n]), ("pos", seg["position_ids"][:, b, :n]), ("kind", seg["kind"][b, :n]),
                ("round", seg["round"][b, :n]), ("index", read + torch.arange(n))))
            keep, body = kept_after_eviction(kind, rnd, int(nxt["round"][b, 0]), window, text_sink, text_window)
            kind[body] = Kind.PREV_BODY  # the evicted replies are previous text from now on
            unit, rel = units(ids, pos, model_cfg)
            p, start = contiguous_positions(unit[keep], rel[:, keep])
            kept[b] = dict(ids=ids[keep], pos=p, kind=kind[keep], round=rnd[keep], index=index[keep])
            starts.append(int(start))
        del seg["kind"], seg["round"]
        seg = nxt
        P = read = max(len(h["index"]) for h in kept)
        seg["keep"], seg["keep_pos"] = torch.zeros(B, P, dtype=torch.long), torch.zeros(3, B, P, dtype=torch.long)
        valid = torch.zeros(B, P, dtype=torch.long)
        for b, h in enumerate(kept):
            n = len(h["index"])
            seg["keep"][b, :n], seg["keep_pos"][:, b, :n], valid[b, :n] = h["index"], h["pos"], 1
            h["index"] = torch.arange(n)  # where the next segment finds them: this one's first n slots
        seg["position_ids"], _ = mrope_positions(seg["input_ids"], model_cfg, video_grid_thw=seg["video_grid_thw"],
                                                 attention_mask=seg["attention_mask"], start=starts)
        seg["attention_mask"] = torch.cat([valid, seg["attention_mask"]], 1)
    del seg["kind"], seg["round"]


def segments(batch):
    """The segments of a batch, in order (one unless it is cut: data.collate_chunks)."""
    out = [batch]
    while "then" in out[-1]:
        out.append(out[-1]["then"])
    return out


def supervised_tokens(batch):
    """Supervised tokens of a batch (all its segments): what a step's mean loss divides by."""
    return sum(int((s["labels"][:, 1:] != IGNORE).sum()) for s in segments(batch))


def new_tokens(batch):
    """Tokens a batch forwards (the reused prefixes of later segments not counted)."""
    return sum(int(s["attention_mask"][:, -s["input_ids"].shape[1]:].sum()) for s in segments(batch))


# -----------------------------------------------------------------------------
# the forwards (the training process)


def segment_counts(batch, model_cfg):
    """(video pads, supervised tokens) of each segment of a batch, counted on the host before it goes to the GPU
    (counted there, they would wait for the GPU's queue)."""
    parts = segments(batch)
    return ([int((s["input_ids"] == model_cfg.video_token_id).sum()) for s in parts],
            [int((s["labels"] != IGNORE).sum()) for s in parts])


def forward_segments(model, batch, counts):
    """[(logits, labels, input_ids)] of a batch cut into segments, on the model's device: each segment on the
    cache the ones before it leave; `counts`: segment_counts of the batch. The vision tower runs once, on every
    segment's frames: each second's frames are encoded alone, so one pass is the same computation with fewer
    kernel launches (two with a pre-roll: its frames without autograd)."""
    raw = getattr(model, "module", model)  # DDP's wrapped model
    parts = [dict(s) for s in segments(batch)]
    for s in parts:
        s.pop("then", None)
    counts, supervised = counts
    # the pre-roll (data.py: segments without a label before the first with one) only leaves K/V for the segments
    # after it: nothing to learn there, so neither it nor its frames keep a graph
    lead = next((i for i, n in enumerate(supervised) if n), len(parts))
    pixels, grids = [s.pop("pixel_values_videos") for s in parts], [s["video_grid_thw"] for s in parts]
    vision = []  # (video tokens, C), segment by segment
    for a, b in ((0, lead), (lead, len(parts))):
        if a < b:
            with torch.set_grad_enabled(torch.is_grad_enabled() and a == lead):
                vision.append(raw.visual(torch.cat(pixels[a:b]), torch.cat(grids[a:b])))
    store, out = ReusedKV(raw.cfg, raw.model), []
    for i, (s, embeds) in enumerate(zip(parts, torch.cat(vision).split(counts))):
        labels, cache = s.pop("labels"), store.segment(i, s.pop("keep", None), s.pop("keep_pos", None))
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= lead):
            out.append((model(**s, video_embeds=embeds, cache=cache), labels, s["input_ids"]))
    return out


class ReusedKV:
    """The streaming cache of a chunk forwarded segment by segment, still attached to the graph: per layer, the raw
    keys and the values (B, Hkv, T, D) each segment wrote, and the ones it read, kept from the segment before.
    segment(i, keep, pos) is the cache segment i's forward writes into and reads: the tokens `keep` (B, P) of
    what segment i - 1 read and wrote, laid end to end (data.py pads short rows; forward's attention_mask hides
    the padding), keys rotated afresh at their contiguous positions `pos` (3, B, P). The reused K/V are the ones
    each token got with its own round in view, as StreamingCache.evict keeps them; a token's K/V pass from segment
    to segment through one gather each, so the backward's work grows with the segments, not with their square.
    One object a segment, so that activation checkpointing, which runs a layer again in backward, reads and
    writes what the first run did."""

    def __init__(self, cfg, text_model):  # the model's rotary tables, on its device (TextModel.rope_tables)
        self.cfg, self.inv_freq, self.axis = cfg, text_model.inv_freq, text_model.rope_axis
        self.written, self.read = {}, {}  # (layer, segment) -> (raw keys, values) it wrote / it read (unrotated)

    def segment(self, i, keep=None, pos=None):
        return SegmentKV(self, i, keep, pos)


class SegmentKV:
    def __init__(self, store, i, keep, pos):
        cfg = store.cfg
        self.store, self.i, self.length = store, i, 0 if keep is None else keep.shape[1]
        if self.length:
            self.index = keep[:, None, :, None].expand(-1, cfg.num_key_value_heads, -1, cfg.head_dim)  # (B, Hkv, P, D)
            self.cos, self.sin = mrope_cos_sin(pos, store.inv_freq, cfg.mrope_section, torch.float32, store.axis)

    def update(self, layer, k, v, raw_k=None):
        store = self.store
        if self.length:  # the kept tokens' keys and values (B, Hkv, P, D), then the new ones (B, Hkv, T, D)
            before = [kv for kv in (store.read.get((layer, self.i - 1)), store.written[layer, self.i - 1]) if kv]
            old_raw = torch.cat([k_ for k_, _ in before], 2).gather(2, self.index)
            old_v = torch.cat([v_ for _, v_ in before], 2).gather(2, self.index)
            store.read[layer, self.i] = old_raw, old_v
            old_k = apply_rope(old_raw.float(), self.cos, self.sin)
            # under autocast the rotated keys are fp32 and the values bf16; the causal kernels want one dtype
            k, v_all = torch.cat([old_k.to(k.dtype), k], 2), torch.cat([old_v, v], 2).to(k.dtype)
        else:
            v_all = v
        store.written[layer, self.i] = raw_k, v
        return k, v_all

    def commit(self, T):
        pass
