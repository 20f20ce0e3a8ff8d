"""Where text comes from: a file, a folder of text files, or a Hugging Face dataset.

:func:`load_text` returns one string. Datasets are read from the local Hugging Face cache
only (offline) unless the caller passes ``download=True``: a machine without network then
gets an immediate, clear error instead of minutes of retries.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["load_text", "DATASET_ALIASES", "DatasetSpec", "parse_dataset_spec"]

#: Separator between the files of a folder and between the rows of a dataset (the
#: usual ``"\n\n".join(test["text"])`` of the wikitext perplexity recipe).
JOIN = "\n\n"

# Shards of allenai/c4 "en" that the SparseGPT / Wanda recipes use (one file per split,
# not the 300 GB dataset).
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}

#: Short names accepted by :func:`load_text` (``NAME`` or ``NAME:SPLIT``).
DATASET_ALIASES = ("wikitext2", "wikitext-2", "c4")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset source. ``names``: the Hub names tried in order (the first found in
    the cache wins); ``data_files``: per-split files for datasets read by shard (c4)."""

    names: tuple[str, ...]
    config: str | None
    split: str
    field: str
    data_files: dict | None = None

    def describe(self) -> str:
        cfg = f", config {self.config}" if self.config else ""
        return f"dataset {self.names[0]}{cfg}, split {self.split}, field {self.field!r}"


def _is_spec(source: str) -> bool:
    return source.startswith("hf:") or source.split(":", 1)[0].lower() in DATASET_ALIASES


def parse_dataset_spec(source: str, split: str | None = None) -> DatasetSpec:
    """Parse ``"wikitext2[:SPLIT]"``, ``"wikitext-2[:SPLIT]"``, ``"c4[:SPLIT]"`` or
    ``"hf:NAME[:CONFIG][:SPLIT][:FIELD]"`` (empty parts take the defaults: no config,
    split ``split`` or ``"train"``, field ``"text"``). A split in the spec and a
    different ``split`` argument are an error."""
    if not isinstance(source, str):
        raise TypeError(f"dataset spec must be a string, got {type(source).__name__}")

    def pick_split(from_spec: str | None) -> str:
        if from_spec and split and from_spec != split:
            raise ValueError(f"dataset spec {source!r} names split {from_spec!r} but split={split!r} was passed")
        return from_spec or split or "train"

    head, _, rest = source.partition(":")
    alias = head.lower()
    if alias in ("wikitext2", "wikitext-2"):
        if ":" in rest:
            raise ValueError(f"dataset spec {source!r}: expected {head}[:SPLIT], got more parts")
        s = pick_split(rest or None)
        if s not in ("train", "validation", "test"):
            raise ValueError(f"dataset spec {source!r}: wikitext-2 has splits train, validation, test; got {s!r}")
        return DatasetSpec(("Salesforce/wikitext", "wikitext"), "wikitext-2-raw-v1", s, "text")
    if alias == "c4":
        if ":" in rest:
            raise ValueError(f"dataset spec {source!r}: expected c4[:SPLIT], got more parts")
        s = pick_split(rest or None)
        if s not in _C4_FILES:
            raise ValueError(f"dataset spec {source!r}: c4 has splits {', '.join(_C4_FILES)}; got {s!r}")
        return DatasetSpec(("allenai/c4",), None, s, "text", {s: _C4_FILES[s]})
    if head == "hf":
        parts = rest.split(":")
        if len(parts) > 4 or not parts[0]:
            raise ValueError(
                f"dataset spec {source!r}: expected hf:NAME[:CONFIG][:SPLIT][:FIELD] with a non-empty NAME"
            )
        parts += [""] * (4 - len(parts))
        name, config, s, fld = parts
        return DatasetSpec((name,), config or None, pick_split(s or None), fld or "text")
    raise ValueError(
        f"unknown dataset spec {source!r}: expected one of {', '.join(DATASET_ALIASES)} (optionally :SPLIT) "
        "or hf:NAME[:CONFIG][:SPLIT][:FIELD]"
    )


# ------------------------------------------------------------------- files
def _read_text_file(path: Path) -> str | None:
    """The file's text, or None when it is not plain UTF-8 text (NUL bytes, bad UTF-8)."""
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _load_folder(folder: Path) -> str:
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise ValueError(f"load_text: folder {folder} holds no files (expected plain-text files such as *.txt)")
    texts, skipped = [], []
    for p in files:
        t = _read_text_file(p)
        if t is None:
            skipped.append(p.relative_to(folder).as_posix())
        elif t.strip():
            texts.append(t)
    if skipped:
        warnings.warn(
            f"load_text: skipped {len(skipped)} file(s) of {folder} that are not UTF-8 text: {', '.join(skipped[:10])}"
            + (" ..." if len(skipped) > 10 else ""),
            stacklevel=3,
        )
    if not texts:
        why = f" ({len(skipped)} not UTF-8 text, the others empty)" if skipped else " (all empty)"
        raise ValueError(f"load_text: folder {folder} has no non-empty plain-text files{why}")
    return JOIN.join(texts)


