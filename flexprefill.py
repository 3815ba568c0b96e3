"""
FlexPrefill: context-aware block-sparse attention for long prefills, on PyTorch FlexAttention.

Paper: Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence
Inference", ICLR 2025, arXiv 2502.20766. Authors' code: bytedance/FlexPrefill (Triton). Written fresh here.

The idea, per query head, on a grid of 128x128 (query block, key block) tiles:
1) Probe. The last 128 queries attend exactly to all keys (a 128 x N softmax, cheap). From it we get the
   "true" attention per key block, plus per-token vertical (key column) and slash (query-key distance) scores.
2) Pattern. The same distribution is estimated from pooled tensors: softmax(mean(probe q) . blockmean(K)).
   If sqrt-JS(estimate, true) < tau, block pooling describes this head well: it is "query-aware" and gets
   blocks from a pooled (query block x key block) score map: global sort, keep the top blocks whose
   cumulative score reaches gamma. Otherwise the head is "vertical-slash": keep the fewest key columns and
   diagonals covering gamma of the probe's attention, clamped to [min_budget, max_budget].
3) Attend. The selection becomes a FlexAttention BlockMask built straight from indices (nothing N x N):
   blocks strictly below the causal boundary are "full" (no mask_mod), blocks crossing it are "partial"
   and get the causal mask_mod.

Where the paper and the authors' code differ we follow the code (it produced the paper's numbers):
- the vertical-slash budget is counted in tokens (fewest probe columns/diagonals covering gamma, +1), turned
  into blocks with count // block_size + 1 (the code writes a literal 128; we use block_size, same at 128),
  and the blocks themselves are the top-k of block-summed scores (the paper sorts lines directly);
- min_budget/max_budget clamp the vertical and the slash counts separately;
- key block 0 (attention sink) and the local diagonal are always in and count inside the budget;
- query-aware heads keep the union of their blocks and a min_budget vertical-slash set (paper: QA set only);
- slash distances are grouped into block diagonals as seen from the last query (exact for the last block);
- sqrt-JS uses natural log and no epsilon: a NaN (0 * log 0 after underflow) makes the head vertical-slash.
Our own choices: pooled q/k means and the pooled score maps are computed in fp32 (the authors use bf16; it
is cheap and keeps the JS test free of rounding noise); any batch size; density is reported as kept blocks
over visible (causal) blocks, whereas the authors divide by the full nb x nb square.

Not in the authors' code, needed by a streaming loop: Nq < Nk. The queries are then the last Nq of Nk
positions (a prefill chunk against a KV cache): query i sits at position Nk - Nq + i. Query blocks are
counted from the first query, key blocks from key 0, so when Nk - Nq is not a multiple of the block size a
query block straddles two key blocks on its diagonal; every block that crosses the causal boundary is kept
and masked. The probe is still the last 128 queries, so the probe and the JS test are unchanged.

Compiles: `flex_attention` is compiled once at import (dynamic=False) and reused. It recompiles for every
new (Nq, Nk), head count, head dim, dtype or device, never for a new selection (the mask_mod captures its
offset as a tensor, which is not guarded). Dynamo's default of 8 graphs per function would fall back to
eager flex (O(N^2) memory) after 8 lengths, so we raise the limit to 64. On CPU the default backend is a
dense masked SDPA over the same blocks (the test reference); `backend="flex"` runs compiled flex on CPU too.
The flex path is forward-only (the BlockMask skips the transposed metadata that backward needs).
The selection has two forms: the eager functions below (select_blocks, the readable reference) and select_blocks_fast,
the same functions compiled (one compile per shape) with a probe written for fusion (_probe_fused: the 128 x N fp32
probabilities, 1.9 GB at 128k, are never stored): ~100 small eager kernels storing every intermediate become a few
fused passes over the probe's bf16 scores, q and the block grid. flexprefill_attention takes the fast one on CUDA
(cfg.fast forces either); tests check both keep the same blocks, and the benchmark reports any difference (sel_diff).
"""
import argparse
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from model import causal_attention


