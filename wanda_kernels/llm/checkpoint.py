"""Pruned checkpoints: safetensors only, no pickle, written whole or not at all, checksummed.

* ``save_pruned(model, tokenizer, out)``: ``save_pretrained`` output that transformers
  reloads as it is (the zeros are in the weights), plus ``wanda_kernels.json`` with the
  pruning report (and ``permutations.safetensors`` after ``permute=True``: the input order
  in which each unfolded layer is N:M, for ``sparsify_(..., permutations=load_permutations(out))``).
* ``save_compressed(model, tokenizer, out, format=...)``: the compressed form, in
  fp16/bf16. ``format="2:4"``: every 2:4 linear layer is stored as a ``SparseLinear``
  (``values`` + ``meta`` from ``compress_24``, ``bias``, and ``perm`` for the layers
  that ``report.permutations`` names: ``prune_model(..., permute=True)``); ``format="bitmap"``: every
  pruned linear layer (unstructured or N:M) as a ``BitmapLinear`` (``values``,
  ``bitmap``, ``row_offsets`` for unequal rows, ``bias``); the rest dense.
  ``wanda_kernels.json`` names the format and lists the sparse layers.
  ``load_compressed(out)`` builds the model from its config with its parameters on the
  meta device (no memory, no random initialisation), puts those modules in place of the
  sparse layers, and loads the stored tensors into them and into empty dense parameters:
  a sparse layer's dense weight is never initialised or filled (``nn.Linear`` reserves
  it for a moment, untouched, before it goes to meta), so loading needs the compressed
  model's memory and time, not the dense one's.

Both copy ``extra_files`` in as they are (a vision-language model's processor files,
:func:`~wanda_kernels.llm.models.processor_files`), and both write into a temporary
sibling folder renamed into place at the end
(:func:`~wanda_kernels.llm.safe_io.staged_dir`): a non-empty ``out`` is refused unless
``overwrite=True``, and an interrupted save leaves ``out`` as it was. The manifest
``wanda_kernels.json`` records the sha256 of every other file; :func:`verify_checkpoint`
(called by ``load_compressed`` and by ``wanda-kernels eval``) names a damaged file.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import torch

from .._linear_like import linear_features
from .._warn import warn_external
from ..bitmap_linear import BitmapLinear
from ..sparse_linear import SparseLinear
from ..sparsify import announce_fallback, sparsify_
from .models import model_class
from .safe_io import sha256_files, staged_dir, verify_files

__all__ = ["save_pruned", "load_permutations", "save_compressed", "load_compressed", "is_compressed_checkpoint",
           "compressed_format", "has_manifest", "verify_checkpoint", "stored_dtype"]

MANIFEST = "wanda_kernels.json"
PERMUTATIONS = "permutations.safetensors"  # save_pruned: prune_model(..., permute=True)'s unfolded permutations
FORMAT_DENSE = "wanda-kernels-pruned"
FORMAT_24 = "wanda-kernels-2:4-compressed"
FORMAT_BITMAP = "wanda-kernels-bitmap-compressed"
# The manifest's format for each sparsify_ format, and the module its layers become.
COMPRESSED = {"2:4": (FORMAT_24, SparseLinear), "bitmap": (FORMAT_BITMAP, BitmapLinear)}
VERSION = 2  # 2: the manifest records the sha256 of every file ("files")
READABLE_VERSIONS = (1, 2)


def _write_manifest(out: Path, manifest: dict) -> None:
    """The manifest, with the checksums of every file written so far; written last."""
    manifest = {**manifest, "files": sha256_files(out, exclude=(MANIFEST,))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


# What every checkpoint writes itself: an extra file of one of these names is refused.
_OWN_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json", MANIFEST,
              PERMUTATIONS)


def _checked_extra_files(extra_files) -> list[Path]:
    """``extra_files`` as Paths, each an existing file, no two with one name and none named
    as a file the checkpoint writes (ValueError naming it)."""
    files = [Path(f) for f in extra_files]
    for f in files:
        if not f.is_file():
            raise ValueError(f"extra_files: {f} is not a file")
        if f.name in _OWN_FILES:
            raise ValueError(f"extra_files: {f} would replace the {f.name} the checkpoint writes itself")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"extra_files: two files named {next(n for n in names if names.count(n) > 1)!r}")
    return files


def _copy_extra_files(files: list[Path], into: Path) -> None:
    """Copy ``files`` into ``into`` as they are. One whose name the checkpoint has already
    written (a tokenizer file) is left out with a warning: the checkpoint's own describes
    what it saved."""
    for f in files:
        if (into / f.name).exists():
            warn_external(f"extra_files: {f} left out: the checkpoint wrote its own {f.name}")
            continue
        shutil.copyfile(f, into / f.name)


def save_pruned(model, tokenizer, out_dir, *, report=None, overwrite: bool = False, extra_files=()) -> Path:
    """``save_pretrained`` (safetensors) of the pruned model and tokenizer, plus the report.

    Args:
        model: the pruned Hugging Face model (any device and dtype).
        tokenizer: its tokenizer, or None.
        out_dir: the folder to create; an existing non-empty one needs ``overwrite=True``
            and is then replaced as a whole.
        report: the :class:`~wanda_kernels.llm.pipeline.PruneReport`, recorded in the manifest.
        extra_files: files copied into the checkpoint as they are (and checksummed with
            the rest): a vision-language model's processor files,
            :func:`~wanda_kernels.llm.models.processor_files`.

    Returns:
        ``out_dir`` as a Path, once everything is written.

    Raises:
        ValueError: an extra file is missing, or named as a file the checkpoint writes
            itself (``config.json``, ``model.safetensors``...): nothing is written then.
    """
    extra_files = _checked_extra_files(extra_files)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _copy_extra_files(extra_files, tmp)
        perms = getattr(report, "permutations", None) or {}
        if perms:
            from safetensors.torch import save_file

            # one copy each: layers that read the same input share one permutation tensor
            save_file({name: p.detach().cpu().clone() for name, p in perms.items()}, str(tmp / PERMUTATIONS))
        _write_manifest(tmp, {"format": FORMAT_DENSE, "version": VERSION,
                              "report": report.to_dict() if report else None})
    return Path(out_dir)


def load_permutations(path) -> dict[str, torch.Tensor]:
    """The N:M input permutations a :func:`save_pruned` checkpoint holds (``{}`` if none), for ``sparsify_``."""
    file = Path(path) / PERMUTATIONS
    if not file.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(file))


def _cpu_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` on the CPU, floating-point parameters and buffers in ``dtype``.

    What ``copy.deepcopy(model).to("cpu", dtype)`` gives, but each tensor is copied
    straight to the CPU in ``dtype``: no second copy of the model on its own device (a
    GPU) or in its own dtype (fp32 on a CPU). Tied parameters stay tied.
    """
    memo: dict[int, torch.Tensor] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in memo:
            copied = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else None, copy=True)
            memo[id(tensor)] = (torch.nn.Parameter(copied, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, torch.nn.Parameter) else copied)
    return copy.deepcopy(model, memo)


