"""Fused projections (layers.Fusable, VLM.fuse) against the separate Linears they stand for: the same logits
(fp32, CPU), the same greedy tokens, the same streamed replies; checkpoint names, saving and loading unchanged;
training still reaches the parameters. On a GPU the bf16 fused model is compared with the unfused one."""
import pytest
import torch

import layers
from model import VLM
from stream import make_streamer

from conftest import frames, tiny_model

VIDEO = dict(pixel_values_videos=None, video_grid_thw=torch.tensor([[2, 8, 12]]),
             second_per_grid_ts=torch.tensor([1.0]))


def prompt(tok, seed=0):
    """Text, a two-grid video (48 vision tokens) and more text, with random pixels."""
    g = torch.Generator().manual_seed(seed)
    ids = [5, 6, tok.vision_start_id] + [tok.video_pad_id] * 48 + [tok.vision_end_id, 7, 8, 9]
    return torch.tensor([ids]), dict(VIDEO, pixel_values_videos=torch.randn(2 * 8 * 12, 1176, generator=g))


@pytest.fixture
def fused_everywhere(monkeypatch):
    """The fused matmul for inputs of any size (by default only up to layers.FUSE_MAX_ROWS rows: decode steps)."""
    monkeypatch.setattr(layers, "FUSE_MAX_ROWS", 10**9)


@torch.no_grad()
def test_fused_logits_and_tokens_equal_unfused(tok, fused_everywhere):
    model = tiny_model(tok, seed=1)
    ids, vision = prompt(tok)
    ref = model(ids, **vision)
    gen_ref = model.generate(ids, max_new_tokens=8, stop_ids=[-1], **vision)
    model.fuse()
    assert model.model.layers[0].self_attn.fused is not None and model.visual.blocks[0].mlp.fused is not None
    got = model(ids, **vision)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert ref.abs().max() > 0.5
    assert torch.equal(model.generate(ids, max_new_tokens=8, stop_ids=[-1], **vision), gen_ref)
    model.fuse(False)  # back to the reference path
    torch.testing.assert_close(model(ids, **vision), ref, atol=0, rtol=0)


def test_fused_parameters_are_views_names_and_checkpoints_unchanged(tok, tmp_path, fused_everywhere):
    model = tiny_model(tok, seed=2)
    names = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse()
    attn = model.model.layers[1].self_attn
    # no copy: the Linears' parameters are rows of the stacked tensor, so an in-place change reaches both
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.fused[0].untyped_storage().data_ptr()
    sd = model.state_dict()
    assert list(sd) == list(names) and all(torch.equal(sd[k], names[k]) for k in names)
    with torch.no_grad():
        attn.k_proj.weight.mul_(2)
    assert torch.equal(attn.fused[0][attn.q_proj.out_features:][:attn.k_proj.out_features], attn.k_proj.weight)
    model.save_pretrained(tmp_path)  # views of one tensor: saved as separate tensors
    back = VLM.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    ids, vision = prompt(tok, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, **vision), model(ids, **vision), atol=1e-5, rtol=1e-5)
        # load_state_dict into a fused model copies into the views: the fused path sees the new weights
        fresh = tiny_model(tok, seed=9).fuse()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(ids, **vision), model(ids, **vision), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_large_inputs_keep_the_separate_linears(tok, monkeypatch):
    # by default a prefill of more than FUSE_MAX_ROWS tokens (and the vision tower's patches) runs the Linears,
    # bit for bit the reference; a decode step (1 row) takes the stacked matmul
    model = tiny_model(tok, seed=8)
    ids, vision = prompt(tok, seed=8)
    monkeypatch.setattr(layers, "FUSE_MAX_ROWS", ids.shape[1] - 1)
    ref = model(ids, **vision)
    model.fuse()
    assert torch.equal(model(ids, **vision), ref)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a[1].shape) or torch._C._nn.linear(*a))
    model.model.layers[0].mlp(torch.randn(1, 1, model.cfg.hidden_size))
    assert calls[0][0] == 2 * model.cfg.intermediate_size  # gate and up in one matmul


@torch.no_grad()
def test_moving_a_fused_model_restacks(tok, fused_everywhere):
    model = tiny_model(tok, seed=4)
    ids, vision = prompt(tok, seed=4)
    ref = model.double()(ids, **{k: v.double() if v.is_floating_point() else v for k, v in vision.items()})
    model.float().fuse().double()  # the move made new tensors; the stack follows them
    mlp = model.model.layers[0].mlp
    assert mlp.fused[0].dtype == torch.float64
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.fused[0].untyped_storage().data_ptr()
    got = model(ids, **{k: v.double() if v.is_floating_point() else v for k, v in vision.items()})
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)


