"""
Rotary positions: 1-D RoPE for the vision tower and 3-D M-RoPE for the language model of Qwen2.5-VL.

M-RoPE (Qwen2-VL, arXiv 2409.12191) splits the head_dim/2 rotary frequencies into three groups (16/24/24 at 7B)
that take their angle from a time, a row and a column position. A text token has all three equal, so for text
M-RoPE is plain RoPE. A vision block of t x h x w merged tokens starting at position `cur` gets
t = cur + floor(k * seconds_per_grid * tokens_per_second) for its k-th temporal patch, h = cur + row,
w = cur + col, and the text after it starts at the block's largest position + 1: a 2-frame 720p second
(1 x 20 x 36 merged tokens) therefore advances the position by 36, not by its 720 tokens.

Everything here takes plain numbers or a config-like object (image_token_id, video_token_id and
vision.spatial_merge_size / vision.tokens_per_second), so model.py and cache.py can both import it.
"""
import functools

import torch


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_freq(dim, base):
    # exactly this expression, in fp32 on CPU: other formulas differ in the last bit from
    # the checkpoints' reference (transformers' Qwen2.5-VL)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


@functools.lru_cache(maxsize=256)
def _vision_block_positions(t, h, w, seconds, tokens_per_second):
    """(3, t*h*w) M-RoPE offsets of one vision block of t x h x w merged tokens: t = floor(k * seconds per grid
    * tokens per second) for the k-th temporal patch, h = row, w = column. Cached: a training batch holds
    hundreds of equal blocks."""
    tt = (torch.arange(t) * seconds * tokens_per_second).long()  # floor of a non-negative float, in the
    # reference's order of operations
    return torch.stack(torch.meshgrid(tt, torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)


@functools.lru_cache(maxsize=256)
def _vision_block(t, h, w, seconds, tokens_per_second):
    """(offsets (3, t*h*w), advance): a vision block's M-RoPE offsets and how far it moves the next position
    (its largest id + 1; the largest ids sit at its last token)."""
    offsets = _vision_block_positions(t, h, w, seconds, tokens_per_second)
    return offsets, int(offsets[:, -1].max()) + 1


def _assemble(pieces, length):
    """(3, length) positions of consecutive pieces (n tokens, first position, vision offsets or None for text):
    text advances all three axes by one a token, a vision block adds its offsets. Vectorised: a long prompt
    holds thousands of pieces (a 2,200 s video: 4,400), and small tensor ops per piece cost ~70 ms of host time."""
    n = torch.tensor([p[0] for p in pieces])
    first = torch.repeat_interleave(torch.tensor([p[1] for p in pieces]), n)   # (length,) its piece's position
    j = torch.arange(length) - torch.repeat_interleave(n.cumsum(0) - n, n)     # (length,) index inside its piece
    out = (first + j).expand(3, -1).clone()                                    # text: t = h = w
    groups = {}  # the vision pieces by their offsets (one tensor per block shape: lru_cache hands out the same)
    for i, (_, _, offsets) in enumerate(pieces):
        if offsets is not None:
            groups.setdefault(id(offsets), (offsets, []))[1].append(i)
    for offsets, members in groups.values():
        mask = torch.zeros(len(pieces), dtype=torch.bool)
        mask[members] = True
        tokens = torch.repeat_interleave(mask, n)
        out[:, tokens] = first[tokens] + offsets[:, j[tokens]]
    return out


def mrope_positions(input_ids, cfg, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                    attention_mask=None, start=0):
    """3-D M-RoPE position ids (3, B, L) for a batch of prompts, and the next free position per row (B,).

    The reference algorithm (transformers 4.x, vLLM): text advances all three axes by 1 per token; a vision
    run of (T, H, W) merged tokens gets t = cur + floor(k * seconds_per_grid * tokens_per_second),
    h = cur + row, w = cur + col, and the text after it starts at max(all ids) + 1. Images use seconds 0.
    Padded slots (attention_mask 0) get 0 and must be masked. `start` offsets a chunk appended to a cache.
    """
    B, L = input_ids.shape
    m, tps = cfg.vision.spatial_merge_size, cfg.vision.tokens_per_second
    pos = torch.zeros(3, B, L, dtype=torch.long)
    next_pos = torch.zeros(B, dtype=torch.long)
    secs = (second_per_grid_ts.tolist() if second_per_grid_ts is not None
            else [1.0] * (len(video_grid_thw) if video_grid_thw is not None else 0))
    blocks = {  # each image's / video's (offsets, advance), in order
        cfg.image_token_id: [_vision_block(t, h // m, w // m, 0.0, tps)
                             for t, h, w in (image_grid_thw.tolist() if image_grid_thw is not None else [])],
        cfg.video_token_id: [_vision_block(t, h // m, w // m, sec, tps)
                             for (t, h, w), sec in zip(video_grid_thw.tolist() if video_grid_thw is not None
                                                       else [], secs)]}
    used = {cfg.image_token_id: 0, cfg.video_token_id: 0}
    starts = [start] * B if isinstance(start, int) else [int(s) for s in start]
    for b in range(B):
        keep = torch.ones(L, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[keep]
        # runs of equal kind (text, image pads, video pads), found at once; a loop over runs, not tokens
        kind = torch.where(ids == cfg.image_token_id, 1, torch.where(ids == cfg.video_token_id, 2, 0))
        run_kind, run_len = torch.unique_consecutive(kind, return_counts=True)
        pieces, cur = [], starts[b]  # (tokens, first position, vision offsets or None), in plain numbers
        for k, n in zip(run_kind.tolist(), run_len.tolist()):
            if k == 0:
                pieces.append((n, cur, None))
                cur += n
                continue
            tok = cfg.image_token_id if k == 1 else cfg.video_token_id
            while n > 0:  # a vision run: consume the next grids of its kind (adjacent blocks share a run)
                if used[tok] >= len(blocks[tok]):
                    raise ValueError(f"more {'image' if tok == cfg.image_token_id else 'video'} runs in input_ids "
                                     "than grids given")
                offsets, advance = blocks[tok][used[tok]]
                used[tok] += 1
                if offsets.shape[1] > n:
                    raise ValueError("a vision placeholder run is shorter than its grid: the number of <|image_pad|>/"
                                     "<|video_pad|> tokens must equal grid_t*grid_h*grid_w/4 per image/video")
                pieces.append((offsets.shape[1], cur, offsets))
                cur += advance
                n -= offsets.shape[1]
        if pieces:
            pos[:, b, keep] = _assemble(pieces, len(ids))
        next_pos[b] = cur
    return pos.to(input_ids.device), next_pos


def mrope_axis(mrope_section, device=None):
    """Which axis (0 = t, 1 = h, 2 = w) each of the head_dim/2 frequencies takes its position from."""
    return torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section)).to(device)


def mrope_cos_sin(position_ids, freq, mrope_section, dtype, axis=None):
    """M-RoPE cos/sin (B, 1, T, head_dim) from position ids (3, B, T) and inv_freq (head_dim/2,). Pass `axis`
    (mrope_axis, on the device) to keep host-to-device copies out of a captured CUDA graph."""
    # frequency j takes its position from axis t, h or w by mrope_section (e.g. 16/24/24)
    axis = mrope_axis(mrope_section, position_ids.device) if axis is None else axis
    p = position_ids[axis].permute(1, 2, 0).float()  # (3, B, T) -> (B, T, head_dim/2), one axis per frequency
    emb = (p * freq.to(p.device)).repeat(1, 1, 2)     # angles in fp32, as the reference, (B, T, head_dim)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin
