"""
Tests for processor.py: python -m pytest tests/test_processor.py -q

Oracles (test-only): transformers 4.57's slow Qwen2VLImageProcessor (PIL resize; its deprecated `videos=` path
is the video oracle, since the real video processor needs torchvision), Qwen2TokenizerFast, Qwen2_5_VLProcessor,
and the Qwen2-VL chat template (Jinja text below, kept here as data) rendered by apply_chat_template.
A hand-written loop over the spec's index formula (2.1.4) checks the patch layout independently of HF.
"""

import json
import os

import pytest
import torch
from PIL import Image

import processor as P

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a red ball rolls under the blue chair while the cat watches",
    "describe the image in one sentence please",
    "what happens in this video? the man opens the door and walks out",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? ( ) : ;",
] * 4

# Qwen2-VL / Qwen2.5-VL chat_template.json, as data (the public prompt format of the checkpoints).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def rand_image(h, w, seed, mode="RGB"):
    g = torch.Generator().manual_seed(seed)
    c = len(mode)
    # smooth gradient + noise: exercises both the interpolation and the edge handling of bicubic
    base = torch.linspace(0, 200, w).view(1, w, 1).expand(h, w, c)
    t = (base + torch.randint(0, 56, (h, w, c), generator=g)).to(torch.uint8).contiguous()
    return Image.frombytes(mode, (w, h), bytes(t.flatten().tolist()))


def hf_images(images, min_pixels=P.MIN_PIXELS, max_pixels=P.MAX_PIXELS):
    return Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images=images, return_tensors="pt")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    P.build_tokenizer(TEXTS, vocab_size=400).save(str(d / "tokenizer.json"))
    return str(d)


@pytest.fixture(scope="module")
def qwen_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qtok")
    P.build_tokenizer(TEXTS, vocab_size=400, qwen_ids=True).save(str(d / "tokenizer.json"))
    return str(d)


# ----------------------------------------------------------------------------- smart_resize


@pytest.mark.parametrize("hw,max_pixels,expected", [
    ((720, 1280), P.MAX_PIXELS, (728, 1288)),
    ((480, 640), P.MAX_PIXELS, (476, 644)),
    ((20, 20), P.MAX_PIXELS, (56, 56)),
    ((4000, 3000), P.MAX_PIXELS, (4004, 2996)),
    ((2160, 3840), 1003520, (728, 1316)),
    ((70, 70), P.MAX_PIXELS, (56, 56)),  # 70/28 = 2.5 rounds half-to-even to 2 (half-up would give 84)
    ((98, 98), P.MAX_PIXELS, (112, 112)),  # 3.5 -> 4
])
def test_smart_resize_spec_table(hw, max_pixels, expected):
    assert P.smart_resize(*hw, max_pixels=max_pixels) == expected


def test_smart_resize_matches_hf_on_a_grid():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize
    for h in range(14, 3000, 97):
        for w in range(14, 3000, 89):
            for lo, hi in [(3136, 12845056), (128 * 784, 768 * 784), (3136, 256 * 784)]:
                if max(h, w) / min(h, w) > 200:
                    continue  # the error path has its own test
                assert P.smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_smart_resize_aspect_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        P.smart_resize(10, 2010)
    P.smart_resize(10, 2000)  # exactly 200 is allowed


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("h,w,max_pixels", [
    (480, 640, P.MAX_PIXELS), (37, 1001, P.MAX_PIXELS), (20, 20, P.MAX_PIXELS), (720, 1280, 300 * 28 * 28),
    (301, 77, P.MAX_PIXELS),
])
def test_images_match_hf_slow_processor(h, w, max_pixels):
    img = rand_image(h, w, seed=h * w)
    pv, grid = P.preprocess_images([img], max_pixels=max_pixels)
    ref = hf_images([img], max_pixels=max_pixels)
    assert pv.dtype == torch.float32 and grid.dtype == torch.int64
    assert torch.equal(grid, ref["image_grid_thw"])
    assert torch.equal(pv, ref["pixel_values"])  # bit-exact


