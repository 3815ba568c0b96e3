"""tools/bench_stream.py's floor and variants at a tiny size on the CPU (the floor itself is timed on a GPU only):
the matrices the floor reads are exactly the decoder's and the LM head's weights, each variant runs and is named."""
import torch

from tools.bench_stream import decode_weights, main, set_variant
from test_eval import refused

from conftest import tiny_model


def test_the_floor_reads_every_decoder_weight_matrix_once(tok):
    model = tiny_model(tok, layers=3).fuse()
    mats = decode_weights(model)
    want = sum(p.numel() for n, p in model.named_parameters()
               if n.startswith("model.layers.") and n.endswith("proj.weight"))
    head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
    assert sum(w.numel() for w in mats) == want + head.numel() and len(mats) == 4 * 3 + 1


def test_variants_side_by_side(tmp_path):
    res = main(["--preset", "tiny", "--seconds", "3", "--warmup", "1", "--height", "56", "--width", "84",
                "--policies", "streaming", "--max-new-tokens", "4", "--variants", "reference,fused",
                "--out", str(tmp_path)])
    assert set(res["runs"]) == {"streaming-reference", "streaming-fused"} and res["floor"] is None  # no GPU
    assert [r["summary"]["variant"] for r in res["runs"].values()] == ["reference", "fused"]


def test_set_variant_picks_layout_and_decode_attention(tok):
    from model import decode_attention
    model = tiny_model(tok)
    set_variant(model, "reference")
    assert model.fusion is False and model.model.layers[0].self_attn.decode_fn is decode_attention
    set_variant(model, "fast")  # on a CPU the split-KV kernel is not there: the reference attention stays
    assert model.fusion is True and model.model.layers[0].self_attn.fused is not None
    assert model.model.layers[0].self_attn.decode_fn is decode_attention or torch.cuda.is_available()


def test_bad_variants_are_one_line_errors(capsys):
    assert "--variants: expected reference, fused, split-kv, fast" in refused(main, ["--variants", "turbo"], capsys)
