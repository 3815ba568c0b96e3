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


def mrope_positions_reference(input_ids, cfg, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                    attention_mask=None, start=0):
    """3-D M-RoPE position ids (3, B, L) for a batch of prompts, and the next free position per row (B,).

    The reference algorithm (transformers 4.x, vLLM): text advances all three axes by 1 per token; a vision
    run of (T, H, W) merged tokens gets t = cur + floor(k * seconds_per_grid * tokens_per_second),
    h = cur + row, w = cur + col, and the text after it starts at max(all ids) + 1. Images use seconds 0.
    Padded slots (attention_mask 0) get 0 and must be masked. `start` offsets a chunk appended to a cache.
    This is the algorithm, run by run; mrope_positions below is the same, vectorised (tests check they agree).
    """
    B, L = input_ids.shape
    m = cfg.vision.spatial_merge_size
    pos = torch.zeros(3, B, L, dtype=torch.long)
    next_pos = torch.zeros(B, dtype=torch.long)
    grids = {cfg.image_token_id: list(image_grid_thw.tolist()) if image_grid_thw is not None else [],
             cfg.video_token_id: list(video_grid_thw.tolist()) if video_grid_thw is not None else []}
    secs = {cfg.image_token_id: [0.0] * len(grids[cfg.image_token_id]),
            cfg.video_token_id: (second_per_grid_ts.tolist() if second_per_grid_ts is not None
                                 else [1.0] * len(grids[cfg.video_token_id]))}
    used = {cfg.image_token_id: 0, cfg.video_token_id: 0}
    starts = [start] * B if isinstance(start, int) else [int(s) for s in start]
    for b in range(B):
        keep = torch.ones(L, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[keep]
        # runs of equal kind (text, image pads, video pads), found at once; a loop over runs, not tokens
        kind = torch.where(ids == cfg.image_token_id, 1, torch.where(ids == cfg.video_token_id, 2, 0))
        run_kind, run_len = torch.unique_consecutive(kind, return_counts=True)
        chunks, cur = [], starts[b]
        for k, n in zip(run_kind.tolist(), run_len.tolist()):
            if k == 0:
                chunks.append(torch.arange(cur, cur + n).expand(3, -1))
                cur += n
                continue
            tok = cfg.image_token_id if k == 1 else cfg.video_token_id
            while n > 0:  # a vision run: consume the next grids of its kind (adjacent blocks share a run)
                if used[tok] >= len(grids[tok]):
                    raise ValueError(f"more {'image' if tok == cfg.image_token_id else 'video'} runs in input_ids "
                                     "than grids given")
                t, h, w = grids[tok][used[tok]]
                block = _vision_block_positions(t, h // m, w // m, secs[tok][used[tok]], cfg.vision.tokens_per_second)
                used[tok] += 1
                if block.shape[1] > n:
                    raise ValueError("a vision placeholder run is shorter than its grid: the number of <|image_pad|>/"
                                     "<|video_pad|> tokens must equal grid_t*grid_h*grid_w/4 per image/video")
                chunks.append(block + cur)  # (3, t*h*w)
                cur = int(chunks[-1][:, -1].max()) + 1  # the block's largest ids sit at its last token
                n -= block.shape[1]
        p = torch.cat(chunks, 1) if chunks else torch.zeros(3, 0, dtype=torch.long)
        pos[:, b, keep] = p
        next_pos[b] = cur
    return pos.to(input_ids.device), next_pos


def _kind_grids(grid_thw, secs, m, tps):
    """One kind's grids (images or videos) as tensors: tokens (G,), advance (G,) (how far each block moves the
    next position: its largest id + 1), shape (G,) (which distinct block it is), the distinct blocks' offsets
    (_vision_block_positions) side by side in table (3, n) from base[shape], and C, the running token count."""
    empty = torch.zeros(0, dtype=torch.long)
    if grid_thw is None or not len(grid_thw):
        return dict(tokens=empty, advance=empty, shape=empty, table=empty.view(3, 0), base=empty, C=empty)
    grid_thw = grid_thw.cpu()
    secs = torch.as_tensor(secs, dtype=torch.float64)[:len(grid_thw)]
    secs = torch.where(grid_thw[:len(secs), 0] > 1, secs, 0.0)  # one temporal patch: its seconds change nothing
    rows = torch.cat([grid_thw[:len(secs)].double(), secs[:, None]], 1)  # (G, 4); more grids than seconds: an
    index = {}                                                            # error if used, as the reference's
    shape = torch.tensor([index.setdefault(r, len(index)) for r in map(tuple, rows.tolist())], dtype=torch.long)
    # (a dict, not torch.unique(dim=0): that sorts rows, ~2 ms for a 2,200 s video's grids, all alike)
    offsets = [_vision_block_positions(int(t), int(h) // m, int(w) // m, float(sec), tps) for t, h, w, sec in index]
    n = torch.tensor([o.shape[1] for o in offsets], dtype=torch.long)
    advance = torch.tensor([int(o[:, -1].max()) + 1 if o.shape[1] else 0 for o in offsets], dtype=torch.long)
    # all shapes' offsets side by side, each from base[shape]: a block's token k takes table[:, base + k]
    table, base = torch.cat(offsets, 1), n.cumsum(0) - n
    return dict(tokens=n[shape], advance=advance[shape], shape=shape, table=table, base=base, C=n[shape].cumsum(0))


def _row_positions(kind, grids, start, pointer):
    """(3, L) positions and the next position of one row; kind (L,) 0 text / 1 image / 2 video pads, grids {1: ...,
    2: ...} from _kind_grids, pointer {1: n, 2: n} the tokens of each kind earlier rows used (updated)."""
    L = len(kind)
    text = kind == 0
    first_of_run = torch.ones(L, dtype=torch.bool)
    first_of_run[1:] = kind[1:] != kind[:-1]
    last_of_run = torch.ones(L, dtype=torch.bool)
    last_of_run[:-1] = first_of_run[1:]
    is_start, within = text & first_of_run, torch.zeros(L, dtype=torch.long)  # a piece: a text run or one block
    grid_of, bad = torch.zeros(L, dtype=torch.long), []
    pads = {k: (kind == k).nonzero().flatten() for k in grids}  # (n,) where each kind's pad tokens are
    for k, g in grids.items():
        mine = pads[k]
        if not len(mine):
            continue
        ends = last_of_run[mine]                                 # a run must end where a grid ends
        if not len(g["C"]):                                      # pads, and no grid of their kind at all
            bad.append((int(mine[ends][0]), k, False))
            continue
        z = pointer[k] + torch.arange(len(mine))                 # index in this kind's stream of pad tokens
        gi = torch.searchsorted(g["C"], z, right=True)           # its grid (G: past the last one)
        ok, gc = gi < len(g["C"]), gi.clamp(max=len(g["C"]) - 1)
        w = z - (g["C"][gc] - g["tokens"][gc])                   # index inside its grid
        fail = (ends & (~ok | (w != g["tokens"][gc] - 1))).nonzero().flatten()
        if len(fail):
            bad.append((int(mine[fail[0]]), k, bool(ok[fail[0]])))
        within[mine], grid_of[mine], is_start[mine] = w, gi, w == 0
        pointer[k] = int(z[-1]) + 1
    if bad:
        _, k, inside = min(bad)
        raise ValueError("a vision placeholder run is shorter than its grid: the number of <|image_pad|>/"
                         "<|video_pad|> tokens must equal grid_t*grid_h*grid_w/4 per image/video" if inside else
                         f"more {'image' if k == 1 else 'video'} runs in input_ids than grids given")
    first_tok = is_start.nonzero().flatten()                     # (P,) each piece's first token
    pid = is_start.cumsum(0) - 1                                 # (L,) the piece of each token
    advance = torch.diff(first_tok, append=torch.tensor([L]))    # text: its length; a block: its own advance
    for k, g in grids.items():
        block = kind[first_tok] == k
        advance[block] = g["advance"][grid_of[first_tok[block]]]
    first = start + advance.cumsum(0) - advance                  # (P,) each piece's first position
    out = (first[pid] + torch.arange(L) - first_tok[pid]).expand(3, -1).clone()  # text: t = h = w
    for k, g in grids.items():  # a block: its first position + its offsets, one gather from all shapes' offsets
        mine = pads[k]
        if len(mine):
            out[:, mine] = first[pid[mine]] + g["table"][:, g["base"][g["shape"][grid_of[mine]]] + within[mine]]
    return out, start + int(advance.sum())


def mrope_positions(input_ids, cfg, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                    attention_mask=None, start=0):
    """mrope_positions_reference, vectorised over the runs: the same (3, B, L) ids and next positions (B,), the
    same errors. A long video is thousands of runs (2,200 s: 4,400), and a few small tensor ops per run cost
    ~70 ms of host time there, more than the prefill's attention on a GPU; here it is ~20 ops over the tokens."""
    B, L = input_ids.shape
    m, tps = cfg.vision.spatial_merge_size, cfg.vision.tokens_per_second
    pos = torch.zeros(3, B, L, dtype=torch.long)
    next_pos = torch.zeros(B, dtype=torch.long)
    n_images, n_videos = (len(g) if g is not None else 0 for g in (image_grid_thw, video_grid_thw))
    secs = second_per_grid_ts.cpu() if second_per_grid_ts is not None else [1.0] * n_videos
    grids = {1: _kind_grids(image_grid_thw, [0.0] * n_images, m, tps), 2: _kind_grids(video_grid_thw, secs, m, tps)}
    pointer = {1: 0, 2: 0}
    starts = [start] * B if isinstance(start, int) else [int(s) for s in start]
    for b in range(B):
        keep = torch.ones(L, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[keep]
        kind = torch.where(ids == cfg.image_token_id, 1, torch.where(ids == cfg.video_token_id, 2, 0))
        if len(ids):
            pos[:, b, keep], next_pos[b] = _row_positions(kind, grids, starts[b], pointer)
        else:
            next_pos[b] = starts[b]
    return pos.to(input_ids.device), next_pos


def mrope_axis(mrope_section, device=None):
    """Which axis (0 = t, 1 = h, 2 = w) each of the head_dim/2 frequencies takes its position from."""
    # (output_size: the length is known, so a model built on the meta device can make it too)
    axes = torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section), output_size=sum(mrope_section))
    return axes.to(device)


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
