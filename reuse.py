"""
Training on the cache that streaming leaves (train.py --evict-seconds).

Why: a training chunk (data.py, as in StreamingVLM's SFT, arXiv 2510.09608) computes its previous text afresh,
as one block after the system prompt. Streaming does not: once a second leaves the vision window, its reply moves
into the previous text with the K/V it got inside its own round, with that round's frames in view (cache.py; the
authors' inference does the same, no re-encoding). Same tokens at the same positions, different K/V from layer 1
on. The authors serve their 7B model this way; a small model trained from scratch can learn to read only the
fresh kind, and then misreads the score it wrote a minute ago (this repo's shipped tiny model did, see README).

What: cut a chunk of n seconds in two at second n // 2. The first half is a plain forward (the authors' layout)
that also keeps every layer's raw keys and values (CaptureKV). The second half attends to the cache a
StreamingCache holds when it has taken the first half in one forward and then, as second n // 2 arrives, evicts
the chunk's first `evict_seconds` seconds at once (cache.kept_after_eviction): system prompt, previous text with
the evicted replies appended (their K/V from the first forward, keys rotated afresh at contiguous positions,
PrefixKV), and the rounds still in the window. Streaming second by second evicts one second at a time, but a reply
gets the same K/V either way: those of its own round. Both halves are supervised, and the second half's loss flows
back through the reused K/V into the first forward. tests/test_train.py checks the second half's logits against
such a StreamingCache fed the same tokens. A question asked inside the chunk (--data) is filed as USER, so it
leaves with its second and never joins the previous text, as Streamer.ask rewinds it.

The bookkeeping per row (which tokens stay, their new positions) is made in the DataLoader workers
(evicted_prefix, from data.with_positions); the GPU does one gather and one rotation per layer.
"""
from dataclasses import replace

import torch

from cache import contiguous_positions, kept_after_eviction, units
from layout import IGNORE
from rope import apply_rope, inv_freq, mrope_cos_sin, mrope_positions

# -----------------------------------------------------------------------------
# the batches (DataLoader workers)


def split_chunk(s, half):
    """A data.Sample cut before its second `half`: (the first `half` seconds with the prefix, the rest)."""
    cut = int((s.round < half).sum())  # rounds never decrease along a chunk
    f = 2 * int(s.grid_thw[:half, 0].sum())      # frames of the first seconds: 2 a temporal patch
    p = int(s.grid_thw[:half].prod(-1).sum())     # their patches

    def part(tokens, seconds, frames, patches):  # slices of the tokens, seconds, frames and patches
        return replace(s, ids=s.ids[tokens], labels=s.labels[tokens], kind=s.kind[tokens], round=s.round[tokens],
                       grid_thw=s.grid_thw[seconds], frames=None if s.frames is None else s.frames[frames],
                       patches=None if s.patches is None else s.patches[patches])
    return (part(slice(cut), slice(half), slice(f), slice(p)),
            part(slice(cut, None), slice(half, None), slice(f, None), slice(p, None)))


def evicted_prefix(batch, model_cfg):
    """For a split batch (collate_chunks) with its first halves' positions: which first-half tokens each row
    keeps, "keep" (B, P), at which contiguous positions, "keep_pos" (3, B, P), and the second halves' positions,
    after them; the second halves' attention_mask grows to (B, P + T2), 0 on padding."""
    then, kinds, rounds, plan = batch["then"], batch.pop("kind"), batch.pop("round"), batch.pop("evict")
    keeps, positions, starts = [], [], []
    for b in range(len(kinds)):
        n = int(batch["attention_mask"][b].sum())
        now, window, sink, tail = plan[b].tolist()
        keep, _ = kept_after_eviction(kinds[b, :n], rounds[b, :n], now, window, sink, tail)
        unit, rel = units(batch["input_ids"][b, :n], batch["position_ids"][:, b, :n], model_cfg)
        pos, nxt = contiguous_positions(unit[keep], rel[:, keep])
        keeps.append(keep)
        positions.append(pos)
        starts.append(int(nxt))
    B, P = len(keeps), max(len(k) for k in keeps)
    then["keep"] = torch.zeros(B, P, dtype=torch.long)
    then["keep_pos"] = torch.zeros(3, B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.long)
    for b, (keep, pos) in enumerate(zip(keeps, positions)):
        then["keep"][b, :len(keep)], then["keep_pos"][:, b, :len(keep)], valid[b, :len(keep)] = keep, pos, 1
    then["position_ids"], _ = mrope_positions(then["input_ids"], model_cfg, video_grid_thw=then["video_grid_thw"],
                                              attention_mask=then["attention_mask"], start=starts)
    then["attention_mask"] = torch.cat([valid, then["attention_mask"]], 1)


def supervised_tokens(batch):
    """Supervised tokens of a batch (both halves of a split one): what a step's mean loss divides by."""
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return n + (supervised_tokens(batch["then"]) if "then" in batch else 0)


def new_tokens(batch):
    """Tokens a batch forwards (the second halves' reused prefix not counted)."""
    then = batch.get("then")
    return int(batch["attention_mask"].sum()) + (int(then["attention_mask"][:, -then["input_ids"].shape[1]:].sum())
                                                 if then is not None else 0)


# -----------------------------------------------------------------------------
# the two forwards (the training process)


def forward_halves(model, batch):
    """[(logits, labels, input_ids)] of a split batch on the model's device: the first halves, then the second
    halves on the cache the first ones leave. The vision tower runs once, on both halves' frames: each second's
    frames are encoded alone, so one pass is the same computation with half the tower's kernel launches."""
    raw = getattr(model, "module", model)  # DDP's wrapped model
    then, labels = dict(batch.pop("then")), batch.pop("labels")
    labels2 = then.pop("labels")
    vision = raw.visual(torch.cat([batch.pop("pixel_values_videos"), then.pop("pixel_values_videos")]),
                        torch.cat([batch["video_grid_thw"], then["video_grid_thw"]]))  # (video tokens, C)
    n = int((batch["input_ids"] == raw.cfg.video_token_id).sum())  # the first halves' video tokens come first
    capture = CaptureKV()
    first = model(**batch, video_embeds=vision[:n], cache=capture)
    prefix = PrefixKV(capture, then.pop("keep"), then.pop("keep_pos"), raw.cfg)
    second = model(**then, video_embeds=vision[n:], cache=prefix)
    return [(first, labels, batch["input_ids"]), (second, labels2, then["input_ids"])]


class CaptureKV:
    """A forward with no past that keeps every layer's raw keys and values (B, Hkv, T, D) as it makes them, still
    attached to the graph, so that a second forward can attend to them as the streaming cache would (PrefixKV)."""
    length = 0

    def __init__(self):
        self.raw_k, self.v = {}, {}

    def update(self, layer, k, v, raw_k=None):
        self.raw_k[layer], self.v[layer] = raw_k, v
        return k, v

    def commit(self, T):
        pass


class PrefixKV:
    """The streaming cache after an eviction, made from a CaptureKV: per row the captured tokens `keep` (B, P)
    (data.py pads short rows; forward's attention_mask hides the padding), keys rotated afresh at their
    contiguous positions `pos` (3, B, P). The reused K/V are the ones each token got with its own round in view,
    as StreamingCache.evict keeps them; the gradient flows back through them into the first forward."""

    def __init__(self, capture, keep, pos, cfg):
        self.capture, self.length = capture, keep.shape[1]
        self.index = keep[:, None, :, None].expand(-1, cfg.num_key_value_heads, -1, cfg.head_dim)  # (B, Hkv, P, D)
        self.cos, self.sin = mrope_cos_sin(pos, inv_freq(cfg.head_dim, cfg.rope_theta), cfg.mrope_section,
                                           torch.float32)

    def update(self, layer, k, v, raw_k=None):
        # the kept tokens' keys and values (B, Hkv, P, D), then the new ones (B, Hkv, T, D)
        old_k = apply_rope(self.capture.raw_k[layer].gather(2, self.index).float(), self.cos, self.sin)
        old_v = self.capture.v[layer].gather(2, self.index)
        # under autocast the rotated keys are fp32 and the values bf16; the causal kernels want one dtype
        return torch.cat([old_k.to(k.dtype), k], 2), torch.cat([old_v, v], 2).to(k.dtype)

    def commit(self, T):
        pass