def save_compressed(model, tokenizer, out_dir, *, format: str = "2:4", dtype: torch.dtype = torch.float16,
                    report=None, overwrite: bool = False, progress: bool = True, extra_files=()) -> Path:
    """The compressed checkpoint of ``model``: its pruned linear layers as SparseLinear (2:4) or BitmapLinear.

    Args:
        model: a model whose pruned linear layers (``nn.Linear``, GPT-2's ``Conv1D``) are to be stored compressed;
            it is not modified (a CPU copy in ``dtype`` is compressed).
        format: ``"2:4"`` (the 2:4 layers, for sparse tensor cores) or ``"bitmap"`` (every
            layer with at least 25% zeros: unstructured or any N:M pattern).
        dtype: ``torch.float16`` or ``torch.bfloat16``, the stored dtype.
        out_dir, overwrite, report, extra_files: as :func:`save_pruned`.
        progress: a tqdm bar over the layers being compressed.
    """
    from safetensors.torch import save_model

    if format not in COMPRESSED:
        raise ValueError(f"format must be one of {', '.join(map(repr, COMPRESSED))}; got {format!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the compressed formats store float16 or bfloat16; got dtype={dtype}")
    manifest_format, module_cls = COMPRESSED[format]
    extra_files = _checked_extra_files(extra_files)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        packed = _cpu_copy(model, dtype)
        perms = getattr(report, "permutations", None) or {}
        names = sparsify_(packed, format=format, progress=progress, permutations=perms)
        if not names:
            hint = "pattern='2:4'" if format == "2:4" else "any pattern (at least 25% of a layer's weights zero)"
            raise ValueError(f"the model has no pruned linear layer to store in the {format} format; prune it with "
                             f"{hint} first")
        save_model(packed, str(tmp / "model.safetensors"))  # de-duplicates tied weights
        packed.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _copy_extra_files(extra_files, tmp)
        # [in, out, bias, permuted inputs (SparseLinear.perm)]
        layers = {n: [m.in_features, m.out_features, m.bias is not None, getattr(m, "perm", None) is not None]
                  for n, m in packed.named_modules() if isinstance(m, module_cls)}
        _write_manifest(tmp, {"format": manifest_format, "version": VERSION, "dtype": str(dtype).replace("torch.", ""),
                              "sparse_layers": layers, "report": report.to_dict() if report else None})
    return Path(out_dir)


