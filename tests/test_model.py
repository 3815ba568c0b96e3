"""model.py against transformers' Qwen2_5_VLForConditionalGeneration (the oracle), in fp32 on the CPU.

Each test builds a random tiny HF model, saves it with save_pretrained, loads it with ours and compares logits.
The HF weights are re-randomised at a larger scale than HF's init (std 0.02 makes every logit ~0, where a wrong
model could still pass).
"""
import json
import os

import re
import pytest
import torch

transformers = pytest.importorskip("transformers")  # test dependency, pinned in requirements-dev.txt
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from model import VLM, VLMConfig, mrope_positions
from vision import vision_layout

VOCAB, VS, VE, IMG, VID = 300, 290, 291, 292, 293  # vision start/end, image pad, video pad
TOL = 1e-4


def hf_config(tie=False, **text):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=tie,
              rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
              vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                                 fullatt_block_indexes=[1], window_size=112, tokens_per_second=2),
              image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(text)
    return Qwen2_5_VLConfig(**kw)


def make_hf(tmp_path, seed=0, tie=False, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = hf_config(tie)
    cfg._attn_implementation = "sdpa"
    hf = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    hf.save_pretrained(tmp_path)
    return hf


def ours(tmp_path):
    return VLM.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)


def vision_run(n):
    return [VS] + [IMG] * n + [VE]


def hf_kwargs(hf, inputs):
    """transformers >= 5 places M-RoPE vision runs from token types it is given, not from the ids: pass them."""
    if int(transformers.__version__.split(".")[0]) < 5:
        return inputs
    ids = inputs["input_ids"]
    mm = (ids == hf.config.image_token_id).long() + 2 * (ids == hf.config.video_token_id).long()
    return {**inputs, "mm_token_type_ids": mm}


def compare(hf, m, **inputs):
    with torch.no_grad():
        ref = hf(**hf_kwargs(hf, inputs)).logits
        got = m(**inputs)
    mask = inputs.get("attention_mask")
    if mask is not None:  # padded positions are undefined in both
        ref, got = ref[mask.bool()], got[mask.bool()]
    err = (ref - got).abs().max().item()
    assert err <= TOL, f"max abs logit diff {err}"
    assert ref.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    return err


def test_text_only(tmp_path):
    hf = make_hf(tmp_path)
    ids = torch.randint(3, 280, (1, 37))
    compare(hf, ours(tmp_path), input_ids=ids)


def test_one_odd_image(tmp_path):
    hf = make_hf(tmp_path, seed=1)
    grid = torch.tensor([[1, 10, 22]])  # a 140x308 px image: not square, windows that do not divide evenly
    n = 10 * 22 // 4
    ids = torch.tensor([[5, 6] + vision_run(n) + [7, 8, 9]])
    pix = torch.randn(10 * 22, 1176)
    compare(hf, ours(tmp_path), input_ids=ids, pixel_values=pix, image_grid_thw=grid)


def test_video_several_temporal_grids(tmp_path):
    hf = make_hf(tmp_path, seed=2)
    grid = torch.tensor([[3, 8, 12]])
    n = 3 * 8 * 12 // 4
    ids = torch.tensor([[5] + [VS] + [VID] * n + [VE] + [7, 8]])
    pix = torch.randn(3 * 8 * 12, 1176)
    compare(hf, ours(tmp_path), input_ids=ids, pixel_values_videos=pix, video_grid_thw=grid,
            second_per_grid_ts=torch.tensor([1.0]))


def test_two_images_video_and_text(tmp_path):
    hf = make_hf(tmp_path, seed=3)
    g_img = torch.tensor([[1, 4, 6], [1, 18, 10]])
    g_vid = torch.tensor([[2, 6, 4]])
    ids = ([4] + vision_run(6) + [5, 6] + vision_run(45) + [7] + [VS] + [VID] * 12 + [VE] + [8, 9, 10, 11])
    ids = torch.tensor([ids])
    compare(hf, ours(tmp_path), input_ids=ids, pixel_values=torch.randn(24 + 180, 1176), image_grid_thw=g_img,
            pixel_values_videos=torch.randn(48, 1176), video_grid_thw=g_vid, second_per_grid_ts=torch.tensor([1.0]))


