"""
The Qwen2.5-VL vision tower: pixels of images or video to tokens for the language model (model.py).

A frame pair is cut into 14x14 pixel patches over 2 frames (one 1176-value row each, made by processor.py). A ViT
with 2-D rotary positions (half the frequencies rotate by row, half by column) runs over them; most blocks attend
only inside 112x112 px windows, a few "full" blocks (7, 15, 23, 31 at 7B) over the whole frame. All images and
videos of a batch are packed in one sequence, and attention never crosses a window or a frame group
(segment_attention). Rows are reordered into window order first, keeping the 2x2 patches of each merge unit
together, and a merger turns each 2x2 unit into one token of the language model's width, back in raster order.

The small layers both towers share (RMSNorm, the gated MLP) are layers.py's; the rotary helpers rope.py's.

References: Qwen2.5-VL technical report, arXiv 2502.13923; transformers' modeling_qwen2_5_vl.py (the window
layout, the RMSNorm order, inv_freq to the last bit) is the oracle in tests/test_model.py.
"""
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from layers import Fusable, GatedMLP, RMSNorm
from rope import inv_freq, rotate_half

# -----------------------------------------------------------------------------
# Config


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584          # = the language model's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112               # pixels; 112 / 14 / 2 = 4x4 merge units per window
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    in_chans: int = 3
    tokens_per_second: int = 2           # M-RoPE time ids per second of video


# -----------------------------------------------------------------------------
# Vision tower


class Segments:
    """Where each row of a packed sequence goes in a padded (num_segments, max_len) batch, for segments
    [cu[i], cu[i+1]). Made once per forward on the CPU (cu_seqlens comes from vision_layout there) and shared by
    every block that uses it: computed per block on the device it would cost a host sync each time."""

    def __init__(self, cu_seqlens, device):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)      # (N,) segment of each row
        pos = torch.arange(int(cu_seqlens[-1])) - cu_seqlens[:-1][seg]          # (N,) index inside it
        self.n, self.max_len = len(lengths), int(lengths.max())
        self.seg, self.pos = seg.to(device), pos.to(device)
        self.key_ok = (torch.arange(self.max_len)[None, :] < lengths[:, None]).to(device)  # (S, max_len)


def segment_attention(q, k, v, segments):
    """Non-causal attention inside each segment of a packed sequence, none across.

    q, k, v: (N, H, D). Instead of a Python loop over windows, the segments are scattered into a padded
    (num_segments, max_len) batch and run as one SDPA call with a key-padding mask.
    """
    N, H, D = q.shape
    sg = segments

    def pad(x):  # (N, H, D) -> (S, H, max_len, D)
        out = x.new_zeros(sg.n, sg.max_len, H, D)
        out[sg.seg, sg.pos] = x
        return out.transpose(1, 2)

    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=sg.key_ok[:, None, None, :])
    return o.transpose(1, 2)[sg.seg, sg.pos]  # back to (N, H, D)


