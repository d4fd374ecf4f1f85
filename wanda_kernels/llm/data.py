"""Calibration and evaluation text, and token windows.

The built-in corpus is Jane Austen's six novels from Debian's ``r-cran-janeaustenr``
package, read from its R lazy-load database (``data/Rdata.rdx`` + ``Rdata.rdb``) with
the ``rdata`` package, without R. ``tools/install_assets.sh`` unpacks it into
``~/.cache/wanda_kernels/janeaustenr`` without installing R. Calibration uses five
novels, evaluation uses *Emma*.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from pathlib import Path

import torch

from .._env import cache_root

__all__ = ["AUSTEN_NOVELS", "EVAL_NOVEL", "austen_dir", "austen_texts", "load_corpus", "sample_windows",
           "eval_windows", "read_text_file", "split_text"]

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
EVAL_NOVEL = "emma"
_DATA_SUBDIR = Path("usr/lib/R/site-library/janeaustenr/data")
_INSTALL_HINT = ("install it with `bash tools/install_assets.sh` (it unpacks Debian's r-cran-janeaustenr into "
                 "~/.cache/wanda_kernels/janeaustenr; no R needed), or `apt-get install r-cran-janeaustenr`, "
                 "or point WANDA_KERNELS_AUSTEN_DIR at the package's data/ folder")


def austen_dir() -> Path:
    """The janeaustenr ``data/`` folder holding ``Rdata.rdx`` and ``Rdata.rdb``."""
    candidates = []
    if os.environ.get("WANDA_KERNELS_AUSTEN_DIR"):
        candidates.append(Path(os.environ["WANDA_KERNELS_AUSTEN_DIR"]))
    candidates += [cache_root() / "janeaustenr" / _DATA_SUBDIR, Path("/") / _DATA_SUBDIR]
    for c in candidates:
        if (c / "Rdata.rdx").is_file() and (c / "Rdata.rdb").is_file():
            return c
    raise FileNotFoundError(f"Jane Austen corpus not found (looked in {', '.join(map(str, candidates))}); "
                            f"{_INSTALL_HINT}")


def _read_r_lazyload(folder: Path) -> dict[str, list[str]]:
    """Every object of an R lazy-load database: the index is a gzip'ed RDS file mapping
    names to (offset, length) in the .rdb, where each object is a 4-byte big-endian
    size followed by a zlib stream of the serialized object."""
    try:
        import rdata
        from rdata.conversion import convert
    except ImportError as exc:
        raise ImportError("reading the Austen corpus needs the `rdata` package: "
                          "pip install 'wanda-kernels[llm]'") from exc

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialization "is assumed RDS"
            return convert(rdata.parser.parse_data(raw, expand_altrep=True))

    index = parse(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    blob = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        size = struct.unpack(">I", chunk[:4])[0]
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise ValueError(f"{folder / 'Rdata.rdb'}: object {name!r} is {len(raw)} bytes, the index says {size}")
        out[str(name)] = [str(line) for line in parse(raw)]
    return out


def austen_texts(folder: str | Path | None = None) -> dict[str, str]:
    """``{novel: full text}`` for the six novels (lines joined with newlines)."""
    lines = _read_r_lazyload(Path(folder) if folder else austen_dir())
    missing = [n for n in AUSTEN_NOVELS if n not in lines]
    if missing:
        raise ValueError(f"the janeaustenr data lacks {missing}")
    return {n: "\n".join(lines[n]) for n in AUSTEN_NOVELS}


def read_text_file(text_file: str | Path) -> str:
    """A UTF-8 text file's content; errors name the file and say what is wrong with it.

    Raises:
        FileNotFoundError: it does not exist. IsADirectoryError: it is a folder.
        ValueError: it is not UTF-8 text (the offset of the first bad byte) or is empty.
    """
    path = Path(text_file)
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"text file {path} is a folder; give a UTF-8 text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                         f"cannot be decoded (convert it, e.g. `iconv -f latin1 -t utf-8`)") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def _check_split(split: str) -> None:
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval'; got {split!r}")


def split_text(text: str, split: str) -> str:
    """The calibration (first 90%) or evaluation (last 10%) part of a text."""
    _check_split(split)
    cut = int(len(text) * 0.9)
    return text[:cut] if split == "calib" else text[cut:]


def load_corpus(text_file: str | Path | None = None, *, split: str) -> str:
    """Calibration (``split="calib"``) or evaluation (``split="eval"``) text.

    With ``text_file``: that file (UTF-8) for both splits, the first 90% for calibration
    and the last 10% for evaluation. Without: the Austen novels, calibration on all but
    *Emma*, evaluation on *Emma*.
    """
    _check_split(split)
    if text_file is not None:
        return split_text(read_text_file(text_file), split)
    texts = austen_texts()
    if split == "eval":
        return texts[EVAL_NOVEL]
    return "\n\n".join(t for n, t in texts.items() if n != EVAL_NOVEL)


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def sample_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(nsamples, seqlen)`` token windows at random offsets of ``text`` (seeded), as in the paper."""
    ids = _token_ids(tokenizer, text)
    if ids.numel() <= seqlen:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, text: str, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """``(n, seqlen)`` non-overlapping windows over ``text`` (the tail that does not fill one is dropped)."""
    ids = _token_ids(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)