def test_batch_left_padding(tmp_path):
    hf = make_hf(tmp_path, seed=4)
    a = [4] + vision_run(6) + [5, 6, 7]
    b = [8, 9, 10, 11, 12] + vision_run(6) + [13, 14, 15, 16]
    pad = len(b) - len(a)
    ids = torch.tensor([[0] * pad + a, b])
    mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
    grid = torch.tensor([[1, 4, 6], [1, 4, 6]])
    compare(hf, ours(tmp_path), input_ids=ids, attention_mask=mask, pixel_values=torch.randn(48, 1176),
            image_grid_thw=grid)


def test_batch_right_padding(tmp_path):
    """A training batch (data.collate pads on the right): causal attention without a (T, T) mask, as transformers
    with its padding mask on every real token."""
    hf = make_hf(tmp_path, seed=4)
    a = [4] + vision_run(6) + [5, 6, 7]
    b = [8, 9, 10, 11, 12] + vision_run(6) + [13, 14, 15, 16]
    pad = len(b) - len(a)
    ids = torch.tensor([a + [0] * pad, b])
    mask = torch.tensor([[1] * len(a) + [0] * pad, [1] * len(b)])
    from model import right_padded
    assert right_padded(mask, 0) and not right_padded(mask.flip(1), 0) and not right_padded(mask, 3)
    grid = torch.tensor([[1, 4, 6], [1, 4, 6]])
    compare(hf, ours(tmp_path), input_ids=ids, attention_mask=mask, pixel_values=torch.randn(48, 1176),
            image_grid_thw=grid)


def test_greedy_generate_matches(tmp_path):
    hf = make_hf(tmp_path, seed=5)
    m = ours(tmp_path)
    ids = torch.tensor([[4] + vision_run(6) + [5, 6, 7]])
    kw = dict(pixel_values=torch.randn(24, 1176), image_grid_thw=torch.tensor([[1, 4, 6]]))
    with torch.no_grad():
        ref = hf.generate(**hf_kwargs(hf, dict(input_ids=ids, **kw)), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False)
    got = m.generate(ids, max_new_tokens=20, stop_ids=[-1], **kw)  # no stop: all 20 tokens compared
    assert got.shape == ref.shape == (1, ids.shape[1] + 20)
    assert got.tolist() == ref.tolist()


def test_greedy_generate_batched(tmp_path):
    hf = make_hf(tmp_path, seed=6)
    m = ours(tmp_path)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                          do_sample=False)
    got = m.generate(ids, attention_mask=mask, max_new_tokens=12, stop_ids=[-1])
    assert got.tolist() == ref.tolist()


def test_our_save_loads_in_transformers(tmp_path):
    make_hf(tmp_path / "a", seed=7)
    m = ours(tmp_path / "a")
    m.save_pretrained(tmp_path / "b")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "b", torch_dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    ids = torch.tensor([[4] + vision_run(6) + [5, 6, 7]])
    compare(hf, m, input_ids=ids, pixel_values=torch.randn(24, 1176), image_grid_thw=torch.tensor([[1, 4, 6]]))