def test_training_a_fused_model_reaches_the_parameters(tok, fused_everywhere):
    # with gradients on, project() runs the Linears: autograd reaches q/k/v and gate/up as before fusing
    ref, model = tiny_model(tok, seed=5), tiny_model(tok, seed=5).fuse()
    ids, vision = prompt(tok, seed=5)
    for m in (ref, model):
        m(ids, **vision).logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_streamed_replies_equal_fused_and_unfused(tok):
    # the fast decode path fuses a model nobody decided about; model.fuse(False) keeps the reference layout
    out = {}
    for layout in ("unfused", "fused"):
        model = tiny_model(tok, seed=1)
        if layout == "unfused":
            model.fuse(False)
        s = make_streamer(model, tok, max_new_tokens=6, decode="graphs", text_sink=4, text_window=8,
                          vision_window=3, capacity=64)
        out[layout] = ([s.step(frames(t)) for t in range(6)], s.last_logits.float())
        assert (model.model.layers[0].self_attn.fused is not None) == (layout == "fused")
    assert out["fused"][0] == out["unfused"][0] and any(out["fused"][0])  # the random model says things
    torch.testing.assert_close(out["fused"][1], out["unfused"][1], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 matmuls on a GPU")
@torch.no_grad()
def test_fused_in_bf16_on_gpu(tok, fused_everywhere):
    # bf16: one stacked matmul may round differently from three; logits within bf16 tolerance of the unfused
    model = tiny_model(tok, seed=7).to("cuda", torch.bfloat16)
    ids, vision = prompt(tok, seed=7)
    ids, vision = ids.cuda(), {k: v.cuda() for k, v in vision.items()}
    ref = model(ids, **vision).float()
    got = model.fuse()(ids, **vision).float()
    scale = ref.abs().max()
    torch.testing.assert_close(got / scale, ref / scale, atol=2e-2, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("rows", [3, 200])
def test_padded_mlp_equals_unfused(rows):
    # a width that is not a multiple of layers.ALIGN (the 7B vision tower's 3,420): fuse() pads gate/up with zero
    # rows and down with zero columns, and runs the padded matmuls at every input size
    torch.manual_seed(0)
    mlp = layers.GatedMLP(48, 100, bias=True)
    for p in mlp.parameters():
        p.normal_()  # a zero-initialised bias would hide a padded column that is not zero
    x = torch.randn(rows, 48)
    ref = mlp(x)
    sd = {k: v.clone() for k, v in mlp.state_dict().items()}
    mlp.fuse()
    assert mlp.down_padded.shape == (48, 128) and mlp.fused[0].shape == (256, 48)
    assert torch.equal(mlp.down_padded[:, 100:], torch.zeros(48, 28))
    assert torch.equal(mlp.fused[1][100:128], torch.zeros(28))
    torch.testing.assert_close(mlp(x), ref, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, sd[k]) for k, v in mlp.state_dict().items())  # names and values unchanged
    mlp.down_proj.weight.mul_(2)  # a view of the padded weight: an in-place change reaches the fast path
    assert torch.equal(mlp.down_padded[:, :100], mlp.down_proj.weight)
    mlp.fuse(False)
    assert mlp.down_padded is None and mlp.down_proj.weight.is_contiguous()  # the reference's own layout back
    assert torch.equal(mlp.down_proj.weight, sd["down_proj.weight"] * 2)
    mlp.double().fuse().float()  # moves restack and re-pad
    assert mlp.down_padded.dtype == torch.float32 and mlp.down_padded.shape == (48, 128)
    with torch.enable_grad():  # training sees the Linears, unpadded
        mlp(x).sum().backward()
    assert mlp.down_proj.weight.grad.shape == (48, 100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
@torch.no_grad()
def test_vision_graph_of_the_7b_tower_equals_eager():
    # the vision fast path on the 7B tower (random weights, bf16): padded MLP (3,420 -> 3,456), compiled blocks and
    # a CUDA graph per grid, against the eager unfused tower on a 720p second's 2,880 patches; the graph replays
    # fresh pixels, and a fuse(False) (new code path, same weights) captures again
    from vision import VisionConfig, VisionTower
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig()).to("cuda")
    for p in tower.parameters():
        p.data.normal_(0, 0.02)
    tower = tower.to(torch.bfloat16)
    grid = torch.tensor([[1, 40, 72]])
    pix = [torch.randn(2880, 1176, device="cuda") for _ in range(2)]
    ref = [tower(p, grid).float() for p in pix]
    tower.apply(lambda m: m.fuse() if isinstance(m, layers.GatedMLP) else None)
    assert tower.blocks[0].mlp.down_padded.shape == (1280, 3456)
    for p, r in zip(pix, ref):
        got = tower(p, grid, compiled=True).float()
        assert ((got - r).norm() / r.norm()) < 2e-2
    assert len(tower.graphs) == 1 and not torch.equal(ref[0], ref[1])
    old = next(iter(tower.graphs.values()))
    tower.apply(lambda m: m.fuse(False) if isinstance(m, layers.GatedMLP) else None)
    got = tower(pix[0], grid, compiled=True).float()
    assert ((got - ref[0]).norm() / ref[0].norm()) < 2e-2 and len(tower.graphs) == 1
    assert next(iter(tower.graphs.values())) is not old  # new weights' layout: captured again
    # values changed in place (same addresses) are what the replay reads
    with torch.no_grad():
        tower.blocks[3].mlp.down_proj.weight.mul_(3)
    want = tower(pix[1], grid).float()
    got = tower(pix[1], grid, compiled=True).float()
    assert ((got - want).norm() / want.norm()) < 2e-2 and not torch.allclose(want, ref[1], rtol=0, atol=1e-3)
    # a graph keeps the plan it was captured with, even after the tower's plans are cleared
    tower.plans.clear()
    torch.randn(4096, 4096, device="cuda")  # reuse freed memory, if anything was freed
    got = tower(pix[1], grid, compiled=True).float()
    assert ((got - want).norm() / want.norm()) < 2e-2
