"""Pruned checkpoints: safetensors only, no pickle.

* ``save_pruned(model, tokenizer, out)``: ``save_pretrained`` output that transformers
  reloads as it is (the zeros are in the weights), plus ``wanda_kernels.json`` with the
  pruning report.
* ``save_compressed(model, tokenizer, out)``: the 2:4 form. Every 2:4 linear layer is
  stored as a ``SparseLinear`` (``values`` + ``meta`` from ``compress_24``, and
  ``bias``), the rest dense, in fp16/bf16; ``wanda_kernels.json`` lists the sparse
  layers. ``load_compressed(out)`` rebuilds the model from its config with
  ``SparseLinear`` modules and loads the tensors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..sparse_linear import SparseLinear, sparsify_

__all__ = ["save_pruned", "save_compressed", "load_compressed", "is_compressed_checkpoint"]

MANIFEST = "wanda_kernels.json"
FORMAT_DENSE = "wanda-kernels-pruned"
FORMAT_24 = "wanda-kernels-2:4-compressed"
VERSION = 1


def save_pruned(model, tokenizer, out_dir, *, report=None) -> Path:
    """``save_pretrained`` (safetensors) of the pruned model and tokenizer, plus the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    manifest = {"format": FORMAT_DENSE, "version": VERSION, "report": report.to_dict() if report else None}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def save_compressed(model, tokenizer, out_dir, *, dtype: torch.dtype = torch.float16, report=None) -> Path:
    """The 2:4 compressed checkpoint of ``model`` (its 2:4 linear layers as SparseLinear)."""
    from safetensors.torch import save_model

    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the 2:4 format stores float16 or bfloat16; got dtype={dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packed = copy.deepcopy(model).to(device="cpu", dtype=dtype)
    names = sparsify_(packed)
    if not names:
        raise ValueError("the model has no 2:4 sparse linear layer to compress; prune it with pattern='2:4' first")
    save_model(packed, str(out / "model.safetensors"))  # de-duplicates tied weights
    packed.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    layers = {n: [m.in_features, m.out_features, m.bias is not None]
              for n, m in packed.named_modules() if isinstance(m, SparseLinear)}
    manifest = {"format": FORMAT_24, "version": VERSION, "dtype": str(dtype).replace("torch.", ""),
                "sparse_layers": layers, "report": report.to_dict() if report else None}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def _manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is corrupt: {exc}") from exc


def is_compressed_checkpoint(path) -> bool:
    manifest = _manifest(Path(path))
    return bool(manifest) and manifest.get("format") == FORMAT_24


def load_compressed(path, *, device="cpu"):
    """``(model, tokenizer)`` from :func:`save_compressed`, with SparseLinear modules, in eval mode."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    manifest = _manifest(path)
    if not manifest or manifest.get("format") != FORMAT_24:
        raise ValueError(f"{path} is not a wanda_kernels 2:4 compressed checkpoint (no {MANIFEST} with format "
                         f"{FORMAT_24!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint format version {manifest.get('version')} is not supported "
                         f"(this wanda_kernels reads version {VERSION})")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(manifest.get("dtype"))
    if dtype is None:
        raise ValueError(f"{path / MANIFEST}: unknown dtype {manifest.get('dtype')!r}")
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, (in_f, out_f, bias) in manifest["sparse_layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path}: sparse layer {name!r} of the manifest is not in the model's config") from exc
        if (getattr(old, "in_features", None), getattr(old, "out_features", None)) != (in_f, out_f):
            raise ValueError(f"{path}: sparse layer {name!r} is {in_f}->{out_f} in the manifest but "
                             f"{getattr(old, 'in_features', '?')}->{getattr(old, 'out_features', '?')} in the config")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SparseLinear(in_f, out_f, bias, dtype=dtype))
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path / 'model.safetensors'} is corrupt or unreadable: {exc}") from exc
    except RuntimeError as exc:
        raise ValueError(f"{path / 'model.safetensors'} does not match the model described by its config and "
                         f"manifest: {str(exc).splitlines()[0]}") from exc
    tokenizer = transformers.AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer
