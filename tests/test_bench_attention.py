"""tools/bench_attention.py on the CPU: the table at a smoke size, and the log-sum-exp merges its cuDNN rows rely on,
checked against causal attention with plain math standing in for cuDNN's kernel."""
import json

import pytest
import torch

import tools.bench_attention as ba
from model import causal_attention


def math_attention(q, k, v, causal, bias=None):
    """Attention and its log-sum-exp (B, H, N), written out: what cuDNN's kernel returns."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v, s.logsumexp(-1)


@pytest.mark.parametrize("nq, cached, bucket", [(5, 37, 64), (16, 100, 128), (3, 1, 8)])
def test_merged_parts_are_causal_attention(nq, cached, bucket):
    g = torch.Generator().manual_seed(nq)
    q = torch.randn(1, 4, nq, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, cached + nq, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref = causal_attention(q, k, v)
    assert torch.allclose(ba.cudnn_two_call(q, k, v, cached, kernel=math_attention), ref, atol=1e-12)
    pad = lambda x: torch.cat([x[:, :, :cached], torch.full((1, 2, bucket - cached, 16), 7.0, dtype=x.dtype),
                               x[:, :, cached:]], 2)   # the empty slots hold junk: the bias must hide it
    assert torch.allclose(ba.cudnn_bucket(q, pad(k), pad(v), cached, bucket, kernel=math_attention), ref, atol=1e-12)


def test_smoke_table(tmp_path):
    rows = ba.main(["--device", "cpu", "--prefill", "32:200", "--decode", "300", "--heads", "4", "2", "--iters", "1",
                    "--warmup", "0", "--json", str(tmp_path / "a.json")])
    kernels = [(r["shape"], r["kernel"]) for r in rows]
    assert kernels[0] == ("prefill 32:200", "model: causal_attention") and rows[0]["ms"] > 0
    assert ("decode 300", "model: decode_attention") in kernels
    # the GPU kernels are rows that say they cannot run here, not errors
    assert all(r["note"].startswith("missing") for r in rows if "note" in r) and len(rows) == 6
    assert json.load(open(tmp_path / "a.json"))["rows"] == rows


def test_bad_flags_are_one_line(capsys):
    for argv, says in [(["--prefill", "12"], "expected NQ:L"), (["--heads", "5", "2"], "multiple of the KV heads")]:
        with pytest.raises(SystemExit):
            ba.main(["--device", "cpu"] + argv)
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1


def test_batched_rows_on_the_cpu():
    """--batch: serve.py's prefill paths side by side; those without a kernel here are rows that say so, the
    others match row-by-row causal attention."""
    rows = ba.main(["--device", "cpu", "--prefill", "16:200", "--decode", "--heads", "4", "2", "--iters", "1",
                    "--warmup", "0", "--batch", "3", "--step", "64"])
    batch = [r for r in rows if r["shape"] == "3 x prefill 16:200"]
    assert [r["kernel"].split(",")[0] for r in batch] == ["model: causal_attention", "cudnn head / flash tail",
                                                         "flex", "ragged: cudnn head + flash varlen"]
    assert float(batch[2]["max_err"]) < 1e-5 and batch[3]["note"].startswith("missing")
