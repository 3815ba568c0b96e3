"""
Tests for flexprefill.py: the fast selection against a slow, obvious one; planted patterns; sparse attention
against dense attention; the BlockMask against the selection. CPU, 20-30 s on 2 cores (the compiled flex
test compiles for ~15 s on a cold inductor cache).

    python -m pytest tests/test_flexprefill.py -q

Tolerances: fp32 outputs must match an fp64 reference to 1e-5 (the same math in a different order); bf16
outputs are compared with the fp64 reference on the same bf16 inputs to 2e-2 (bf16 has 8 mantissa bits,
about 4e-3 relative per rounding, and attention rounds q.k, the probabilities and the output).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from flexprefill import (GUARDED, FlexPrefillConfig, _probe, _probe_fused, block_mask_from_selection,
                         enable_flexprefill, flexprefill_attention, select_blocks, select_blocks_fast, sparse_attention)
from model import causal_attention

FP32_TOL, BF16_TOL = 1e-5, 2e-2


def assert_close(a, b, tol, what=""):
    diff = (a.float() - b.float()).abs()
    assert diff.max() <= tol, f"{what} max diff {diff.max():.2e} mean {diff.mean():.2e} > tol {tol:.0e}"


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def attention_reference(q, k, v, sel, bs):
    """Masked softmax attention written out in fp64, one head at a time. sel=None means dense causal."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, Nq, D, dtype=torch.float64)
    pos = torch.arange(Nq) + Nk - Nq                       # absolute position of each query
    for b in range(B):
        for h in range(Hq):
            kvh = h // (Hq // Hkv)
            mask = pos[:, None] >= torch.arange(Nk)[None, :]
            if sel is not None:
                mask &= sel[b, h][torch.arange(Nq) // bs][:, torch.arange(Nk) // bs]
            s = q[b, h].double() @ k[b, kvh].double().T / math.sqrt(D)
            out[b, h] = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v[b, kvh].double()
    return out


def reference_select(q, k, gamma, tau, min_budget, max_budget, bs):
    """FlexPrefill's selection as plainly as possible: one head at a time, Python loops, dense tensors."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g, offset = Hq // Hkv, Nk - Nq
    nqb, nkb = math.ceil(Nq / bs), math.ceil(Nk / bs)
    min_blocks = max(1, math.ceil(min_budget / bs))
    max_blocks = nkb if max_budget is None else min(math.ceil(max_budget / bs), nkb)
    sel = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool)
    query_aware = torch.zeros(B, Hq, dtype=torch.bool)
    js_all = torch.zeros(B, Hq)

    def cover_count(x):  # fewest largest entries whose running sum passes gamma
        return int((x.sort(descending=True).values.cumsum(0) <= gamma).sum()) + 1

    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // g]
            # probe: the last bs queries (positions Nk-bs .. Nk-1) against every key they can see
            s = (q[b, h, -bs:] * D**-0.5) @ kh.T              # (bs, Nk)
            for i in range(bs):
                s[i, Nk - bs + i + 1:] = float("-inf")
            p = s.softmax(-1, dtype=torch.float32)
            vertical = p.mean(0)                                # per key
            slash = torch.zeros(Nk)                             # per distance query - key
            for i in range(bs):
                qpos = Nk - bs + i
                slash[qpos - torch.arange(qpos + 1)] += p[i, :qpos + 1]
            slash /= bs
            n_v = min(max(cover_count(vertical) // bs + 1, min_blocks), max_blocks)
            n_s = min(max(cover_count(slash) // bs + 1, min_blocks), max_blocks)
            # per key block, and per block diagonal counted from the last query's key block
            pad = (-Nk) % bs
            vert_blk = torch.stack([vertical[c * bs:(c + 1) * bs].sum() for c in range(nkb)])
            slash_blk = torch.stack([slash[max(0, o * bs - pad):(o + 1) * bs - pad].sum() for o in range(nkb)])
            # estimate from pooled q and k, sqrt-JS against the probe's block distribution
            k_pool = torch.stack([kh[c * bs:(c + 1) * bs].float().mean(0) for c in range(nkb)])
            est = (k_pool @ (q[b, h, -bs:] * D**-0.5).float().mean(0)).softmax(-1)
            m = (est + vert_blk) / 2
            js = (0.5 * (est * (est / m).log()).sum() + 0.5 * (vert_blk * (vert_blk / m).log()).sum()).sqrt()
            js_all[b, h] = js
            is_qa = bool(js < tau)
            query_aware[b, h] = is_qa
            if is_qa:
                n_v = n_s = min_blocks
            vert_blk[0] = slash_blk[0] = float("inf")           # sink column and diagonal 0 always in
            cols = set(vert_blk.argsort(descending=True, stable=True)[:n_v].tolist())
            diags = set(slash_blk.argsort(descending=True, stable=True)[:n_s].tolist())
            for r in range(nqb):
                first, last = offset + r * bs, min(offset + (r + 1) * bs, Nk) - 1
                for c in range(nkb):
                    if c * bs > last:
                        continue                                # block entirely in the future
                    crosses_causal_boundary = (c + 1) * bs - 1 > first
                    if c in cols or (last // bs - c) in diags or crosses_causal_boundary:
                        sel[b, h, r, c] = True
            if is_qa:
                q_pool = torch.stack([q[b, h, r * bs:(r + 1) * bs].float().mean(0) for r in range(nqb)])
                a = (q_pool * D**-0.5) @ k_pool.T               # (nqb, nkb)
                for r in range(nqb):
                    last = min(offset + (r + 1) * bs, Nk) - 1
                    a[r, last // bs + 1:] = float("-inf")
                a = a.softmax(-1).flatten()
                values, order = a.sort(descending=True)
                csum = values.cumsum(0)
                for rank in range(len(order)):
                    if csum[rank] <= gamma * nqb:
                        idx = int(order[rank])
                        sel[b, h, idx // nkb, idx % nkb] = True
    return sel, query_aware, js_all


def visible_blocks(Nq, Nk, bs):
    r, c = torch.arange(math.ceil(Nq / bs)), torch.arange(math.ceil(Nk / bs))
    last = (Nk - Nq + (r + 1) * bs).clamp(max=Nk) - 1
    return c[None, :] * bs <= last[:, None]


# ------------------------------------------------------------------------------------------------
# the fast selection equals the slow one

@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,bs,min_budget,max_budget", [
    (2, 4, 2, 1000, 1000, 32, 32, 64, None),     # not a multiple of the block
    (1, 4, 4, 1024, 1024, 32, 32, 32, None),
    (1, 2, 1, 1025, 1025, 16, 64, 64, 256),      # one token into a new block, max_budget binds
    (1, 4, 2, 300, 1000, 32, 32, 64, None),      # Nq < Nk, offset 700 not a multiple of 32
    (1, 4, 1, 256, 1024, 16, 32, 64, None),      # Nq < Nk, aligned offset
    (1, 28, 4, 512, 512, 16, 32, 32, None),      # Qwen2.5-VL-7B GQA
    (1, 16, 2, 400, 640, 16, 32, 64, None),      # GQA 16/2 with Nq < Nk
    (1, 2, 1, 4097, 4097, 16, 128, 1024, None),  # the default block size and budget
])
def test_select_matches_reference(B, Hq, Hkv, Nq, Nk, D, bs, min_budget, max_budget):
    q, k = randn(B, Hq, Nq, D, seed=1), randn(B, Hkv, Nk, D, seed=2)
    q[..., 0] += 2.0           # a shared direction so the attention is not flat (more varied budgets)
    k[..., 0] += torch.linspace(0, 3, Nk)
    gamma = 0.9
    _, _, js_ref = reference_select(q, k, gamma, 0.0, min_budget, max_budget, bs)
    _, info = select_blocks(q, k, FlexPrefillConfig(gamma, 0.0, min_budget, max_budget, bs))
    assert_close(info["js"], js_ref, 1e-4, "sqrt-JS")
    # tau halfway between two heads' divergences, so both patterns occur and no head sits on the threshold
    js_sorted = js_ref.flatten().sort().values
    mid = len(js_sorted) // 2
    tau = float(js_sorted[mid - 1] + js_sorted[mid]) / 2
    sel_ref, qa_ref, _ = reference_select(q, k, gamma, tau, min_budget, max_budget, bs)
    sel, info = select_blocks(q, k, FlexPrefillConfig(gamma, tau, min_budget, max_budget, bs))
    assert qa_ref.any() and not qa_ref.all()
    assert torch.equal(info["query_aware"], qa_ref)
    assert torch.equal(sel, sel_ref), f"{(sel != sel_ref).sum()} blocks differ"
    assert not sel.all(), "a selection that keeps everything tests nothing"
    assert torch.equal(info["n_blocks"], sel.sum((-1, -2)))


# ------------------------------------------------------------------------------------------------
# planted patterns: the right pattern and the right blocks

def planted(Nk=1024, D=64, seed=0):
    """Three heads sharing nothing: a strong key column, a strong diagonal, a block-structured head."""
    bs, g = 64, torch.Generator().manual_seed(seed)
    q, k = 0.3 * torch.randn(1, 3, Nk, D, generator=g), 0.3 * torch.randn(1, 3, Nk, D, generator=g)
    # head 0: every query looks at key 300 (key block 4)
    q[0, 0, :, 0] += 10.0
    k[0, 0, 300, 0] += 10.0
    # head 1: query at position i looks at the key at i - 192 (distance 192: block diagonal 3)
    r = F.normalize(torch.randn(Nk, D, generator=g), dim=-1)
    k[0, 1] += 10.0 * r
    q[0, 1, 192:] += 10.0 * r[:-192]
    # head 2: query block i looks at key block i // 2 as a whole (a block code shared by the block)
    codes = F.normalize(torch.randn(Nk // bs, D, generator=g), dim=-1)
    blk = torch.arange(Nk) // bs
    k[0, 2] += 8.0 * codes[blk]
    q[0, 2] += 8.0 * codes[blk // 2]
    return q, k, bs


def test_planted_patterns():
    q, k, bs = planted()
    # min_budget of 2 blocks: with one, the forced sink column (diagonal) would take the only slot
    sel, info = select_blocks(q, k, FlexPrefillConfig(gamma=0.9, tau=0.1, min_budget=2 * bs, block_size=bs))
    sel_ref, qa_ref, _ = reference_select(q, k, 0.9, 0.1, 2 * bs, None, bs)
    assert torch.equal(sel, sel_ref) and torch.equal(info["query_aware"], qa_ref)
    assert info["query_aware"].tolist() == [[False, False, True]], info["js"]
    nb = sel.shape[-1]
    rows = torch.arange(nb)
    # every head: sink column and diagonal
    assert sel[0, :, :, 0].all() and sel[0, :, rows, rows].all()
    # head 0: the column of key 300 in every row that can see it, and little else
    assert sel[0, 0, 4:, 4].all() and info["density"][0, 0] < 0.4
    # head 1: block diagonal 3 in every row that has it, and little else
    assert sel[0, 1, rows[3:], rows[3:] - 3].all() and info["density"][0, 1] < 0.4
    # head 2: block (i, i // 2) in every row
    assert sel[0, 2, rows, rows // 2].all()


# ------------------------------------------------------------------------------------------------
# the fast (compiled) selection against the eager reference

def fast_cases():
    """Random with a shared direction (both patterns at a mid tau), the planted heads, and Nq < Nk (offset 700)."""
    q, k = randn(1, 8, 1000, 32, seed=1), randn(1, 2, 1000, 32, seed=2)
    q[..., 0] += 2.0
    k[..., 0] += torch.linspace(0, 3, 1000)
    yield "random", q, k, FlexPrefillConfig(tau=0.119, min_budget=64, block_size=32)   # 5 of 8 heads QA
    q, k, bs = planted()
    yield "planted", q, k, FlexPrefillConfig(min_budget=2 * bs, block_size=bs)
    yield "Nq < Nk", randn(1, 4, 300, 32, seed=3), randn(1, 2, 1000, 32, seed=4), FlexPrefillConfig(
        min_budget=64, block_size=32, tau=0.099)   # tau: 2 of 4 heads query-aware, none within 5e-4


def test_fused_probe_matches_probe():
    """The fused probe computes the same sums in a different order: equal to fp32 rounding (1e-6 of a sum of 1)."""
    for name, q, k, cfg in fast_cases():
        for a, b in zip(_probe(q, k, cfg.block_size), _probe_fused(q, k, cfg.block_size)):
            assert_close(a, b, 1e-6, name)


def test_fast_selection_is_the_reference_selection():
    """select_blocks_fast (compiled, CPU inductor) keeps exactly the reference's blocks and head patterns. Exact
    equality holds here because no decision of these inputs sits within fp32 rounding (~1e-7) of its threshold:
    the sums differ by that much (test above), so a cover count or top-k exactly on a tie could flip on other
    inputs; the GPU benchmark reports any differing blocks (sel_diff)."""
    for name, q, k, cfg in fast_cases():
        sel, info = select_blocks(q, k, cfg)
        sel_fast, info_fast = select_blocks_fast(q, k, cfg)
        assert 0 < info["density"].mean() < 1, name
        assert torch.equal(sel_fast, sel), f"{name}: {(sel_fast != sel).sum()} blocks differ"
        for key in ("query_aware", "n_vertical", "n_slash", "n_blocks"):
            assert torch.equal(info_fast[key], info[key]), (name, key)
        assert_close(info_fast["js"], info["js"], 1e-5, name)
        assert name == "planted" or info["query_aware"].any() and not info["query_aware"].all()   # both patterns


def test_fast_flexprefill_matches_eager():
    """flexprefill_attention with fast=True (compiled selection, estimate and BlockMask indices) gives the eager
    path's output and info, and the compiled BlockMask indices are the eager ones."""
    q, k, v = randn(1, 4, 1000, 32, seed=1), randn(1, 2, 1000, 32, seed=2), randn(1, 2, 1000, 32, seed=3)
    cfg = FlexPrefillConfig(min_budget=64, block_size=32, dense_above=0.9)
    out, info = flexprefill_attention(q, k, v, cfg, return_info=True)
    out_fast, info_fast = flexprefill_attention(q, k, v, FlexPrefillConfig(**{**vars(cfg), "fast": True}),
                                                return_info=True)
    assert not info["dense_fallback"] and torch.equal(out_fast, out)
    assert torch.equal(info_fast["n_blocks"], info["n_blocks"])
    assert abs(float(info_fast["estimated_density"]) - float(info["estimated_density"])) < 1e-6
    sel, _ = select_blocks(q, k, cfg)
    a, b = block_mask_from_selection(sel, 1000, 1000, 32), block_mask_from_selection(sel, 1000, 1000, 32, fast=True)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_dense_looking_inputs_run_dense_sdpa():
    """Random q/k: every head's probe attention is flat, so the lines covering gamma of it span most key blocks;
    the cheap estimate alone sends the input to dense SDPA (no selection). Planted heads stay sparse."""
    bs = 64
    q, k, v = randn(1, 4, 2048, 64, seed=1), randn(1, 2, 2048, 64, seed=2), randn(1, 2, 2048, 64, seed=3)
    cfg = FlexPrefillConfig(min_budget=bs, block_size=bs, dense_above=GUARDED.dense_above)
    out, info = flexprefill_attention(q, k, v, cfg, return_info=True)
    assert info["dense_fallback"] and info["estimated_density"] > cfg.dense_above and "density" not in info
    assert torch.equal(out, causal_attention(q, k, v))
    # the exact figure agrees: what the selection would keep is too dense to win
    assert select_blocks(q, k, cfg)[1]["density"].mean() > cfg.dense_above
    out, info = flexprefill_attention(q, k, v, FlexPrefillConfig(min_budget=bs, block_size=bs), return_info=True)
    assert not info["dense_fallback"]  # the authors' method (dense_above=None): always sparse
    qp, kp, bs = planted()
    _, info = flexprefill_attention(qp, kp, randn(1, 3, 1024, 64, seed=3),
                                    FlexPrefillConfig(min_budget=2 * bs, block_size=bs, dense_above=0.4),
                                    return_info=True)
    assert not info["dense_fallback"] and info["estimated_density"] <= 0.4
    # shorter than dense_below (GUARDED: 16k): dense SDPA at once, nothing estimated
    _, info = flexprefill_attention(qp, kp, randn(1, 3, 1024, 64, seed=3), FlexPrefillConfig(min_budget=2 * bs,
                                    block_size=bs, dense_above=0.4, dense_below=GUARDED.dense_below), return_info=True)
    assert info["dense_fallback"] and "estimated_density" not in info


def test_a_dense_selection_past_the_probe_runs_dense(monkeypatch):
    """The second check: the estimate let the input through, the selection itself came out too dense."""
    import flexprefill
    q, k, bs = planted()
    v = randn(1, 3, 1024, 64, seed=3)
    real = flexprefill.select_blocks

    def everything(q, k, cfg):  # the real selection's info, but every visible block kept
        sel, info = real(q, k, cfg)
        visible = flexprefill._block_geometry(q.shape[2], k.shape[2], cfg.block_size, q.device)[0]
        return sel | visible, dict(info, density=torch.ones_like(info["density"]))
    monkeypatch.setattr(flexprefill, "select_blocks", everything)
    out, info = flexprefill_attention(q, k, v, FlexPrefillConfig(min_budget=2 * bs, block_size=bs, dense_above=0.4),
                                      return_info=True)
    assert info["dense_fallback"] and "density" in info and torch.equal(out, causal_attention(q, k, v))


def test_every_query_keeps_its_own_block():
    """A sink-dominated head gets the minimum budget (1 column, 1 diagonal). With Nq < Nk and an offset
    that is not a multiple of the block, query blocks straddle two key blocks: both must stay."""
    bs, Nq, Nk = 64, 300, 1000                             # offset 700 = 10 * 64 + 60
    q, k = randn(1, 2, Nq, 32, seed=1), randn(1, 1, Nk, 32, seed=2)
    q[..., 0] += 10.0
    k[:, :, 0, 0] += 10.0                                  # every query puts ~all its attention on key 0
    sel, info = select_blocks(q, k, FlexPrefillConfig(min_budget=bs, block_size=bs))
    assert (info["n_vertical"] == 1).all() and (info["n_slash"] == 1).all()
    pos = torch.arange(Nq) + Nk - Nq
    assert sel[:, :, torch.arange(Nq) // bs, pos // bs].all()
    assert (sel.sum(-1) <= 3).all()                        # sink column + at most two local blocks


def test_planted_attention_is_accurate():
    """On planted heads the sparse output stays close to dense attention (the point of the method)."""
    q, k, bs = planted()
    v = randn(1, 3, 1024, 64, seed=3)
    out, info = flexprefill_attention(q, k, v, FlexPrefillConfig(min_budget=2 * bs, block_size=bs), return_info=True)
    assert not info["dense_fallback"] and info["density"].max() < 0.45
    # queries before key 300 (head 0) or position 192 (head 1) have no planted target: flat attention
    # that a few blocks cannot approximate, so only the queries that have one are checked
    # (the planted targets hold ~99% of the attention; random logit noise lets a few stray keys matter)
    diff = (out - causal_attention(q, k, v))[:, :, 320:].abs()
    assert diff.max() < 0.15 and diff.mean() < 0.01, (diff.max(), diff.mean())


# ------------------------------------------------------------------------------------------------
# sparse attention against dense attention

@pytest.mark.parametrize("Nq,Nk,Hq,Hkv,D", [(1000, 1000, 4, 2, 32), (1024, 1024, 4, 2, 32), (1025, 1025, 4, 2, 32),
                                             (4097, 4097, 2, 1, 16), (300, 1000, 4, 2, 32), (129, 4097, 2, 1, 16)])
def test_all_blocks_is_dense_causal(Nq, Nk, Hq, Hkv, D):
    q, k, v = randn(1, Hq, Nq, D, seed=1), randn(1, Hkv, Nk, D, seed=2), randn(1, Hkv, Nk, D, seed=3)
    dense = causal_attention(q, k, v)
    assert_close(dense[:, :1], attention_reference(q[:, :1], k[:, :1], v[:, :1], None, 128), FP32_TOL, "causal")
    sel = torch.ones(1, Hq, math.ceil(Nq / 128), math.ceil(Nk / 128), dtype=torch.bool)  # even invisible blocks
    assert_close(sparse_attention(q, k, v, sel, 128, "dense"), dense, FP32_TOL)
    # a min_budget covering every key block makes FlexPrefill select every visible block
    sel, info = select_blocks(q, k, FlexPrefillConfig(min_budget=Nk, block_size=64))
    assert torch.equal(sel[0, 0], visible_blocks(Nq, Nk, 64)) and (info["density"] == 1).all()
    assert_close(sparse_attention(q, k, v, sel, 64, "dense"), dense, FP32_TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("Nq,Nk", [(1025, 1025), (300, 1000)])
def test_sparse_matches_explicit_reference(dtype, tol, Nq, Nk):
    """The dense backend on a real (sparse) selection against fp64 attention written out head by head."""
    Hq, Hkv, D, bs = 4, 2, 32, 64
    q, k, v = (randn(1, Hq, Nq, D, seed=1, dtype=dtype), randn(1, Hkv, Nk, D, seed=2, dtype=dtype),
               randn(1, Hkv, Nk, D, seed=3, dtype=dtype))
    sel, _ = select_blocks(q, k, FlexPrefillConfig(min_budget=bs, block_size=bs))
    assert not sel.all()
    ref = attention_reference(q, k, v, sel, bs)
    assert_close(sparse_attention(q, k, v, sel, bs, "dense"), ref, tol, f"{dtype}")
    assert_close(causal_attention(q, k, v), attention_reference(q, k, v, None, bs), tol, "causal")


def test_short_inputs_fall_back_to_dense():
    q, k, v = randn(1, 4, 1000, 32, seed=1), randn(1, 2, 1000, 32, seed=2), randn(1, 2, 1000, 32, seed=3)
    out, info = flexprefill_attention(q, k, v, return_info=True)   # 1000 <= min_budget 1024
    assert info["dense_fallback"] and torch.equal(out, causal_attention(q, k, v))
    out, info = flexprefill_attention(q[:, :, -100:], k, v, FlexPrefillConfig(min_budget=128),  # Nq <= 128
                                      return_info=True)
    assert info["dense_fallback"] and torch.equal(out, causal_attention(q[:, :, -100:], k, v))


# ------------------------------------------------------------------------------------------------
# the BlockMask and the flex backend

@pytest.mark.parametrize("Nq,Nk", [(1000, 1000), (1025, 1025), (300, 1000), (256, 1024)])
def test_block_mask_matches_selection(Nq, Nk):
    bs = 128
    g = torch.Generator().manual_seed(0)
    sel = torch.rand(2, 3, math.ceil(Nq / bs), math.ceil(Nk / bs), generator=g) < 0.5
    bm = block_mask_from_selection(sel, Nq, Nk, bs)
    visible = visible_blocks(Nq, Nk, bs)
    assert torch.equal(bm.to_dense().bool(), sel & visible)
    assert bm.shape == (2, 3, Nq, Nk)
    # full blocks (no mask_mod) must be entirely visible: every key <= every query's position
    full = torch.zeros_like(sel)
    for b, h, r in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(sel.shape[2])).tolist():
        full[b, h, r, bm.full_kv_indices[b, h, r, :bm.full_kv_num_blocks[b, h, r]].long()] = True
    first_query = Nk - Nq + torch.arange(sel.shape[2]) * bs
    last_key = (torch.arange(sel.shape[3]) + 1) * bs - 1
    assert not (full & (last_key[None, :] > first_query[:, None])).any()


def test_flex_backend_matches_dense_on_cpu():
    """Compiled flex_attention on CPU (inductor's C++ template) against the dense backend, small shapes."""
    Hq, Hkv, D, bs = 4, 2, 16, 128
    for Nq, Nk in [(1000, 1000), (300, 1000)]:
        q, k, v = randn(1, Hq, Nq, D, seed=1), randn(1, Hkv, Nk, D, seed=2), randn(1, Hkv, Nk, D, seed=3)
        sel, _ = select_blocks(q, k, FlexPrefillConfig(min_budget=bs, block_size=bs))
        assert not sel.all()
        dense = sparse_attention(q, k, v, sel, bs, "dense")
        assert_close(sparse_attention(q, k, v, sel, bs, "flex"), dense, FP32_TOL, f"flex {Nq}x{Nk}")
        # a new selection with the same shapes must reuse the compiled kernel
        with torch.compiler.set_stance("fail_on_recompile"):
            sel2 = sel | (torch.rand(sel.shape, generator=torch.Generator().manual_seed(0)) < 0.3)
            out2 = sparse_attention(q, k, v, sel2, bs, "flex")
        assert_close(out2, sparse_attention(q, k, v, sel2, bs, "dense"), FP32_TOL, "flex, second selection")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for compiled flex_attention on GPU")
@pytest.mark.parametrize("Nq,Nk", [(4097, 4097), (1500, 4097)])
def test_flex_cuda_bf16_qwen_shape(Nq, Nk):
    dev, bs = "cuda", 128
    q = randn(1, 28, Nq, 128, seed=1, dtype=torch.bfloat16).to(dev)
    k, v = (randn(1, 4, Nk, 128, seed=s, dtype=torch.bfloat16).to(dev) for s in (2, 3))
    sel, _ = select_blocks(q, k, FlexPrefillConfig(min_budget=bs))
    assert not sel.all()
    flex = sparse_attention(q, k, v, sel, bs, "flex")
    assert_close(flex, sparse_attention(q, k, v, sel, bs, "dense"), BF16_TOL, "flex vs dense on CUDA")
    # auto -> flex on CUDA
    out, info = flexprefill_attention(q, k, v, FlexPrefillConfig(min_budget=bs), return_info=True)
    assert not info["dense_fallback"]
    assert_close(out, flex, BF16_TOL, "flexprefill_attention vs flex backend")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", ["random_inputs", "planted_inputs"])
def test_fast_selection_is_the_reference_selection_cuda(make):
    """The benchmark's inputs at 8k, Qwen2.5-VL-7B's heads, bf16 on the GPU: the compiled selection (Triton kernels,
    other summation orders than cuBLAS/ATen's) keeps exactly the reference's blocks and head patterns."""
    import tools.bench_flexprefill as bench
    q, k, _ = getattr(bench, make)(8192, 28, 4, 128, torch.Generator().manual_seed(0))
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    cfg = FlexPrefillConfig()
    (sel, info), (sel_fast, info_fast) = select_blocks(q, k, cfg), select_blocks_fast(q, k, cfg)
    assert torch.equal(info_fast["query_aware"], info["query_aware"]), (info["js"], info_fast["js"])
    heads = (sel_fast != sel).flatten(2).any(-1).nonzero().tolist()
    assert not heads, f"{(sel_fast != sel).sum()} blocks differ, in (batch, head) {heads}"


# ------------------------------------------------------------------------------------------------
# bad inputs

def test_bad_inputs_raise():
    q, k = randn(1, 4, 256, 16), randn(1, 2, 512, 16)
    with pytest.raises(ValueError, match="multiple"):
        flexprefill_attention(randn(1, 3, 256, 16), k, k)
    with pytest.raises(ValueError, match="Nq"):
        flexprefill_attention(randn(1, 4, 600, 16), k, k)
    with pytest.raises(ValueError, match="mismatch"):
        flexprefill_attention(q, k, randn(1, 2, 500, 16))
    with pytest.raises(ValueError, match="mismatch"):
        flexprefill_attention(randn(1, 4, 256, 32), k, k)
    with pytest.raises(ValueError, match="4-D"):
        flexprefill_attention(q[0], k, k)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, k, k, torch.ones(1, 4, 2, 4, dtype=torch.bool), 128, "triton")
    with pytest.raises(ValueError, match="grid"):
        sparse_attention(q, k, k, torch.ones(1, 4, 2, 2, dtype=torch.bool), 128)


def test_wired_into_the_model_prefill():
    """flexprefill.enable_flexprefill: long prefill chunks go through FlexPrefill; with every block kept the logits
    equal the dense model's, a sparse selection changes them, and decode stays dense."""
    from cache import KVCache
    from model import PRESETS, VLM
    cfg = PRESETS["tiny"](vocab_size=128)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 64, 128
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.mrope_section = 4, 2, [2, 3, 3]
    model = VLM(cfg).init_weights(std=0.3).eval()
    ids = torch.randint(0, 100, (1, 300))
    with torch.no_grad():
        dense = model(ids)
        # a budget that covers every block
        enable_flexprefill(model, FlexPrefillConfig(min_len=64, block_size=16, min_budget=10**6))
        every = model(ids)
        enable_flexprefill(model, FlexPrefillConfig(min_len=64, block_size=16, min_budget=16, gamma=0.3))
        sparse = model(ids)
        cache = KVCache(cfg, 1, 301, "cpu", torch.float32)  # prefill sparse, then one dense decode step
        model(ids, cache=cache)
        step = model(ids[:, :1], cache=cache)  # the cache hands out position 300
    assert (every - dense).abs().max() < 1e-4
    assert (sparse - dense).abs().max() > 1e-3
    assert step.shape == (1, 1, 128)
