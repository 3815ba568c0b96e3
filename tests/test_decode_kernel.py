"""decode.py's split-KV decode attention (Triton) against model.decode_attention, the two-matmul reference: random
inputs drawn fresh for each case, cache lengths that do and do not fill the last block, one and two sequences, prefix
and scattered masks, 16-bit (7B's 7 query heads per KV head, d 128) and fp32 (the tiny model's shape). On a GPU in
bf16, eagerly, compiled, and captured in a CUDA graph; on a CPU through Triton's interpreter, in fp16 (conftest)."""
import pytest
import torch

from conftest import kernel_device, kernel_dtype
from decode import decode_kernel_for, split_kv_attention
from model import decode_attention

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling and graphing the kernel needs CUDA")
kernels = pytest.mark.skipif(kernel_device() is None, reason="Triton is not installed (requirements-dev.txt)")
HALF = kernel_dtype()
# the interpreter runs a program at a time in NumPy: on a CPU a shorter long cache and fewer, longer slices (several
# a head still, so that the merge is tested)
LONG, PROGRAMS = (13824 + 5, 264) if kernel_device() == "cuda" else (2048 + 5, 32)


def test_no_kernel_without_cuda():
    assert decode_kernel_for("cpu") is None  # the CPU keeps the reference


def inputs(B, Hkv, G, D, N, dtype, mask_kind, seed, device=None):
    device = device or kernel_device()
    g = torch.Generator(device).manual_seed(seed)
    q, k, v = (torch.randn(B, Hkv, n, D, generator=g, device=device, dtype=dtype) for n in (G, N, N))
    if mask_kind is None:
        return q, k, v, None
    if mask_kind == "prefix":  # the decode step's: the first length+1 slots visible
        lengths = torch.randint(1, N + 1, (B,), generator=g, device=device)
        mask = torch.arange(N, device=device)[None] < lengths[:, None]
    else:  # left padding and holes
        mask = torch.rand(B, N, generator=g, device=device) < 0.7
        mask[:, -1] = True
    return q, k, v, mask[:, None, None, :]


@kernels
@pytest.mark.parametrize("B, Hkv, G, D, N, dtype, mask_kind", [
    (1, 4, 7, 128, LONG, HALF, "prefix"),
    (1, 4, 7, 128, 64, HALF, None),
    (2, 4, 7, 128, 1000, HALF, "holes"),
    (1, 2, 2, 64, 1, torch.float32, None),
    (2, 2, 2, 64, 300, torch.float32, "prefix"),
])
@torch.no_grad()
def test_split_kv_equals_reference(B, Hkv, G, D, N, dtype, mask_kind):
    for seed in range(2):
        q, k, v, mask = inputs(B, Hkv, G, D, N, dtype, mask_kind, seed)
        ref = decode_attention(q.double(), k.double(), v.double(), mask)    # fp64 truth
        out = torch.full_like(q, float("nan"))                             # poisoned: every element is written
        out.copy_(split_kv_attention(q, k, v, mask, programs=PROGRAMS))
        err = ((out.double() - ref).norm() / ref.norm()).item()
        half_ref = ((decode_attention(q, k, v, mask).double() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all()
        if dtype == torch.float32:
            assert err < 1e-5, err
        else:  # no further from the truth than the 16-bit reference (which rounds its scores to 16 bits)
            assert err < max(2 * half_ref, 4e-3), (err, half_ref)


@kernels
@torch.no_grad()
def test_many_slices_merge():
    """More slices than the merge reads at a time (16), their count no multiple of it, some seeing no key at all."""
    q, k, v, mask = inputs(1, 1, 4, 64, 2053, torch.float32, "prefix", 5)
    mask[..., 1500:] = False                                               # the last ~9 slices see no key
    ref = decode_attention(q.double(), k.double(), v.double(), mask)
    out = split_kv_attention(q, k, v, mask, programs=64)                   # 33 slices of 64 keys
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


@gpu
@torch.no_grad()
def test_split_kv_compiled_and_in_a_graph():
    q, k, v, mask = inputs(1, 4, 7, 128, 4096, torch.bfloat16, "prefix", 3, "cuda")
    fn = decode_kernel_for("cuda")
    want = fn(q, k, v, mask)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), want, atol=1e-3, rtol=1e-3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        compiled(q, k, v, mask)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(q, k, v, mask)
    k.normal_()  # new contents at the same addresses: the replay reads them
    graph.replay()
    torch.testing.assert_close(out, fn(q, k, v, mask), atol=1e-3, rtol=1e-3)