def test_tied_and_new_naming_layouts(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = make_hf(tmp_path / "tied", seed=8, tie=True)
    m = ours(tmp_path / "tied")
    assert m.lm_head is None and m.cfg.tie_word_embeddings
    ids = torch.randint(3, 280, (1, 12))
    compare(hf, m, input_ids=ids)
    # rewrite the file with transformers >= 4.52 module names: model.visual.*, model.language_model.*
    sd = load_file(tmp_path / "tied" / "model.safetensors")
    renamed = {("model." + k if k.startswith("visual.") else
                k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in sd.items()}
    assert any(k.startswith("model.language_model.") for k in renamed)
    save_file(renamed, tmp_path / "tied" / "model.safetensors")
    compare(hf, ours(tmp_path / "tied"), input_ids=ids)


def test_sharded_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = make_hf(tmp_path, seed=9)
    sd = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    compare(hf, ours(tmp_path), input_ids=torch.randint(3, 280, (1, 9)))


def test_published_config_values():
    for name, size in (("3B", 3_754_622_976), ("7B", 8_292_166_656)):
        from model import PRESETS
        cfg = PRESETS[name]()
        with torch.device("meta"):
            n = sum(p.numel() for p in VLM(cfg).parameters())
        assert n == size, f"{name}: {n} parameters"
        again = VLMConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
        assert again.to_hf_dict() == cfg.to_hf_dict()


def test_index_functions_match_spec_examples():
    cfg = VLMConfig()
    # grid (1, 12, 20) -> these windows (as transformers' get_window_index makes them)
    pos, window_index, cu_window, cu_full = vision_layout(torch.tensor([[1, 12, 20]]), cfg.vision)
    assert cu_window.tolist() == [0, 64, 128, 160, 192, 224, 240]
    assert window_index[:8].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    assert cu_full.tolist() == [0, 240]
    _, _, _, cu_full = vision_layout(torch.tensor([[1, 4, 6]]), cfg.vision)
    p, _, _, _ = vision_layout(torch.tensor([[1, 4, 6]]), cfg.vision)
    assert p[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    # 3 text tokens, an image of grid (1, 4, 6), 2 text tokens
    ids = torch.tensor([[1, 2, 3] + [cfg.image_token_id] * 6 + [4, 5]])
    pos, nxt = mrope_positions(ids, cfg, image_grid_thw=torch.tensor([[1, 4, 6]]))
    assert pos[:, 0].tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
                                  [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]]
    assert nxt.tolist() == [8]
    ids = torch.tensor([[1, 2] + [cfg.video_token_id] * 16 + [3, 4]])
    pos, _ = mrope_positions(ids, cfg, video_grid_thw=torch.tensor([[4, 4, 4]]),
                             second_per_grid_ts=torch.tensor([1.0]))
    assert pos[0, 0].tolist() == [0, 1] + [2] * 4 + [4] * 4 + [6] * 4 + [8] * 4 + [9, 10]


def test_vectorised_positions_are_the_reference_walk():
    """rope.mrope_positions (vectorised) against mrope_positions_reference (run by run) on random batches: text,
    images and videos of several shapes, adjacent blocks, left padding, a start per row, fractional seconds a grid,
    and broken inputs (a pad run that is not whole grids, too few grids), where both must raise the same error."""
    import random
    from rope import mrope_positions_reference
    cfg = VLMConfig.from_hf_dict(hf_config().to_dict())
    rng, raised = random.Random(0), 0
    for _ in range(400):
        rows, grids = [], {cfg.image_token_id: [], cfg.video_token_id: []}
        for _ in range(rng.randint(1, 3)):
            row = []
            for _ in range(rng.randint(0, 6)):
                if rng.random() < 0.35:
                    row += [rng.randint(0, 600)] * rng.randint(1, 4)
                    continue
                pad = rng.choice(list(grids))
                t = 1 if pad == cfg.image_token_id else rng.randint(1, 3)
                h, w = 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)
                grids[pad].append([t, h, w])
                row += [pad] * (t * h * w // 4 + (rng.random() < 0.05) * rng.choice([-1, 1, 3]))  # sometimes broken
            rows.append(row)
        if rng.random() < 0.05 and grids[cfg.video_token_id]:
            grids[cfg.video_token_id].pop()  # one grid too few
        L = max(len(r) for r in rows)
        ids = torch.tensor([[5] * (L - len(r)) + r for r in rows]).reshape(len(rows), L)
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows]).reshape(len(rows), L)
        image, video = (torch.tensor(grids[k]) if grids[k] else None for k in grids)
        kw = dict(image_grid_thw=image, video_grid_thw=video, attention_mask=mask, start=rng.choice([0, 7]),
                  second_per_grid_ts=torch.rand(len(video)) * 2 if video is not None and rng.random() < 0.5 else None)
        try:
            want = mrope_positions_reference(ids, cfg, **kw)
        except ValueError as e:
            raised += 1
            with pytest.raises(ValueError, match=re.escape(str(e))):
                mrope_positions(ids, cfg, **kw)
            continue
        got = mrope_positions(ids, cfg, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert 20 < raised < 200  # both kinds of error were reached, and most batches were valid


def test_text_after_a_video_starts_after_its_largest_position():
    """Our rule for the text after a video is the reference's: transformers 4.57.6's get_rope_index (the pinned
    oracle), Qwen's own code and the StreamingVLM authors' start it at the video's largest position + 1, temporal
    positions included. transformers 5 starts it at the video's start + max(h, w) / 2 instead, which differs
    once a video has several temporal patches: here 5 where the reference says 7.

    By hand: text 5 and <|vision_start|> take 0 and 1; the video (grid 3 x 4 x 6: 3 temporal patches of 2 x 3
    merged tokens, 1 s each at 2 tokens a second) starts at 2, its t positions 2, 4, 6, h 2-3, w 2-4; so
    <|vision_end|> and the text after it take 7, 8, 9, and the next free position is 10."""
    from types import SimpleNamespace
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    hf = hf_config()
    cfg = VLMConfig.from_hf_dict(hf.to_dict())
    grid, secs = torch.tensor([[3, 4, 6]]), torch.tensor([1.0])
    ids = torch.tensor([[5, VS] + [VID] * (3 * 4 * 6 // 4) + [VE, 7, 8]])
    got, nxt = mrope_positions(ids, cfg, video_grid_thw=grid, second_per_grid_ts=secs)
    video = got[:, 0, 2:-3]
    assert sorted(set(video[0].tolist())) == [2, 4, 6] and sorted(set(video[1].tolist())) == [2, 3]
    assert sorted(set(video[2].tolist())) == [2, 3, 4]
    assert got[:, 0, -3:].tolist() == [[7, 8, 9]] * 3 and nxt.tolist() == [10]
    assert 2 + max(4, 6) // 2 != 7  # transformers 5's rule would put the text elsewhere
    # the reference: transformers 4.57.6's own position function (on a stand-in model: it only reads the config)
    ref, _ = Qwen2_5_VLModel.get_rope_index(SimpleNamespace(config=hf), ids, video_grid_thw=grid,
                                            second_per_grid_ts=secs)
    assert torch.equal(got, ref)


# ---- errors ------------------------------------------------------------------------------------------------


def test_error_wrong_model_type(tmp_path):
    make_hf(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type='llama'"):
        ours(tmp_path)


def test_error_shape_mismatch_names_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(97, 64)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.*\(97, 64\).*\(96, 64\)"):
        ours(tmp_path)


def test_error_missing_and_unexpected_listed(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["visual.blocks.2.norm1.weight"]
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['visual.blocks.2.norm1.weight'\].*"
                                         r"unexpected tensors \['model.extra.weight'\]"):
        ours(tmp_path)


def test_error_truncated_file(tmp_path):
    make_hf(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        ours(tmp_path)
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="model.safetensors"):
        ours(tmp_path)


def test_error_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ours(tmp_path)
    make_hf(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ours(tmp_path)


def test_error_pad_count_mismatch(tmp_path):
    make_hf(tmp_path)
    m = ours(tmp_path)
    ids = torch.tensor([[4] + vision_run(5) + [5]])  # the grid needs 6 pads
    with pytest.raises(ValueError, match="grid"):
        m(ids, pixel_values=torch.randn(24, 1176), image_grid_thw=torch.tensor([[1, 4, 6]]))


def test_save_is_atomic_and_leaves_no_temp(tmp_path):
    make_hf(tmp_path / "a")
    m = ours(tmp_path / "a")
    m.save_pretrained(tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "model.safetensors"]


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    from model import sample_next
    logits = torch.tensor([[3.0, 2.9, -5.0, -5.0]])
    seen = torch.tensor([[0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, seen, 1.0, 0.5, 1.0, g)) for _ in range(50)}
    assert draws == {0}  # token 0 alone holds >= 50% of the mass
    draws = {int(sample_next(logits, seen, 1.0, 0.99, 1.0, g)) for _ in range(200)}
    assert draws == {0, 1}
    # repetition penalty 10 pushes the seen token 0 below token 1
    assert int(sample_next(logits, seen, 0.0, 1.0, 10.0)) == 1


def test_compiled_vision_blocks_equal_eager():
    """The compiled vision blocks (Streamer(decode="compiled"), the fast path) against the eager ones."""
    from model import PRESETS
    cfg = PRESETS["tiny"]()
    model = VLM(cfg).init_weights(seed=0).eval()
    g = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 255, (112, 168, 3), generator=g, dtype=torch.uint8) for _ in range(4)]
    from processor import preprocess_video
    pv, grid, _ = preprocess_video(frames)
    with torch.no_grad():
        eager, compiled = model.visual(pv, grid), model.visual(pv, grid, compiled=True)
    assert grid[0, 0] == 2 and eager.abs().max() > 0.1
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