def test_several_images_concatenate_like_hf():
    imgs = [rand_image(100, 150, 1), rand_image(64, 64, 2), rand_image(30, 200, 3).convert("L")]
    pv, grid = P.preprocess_images(imgs)
    ref = hf_images(imgs)
    assert torch.equal(grid, ref["image_grid_thw"]) and torch.equal(pv, ref["pixel_values"])
    assert pv.shape == (int(grid.prod(-1).sum()), 1176)


def test_rgba_is_composited_over_white():
    rgba = rand_image(60, 90, 7, mode="RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    expected = Image.alpha_composite(white, rgba).convert("RGB")  # independent PIL blend as the oracle
    assert P.to_rgb_image(rgba).tobytes() == expected.tobytes()
    pv, grid = P.preprocess_images(rgba)
    ref = hf_images([expected])
    assert torch.equal(pv, ref["pixel_values"]) and torch.equal(grid, ref["image_grid_thw"])
    # Fully opaque RGBA: HF 4.57 (which just drops alpha) and we agree directly.
    opaque = rgba.copy()
    opaque.putalpha(255)
    assert torch.equal(P.preprocess_images(opaque)[0], hf_images([opaque])["pixel_values"])


def test_tensor_and_array_inputs_match_pil():
    img = rand_image(50, 70, 3)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(50, 70, 3)
    pv, _ = P.preprocess_images(img)
    assert torch.equal(P.preprocess_images(t)[0], pv)
    assert torch.equal(P.preprocess_images(t.numpy())[0], pv)
    big = torch.zeros(3, 50, 70, 3, dtype=torch.uint8)
    big[1] = t  # a non-zero storage offset view must still read the right bytes
    assert torch.equal(P.preprocess_images(big[1])[0], pv)


# ----------------------------------------------------------------------------- videos


def loop_patchify(frames):
    """The processor's patchify written as plain loops: float32 frames [F, 3, H, W] (F even) -> rows [t*h*w, 1176]."""
    F, _, H, W = frames.shape
    rows = []
    for t in range(F // 2):
        for hb in range(H // 28):
            for wb in range(W // 28):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (2 * hb + mh) * 14, (2 * wb + mw) * 14
                        tube = frames[2 * t:2 * t + 2, :, y:y + 14, x:x + 14]  # (tp, c, py, px)
                        rows.append(tube.permute(1, 0, 2, 3).reshape(-1))  # column order (c, tp, py, px)
    return torch.stack(rows)


def normalized(img):
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    x = (x.double() / 255).float()
    x = (x - torch.tensor(P.IMAGE_MEAN)) / torch.tensor(P.IMAGE_STD)
    return x.permute(2, 0, 1)


def test_video_matches_hf_and_loop_reference():
    frames = [rand_image(90, 160, 10 + i) for i in range(5)]  # odd count: the last frame is repeated
    pv, grid, sec = P.preprocess_video(frames, fps=4.0)
    ref = Qwen2VLImageProcessor(min_pixels=P.VIDEO_MIN_PIXELS, max_pixels=P.VIDEO_MAX_PIXELS)(
        images=None, videos=[frames], return_tensors="pt")
    assert torch.equal(grid, ref["video_grid_thw"]) and grid.tolist() == [[3, 18, 32]]
    assert torch.equal(pv, ref["pixel_values_videos"])
    assert sec.dtype == torch.float32 and sec.tolist() == [0.5]
    # independent check of the layout with plain loops
    h, w = P.smart_resize(90, 160, 28, P.VIDEO_MIN_PIXELS, P.VIDEO_MAX_PIXELS)
    clip = torch.stack([normalized(f.resize((w, h), Image.BICUBIC)) for f in frames + frames[-1:]])
    assert torch.equal(pv, loop_patchify(clip))


def test_video_tensor_input_and_even_frames():
    frames = [rand_image(56, 84, 20 + i) for i in range(4)]
    t = torch.stack([torch.frombuffer(bytearray(f.tobytes()), dtype=torch.uint8).view(56, 84, 3) for f in frames])
    a = P.preprocess_video(frames, min_pixels=3136, max_pixels=P.MAX_PIXELS)
    b = P.preprocess_video(t, min_pixels=3136, max_pixels=P.MAX_PIXELS)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[1].tolist() == [[2, 4, 6]] and a[2].tolist() == [1.0]
    assert torch.equal(a[0], loop_patchify(torch.stack([normalized(f) for f in frames])))


def test_video_errors():
    with pytest.raises(ValueError, match="empty video"):
        P.preprocess_video([])
    with pytest.raises(ValueError, match="differ in size"):
        P.preprocess_video([rand_image(56, 56, 0), rand_image(56, 84, 1)])
    with pytest.raises(TypeError):
        P.preprocess_video(["not a frame"])


def test_non_image_inputs_raise():
    for bad in ["cat.jpg", 3.0, torch.zeros(8, 8, 3), torch.zeros(3, 8, 8, dtype=torch.uint8)]:
        with pytest.raises(TypeError):
            P.preprocess_images(bad)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_are_atomic(tok_dir):
    tok = P.Tokenizer.from_file(tok_dir)
    text = "<|im_start|>user\nthe cat<|vision_start|><|image_pad|><|image_pad|><|vision_end|>sat<|im_end|>"
    ids = tok.encode(text)
    for name in ["im_start", "im_end", "vision_start", "vision_end"]:
        assert ids.count(getattr(tok, f"{name}_id")) == 1
    assert ids.count(tok.image_pad_id) == 2
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids), skip_special=True) == "user\nthe catsat"
    assert tok.encode("the cat") == Qwen2TokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))(
        "the cat").input_ids
    assert len(set(tok.encode("<|im_start|><|im_end|><|endoftext|><|video_pad|>"))) == 4