@functools.cache
def _flex_compiled():
    """flex_attention compiled once per process (on first use), shapes static."""
    return torch.compile(flex_attention, dynamic=False)


# dynamo keeps 8 compiled graphs per function by default and then falls back to eager flex attention, which
# materialises the N x N scores; each new (Nq, Nk) is a new graph, so a run over many lengths needs more. The
# limit is raised around our calls only: importing this module changes no global setting.
@torch._dynamo.config.patch(recompile_limit=64)
def _flex(q, k, v, block_mask, enable_gqa):
    return _flex_compiled()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _cdiv(a, b):
    return -(-a // b)


def _check_inputs(q, k, v, block_size):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D (B, H, N, D) q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (B, Hq, Nq, D), (Bk, Hkv, Nk, Dk) = q.shape, k.shape
    if k.shape[:3] != v.shape[:3] or Bk != B or Dk != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if Nq > Nk:
        raise ValueError(f"Nq ({Nq}) > Nk ({Nk}): the queries must be the last Nq of the Nk positions")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")


def _block_geometry(q_len, kv_len, block_size, device):
    """Which (query block, key block) tiles are visible, and which of them cross the causal boundary."""
    r = torch.arange(_cdiv(q_len, block_size), device=device)
    c = torch.arange(_cdiv(kv_len, block_size), device=device)
    offset = kv_len - q_len                                  # query i sits at position offset + i
    first = offset + r * block_size                          # position of each query block's first row
    last = (offset + (r + 1) * block_size).clamp(max=kv_len) - 1   # ... and of its last row
    diag = last // block_size                                # key block of the last row: block diagonal 0
    visible = c[None, :] <= diag[:, None]                    # (nqb, nkb) at least one key visible
    full = (c[None, :] + 1) * block_size - 1 <= first[:, None]  # every key visible to every row
    return visible, visible & ~full, diag


@torch.compiler.disable   # eager in select_blocks_fast too: see query_aware_blocks
def _block_mean(x, block_size):
    """(B, H, N, D) -> (B, H, ceil(N/bs), D) fp32 means; the last, partial block is divided by its true size."""
    B, H, N, D = x.shape
    nb = _cdiv(N, block_size)
    if N % block_size:
        x = F.pad(x, (0, 0, 0, nb * block_size - N))
    x = x.view(B, H, nb, block_size, D)
    count = (N - torch.arange(nb, device=x.device) * block_size).clamp(max=block_size)
    return x.sum(3, dtype=torch.float32) / count[:, None]


def _block_sum(x, block_size, pad_left=0):
    """(B, H, N) -> (B, H, ceil(N/bs)) sums over groups of block_size, after pad_left zeros on the left."""
    nb = _cdiv(x.shape[-1], block_size)
    x = F.pad(x, (pad_left, nb * block_size - x.shape[-1] - pad_left))
    return x.view(*x.shape[:-1], nb, block_size).sum(-1)


def _cover_count(x, gamma):
    """How many of the largest entries of x (per row) it takes for their running sum to pass gamma."""
    csum = x.sort(-1, descending=True).values.cumsum(-1)
    return (csum <= gamma).sum(-1) + 1


def _scatter_mask(order, keep):
    """Boolean mask that is `keep[rank]` at position order[rank] (order: a permutation along the last dim)."""
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def _top_mask(x, n):
    """The n[...] largest entries of each row of x, as a boolean mask; n varies per row (no .item())."""
    order = x.argsort(dim=-1, descending=True, stable=True)
    keep = torch.arange(x.shape[-1], device=x.device) < n[..., None]
    return _scatter_mask(order, keep)


def _sqrt_js(p, q):
    """sqrt of the Jensen-Shannon divergence along the last dim, natural log, no epsilon (as the authors)."""
    m = (p + q) / 2
    return (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).sqrt()


def _probe(q, k, n):
    """Exact attention of the last n queries. Returns per-token vertical and slash scores, (B, Hq, Nk) each
    and each summing to 1, and the probe queries' mean (B, Hq, D), all fp32."""
    (B, Hq, _, D), (_, Hkv, Nk, _) = q.shape, k.shape
    L = _cdiv(Nk + n - 1, 64) * 64     # >= n-1 padding keys; a multiple of 64 keeps the matmul output aligned
    # probe rows in reverse: row i is the query at position Nk-1-i. The zero keys on the right make the
    # diagonal sums below a plain reshape (the classic "skew" trick, no copy of the probe matrix)
    qp = q[:, :, -n:].flip(2) * D**-0.5                                        # (B, Hq, n, D)
    kp = F.pad(k, (0, 0, 0, L - Nk))                                           # (B, Hkv, L, D)
    s = (qp.reshape(B, Hkv, -1, D) @ kp.transpose(-1, -2)).view(B, Hq, n, L)    # GQA without repeating K
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(Nk - n, L, device=q.device)[None, :]
    s[..., Nk - n:].masked_fill_(j > Nk - 1 - i, float("-inf"))  # causal corner, and hides the padding keys
    p = torch.softmax(s, dim=-1, dtype=torch.float32)                          # (B, Hq, n, L)
    vertical = p[..., :Nk].mean(2)                                             # (B, Hq, Nk), per key
    # read row i shifted left by i (row stride L-1 instead of L, no copy): every diagonal, i.e. every
    # query-key distance, lines up in one column, column t <-> distance Nk-1-t. Entries shifted in from
    # the previous row land in its zero padding, so nothing leaks.
    skew = p.flatten(2)[..., : n * (L - 1)].view(B, Hq, n, L - 1)[..., :Nk]
    slash = skew.sum(2).flip(-1) / n                                           # (B, Hq, Nk), per distance
    return vertical, slash, qp.float().mean(2)


def _probe_fused(q, k, n):
    """_probe for torch.compile: the same sums, the fp32 probabilities never stored (28 x 128 x 131k at 128k: 1.9 GB).
    Only the bf16 scores s are (one matmul, 0.94 GB); row max, row sum, vertical and slash sums each read s once with
    exp(s - max) / sum recomputed on the fly: one fused pass each. The causal corner and the padding keys are masked
    by index arithmetic, not a write; the slash reads s through the skew view."""
    (B, Hq, _, D), (_, Hkv, Nk, _) = q.shape, k.shape
    L = _cdiv(Nk + n - 1, 64) * 64
    qp = q[:, :, -n:].flip(2) * D**-0.5                                        # (B, Hq, n, D)
    kp = F.pad(k, (0, 0, 0, L - Nk))                                           # (B, Hkv, L, D)
    s = (qp.reshape(B, Hkv, -1, D) @ kp.transpose(-1, -2)).view(B, Hq, n, L)    # input dtype, stored once
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None, :]
    s32 = s.float().masked_fill(j > Nk - 1 - i, float("-inf"))                 # (B, Hq, n, L), not stored
    m = s32.amax(-1, keepdim=True)                                             # (B, Hq, n, 1)
    z = (s32 - m).exp().sum(-1, keepdim=True)
    vertical = ((s32[..., :Nk] - m).exp() / z).mean(2)                         # (B, Hq, Nk), per key
    # skew row i, column t is key t - i of row i for t >= i (always causal); for t < i it is the previous row's
    # tail, which _probe reads as zero probabilities and we mask here
    skew = s.flatten(2)[..., : n * (L - 1)].view(B, Hq, n, L - 1)[..., :Nk].float()
    t = torch.arange(Nk, device=q.device)[None, :]
    slash = ((skew - m).exp() / z).masked_fill(t < i, 0).sum(2).flip(-1) / n   # (B, Hq, Nk), per distance
    return vertical, slash, qp.float().mean(2)


