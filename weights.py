"""
Reading a published Qwen2.5-VL checkpoint's weights (model.VLM.from_pretrained calls these): one model.safetensors
or shards listed by model.safetensors.index.json, tensor names in the published layout (visual.*, model.*, lm_head)
or the one transformers >= 4.52 saves (model.visual.*, model.language_model.*), each tensor's stored dtype and shape
checked against the config before it is read, memory-mapped, straight to the device in the model's dtype.

A checkpoint from elsewhere is untrusted input: a shard name may not leave the folder, a truncated or mislabelled file
is one ValueError that names it, and weights holding NaN or inf load with a warning.
"""
import os

import torch


def canonical_name(name):
    """transformers >= 4.52 may save model.visual.* / model.language_model.*; we use the published names."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def checkpoint_files(path):
    """{safetensors file: the tensor names to read from it, or None for all of them}. A sharded checkpoint's
    model.safetensors.index.json decides which shard each tensor comes from (even when two shards hold it);
    its shard names must stay inside the folder: no absolute paths, no ../"""
    from processor import read_json
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        single = os.path.join(path, "model.safetensors")
        if not os.path.isfile(single):
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
        return {single: None}
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: needs a \"weight_map\" object of tensor name -> shard file name")
    files = {}
    for name, shard in weight_map.items():
        rel = os.path.normpath(shard)
        if os.path.isabs(shard) or rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise ValueError(f"{index}: the shard {shard!r} of {name} is outside the checkpoint folder")
        files.setdefault(os.path.join(path, rel), []).append(name)
    absent = sorted(f for f in files if not os.path.isfile(f))
    if absent:
        raise FileNotFoundError(f"{index}: names shards that are not in {path}: {absent}")
    return files


def tensor_locations(files):
    """{our tensor name: (file, name in the file)} from checkpoint_files' answer; names in the published or the
    transformers >= 4.52 layout."""
    from safetensors import SafetensorError, safe_open
    where = {}
    for file, names in files.items():
        try:
            with safe_open(file, "pt") as f:
                present = set(f.keys())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {file}: the file is truncated or not a safetensors file ({e})") from None
        for name in sorted(present) if names is None else names:
            if name not in present:
                raise ValueError(f"{file}: has no tensor {name}, though the index places it there")
            where[canonical_name(name)] = (file, name)
    return where


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes weights may be stored in


def read_tensors(where, expected, device, dtype):
    """Each tensor of `where`, its stored dtype and shape checked, read from the memory-mapped file straight to
    `device` in `dtype`. Weights holding NaN or inf load with a warning (every output would be NaN)."""
    from safetensors import safe_open
    by_file, state, nonfinite = {}, {}, []
    for key, (file, name) in where.items():
        by_file.setdefault(file, []).append((key, name))
    for file, items in by_file.items():
        with safe_open(file, "pt", device="cpu") as f:
            for key, name in items:
                info = f.get_slice(name)  # the header's dtype and shape, no data read yet
                stored, shape = info.get_dtype(), tuple(info.get_shape())
                if stored not in FLOAT_DTYPES:  # e.g. a header flipped from F32 to I32: same bytes, garbage values
                    raise ValueError(f"{file}: tensor {name} is stored as {stored}, not a float type "
                                     f"({'/'.join(FLOAT_DTYPES)}); the file is corrupt or quantized")
                if shape != tuple(expected[key]):
                    raise ValueError(f"tensor {name} in {file} has shape {shape}, the config expects "
                                     f"{tuple(expected[key])}")
                try:
                    state[key] = f.get_tensor(name).to(device=device, dtype=dtype)
                except Exception as e:
                    raise ValueError(f"cannot read tensor {name} from {file}: truncated or corrupt ({e})") from None
                if not bool(torch.isfinite(state[key]).all()):
                    nonfinite.append(f"{name} (in {file})")
    if nonfinite:
        import warnings
        n = len(nonfinite)
        warnings.warn(f"{n} tensor{'s hold' if n > 1 else ' holds'} NaN or inf values, the first is "
                      f"{nonfinite[0]}: the model's outputs will be NaN", stacklevel=3)
    return state