def _manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{file} is corrupt: not a JSON object")
    return manifest


def _check_version(path: Path, manifest: dict) -> None:
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: checkpoint format version {version} is not supported (this wanda_kernels reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))})")


def _stored_dtype(path: Path, manifest: dict) -> torch.dtype:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(manifest.get("dtype"))
    if dtype is None:
        raise ValueError(f"{path / MANIFEST}: unknown dtype {manifest.get('dtype')!r}")
    return dtype


def _module_for(manifest: dict | None):
    """The sparse module class of a compressed checkpoint's manifest, or None."""
    formats = {name: module_cls for name, module_cls in COMPRESSED.values()}
    return formats.get(manifest.get("format")) if manifest else None


def _compressed_manifest(path: Path) -> dict:
    """The manifest of a compressed checkpoint (2:4 or bitmap); ValueError when ``path`` is not one."""
    manifest = _manifest(path)
    if _module_for(manifest) is None:
        raise ValueError(f"{path} is not a wanda_kernels compressed checkpoint (no {MANIFEST} with format "
                         f"{FORMAT_24!r} or {FORMAT_BITMAP!r})")
    return manifest


def compressed_format(path) -> str:
    """``"2:4"`` or ``"bitmap"``: the format of a compressed checkpoint."""
    manifest = _compressed_manifest(Path(path))
    return next(name for name, (fmt, _) in COMPRESSED.items() if fmt == manifest["format"])


def stored_dtype(path) -> torch.dtype:
    """The dtype a compressed checkpoint is stored (and loaded) in."""
    path = Path(path)
    return _stored_dtype(path, _compressed_manifest(path))