@dataclass(frozen=True)
class FlexPrefillConfig:
    """FlexPrefill's settings, passed by name to every function here (the authors' defaults).
    gamma: the attention mass each head's selection must cover (higher: denser, closer to exact);
    tau: the sqrt-JS threshold under which a head counts as query-aware (higher: more query-aware heads);
    min_budget / max_budget: bounds, in tokens, on the vertical and slash lines a vertical-slash head keeps;
    block_size: the tile of the block grid; min_len: chunks shorter than this stay dense in a model (FlexPrefill);
    backend: "flex" (compiled FlexAttention), "dense" (a masked SDPA, the reference) or "auto" (flex on CUDA);
    dense_above: when the selection keeps more than this share of the visible blocks (mean over heads), run dense
    SDPA instead (None: never, as the authors); a cheap estimate (estimate_density) is checked first, so a
    dense-looking input pays ~0.5 ms at 32k, not the selection; dense_below: inputs of fewer keys run dense SDPA
    (0: never). GUARDED below sets both for a GPU like the H100. fast: the selection, density estimate and
    BlockMask indices compiled (select_blocks_fast: the reference's blocks, one compile per shape; None: on CUDA)."""
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: int | None = None
    block_size: int = 128
    min_len: int = 4096
    backend: str = "auto"
    dense_above: float | None = None
    dense_below: int = 0
    fast: bool | None = None


