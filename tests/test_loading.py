"""Checkpoint loading: a tiny checkpoint is saved, then broken one way at a time; every break must give a
one-line error naming the file (and the tensor), or load with the documented behaviour."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import processor as P


@pytest.fixture(scope="module")
def tiny():
    return M.VLM(M.PRESETS["tiny"]()).init_weights()


@pytest.fixture
def ckpt(tiny, tmp_path):
    path = tmp_path / "ckpt"
    tiny.save_pretrained(path)
    return path


def load(path):
    return M.VLM.from_pretrained(path, device="cpu", dtype=torch.float32)


def set_header_dtype(file, name, dtype):
    """Rewrite one tensor's dtype in a safetensors header in place (F32 -> I32 keeps every byte offset)."""
    data = bytearray(file.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    data[8:8 + n] = text
    file.write_bytes(bytes(data))


def shard(path, names_in_a):
    """Split model.safetensors into a.safetensors (names_in_a) and b.safetensors (the rest) plus an index."""
    sd = load_file(path / "model.safetensors")
    a = {k: v for k, v in sd.items() if k in names_in_a}
    b = {k: v for k, v in sd.items() if k not in names_in_a}
    save_file(a, path / "a.safetensors")
    save_file(b, path / "b.safetensors")
    os.remove(path / "model.safetensors")
    weight_map = {**{k: "a.safetensors" for k in a}, **{k: "b.safetensors" for k in b}}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sd, weight_map


NAME = "model.layers.0.mlp.up_proj.weight"


def test_round_trip(tiny, ckpt):
    m = load(ckpt)
    for k, v in tiny.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_integer_dtype_refused(ckpt):
    set_header_dtype(ckpt / "model.safetensors", NAME, "I32")
    with pytest.raises(ValueError, match=rf"model.safetensors.*{NAME}.*I32") as e:
        load(ckpt)
    assert "\n" not in str(e.value)


def test_sharded_index_decides_which_copy(tiny, ckpt):
    sd, weight_map = shard(ckpt, {NAME})
    # b.safetensors also holds a different copy of NAME; the index says a.safetensors, so a's copy is read
    b = load_file(ckpt / "b.safetensors")
    b[NAME] = torch.full_like(sd[NAME], 7.0)
    save_file(b, ckpt / "b.safetensors")
    assert torch.equal(load(ckpt).state_dict()[NAME], tiny.state_dict()[NAME])
    # and the other way round: the index moved to b, b's copy is read
    weight_map[NAME] = "b.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert (load(ckpt).state_dict()[NAME] == 7.0).all()


def test_index_naming_a_tensor_its_shard_lacks(ckpt):
    _, weight_map = shard(ckpt, {NAME})
    weight_map["model.norm.weight"] = "a.safetensors"  # it is in b
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"a.safetensors.*model.norm.weight"):
        load(ckpt)


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABSOLUTE"])
def test_shard_paths_stay_in_the_folder(ckpt, where):
    sd, weight_map = shard(ckpt, {NAME})
    outside = ckpt.parent / "outside.safetensors"
    save_file({NAME: sd[NAME]}, outside)  # a readable file: only the confinement can refuse it
    weight_map[NAME] = str(outside) if where == "ABSOLUTE" else where
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json.*outside the checkpoint folder"):
        load(ckpt)


def test_nonfinite_weights_warn(tiny, ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd[NAME][0, 0] = float("nan")
    sd["model.norm.weight"][1] = float("inf")
    save_file(sd, ckpt / "model.safetensors")
    with pytest.warns(UserWarning, match=rf"2 tensors hold NaN or inf.*first is (model.norm.weight|{NAME})"):
        m = load(ckpt)
    assert torch.isnan(m.state_dict()[NAME][0, 0])


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_bad_json_names_the_file(ckpt, file):
    if file != "config.json":
        shard(ckpt, {NAME})
    (ckpt / file).write_text("")
    with pytest.raises(ValueError, match=rf"^[^:]*{file}: not valid JSON \(Expecting value: line 1 column 1\)$"):
        load(ckpt)


def test_config_with_wrong_shapes_names_the_file(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"] = [1, 2]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: "):
        load(ckpt)


def test_missing_config_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*config.json.*python train.py"):
        load(tmp_path)


def test_stale_index_is_removed_by_save(tiny, ckpt):
    shard(ckpt, {NAME})
    other = M.VLM(M.PRESETS["tiny"]()).init_weights(seed=1)
    other.save_pretrained(ckpt)  # over a sharded checkpoint: the new single file must be what loads
    assert torch.equal(load(ckpt).state_dict()[NAME], other.state_dict()[NAME])


def test_preprocessor_config_bad_json_names_the_file(tmp_path):
    tok = P.build_tokenizer(["a b c"], 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "preprocessor_config.json").write_text("{\"min_pixels\": ")
    with pytest.raises(ValueError, match=r"preprocessor_config.json: not valid JSON"):
        P.Processor.from_pretrained(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text("{\"min_pixels\": \"many\"}")
    with pytest.raises(ValueError, match=r"preprocessor_config.json: the pixel limits must be positive numbers"):
        P.Processor.from_pretrained(str(tmp_path))


def test_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'tokenizer.json'}: no such file"):
        P.Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'tokenizer.json'}: not a valid tokenizer.json"):
        P.Tokenizer.from_file(tmp_path)


def test_cuda_on_a_cpu_only_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ValueError, match=r"CUDA is not available \(this torch is CPU-only\)"):
        M.pick_device_dtype("cuda")
    with pytest.raises(ValueError, match=r"'gpu' is not a torch device"):
        M.pick_device_dtype("gpu")
    assert M.pick_device_dtype("cpu", quiet=True) == (torch.device("cpu"), torch.float32)


def test_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """A save that fails half-way (here: the weights cannot be written) leaves no .tmp-save-* folder, and one
    left by a save that was killed is cleaned up by the next save."""
    import model as M
    m = M.VLM(M.PRESETS["tiny"]()).init_weights()
    (tmp_path / ".tmp-save-killed").mkdir()
    m.save_pretrained(str(tmp_path))
    assert not list(tmp_path.glob(".tmp-save-*"))

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(str(tmp_path))
    assert not list(tmp_path.glob(".tmp-save-*"))
    assert M.VLM.from_pretrained(str(tmp_path)) is not None  # the earlier save is whole
