"""quantize.py: FP8Linear is exact math on its 8-bit values and near the Linear it came from; the shipped model in FP8
streams near itself in full precision, and a batch of FP8 streams says what each FP8 stream says alone. On the CPU
torch._scaled_mm multiplies the e4m3 values in fp32; on a GPU (Hopper) its FP8 tensor cores, in bf16."""
import copy

import pytest
import torch
import torch.nn as nn

import stream
from checkpoint import load_checkpoint
from cli import SHIPPED
from layout import layout_of
from quantize import FP8Linear, fp8_supported, quantize_fp8, rowwise
from serve import StreamBatch
from world import SportsStream, WorldConfig, split_seed

cpu = pytest.mark.skipif(not fp8_supported("cpu"), reason="this PyTorch's CPU build lacks torch._scaled_mm")


@cpu
@pytest.mark.parametrize("K, N, bias", [(64, 48, True), (40, 24, False), (3420 // 20, 3420 // 20, True)])
@torch.no_grad()
def test_fp8_linear_is_exact_math_on_its_8_bit_values(K, N, bias):
    """Sizes off 16 (padded inside) too. The reference: the dequantized input rows times the dequantized weight."""
    g = torch.Generator().manual_seed(K)
    lin = nn.Linear(K, N, bias=bias)
    nn.init.normal_(lin.weight, generator=g)
    if bias:
        nn.init.normal_(lin.bias, generator=g)
    q = FP8Linear(lin)
    x = torch.randn(3, 5, K, generator=g)
    x[0, 0] = 0.0                                                    # an all-zero row: no NaN
    x8, sx = rowwise(torch.nn.functional.pad(x.reshape(-1, K), (0, q.weight8.shape[1] - K)))
    ref = (x8.float() * sx)[:, :K] @ q.dequantized().T + (lin.bias if bias else 0)
    got = q(x)
    assert got.shape == (3, 5, N) and torch.isfinite(got).all()
    torch.testing.assert_close(got.reshape(-1, N), ref, rtol=1e-5, atol=1e-5)


@cpu
@torch.no_grad()
def test_fp8_linear_is_near_the_linear():
    """e4m3 rounds to 3 mantissa bits (<= 6.25% an element); over a dot product of 256 the errors average out."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 128)
    nn.init.normal_(lin.weight, generator=g)
    x = torch.randn(64, 256, generator=g)
    want, got = lin(x), FP8Linear(lin)(x)
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-4 < rel < 0.05, rel   # (not 0: the 8-bit values are used)
    assert ((FP8Linear(lin).dequantized() - lin.weight).abs() <= 0.0625 * lin.weight.abs() + 1e-6).all()


@cpu
@torch.no_grad()
def test_fp8_linear_edge_cases():
    """No rows; a dtype cast after quantizing (the 8-bit weight and fp32 scales keep their types, the output takes the
    input's); the compiled input quantization (a GPU's) against the eager one."""
    from quantize import _compiled_quantize_rows, quantize_rows
    lin = nn.Linear(40, 24)
    q = FP8Linear(lin)
    assert q(torch.empty(0, 3, 40)).shape == (0, 3, 24)
    w8, scale = q.weight8.clone(), q.scale.clone()
    q.to(torch.bfloat16)
    assert q.weight8.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    assert torch.equal(q.weight8.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(q.scale, scale)
    x = torch.randn(5, 40)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    got, want = q(x.bfloat16()).float(), FP8Linear(lin)(x)   # (the bf16 input rounds before its e4m3 does)
    assert ((got - want).norm() / want.norm()).item() < 0.03
    want, got = quantize_rows(x, 48), _compiled_quantize_rows()(x, 48)
    assert got[0].shape == (5, 48) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0.0625, atol=0)   # within one e4m3 step


@pytest.fixture(scope="module")
def shipped():
    model, tok, st = load_checkpoint(SHIPPED, "cpu")
    return model, tok, stream.streamer_kwargs(layout_of(st))


def world(seed):
    return SportsStream(WorldConfig(seed=split_seed("eval", seed), size=56))


@cpu
@torch.no_grad()
def test_the_shipped_model_in_fp8_says_what_it_says_in_full_precision(shipped):
    """A trained model's commentary survives FP8: the first 40 s of a held-out stream word for word, every Linear of
    both towers quantized."""
    model, tok, kw = shipped
    fp8 = quantize_fp8(copy.deepcopy(model))
    assert fp8.fp8 and not any(type(m) is nn.Linear for m in fp8.modules())
    said = []
    for m in (model, fp8):
        s, w = stream.make_streamer(m, tok, **kw), world(0)
        said.append([s.step(w.second(t).frames) for t in range(40)])
    assert said[0] == said[1]
    assert sum(bool(x) for x in said[0]) >= 5, "it must say something to compare"


@cpu
@torch.no_grad()
def test_a_batch_of_fp8_streams_says_what_each_says_alone(shipped):
    model, tok, kw = shipped
    fp8 = quantize_fp8(copy.deepcopy(model))
    alone = []
    for seed in (0, 4):
        s, w = stream.make_streamer(fp8, tok, **kw, capacity=1024), world(seed)
        alone.append([s.step(w.second(t).frames) for t in range(8)])
    batch, said, worlds = StreamBatch(fp8, tok, rows=2, capacity=1024), [[], []], [world(0), world(4)]
    for i in range(2):
        batch.add(i, **kw)
    for t in range(8):
        for i, text in batch.step({i: worlds[i].second(t).frames for i in range(2)}).items():
            said[i].append(text)
    assert said == alone


@cpu
def test_an_fp8_model_is_not_fused_or_saved(shipped, tmp_path):
    fp8 = quantize_fp8(copy.deepcopy(shipped[0]))
    with pytest.raises(ValueError, match="run unfused"):
        fp8.fuse()
    assert fp8.fuse(False) is fp8 and quantize_fp8(fp8) is fp8   # unfused already; quantized already
    with pytest.raises(ValueError, match="for inference; save the bf16 model"):
        fp8.save_pretrained(str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported("cuda")), reason="FP8 tensor cores: a Hopper GPU")
@pytest.mark.parametrize("decode", ["graphs", "compiled"])
@torch.no_grad()
def test_fp8_on_a_gpu_replayed_and_compiled_as_eager(shipped, decode):
    """bf16 on the GPU: the FP8 model's decode graph (compiled too) against its eager loop, teacher-forced so that both
    feed the same tokens; and FP8Linear against exact math on its 8-bit values."""
    model, tok, kw = shipped
    fp8 = quantize_fp8(copy.deepcopy(model).to("cuda", torch.bfloat16))
    runs = []
    for how in ("plain", decode):
        s, w = stream.make_streamer(fp8, tok, **kw, decode=how), world(0)
        logits = []
        for t in range(6):
            s.step(w.second(t).frames, force_text=w.second(t).text)
            logits.append(s.last_logits[:, -1].float().cpu())
        runs.append(torch.cat(logits))
    scale = runs[0].abs().max()
    torch.testing.assert_close(runs[1] / scale, runs[0] / scale, atol=2e-2, rtol=0)
    lin = fp8.model.layers[0].mlp.down_proj
    x = torch.randn(7, lin.in_features, device="cuda", dtype=torch.bfloat16)
    x8, sx = rowwise(x)
    ref = (x8.float() * sx) @ lin.dequantized().T
    torch.testing.assert_close(lin(x).float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
