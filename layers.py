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
Inputs of more than FUSE_MAX_ROWS rows (prefills, the vision tower) still run the separate Linears, bit for bit
the reference: there the launches cost nothing next to the matmuls, and on an H100 an 8k-token prefill showed no
gain from fusing that stood out of the run-to-run spread (241 vs 228 ms unfused in one run, 242 vs 245 in another).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FUSE_MAX_ROWS = 64  # the fused matmul serves inputs of at most this many rows (tokens x batch): decode steps


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


def fuse_linears(linears):
    """Linears that read the same input -> (weight, bias or None) stacked along the output dim. Each Linear's
    parameters become views of its rows of the stack: no copy is kept, and an in-place change of either (an
    optimizer step, load_state_dict) is seen by both."""
    weight = torch.cat([lin.weight.detach() for lin in linears])          # (sum of out_features, in_features)
    bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    start = 0
    for lin in linears:
        rows = slice(start, start + lin.out_features)
        lin.weight = nn.Parameter(weight[rows], requires_grad=lin.weight.requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias[rows], requires_grad=lin.bias.requires_grad)
        start += lin.out_features
    return weight, bias


class Fusable(nn.Module):
    """A module with parallel projections (Linears reading one input, named by parallel()). project(x) returns
    their outputs: from the Linears themselves (the reference), or after fuse() from one matmul over the stacked
    weights, for inputs of at most FUSE_MAX_ROWS rows. The fused path is inference-only: with gradients on,
    project() uses the Linears, whose parameters are what autograd and optimizers see."""
    fused = None  # (weight, bias) of the stacked projection, or None

    def parallel(self):
        raise NotImplementedError

    def fuse(self, enabled=True):
        self.fused = fuse_linears(self.parallel()) if enabled else None
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
        return F.linear(x, *self.fused).split([lin.out_features for lin in linears], -1)


class GatedMLP(Fusable):
    """down(silu(gate(x)) * up(x)); the vision tower's has biases, the language model's does not."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def parallel(self):
        return [self.gate_proj, self.up_proj]

    def forward(self, x):
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)