def test_qwen_ids(qwen_tok_dir):
    tok = P.Tokenizer.from_file(qwen_tok_dir)
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    vision_ids = (tok.vision_start_id, tok.vision_end_id, tok.image_pad_id, tok.video_pad_id)
    assert vision_ids == (151652, 151653, 151655, 151656)
    assert len(tok) == 151665 and tok.tok.token_to_id("<|file_sep|>") == 151664
    hf = Qwen2TokenizerFast(tokenizer_file=os.path.join(qwen_tok_dir, "tokenizer.json"))
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what happens?<|im_end|>\n"
    assert tok.encode(text) == hf(text).input_ids


def test_missing_special_token_is_named():
    from tokenizers import Tokenizer as HFTok, models
    bare = HFTok(models.BPE())
    bare.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    with pytest.raises(ValueError, match=r"<\|vision_start\|>"):
        P.Tokenizer(bare)


# ----------------------------------------------------------------------------- chat layout and processor


CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What happens?"},
                                  {"type": "image", "image": "a.png"}, {"image_url": "b.png"}]},
     {"role": "assistant", "content": "A man walks."},
     {"role": "user", "content": [{"type": "text", "text": "And then?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "list system"}]}, {"role": "user", "content": "hi"}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen,vision_id", [(True, False), (False, False), (True, True)])
def test_build_prompt_matches_chat_template(tok_dir, conv, gen, vision_id):
    hf = Qwen2TokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
    ref = hf.apply_chat_template(conv, chat_template=QWEN2VL_CHAT_TEMPLATE, tokenize=False,
                                 add_generation_prompt=gen, add_vision_id=vision_id)
    assert P.build_prompt(conv, add_generation_prompt=gen, add_vision_id=vision_id) == ref


def test_spec_example_prompt():
    conv = CONVERSATIONS[1]
    assert P.build_prompt(conv) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")


def hf_processor(tok_dir):
    """Qwen2_5_VLProcessor without torchvision: its video slot gets a stand-in that forwards to the slow image
    processor's (deprecated, still present in 4.57) `videos=` path with the video pixel limits."""
    from transformers.processing_utils import ProcessorMixin
    base = ProcessorMixin.get_possibly_dynamic_module("BaseVideoProcessor")  # a dummy class without torchvision

    class SlowVideoProcessor(base):
        def __init__(self):
            self.ip = Qwen2VLImageProcessor(min_pixels=P.VIDEO_MIN_PIXELS, max_pixels=P.VIDEO_MAX_PIXELS)
            self.merge_size, self.temporal_patch_size = 2, 2

        def __call__(self, videos=None, **kwargs):
            return self.ip(images=None, videos=videos, return_tensors=kwargs.get("return_tensors"))

    tok = Qwen2TokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
    ip = Qwen2VLImageProcessor(min_pixels=P.MIN_PIXELS, max_pixels=P.MAX_PIXELS)
    return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=SlowVideoProcessor())


def test_processor_matches_hf_processor(tok_dir):
    proc = P.Processor.from_pretrained(tok_dir)
    texts = [P.build_prompt(CONVERSATIONS[2]), P.build_prompt(CONVERSATIONS[1])]  # video+2 images, then 1 image
    images = [rand_image(120, 90, 1), rand_image(60, 300, 2), rand_image(200, 200, 3)]
    video = [rand_image(56, 112, 10 + i) for i in range(3)]
    ours = proc(texts, images=images, videos=[video], video_fps=1.0)
    ref = hf_processor(tok_dir)(text=texts, images=images, videos=[video], fps=1.0, return_tensors="pt",
                                padding=True, padding_side="left")
    assert list(ours) == list(ref.keys())
    for k in ours:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    tok = proc.tokenizer
    assert (ours["input_ids"] == tok.image_pad_id).sum() == ours["image_grid_thw"].prod(-1).sum() // 4
    assert (ours["input_ids"] == tok.video_pad_id).sum() == ours["video_grid_thw"].prod(-1).sum() // 4
    assert ours["attention_mask"][1, 0] == 0 and ours["input_ids"][1, 0] == tok.pad_id  # left padding


def test_processor_single_text_and_720p_pad_count(tok_dir):
    proc = P.Processor.from_pretrained(tok_dir)
    out = proc(P.build_prompt(CONVERSATIONS[1]), images=Image.new("RGB", (1280, 720), (9, 99, 199)))
    assert out["input_ids"].shape[0] == 1 and out["attention_mask"].all()
    assert (out["input_ids"] == proc.tokenizer.image_pad_id).sum() == 1196  # 1,196 image pads: the transformers processor's count for this image
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}