# ----------------------------------------------------------------- datasets
@contextmanager
def _hub_offline(offline: bool):
    """Force datasets / huggingface_hub into offline mode for the duration (they read their
    environment variables once, at import, so setting HF_DATASETS_OFFLINE now is too late)."""
    if not offline:
        yield
        return
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    saved = (dcfg.HF_HUB_OFFLINE, getattr(dcfg, "HF_DATASETS_OFFLINE", None), hcfg.HF_HUB_OFFLINE)
    dcfg.HF_HUB_OFFLINE = True
    if hasattr(dcfg, "HF_DATASETS_OFFLINE"):
        dcfg.HF_DATASETS_OFFLINE = True
    hcfg.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE = saved[0]
        if saved[1] is not None:
            dcfg.HF_DATASETS_OFFLINE = saved[1]
        hcfg.HF_HUB_OFFLINE = saved[2]


def _load_dataset_text(spec: DatasetSpec, source: str, cache_dir, download: bool) -> str:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"load_text({source!r}): reading a Hugging Face dataset needs the `datasets` package "
            "(pip install datasets); a text file or a folder of text files needs nothing"
        ) from None

    errors = []
    ds = None
    for name in spec.names:
        kwargs = {"split": spec.split, "cache_dir": None if cache_dir is None else str(cache_dir)}
        if spec.config:
            kwargs["name"] = spec.config
        if spec.data_files:
            kwargs["data_files"] = spec.data_files
        try:
            with _hub_offline(not download):
                ds = datasets.load_dataset(name, **kwargs)
            break
        except (ConnectionError, FileNotFoundError) as e:  # not cached / not reachable / no such dataset
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        except ValueError as e:  # e.g. unknown split or config
            raise ValueError(f"load_text({source!r}): {spec.describe()}: {e}") from e
    if ds is None:
        where = cache_dir or os.environ.get("HF_DATASETS_CACHE") or "the default Hugging Face cache"
        how = (
            "download=True was passed, so the Hub was tried too"
            if download
            else "datasets are read offline, from the local cache only; pass download=True "
            "(on a machine with network) to fetch it once"
        )
        raise FileNotFoundError(
            f"load_text({source!r}): {spec.describe()} is not available: not in the local cache ({where}); {how}. "
            f"Tried: {'; '.join(errors)}"
        )
    if spec.field not in ds.column_names:
        raise ValueError(
            f"load_text({source!r}): {spec.describe()} has no column {spec.field!r}; columns: {ds.column_names}"
        )
    rows = ds[spec.field]
    bad = next((r for r in rows if not isinstance(r, str)), None)
    if bad is not None:
        raise ValueError(
            f"load_text({source!r}): column {spec.field!r} must hold strings, found {type(bad).__name__}"
        )
    text = JOIN.join(rows)
    if not text.strip():
        raise ValueError(f"load_text({source!r}): {spec.describe()} holds no text ({len(rows)} empty rows)")
    return text


# ------------------------------------------------------------------- public
def load_text(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> str:
    """Load a text corpus as one string.

    ``source`` is, in this order of precedence:

    * an existing **file**: read as UTF-8 (a file that is not UTF-8 text is an error);
    * an existing **folder**: every non-hidden file below it (recursively), sorted by
      relative path, joined with ``"\\n\\n"``; files that are not UTF-8 text (NUL bytes,
      invalid UTF-8) are skipped with a warning, empty files are skipped;
    * a **dataset spec** (needs the ``datasets`` package): ``"wikitext2"`` /
      ``"wikitext-2"`` (wikitext, ``wikitext-2-raw-v1``), ``"c4"`` (allenai/c4 ``en``,
      the first shard of the split, as in the SparseGPT/Wanda recipes), each optionally
      ``":SPLIT"``; or ``"hf:NAME[:CONFIG][:SPLIT][:FIELD]"`` where NAME is a Hub dataset
      or a local folder of data files (json/csv/parquet/text). The rows of FIELD
      (default ``"text"``) are joined with ``"\\n\\n"``. The split defaults to ``split``,
      else ``"train"``.

    Datasets are read **offline** (local cache only) unless ``download=True``; one that is
    not cached raises :class:`FileNotFoundError` saying so, at once. ``cache_dir``
    overrides the datasets cache folder. ``split``, ``cache_dir`` and ``download`` apply
    to datasets only (a file or folder has no splits). For evaluation pass
    ``split="test"`` (or ``"wikitext2:test"``, ``"c4:validation"``).

    Raises :class:`FileNotFoundError` for a path that does not exist and is not a dataset
    spec, and :class:`ValueError` for empty or non-text input and malformed specs.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"load_text: source must be a path or a string, got {type(source).__name__}")
    if not source:
        raise ValueError("load_text: source is empty (expected a file, a folder or a dataset spec)")
    path = Path(source).expanduser()
    if path.is_file():
        text = _read_text_file(path)
        if text is None:
            raise ValueError(f"load_text: {path} is not a plain UTF-8 text file")
        if not text.strip():
            raise ValueError(f"load_text: {path} is empty")
        return text
    if path.is_dir():
        return _load_folder(path)
    if path.exists():
        raise ValueError(f"load_text: {path} is neither a regular file nor a folder")
    if _is_spec(source):
        return _load_dataset_text(parse_dataset_spec(source, split), source, cache_dir, download)
    raise FileNotFoundError(
        f"load_text: no such file or folder: {source!r} (and it is not a dataset spec: expected "
        f"{', '.join(DATASET_ALIASES)}[:SPLIT] or hf:NAME[:CONFIG][:SPLIT][:FIELD])"
    )