def line_budgets(vertical, slash, cfg, nkb):
    """1b) How many key-block columns and block diagonals a vertical-slash head keeps: the fewest probe columns
    (diagonals) covering gamma of the probe's attention, counted in tokens and turned into blocks as the authors do
    (count // bs + 1), clamped to [min_budget, max_budget]. vertical, slash (B, Hq, Nk) -> two (B, Hq) counts."""
    bs = cfg.block_size
    lo = max(1, _cdiv(cfg.min_budget or 1, bs))
    hi = nkb if cfg.max_budget is None else min(_cdiv(cfg.max_budget, bs), nkb)
    return ((_cover_count(vertical, cfg.gamma) // bs + 1).clamp(lo, hi),
            (_cover_count(slash, cfg.gamma) // bs + 1).clamp(lo, hi))


def js_test(q_probe, k_pool, vertical_blocks, tau):
    """2) Is the head query-aware? The probe's attention over key blocks estimated from pooled tensors,
    softmax(mean(probe q) . blockmean(K)), against the true one: sqrt-JS below tau means block pooling describes
    the head. q_probe (B, Hq, D), k_pool (B, Hkv, nkb, D), vertical_blocks (B, Hq, nkb) -> js, query_aware (B, Hq)."""
    (B, Hq, D), (_, Hkv, nkb, _) = q_probe.shape, k_pool.shape
    est = (q_probe.reshape(B, Hkv, -1, D) @ k_pool.transpose(-1, -2)).view(B, Hq, nkb).softmax(-1)
    js = _sqrt_js(est, vertical_blocks)
    return js, js < tau                                       # NaN -> False -> vertical-slash


def vertical_slash_blocks(vertical_blocks, slash_blocks, n_vertical, n_slash, diag, partial):
    """3) A vertical-slash head's blocks: its top n_vertical key-block columns and n_slash block diagonals (the sink
    column and diagonal 0 always among them), plus every block crossing the causal boundary: the diagonal, two
    blocks per row when Nk - Nq is not a multiple of bs (each query keeps its own key block).
    (B, Hq, nkb) masses, (B, Hq) counts, diag (nqb,), partial (nqb, nkb) -> (B, Hq, nqb, nkb) bool."""
    vertical_blocks, slash_blocks = vertical_blocks.clone(), slash_blocks.clone()
    vertical_blocks[..., 0] = float("inf")
    slash_blocks[..., 0] = float("inf")
    cols = _top_mask(vertical_blocks, n_vertical)             # (B, Hq, nkb)
    diags = _top_mask(slash_blocks, n_slash)                  # (B, Hq, nkb), by block-diagonal offset
    nkb = cols.shape[-1]
    offset = (diag[:, None] - torch.arange(nkb, device=diag.device)).clamp(min=0)   # (nqb, nkb)
    return cols[:, :, None, :] | diags[:, :, offset] | partial


# Eager in select_blocks_fast too (a graph break; so are the pooled means): a random-looking head's pooled scores are
# nearly flat, and compiled code (other sum orders, Triton's exp) moves them by ~1e-7, enough to swap blocks at the
# gamma boundary; ATen's kernels on the same inputs keep the reference's blocks bit for bit
@torch.compiler.disable
def query_aware_blocks(q, k_pool, visible, gamma, bs):
    """4) A query-aware head's blocks: pooled (query block x key block) scores, a softmax per row, one global sort,
    and the top blocks covering gamma of the total mass (nqb: each row sums to 1).
    q (B, Hq, Nq, D), k_pool (B, Hkv, nkb, D), visible (nqb, nkb) -> (B, Hq, nqb, nkb) bool."""
    (B, Hq, _, D), (_, Hkv, nkb, _) = q.shape, k_pool.shape
    q_pool = _block_mean(q, bs) * D**-0.5                     # (B, Hq, nqb, D)
    nqb = q_pool.shape[2]
    a = (q_pool.reshape(B, Hkv, -1, D) @ k_pool.transpose(-1, -2)).view(B, Hq, nqb, nkb)
    a = a.masked_fill(~visible, float("-inf")).softmax(-1).flatten(2)   # (B, Hq, nqb*nkb)
    a, order = a.sort(-1, descending=True)                    # the one big sort: 1M per head at 128k
    # fp64 running sum: fp32 over 1M blocks drifts by ~1e-4, next to blocks of ~1e-3 at the boundary, and the fast
    # path sums in another order; fp64 leaves only ties of the fp32 scores themselves to flip a block
    return _scatter_mask(order, a.cumsum(-1, dtype=torch.float64) <= gamma * nqb).view(B, Hq, nqb, nkb)


@torch.no_grad()
def probe_lines(q, k, cfg=FlexPrefillConfig(), fused=False):
    """1) The probe and the vertical-slash budgets: the true attention of the last block_size queries per key block
    (vertical) and per block diagonal (slash), the probe queries' mean, and how many key-block columns and block
    diagonals would cover gamma of it (line_budgets). Cheap next to the rest of the selection."""
    bs = cfg.block_size
    _check_inputs(q, k, k, bs)
    Nq, Nk = q.shape[2], k.shape[2]
    if Nq < bs:
        raise ValueError(f"select_blocks needs at least block_size={bs} queries for the probe, got {Nq}")
    vertical, slash, q_probe = (_probe_fused if fused else _probe)(q, k, bs)
    n_vertical, n_slash = line_budgets(vertical, slash, cfg, _cdiv(Nk, bs))
    # distance d as seen from the last query, which sits (-Nk) % bs slots before its block's end, falls
    # in block diagonal (d + (-Nk) % bs) // bs
    return dict(vertical=_block_sum(vertical, bs), slash=_block_sum(slash, bs, pad_left=(-Nk) % bs),
                q_probe=q_probe, n_vertical=n_vertical, n_slash=n_slash)


@torch.no_grad()
def estimate_density(q, k, cfg=FlexPrefillConfig(), n=16):
    """A cheap look before the selection: the share of key blocks it takes to cover gamma of the last n queries'
    mean attention, averaged over heads. Flat attention (it needs most blocks) is kept about as densely by either
    kind of head, since a query-aware head's pooled estimate matches it; select_blocks' density is the exact figure.
    n queries instead of the probe's block_size: ~30x fewer scores; and the blocks are sorted, not the keys (nb values
    a head, not Nk: 256 instead of 32,768 at 32k), so a dense-looking input pays little before dense SDPA runs."""
    (B, Hq, Nq, D), (_, Hkv, Nk, _) = q.shape, k.shape
    n = min(n, Nq)
    s = (q[:, :, -n:].reshape(B, Hkv, -1, D) @ k.transpose(-1, -2)).view(B, Hq, n, Nk) * D**-0.5
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(Nk - n, Nk, device=q.device)[None, :]
    s[..., Nk - n:].masked_fill_(j > Nk - n + i, float("-inf"))   # the causal corner of the last n queries
    mass = _block_sum(s.softmax(-1, dtype=torch.float32).mean(2), cfg.block_size)   # (B, Hq, nb)
    return (_cover_count(mass, cfg.gamma).float() / mass.shape[-1]).mean()


@torch.no_grad()
def select_from_probe(q, k, probe, cfg=FlexPrefillConfig()):
    """2)-4) of select_blocks, after probe_lines."""
    bs = cfg.block_size
    Nq, Nk = q.shape[2], k.shape[2]
    visible, partial, diag = _block_geometry(Nq, Nk, bs, q.device)
    vertical, slash = probe["vertical"], probe["slash"]
    # 2) the pattern; a query-aware head still keeps a min_budget vertical-slash set (as the authors' code)
    k_pool = _block_mean(k, bs)                               # (B, Hkv, nkb, D) fp32
    js, query_aware = js_test(probe["q_probe"], k_pool, vertical, cfg.tau)
    least = max(1, _cdiv(cfg.min_budget or 1, bs))
    n_vertical = torch.where(query_aware, least, probe["n_vertical"])
    n_slash = torch.where(query_aware, least, probe["n_slash"])
    # 3) + 4): computed for every head; the query-aware blocks are used where the head is query-aware
    sel = vertical_slash_blocks(vertical, slash, n_vertical, n_slash, diag, partial)
    qa = query_aware_blocks(q, k_pool, visible, cfg.gamma, bs)
    sel = (sel | (qa & query_aware[..., None, None])) & visible
    n_blocks = sel.sum((-2, -1))
    info = dict(query_aware=query_aware, js=js, n_vertical=n_vertical, n_slash=n_slash,
                n_blocks=n_blocks, density=n_blocks / visible.sum())
    return sel, info


def select_blocks(q, k, cfg=FlexPrefillConfig()):
    """FlexPrefill's block selection, the four steps above in order. q (B, Hq, Nq, D), k (B, Hkv, Nk, D),
    Nq >= block_size. Returns sel, a bool (B, Hq, ceil(Nq/bs), ceil(Nk/bs)) grid of kept blocks (always causal),
    and an info dict of (B, Hq) tensors: query_aware, js, n_vertical, n_slash, n_blocks, density."""
    return select_from_probe(q, k, probe_lines(q, k, cfg), cfg)


def _select_fused(q, k, cfg):
    return select_from_probe(q, k, probe_lines(q, k, cfg, fused=True), cfg)


@functools.cache
def _compiled(fn):
    """fn compiled once per process, shapes static (a new shape or cfg recompiles, a new value does not)."""
    return torch.compile(fn, dynamic=False)


@torch._dynamo.config.patch(recompile_limit=64)   # as _flex: one graph per (Nq, Nk), heads, dtype, device
def _call_compiled(fn, *args):
    return _compiled(fn)(*args)


def _is_fast(cfg, device):
    return device.type == "cuda" if cfg.fast is None else cfg.fast


def select_blocks_fast(q, k, cfg=FlexPrefillConfig()):
    """select_blocks compiled, with the fused probe (_probe_fused): a few fused kernels. Same arguments and results."""
    _check_inputs(q, k, k, cfg.block_size)
    return _call_compiled(_select_fused, q, k, cfg)


# FlexPrefill that is rarely much slower than dense SDPA on an H100 (tools/bench_flexprefill.py measures it), the
# model's default (enable_flexprefill). dense_above=0.4: FlexAttention costs ~1.5x cuDNN's dense SDPA per visible
# block (on an H100 at 32k: 3.8 ms at density 0.2 vs 12 ms dense) and the compiled selection ~0.05-0.15x dense on
# top, so above ~0.4-0.5 kept the sparse path cannot win. dense_below=16384: at 8k dense SDPA takes 0.8 ms, less
# than the selection.
GUARDED = FlexPrefillConfig(dense_above=0.4, dense_below=16384)


def generate_causal_mask(offset):
    """mask_mod for queries that are the last positions of the sequence: query i sits at offset + i.
    offset is a 0-dim tensor: a captured tensor is not guarded by dynamo, so a new offset never recompiles."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx
    return causal


def _ordered(mask):
    """(..., n) bool -> (count, indices) int32 in from_kv_blocks' format: the selected columns first, in
    ascending order, then padding. Cumsum + scatter instead of an argsort of the whole grid."""
    n = mask.shape[-1]
    count = mask.sum(-1, dtype=torch.int32)
    slot = torch.where(mask, mask.cumsum(-1) - 1, n)          # unselected columns go to a spare slot n
    cols = torch.arange(n, dtype=torch.int32, device=mask.device).expand(mask.shape)
    idx = torch.zeros(*mask.shape[:-1], n + 1, dtype=torch.int32, device=mask.device)
    return count, idx.scatter_(-1, slot, cols)[..., :n].contiguous()


def _kv_blocks(sel, q_len, kv_len, block_size):
    """from_kv_blocks' four index tensors: the partial blocks (crossing the causal boundary) and the full ones."""
    visible, partial, _ = _block_geometry(q_len, kv_len, block_size, sel.device)
    return *_ordered(sel & partial), *_ordered(sel & visible & ~partial)


def block_mask_from_selection(sel, q_len, kv_len, block_size=128, fast=False):
    """BlockMask for a (B, H, nqb, nkb) block selection. Blocks crossing the causal boundary are partial
    (causal mask_mod applied), visible blocks below it are full (no mask_mod), invisible ones are dropped.
    fast: the index tensors through torch.compile (a few fused kernels instead of ~20 small ones)."""
    args = (sel, q_len, kv_len, block_size)
    kv_num, kv_idx, full_num, full_idx = _call_compiled(_kv_blocks, *args) if fast else _kv_blocks(*args)
    offset = torch.full((), kv_len - q_len, dtype=torch.int32, device=sel.device)  # a fill, not a host copy
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=generate_causal_mask(offset), seq_lengths=(q_len, kv_len),
                                    compute_q_blocks=False)  # forward only: skip the transposed metadata


def sparse_attention(q, k, v, sel, block_size=128, backend="auto", fast=False):
    """Causal attention restricted to the selected blocks. backend: "flex" (compiled FlexAttention),
    "dense" (SDPA with an Nq x Nk token mask: the reference, O(N^2) memory) or "auto" (flex on CUDA)."""
    _check_inputs(q, k, v, block_size)
    (B, Hq, Nq, _), Nk = q.shape, k.shape[2]
    grid = (B, Hq, _cdiv(Nq, block_size), _cdiv(Nk, block_size))
    if tuple(sel.shape) != grid:
        raise ValueError(f"selection shape {tuple(sel.shape)} does not match the block grid {grid}")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "dense"
    gqa = Hq != k.shape[1]
    if backend == "flex":
        block_mask = block_mask_from_selection(sel, Nq, Nk, block_size, fast)
        return _flex(q, k, v, block_mask, gqa)
    if backend == "dense":
        mask = sel.repeat_interleave(block_size, 2)[:, :, :Nq].repeat_interleave(block_size, 3)[..., :Nk]
        causal = torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq) >= torch.arange(Nk, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask & causal, enable_gqa=gqa)
    raise ValueError(f"unknown backend {backend!r}, expected 'auto', 'flex' or 'dense'")


def flexprefill_attention(q, k, v, cfg=FlexPrefillConfig(), return_info=False):
    """FlexPrefill causal attention. q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) with Hq % Hkv == 0 (q head j
    reads kv head j // (Hq // Hkv)) and Nq <= Nk (queries are the last Nq positions). Returns (B, Hq, Nq, D),
    and with return_info also the info dict of select_blocks (plus dense_fallback and estimated_density). Dense
    causal SDPA runs instead for short inputs (Nk at most max(2 blocks, min_budget rounded up to blocks), as the
    authors, and Nk < cfg.dense_below), for Nq <= block_size, and when sparse attention cannot win
    (cfg.dense_above: first estimate_density, then the selection's density; one host sync each)."""
    bs = cfg.block_size
    _check_inputs(q, k, v, bs)
    Nq, Nk = q.shape[2], k.shape[2]
    sel = None
    if Nk <= max(2 * bs, _cdiv(cfg.min_budget or 1, bs) * bs) or Nk < cfg.dense_below or Nq <= bs:
        info = dict()
    else:
        fast = _is_fast(cfg, q.device)
        estimate = functools.partial(_call_compiled, estimate_density) if fast else estimate_density
        info = dict(estimated_density=estimate(q, k, cfg) if cfg.dense_above is not None else None)
        if cfg.dense_above is None or float(info["estimated_density"]) <= cfg.dense_above:
            sel, more = (select_blocks_fast if fast else select_blocks)(q, k, cfg)
            info.update(more)
            if cfg.dense_above is not None and float(more["density"].float().mean()) > cfg.dense_above:
                sel = None
    info["dense_fallback"] = sel is None
    fast_mask = _is_fast(cfg, q.device)
    out = causal_attention(q, k, v) if sel is None else sparse_attention(q, k, v, sel, bs, cfg.backend, fast_mask)
    return (out, info) if return_info else out


class FlexPrefill:
    """FlexPrefill as a model's attention function (enable_flexprefill): chunks of at least cfg.min_len new tokens
    go through flexprefill_attention, shorter ones stay dense (selection costs more than it saves there)."""

    def __init__(self, cfg=FlexPrefillConfig()):
        self.cfg = cfg

    def __call__(self, q, k, v):
        if q.shape[2] < self.cfg.min_len:
            return causal_attention(q, k, v)
        return flexprefill_attention(q, k, v, self.cfg)


def enable_flexprefill(model, cfg=GUARDED):
    """Block-sparse prefill in a model.VLM: its prompts and prefill chunks of at least cfg.min_len tokens go through
    FlexPrefill; decode steps and shorter chunks stay dense, and so do chunks where sparse attention cannot win
    (GUARDED's dense_above / dense_below; pass FlexPrefillConfig() for the authors' method). Returns the model."""
    return model.use_attention(FlexPrefill(cfg))


def demo():
    """Two toy heads on the CPU: one with a strong key column (vertical-slash), one plain random (query-aware)."""
    torch.manual_seed(0)
    B, Hq, Hkv, N, D, bs = 1, 2, 1, 2048, 64, 128
    q, k, v = 0.5 * torch.randn(B, Hq, N, D), 0.5 * torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    q[:, 0, :, 0] += 10.0
    k[:, :, 700, 0] += 10.0                                   # key 700 (block 5) stands out for head 0
    sel, info = select_blocks(q, k, FlexPrefillConfig(min_budget=2 * bs, block_size=bs))
    out = sparse_attention(q, k, v, sel, bs)
    err = (out - causal_attention(q, k, v)).abs().max().item()
    for h in range(Hq):
        print(f"head {h}: {'query-aware' if info['query_aware'][0, h] else 'vertical-slash'}, "
              f"js {info['js'][0, h]:.3f}, density {info['density'][0, h]:.2f}")
        print("\n".join("  " + "".join("#" if x else "." for x in row) for row in sel[0, h].tolist()))
    print(f"max |sparse - dense| = {err:.4f} (not 0 by design: a head may leave out 1 - gamma of its attention mass)")


if __name__ == "__main__":
    argparse.ArgumentParser(description="FlexPrefill on two toy heads, on the CPU: which blocks each head keeps "
                            "('#') and how far the sparse output is from dense attention. No options.").parse_args()
    demo()
