"""Calibration images for image models (LPViT block pruning).

:func:`load_calibration_images` returns ``nsamples`` images as float32 batches
``[B, C, H, W]`` (the model's ``pixel_values``), from

* a folder of image files (searched recursively, so ``class/xxx.png`` layouts work;
  ``.png .jpg .jpeg .bmp .webp .gif .tif .tiff``): the paths are sorted and a seeded
  sample of ``nsamples`` is drawn without replacement (only those files are decoded);
* ``"digits"``: scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``,
  bundled with scikit-learn, no download), upsampled bilinearly to the model's image size
  and replicated to its channels.

Preprocessing: when ``model_dir`` holds a ``preprocessor_config.json`` the model's own
image processor (``transformers.AutoImageProcessor``, local files only) turns the PIL
images into ``pixel_values``. Otherwise each image is resized (bilinear) to the config's
``image_size``, scaled to [0, 1] and normalised with ``mean`` / ``std`` (default 0.5 per
channel, ViT's default, i.e. values in [-1, 1]). Images are converted to RGB, or to
grayscale ("L") when the model has ``num_channels == 1``. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["IMAGE_DATASETS", "IMAGE_EXTENSIONS", "find_images", "load_calibration_images", "model_image_spec"]

#: File name endings read as images from a folder (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

#: Built-in image data set names.
IMAGE_DATASETS = ("digits",)

_PREPROCESSOR = "preprocessor_config.json"


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("calibration images need Pillow (pip install pillow, or semisparse[vision])") from None
    return Image


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (recursive, hidden files and folders skipped), sorted."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(root) / f)
    return sorted(out)


def _size_pair(v, where: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
        return int(v[0]), int(v[1])
    raise ValueError(f"{where}: image_size must be a positive int or (height, width), got {v!r}")


def model_image_spec(model_dir: str | os.PathLike | None) -> dict:
    """``{"image_size": (H, W) or None, "num_channels": int or None, "processor": bool}`` from
    a model folder's ``config.json`` (``image_size``, ``num_channels``) and whether it has a
    ``preprocessor_config.json``. ``model_dir=None`` gives all unknown."""
    spec = {"image_size": None, "num_channels": None, "processor": False}
    if model_dir is None:
        return spec
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if isinstance(cfg, dict):
            if cfg.get("image_size") is not None:
                spec["image_size"] = _size_pair(cfg["image_size"], str(cfg_path))
            nc = cfg.get("num_channels")
            if isinstance(nc, int) and not isinstance(nc, bool) and nc > 0:
                spec["num_channels"] = nc
    spec["processor"] = (d / _PREPROCESSOR).is_file()
    return spec


def _digits_images(nsamples: int, seed: int, size: tuple[int, int] | None, mode: str) -> list:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the 'digits' calibration images need scikit-learn (pip install scikit-learn)") from None
    import numpy as np
    Image = _pil()

    images = load_digits().images  # [1797, 8, 8] float64 in 0..16
    if nsamples > len(images):
        raise ValueError(f"calibration images: nsamples={nsamples} but 'digits' has only {len(images)} images")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:nsamples].tolist()
    out = []
    for i in idx:
        im = Image.fromarray(np.clip(images[i] * (255.0 / 16.0), 0, 255).round().astype(np.uint8), mode="L")
        if size is not None:
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        out.append(im.convert(mode))  # L -> RGB replicates the gray channel
    return out


def _folder_images(folder: Path, nsamples: int, seed: int, mode: str) -> list:
    Image = _pil()
    from PIL import UnidentifiedImageError

    paths = find_images(folder)
    if not paths:
        raise ValueError(f"calibration images: no image files ({' '.join(IMAGE_EXTENSIONS)}) under {folder}")
    if len(paths) < nsamples:
        raise ValueError(f"calibration images: {nsamples} images asked for (nsamples) but {folder} holds only "
                         f"{len(paths)} image file(s); ask for fewer or add images")
    idx = sorted(torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:nsamples].tolist())
    out = []
    for i in idx:
        p = paths[i]
        try:
            with Image.open(p) as im:
                im.seek(0)  # first frame of an animated GIF / multi-page TIFF
                out.append(im.convert(mode))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"calibration images: cannot read {p}: {e}") from None
    return out


def _check_positive(v, name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"calibration images: {name} must be a positive integer, got {v!r}")
    return v


def _stats(v, channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"calibration images: {name} has {t.numel()} values for {channels} channel(s)")
    return t.reshape(channels, 1, 1)


def load_calibration_images(
    spec: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    nsamples: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    image_size: int | Sequence[int] | None = None,
    num_channels: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """``nsamples`` calibration images as a list of float32 ``[B, C, H, W]`` batches
    (``batch_size`` each, the last one smaller).

    ``spec``: a folder of images, or ``"digits"`` (see the module docstring). ``model_dir``:
    the model folder whose ``preprocessor_config.json`` (if any) preprocesses the images,
    and whose ``config.json`` gives ``image_size`` / ``num_channels`` otherwise; the
    arguments ``image_size`` (int or (H, W)), ``num_channels``, ``mean`` and ``std``
    override it (and make the images bypass the image processor). Without a processor the
    image size must be known (from the config or the argument). The sample is seeded by
    ``seed``: the same arguments give the same tensors.

    Raises :class:`FileNotFoundError` when ``spec`` is neither an existing folder nor a
    known name, :class:`ValueError` for a folder with no or too few images or a file
    that cannot be decoded, :class:`ImportError` when ``digits`` lacks scikit-learn.
    """
    nsamples = _check_positive(nsamples, "nsamples")
    batch_size = _check_positive(batch_size, "batch_size")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"calibration images: seed must be an int, got {seed!r}")
    if num_channels is not None:
        _check_positive(num_channels, "num_channels")
    info = model_image_spec(model_dir)
    size = _size_pair(image_size, "calibration images") if image_size is not None else info["image_size"]
    channels = num_channels or info["num_channels"] or 3
    if channels not in (1, 3):
        raise ValueError(f"calibration images: the model takes {channels} channels; images can be fed to models "
                         "with 1 (grayscale) or 3 (RGB) channels")
    mode = "L" if channels == 1 else "RGB"
    use_processor = info["processor"] and image_size is None and num_channels is None and mean is None and std is None

    src = os.fspath(spec)
    folder = Path(src).expanduser()
    is_folder = folder.is_dir()
    if not is_folder and src.lower() not in IMAGE_DATASETS:
        if folder.exists():
            raise NotADirectoryError(f"calibration images: {src} is not a folder (expected a folder of images "
                                     f"or one of {', '.join(IMAGE_DATASETS)})")
        raise FileNotFoundError(f"calibration images: {src!r} is neither an existing folder of images nor a "
                                f"built-in data set ({', '.join(IMAGE_DATASETS)})")
    if not use_processor and size is None:
        where = f"{model_dir}/config.json has no image_size" if model_dir is not None else "no model folder given"
        raise ValueError(f"calibration images: the image size is unknown ({where}, no {_PREPROCESSOR}); "
                         "pass image_size")
    if is_folder:
        images = _folder_images(folder, nsamples, seed, mode)
    else:  # with a processor and no known size, the processor resizes the 8x8 digits itself
        images = _digits_images(nsamples, seed, size, mode)

    if use_processor:
        return _with_processor(images, model_dir, batch_size)
    import numpy as np
    Image = _pil()

    m = _stats(0.5 if mean is None else mean, channels, "mean")
    s = _stats(0.5 if std is None else std, channels, "std")
    if (s == 0).any():
        raise ValueError("calibration images: std must not be 0")
    batches = []
    for i in range(0, len(images), batch_size):
        xs = []
        for im in images[i : i + batch_size]:
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
            a = a.unsqueeze(0) if a.dim() == 2 else a.permute(2, 0, 1)
            xs.append((a - m) / s)
        batches.append(torch.stack(xs).contiguous())
    return batches


def _with_processor(images: list, model_dir, batch_size: int) -> list[torch.Tensor]:
    try:
        from transformers import AutoImageProcessor
    except ImportError:
        raise ImportError(f"{model_dir} has {_PREPROCESSOR}: preprocessing with it needs transformers "
                          "(pip install transformers)") from None
    try:
        proc = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ValueError(f"cannot load the image processor of {model_dir}: {e}".splitlines()[0]) from None
    batches = []
    for i in range(0, len(images), batch_size):
        out = proc(images=images[i : i + batch_size], return_tensors="pt")
        pv = out.get("pixel_values")
        if not isinstance(pv, torch.Tensor) or pv.dim() != 4:
            raise ValueError(f"the image processor of {model_dir} did not return pixel_values [B, C, H, W]")
        batches.append(pv.to(torch.float32).contiguous())
    return batches