def has_manifest(path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_pruned` or :func:`save_compressed`."""
    return (Path(path) / MANIFEST).is_file()


def verify_checkpoint(path) -> None:
    """Check every file of a saved checkpoint against the sha256 in its manifest.

    Raises:
        ValueError: no or corrupt manifest, an unsupported version, or a file missing or
            damaged (named). A version-1 manifest (no checksums) is accepted with a warning.
    """
    path = Path(path)
    manifest = _manifest(path)
    if manifest is None:
        raise ValueError(f"{path} has no {MANIFEST}: not a checkpoint written by wanda_kernels")
    _check_version(path, manifest)
    if "files" not in manifest:
        warnings.warn(f"{path / MANIFEST} records no checksums (written by an older wanda_kernels): the files "
                      "cannot be verified", RuntimeWarning, stacklevel=2)
        return
    verify_files(path, manifest["files"], record=str(path / MANIFEST))


def is_compressed_checkpoint(path) -> bool:
    """Whether ``path`` holds a checkpoint written by :func:`save_compressed` (either format)."""
    return _module_for(_manifest(Path(path))) is not None


def _empty_meta_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every parameter still on the meta device uninitialised CPU memory, in place,
    floating-point ones in ``dtype`` (the file's).

    For a model about to receive every parameter from a file (``load_model(strict=True)``
    then fails on any it lacks, and copies each tensor into the parameter's own dtype).
    Not the dtype ``from_config`` gave: transformers 4.x builds the parts of a composite
    model (a vision-language model's language model and vision encoder) in the dtype
    saved in their own sub-configs, fp32, whatever ``dtype`` it was given. A parameter
    shared by several modules stays shared.
    """
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in made:
                    like = dtype if param.is_floating_point() else param.dtype
                    made[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu", dtype=like),
                                                         requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]


def load_compressed(path, *, device="cpu", verify: bool = True):
    """``(model, tokenizer)`` from :func:`save_compressed`, with SparseLinear or BitmapLinear modules, in eval mode.

    Args:
        path: the checkpoint folder.
        device: where the model goes. Where no kernel of the format runs there (a CPU, a
            GPU without one), one warning, now, says the sparse layers run dense.
        verify: check every file against the manifest's sha256 first (:func:`verify_checkpoint`).

    Raises:
        ValueError: not such a checkpoint, an unsupported version, a damaged or missing
            file (named), or tensors that do not match the config and manifest.
    """
    import transformers
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    manifest = _compressed_manifest(path)
    if verify:
        verify_checkpoint(path)  # checks the version too
    else:
        _check_version(path, manifest)
    dtype = _stored_dtype(path, manifest)
    module_cls = _module_for(manifest)
    config = transformers.AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = model_class(config).from_config(config, dtype=dtype)  # a vision-language model's vision encoder too
    for name, (in_f, out_f, bias, *permuted) in manifest["sparse_layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path}: sparse layer {name!r} of the manifest is not in the model's config") from exc
        features = linear_features(old)  # nn.Linear, or Conv1D (GPT-2)
        if features != (in_f, out_f):
            shown = "{}->{}".format(*features) if features else f"a {type(old).__name__}, not a linear layer,"
            raise ValueError(f"{path}: sparse layer {name!r} is {in_f}->{out_f} in the manifest but {shown} in "
                             "the config")
        parent, _, child = name.rpartition(".")
        # BitmapLinear takes the sizes of its values from the file (they depend on the weight).
        extra = {"permuted": True} if permuted and permuted[0] else {}  # a SparseLinear with an input permutation
        setattr(model.get_submodule(parent), child, module_cls(in_f, out_f, bias, dtype=dtype, **extra))
    _empty_meta_parameters(model, dtype)
    model.tie_weights()  # tied embeddings share one tensor again (the file stores it once)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path / 'model.safetensors'} is corrupt or unreadable: {exc}") from exc
    except ValueError as exc:  # a BitmapLinear whose bits and values disagree (named)
        raise ValueError(f"{path / 'model.safetensors'}: {exc}") from exc
    except RuntimeError as exc:
        raise ValueError(f"{path / 'model.safetensors'} does not match the model described by its config and "
                         f"manifest: {str(exc).splitlines()[0]}") from exc
    tokenizer = transformers.AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    model.config.use_cache = False
    model = model.to(device).eval()
    announce_fallback(model)
    return model, tokenizer