class VisionAttention(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, segments, cos, sin):
        q, k, v = rearrange(self.qkv(x), "n (three h d) -> three n h d", three=3, h=self.n_heads)
        # the vision rotary is applied in fp32 and cast back (the opposite of the text model)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        o = segment_attention(q, k, v, segments)
        return self.proj(o.flatten(1))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size)
        self.attn = VisionAttention(c.hidden_size, c.num_heads)
        self.norm2 = RMSNorm(c.hidden_size)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, bias=True)

    def forward(self, x, segments, cos, sin):
        x = x + self.attn(self.norm1(x), segments, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm per patch, then each 2x2 group of patches (4 consecutive rows) -> one LLM token."""

    def __init__(self, dim, out_dim, merge=2):
        super().__init__()
        self.ln_q = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim * merge**2, dim * merge**2), nn.GELU(),
                                 nn.Linear(dim * merge**2, out_dim))

    def forward(self, x):
        x = self.ln_q(x)
        return self.mlp(x.reshape(-1, self.mlp[0].in_features))  # (N, C) -> (N/4, 4C)


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        # Conv3d and a matmul are equal in exact arithmetic; the conv matches the checkpoint's bf16 rounding
        self.proj = nn.Conv3d(c.in_chans, c.hidden_size, kernel_size=self.kernel, stride=self.kernel, bias=False)

    def forward(self, x):  # (N, 3*2*14*14) -> (N, C)
        x = x.view(-1, self.proj.in_channels, *self.kernel).to(self.proj.weight.dtype)
        return self.proj(x).flatten(1)


@functools.lru_cache(maxsize=256)
def _grid_layout(t, h, w, m, ws):
    """vision_layout's pieces for one (t, h, w) grid, cached: a training batch holds hundreds of equal grids.
    Returns pos (t*h*w, 2), window_index (t*h*w/m^2,) from 0, and the sizes of its non-empty windows in patches."""
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    hw = torch.stack([hh, ww], -1)                                     # (h, w, 2)
    hw = rearrange(hw, "(hb mh) (wb mw) two -> (hb wb mh mw) two", mh=m, mw=m)
    lh, lw = h // m, w // m
    idx = torch.arange(t * lh * lw).view(t, lh, lw)
    # pad to whole windows; note the pad is a full window (not 0) when the size divides: empty windows
    # are dropped below, so the result is the same either way
    ph, pw = ws - lh % ws, ws - lw % ws
    idx = F.pad(idx, (0, pw, 0, ph), value=-1)
    idx = rearrange(idx, "t (nh a) (nw b) -> t (nh nw) (a b)", a=ws, b=ws)
    counts = (idx >= 0).sum(-1).flatten()                              # merge units per window
    return hw.repeat(t, 1), idx[idx >= 0], counts[counts > 0] * m * m  # every frame: same spatial ids


def vision_layout(grid_thw, c: VisionConfig):
    """Index bookkeeping for one batch of images/videos, all on the CPU in int64.

    Returns
      pos (N, 2): (row, col) of every patch, rows in the processor's merge-block order;
      window_index (N/4,): merge units in window order (the ViT runs on rows permuted by this);
      cu_window (W+1,): segment boundaries of the windows, in patches, after the permutation;
      cu_full (F+1,): one segment per temporal patch per image, for the full-attention blocks.
    """
    m = c.spatial_merge_size
    ws = c.window_size // m // c.patch_size  # window side in merge units (4)
    pos, window_index, sizes, offset = [], [], [], 0
    for t, h, w in grid_thw.tolist():
        p, idx, size = _grid_layout(t, h, w, m, ws)
        pos.append(p)
        window_index.append(idx + offset)
        sizes.append(size)
        offset += len(idx)
    cu_window = F.pad(torch.cat(sizes).cumsum(0), (1, 0))
    sizes = grid_thw[:, 1] * grid_thw[:, 2]
    cu_full = F.pad(torch.repeat_interleave(sizes, grid_thw[:, 0]).cumsum(0), (1, 0))
    return torch.cat(pos), torch.cat(window_index), cu_window, cu_full


class Plan(NamedTuple):
    """What a batch of grids needs besides the pixels, made once per grid and device (VisionTower.plan)."""
    order: torch.Tensor     # (N,) patch rows in window order, merge units kept together
    back: torch.Tensor      # (N/4,) merged tokens from window order back to raster order
    cos: torch.Tensor       # (N, 1, head_dim) fp32 2-D rotary, in window order
    sin: torch.Tensor
    windows: Segments       # the windowed blocks' segments
    full: Segments          # the full-attention blocks' segments (one per temporal patch per image)


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c.hidden_size, c.out_hidden_size, c.spatial_merge_size)
        self.plans, self.graphs = {}, {}  # per (grids, device): Plan; per (grids, device, pixel dtype): VisionGraph
        self.graphed_weights = None       # the weights' addresses the graphs were captured with

    def forward(self, pixel_values, grid_thw, compiled=False):
        """pixel_values (N, 1176) as the processor makes them, grid_thw (n, 3) -> (N/4, out_hidden).
        compiled=True runs the blocks through torch.compile (fused norms, rotary and casts, far fewer launches) and,
        on a GPU without gradients, replays them from a CUDA graph captured once per grid (VisionGraph)."""
        plan = self.plan(grid_thw, pixel_values.device)
        if compiled and pixel_values.is_cuda and not torch.is_grad_enabled():
            # a graph replays the kernels with the weights' addresses of its capture: new weights (fuse(), .to(),
            # quantize.py's FP8 buffers) make new graphs (an address alone could be reused by a tensor of another
            # dtype or shape); values loaded in place are seen as they are
            weights = tuple((p.data_ptr(), p.dtype, p.shape) for p in [*self.parameters(), *self.buffers()]) + tuple(
                m.fused is not None for m in self.modules() if isinstance(m, Fusable))
            if weights != self.graphed_weights:
                self.graphs, self.graphed_weights = {}, weights
            key = (tuple(grid_thw.flatten().tolist()), str(pixel_values.device), pixel_values.dtype)
            if key not in self.graphs:
                if len(self.graphs) >= MAX_GRAPHS:  # a graph holds its own activations: keep a few
                    self.graphs.pop(next(iter(self.graphs)))
                self.graphs[key] = VisionGraph(self, pixel_values, plan)
            return self.graphs[key](pixel_values)
        return self.run(pixel_values, plan, compiled)

    def plan(self, grid_thw, device):
        """The host-side bookkeeping for these grids (vision_layout, the rotary table, the segments), on `device`;
        kept per grid, as a stream's seconds repeat their grid. Computed per forward on the device it would cost
        host syncs; recomputed per forward on the host, ~20 small copies."""
        key = (tuple(grid_thw.flatten().tolist()), str(device))
        if key in self.plans:
            return self.plans[key]
        c = self.c
        pos, window_index, cu_window, cu_full = vision_layout(grid_thw.cpu(), c)
        # 2-D rotary: the first half of the frequencies rotate by row, the second half by column
        head_dim = c.hidden_size // c.num_heads
        freqs = pos.float()[:, :, None] * inv_freq(head_dim // 2, 10000.0)  # (N, 2, head_dim/4)
        emb = freqs.flatten(1).repeat(1, 2)                                 # (N, head_dim)
        # reorder rows into window order, keeping the 4 patches of each merge unit together
        u = c.spatial_merge_size ** 2
        order = (window_index[:, None] * u + torch.arange(u)).flatten()
        emb = emb[order].to(device)
        plan = Plan(order.to(device), torch.argsort(window_index).to(device), emb.cos()[:, None, :],
                    emb.sin()[:, None, :], Segments(cu_window, device), Segments(cu_full, device))
        if len(self.plans) >= MAX_PLANS:  # training batches bring many grids
            self.plans.clear()
        self.plans[key] = plan
        return plan

    def run(self, pixel_values, plan, compiled=False):
        """The tower on pixels whose grids `plan` describes -> merged tokens in raster order."""
        x = self.patch_embed(pixel_values)[plan.order]
        for i, blk in enumerate(self.blocks):
            segments = plan.full if i in self.c.fullatt_block_indexes else plan.windows
            x = _compiled_block(blk, x, segments, plan.cos, plan.sin) if compiled else blk(x, segments, plan.cos,
                                                                                            plan.sin)
        return self.merger(x)[plan.back]  # back to raster order, as the prompt expects


# One compiled block function for every block of every tower (the weights are its inputs): a compile for the
# window blocks and one for the full-attention blocks, per input size
_compiled_block = torch.compile(VisionBlock.forward)
MAX_PLANS, MAX_GRAPHS = 32, 4  # a 720p plan holds ~2 MB of rotary tables on the device

# -----------------------------------------------------------------------------
# The fast path: the whole tower replayed from a CUDA graph
#
# Why: at 720p a second is 2,880 patches through 32 blocks, and even compiled each block launches ~10 kernels
# and checks its compile guards from Python. On an H100 that host work (~25 ms) outlasted the GPU's (~12 ms with
# the padded MLP, layers.py), so the tower waited on Python. A stream's seconds all have the same grid, so the
# tower's kernels can be recorded once and replayed with one launch, like the decode step (decode.py). The graph
# reads its pixels from a fixed buffer and writes a fixed output, which __call__ copies out.


class VisionGraph:
    """tower.run(pixels, plan, compiled=True) captured for one grid; calling it with pixels of that shape replays
    it and returns a copy of the output (the next replay overwrites the graph's own)."""

    def __init__(self, tower, pixel_values, plan):
        self.plan = plan  # the graph reads the plan's tensors by address: keep them alive (plans may be cleared)
        self.pixels = pixel_values.clone()
        side = torch.cuda.Stream()  # warm up (compile, pick kernels) off the capture, as CUDA graphs require
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                tower.run(self.pixels, plan, compiled=True)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = tower.run(self.pixels, plan, compiled=True)

    def __call__(self, pixel_values):
        self.pixels.copy_(pixel_values)
        self.graph.replay()
        return self.out.clone()