def test_placeholder_count_mismatch(tok_dir):
    proc = P.Processor.from_pretrained(tok_dir)
    one_image = P.build_prompt(CONVERSATIONS[1])
    img = rand_image(56, 56, 0)
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholder"):
        proc(one_image, images=[img, img])
    with pytest.raises(ValueError, match="placeholder"):
        proc(one_image)
    with pytest.raises(ValueError, match="videos"):
        proc("no video here", videos=[img, img])


def test_save_and_load_roundtrip(tok_dir, tmp_path):
    proc = P.Processor(P.Tokenizer.from_file(tok_dir), min_pixels=6272, max_pixels=200704)
    proc.save_pretrained(str(tmp_path))
    again = P.Processor.from_pretrained(str(tmp_path))
    assert (again.min_pixels, again.max_pixels) == (6272, 200704)
    assert (again.video_min_pixels, again.video_max_pixels) == (P.VIDEO_MIN_PIXELS, P.VIDEO_MAX_PIXELS)
    text = P.build_prompt(CONVERSATIONS[2])
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(hf_tok).__name__ == "Qwen2TokenizerFast"
    assert hf_tok(text).input_ids == again.tokenizer.encode(text)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"
    hf_ip = Qwen2VLImageProcessor.from_pretrained(str(tmp_path))
    assert (hf_ip.min_pixels, hf_ip.max_pixels) == (6272, 200704)


def test_from_pretrained_reads_size_keys(tok_dir, tmp_path):
    for name in ["tokenizer.json"]:
        with open(os.path.join(tok_dir, name)) as src, open(tmp_path / name, "w") as dst:
            dst.write(src.read())
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 1234, "longest_edge": 56789}}))
    proc = P.Processor.from_pretrained(str(tmp_path))
    assert (proc.min_pixels, proc.max_pixels) == (1234, 56789)
