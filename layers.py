"""
The small layers that the language model (model.py) and the vision tower (vision.py) both stack: RMSNorm, the
gated (SwiGLU) MLP, and Fusable, which lets a module run its parallel projections as one matmul. They sit in a
file of their own so that each tower can import them without importing the other.

Both follow Qwen2.5-VL's published checkpoints (arXiv 2502.13923): RMSNorm normalises in fp32 and scales after
casting back; the MLP is down(silu(gate(x)) * up(x)), with biases in the vision tower and none in the decoder.

Fused projections (an inference fast path): q/k/v read the same input, and so do gate/up. One matmul over their
stacked weights reads the same bytes as three (two) but launches one kernel instead of three, and a matrix-vector
product over one 33 MB matrix runs nearer the memory's speed than over a 26 MB and two 3.7 MB ones (a decode step
is ~200 such products). fuse_linears stacks the weights once and re-points each Linear's parameters at its rows of
the stack, so nothing is stored twice and the checkpoint names (q_proj.weight, ...) load and save unchanged.
Inputs of more than FUSE_MAX_ROWS rows (prefills) still run the separate Linears, bit for bit the reference:
there the launches cost nothing next to the matmuls, and on an H100 an 8k-token prefill showed no gain from fusing
that stood out of the run-to-run spread (241 vs 228 ms unfused in one run, 242 vs 245 in another).

Padded MLPs: the 7B vision tower's MLP is 3,420 wide, and a bf16 row of 3,420 values is 6,840 bytes, not a
multiple of 16. cuBLAS then cannot use its Hopper kernels for the gate, up and down matmuls and falls back to an
older, slower one (one H100, a 720p second's 2,880 patches: those 96 matmuls took 12.9 of the tower's 20.8 ms of
GPU time). So a fused GatedMLP stacks gate and up padded with zero rows to a multiple of ALIGN (3,456) and keeps
down's weight padded with zero columns; it then runs the padded matmuls at every input size. The zero rows give
silu(0) * 0 = 0 in the padded columns, which the zero columns of down ignore: the same sums, up to the order in
which the matmul adds them. The Linears' parameters are views of the padded tensors, as above.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FUSE_MAX_ROWS = 64  # the fused matmul serves inputs of at most this many rows (tokens x batch): decode steps
ALIGN = 64          # a padded MLP's width is a multiple of this (bf16 rows of a multiple of 128 bytes)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, *then* scale: the order the checkpoints were trained with
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def padded(n, align):
    return -(-n // align) * align


def fuse_linears(linears, align=1):
    """Linears that read the same input -> (weight, bias or None) stacked along the output dim, each block followed
    by zero rows up to a multiple of `align`. Each Linear's parameters become views of its rows of the stack: no
    copy is kept, and an in-place change of either (an optimizer step, load_state_dict) is seen by both."""
    first = linears[0].weight
    weight = first.new_zeros(sum(padded(lin.out_features, align) for lin in linears), first.shape[1])
    bias = weight.new_zeros(weight.shape[0]) if linears[0].bias is not None else None
    start = 0
    for lin in linears:
        rows = slice(start, start + lin.out_features)
        weight[rows] = lin.weight.detach()
        lin.weight = nn.Parameter(weight[rows], requires_grad=lin.weight.requires_grad)
        if bias is not None:
            bias[rows] = lin.bias.detach()
            lin.bias = nn.Parameter(bias[rows], requires_grad=lin.bias.requires_grad)
        start += padded(lin.out_features, align)
    return weight, bias


def pad_inputs(lin, width):
    """Give lin's weight zero columns up to `width` inputs; returns the padded (out, width) weight, of which the
    Linear's parameter becomes a view (its first in_features columns)."""
    weight = lin.weight.new_zeros(lin.out_features, width)
    weight[:, :lin.in_features] = lin.weight.detach()
    lin.weight = nn.Parameter(weight[:, :lin.in_features], requires_grad=lin.weight.requires_grad)
    return weight


class Fusable(nn.Module):
    """A module with parallel projections (Linears reading one input, named by parallel()). project(x) returns
    their outputs: from the Linears themselves (the reference), or after fuse() from one matmul over the stacked
    weights, for inputs of at most FUSE_MAX_ROWS rows. The fused path is inference-only: with gradients on,
    project() uses the Linears, whose parameters are what autograd and optimizers see."""
    fused = None  # (weight, bias) of the stacked projection, or None
    align = 1     # each projection's rows in the stack are padded to a multiple of this

    def parallel(self):
        raise NotImplementedError

    def fuse(self, enabled=True):
        self.fused = fuse_linears(self.parallel(), self.align) if enabled else None
        return self

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() give the parameters new tensors: stack those again (no stale or doubled copy)
        refuse, self.fused = self.fused is not None, None
        super()._apply(fn, recurse)
        return self.fuse() if refuse else self

    def project(self, x):
        linears = self.parallel()
        if self.fused is None or torch.is_grad_enabled() or x.numel() > FUSE_MAX_ROWS * x.shape[-1]:
            return [lin(x) for lin in linears]
        outs = F.linear(x, *self.fused).split([padded(lin.out_features, self.align) for lin in linears], -1)
        return [o[..., :lin.out_features] for o, lin in zip(outs, linears)]


class GatedMLP(Fusable):
    """down(silu(gate(x)) * up(x)); the vision tower's has biases, the language model's does not."""
    align = ALIGN
    down_padded = None  # down's weight with zero columns, when fuse() padded the width (see the module docstring)

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def parallel(self):
        return [self.gate_proj, self.up_proj]

    def fuse(self, enabled=True):
        super().fuse(enabled)
        width = padded(self.down_proj.in_features, self.align)
        pad = enabled and width != self.down_proj.in_features
        self.down_padded = pad_inputs(self.down_proj, width) if pad else None
        w = self.down_proj.weight
        if not enabled and not w.is_contiguous():  # unfused: down's weight its own again, not a strided view
            self.down_proj.weight = nn.Parameter(w.detach().contiguous(), requires_grad=w.requires_grad)
        return self

    def forward(self, x):
        if self.down_padded is not None and not torch.is_grad_enabled():  # padded, at every input size
            gate, up = F.linear(x, *self.fused).chunk(2, -1)                 # (..., width) each, zero past hidden
            return F.linear(F.silu(gate) * up, self.down_padded, self.down_proj.bias)
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)
