"""Images -> pixel arrays exactly as transformers' ``CLIPImageProcessor`` makes them (pure numpy + PIL).

``load_image_spec(model_dir)`` reads an HF LLaVA folder: the image processor settings
(``processor_config.json``'s ``"image_processor"`` block, as transformers 5 saves it, or
``preprocessor_config.json``), the image token (``config.json``'s ``image_token_index``) and the number
of tokens one image becomes (``tokens_per_image``: ``(image_size // patch_size) ** 2`` patches of the
``vision_config``, plus the CLS token when ``vision_feature_select_strategy`` is ``"full"``; the
``"default"`` strategy drops it), as ``LlavaProcessor`` counts them.

``preprocess(image, settings)``: the CLIP pipeline of transformers' PIL backend, step by step:

1. RGB: an image with transparency is composited onto white, any other mode converted to RGB
   (EXIF orientation is not applied: transformers does not apply it to PIL images either);
2. resize (``do_resize``): ``size.shortest_edge`` S scales the short side to S and the long side to
   ``int(S * long / short)``; ``size.height/width`` resizes to exactly that; PIL ``resize`` with
   ``resample`` (3 = bicubic) on the uint8 image;
3. center crop (``do_center_crop``) to ``crop_size`` (top = ``(H - h) // 2``; zero padding when smaller);
4. rescale (``do_rescale``): float64 multiply by ``rescale_factor``, cast to float32;
5. normalize (``do_normalize``): ``(x - mean) / std`` in float32, per channel.

The result is ``[3, H, W]`` float32, channels first (``pixel_values`` of one image). ``decode_image``
opens a path or embedded bytes with PIL and decodes it fully; anything PIL cannot read raises
``SkipRecord("bad_image", ...)`` naming the image and the reason.

Pure numpy + PIL: no torch, no transformers, no megatron.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from megatron_prefix.data.records import ImageRef, SkipRecord

SELECT_STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class ImageProcessorSettings:
    """The CLIP image processor settings (``CLIPImageProcessor`` names and defaults)."""

    do_resize: bool = True
    size: tuple[tuple[str, int], ...] = (("shortest_edge", 224),)
    resample: int = 3
    do_center_crop: bool = True
    crop_size: tuple[tuple[str, int], ...] = (("height", 224), ("width", 224))
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ImageProcessorSettings:
        """From a saved processor dict (unknown keys ignored); ``ValueError`` naming ``where`` when unusable."""
        kw: dict[str, Any] = {}
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(key) is not None:
                kw[key] = bool(d[key])
        for key in ("size", "crop_size"):
            v = d.get(key)
            if isinstance(v, int):
                v = {"shortest_edge": v} if key == "size" else {"height": v, "width": v}
            if isinstance(v, dict):
                kw[key] = tuple(sorted((k, int(x)) for k, x in v.items() if x is not None))
        for key in ("image_mean", "image_std"):
            v = d.get(key)
            if v is not None:
                kw[key] = tuple(float(x) for x in (v if isinstance(v, list) else [v] * 3))
        if d.get("resample") is not None:
            kw["resample"] = int(d["resample"])
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(d["rescale_factor"])
        s = cls(**kw)
        size, crop = dict(s.size), dict(s.crop_size)
        if s.do_resize and not ("shortest_edge" in size and "longest_edge" not in size or {"height", "width"} <= set(size)):
            raise ValueError(f"{where}: image processor size {size} is not supported (shortest_edge, or height "
                             "and width)")
        if not s.do_center_crop and "shortest_edge" in size:
            raise ValueError(f"{where}: without do_center_crop a shortest_edge resize gives images of varying "
                             "shape; not supported")
        if s.do_center_crop and not {"height", "width"} <= set(crop):
            raise ValueError(f"{where}: crop_size {crop} needs height and width")
        if len(s.image_mean) != 3 or len(s.image_std) != 3:
            raise ValueError(f"{where}: image_mean and image_std need 3 values (RGB)")
        return s

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of every preprocessed image."""
        hw = dict(self.crop_size) if self.do_center_crop else dict(self.size)
        return (3, hw["height"], hw["width"])

    def to_json(self) -> dict:
        """The settings as JSON (``meta.json["images"]["processor"]``): dicts for sizes, lists for stats."""
        d = asdict(self)
        d["size"], d["crop_size"] = dict(self.size), dict(self.crop_size)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d


@dataclass(frozen=True)
class ImageSpec:
    """What a dataset needs to lay images out for one model: processor settings and image tokens."""

    processor: ImageProcessorSettings
    image_token_id: int
    tokens_per_image: int
    image_token: str = "<image>"
    source: str = ""  # the model folder it was read from

    def to_meta(self, count: int) -> dict:
        """``meta.json["images"]`` (``count`` images stored)."""
        return {
            "processor": self.processor.to_json(),
            "shape": list(self.processor.shape),
            "dtype": "float32",
            "image_token_id": self.image_token_id,
            "image_token": self.image_token,
            "tokens_per_image": self.tokens_per_image,
            "count": count,
        }


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object")
    return obj


def load_image_spec(model_dir: str | Path) -> ImageSpec:
    """The ``ImageSpec`` of an HF LLaVA folder (see the module docstring); ``ValueError`` naming the file."""
    folder = Path(model_dir)
    flag = "--image-processor"
    if not folder.is_dir():
        raise ValueError(f"{flag} {folder}: not a folder (give the Hugging Face LLaVA model folder)")
    proc_file, proc = folder / "processor_config.json", None
    extra: dict = {}
    if proc_file.is_file():
        extra = _read_json(proc_file)
        proc = extra.get("image_processor")
    if not isinstance(proc, dict) and (folder / "preprocessor_config.json").is_file():
        proc_file = folder / "preprocessor_config.json"
        proc = _read_json(proc_file)
    if not isinstance(proc, dict):
        raise ValueError(f"{flag} {folder}: no image processor settings (processor_config.json with an "
                         "'image_processor' block, or preprocessor_config.json)")
    settings = ImageProcessorSettings.from_dict(proc, str(proc_file))
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{flag} {folder}: no config.json (the model's image token and vision settings)")
    cfg = _read_json(cfg_file)
    token_id = cfg.get("image_token_index", cfg.get("image_token_id"))
    vision = cfg.get("vision_config")
    if not isinstance(token_id, int) or not isinstance(vision, dict):
        raise ValueError(f"{cfg_file}: not a LLaVA config (needs image_token_index and vision_config)")
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0 or size % patch:
        raise ValueError(f"{cfg_file}: vision_config needs image_size divisible by patch_size, got {size}, {patch}")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"{cfg_file}: vision_feature_select_strategy {strategy!r} not in {SELECT_STRATEGIES}")
    if settings.shape[1:] != (size, size):
        raise ValueError(f"{proc_file}: images are preprocessed to {settings.shape[1:]} but the vision tower "
                         f"({cfg_file}) takes {size}x{size}")
    tokens = (size // patch) ** 2 + (1 if strategy == "full" else 0)
    image_token = extra.get("image_token") if isinstance(extra.get("image_token"), str) else "<image>"
    return ImageSpec(settings, token_id, tokens, image_token, str(folder))


# ------------------------------------------------------------------------------------------- decoding


def decode_image(ref: ImageRef) -> Image.Image:
    """Open and fully decode one image (file or embedded bytes); ``bad_image`` naming it otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            src = io.BytesIO(ref.data) if ref.data is not None else ref.path
            with Image.open(src) as img:
                img.load()
                return img.copy()
    except FileNotFoundError:
        raise SkipRecord("bad_image", f"{ref.describe()}: no such file") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        reason = f"{type(err).__name__}: {err}"[:300]
        raise SkipRecord("bad_image", f"{ref.describe()}: unreadable image ({reason})") from None


def to_rgb(img: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8: transparency composited onto white, any other mode converted (as transformers)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(img.convert("RGB"))


def _resize_hw(h: int, w: int, size: dict[str, int]) -> tuple[int, int]:
    if "shortest_edge" in size:
        s = size["shortest_edge"]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    return size["height"], size["width"]


def _center_crop(chw: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = chw.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return chw[..., top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)  # too small: zero-pad as transformers does, then crop
    padded = np.zeros(chw.shape[:-2] + (nh, nw), dtype=chw.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded[..., tp : tp + h, lp : lp + w] = chw
    top, left = top + tp, left + lp
    return padded[..., max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def preprocess(img: Image.Image | np.ndarray, s: ImageProcessorSettings) -> np.ndarray:
    """One image -> ``[3, H, W]`` float32 pixel values (the module docstring's five steps)."""
    hwc = to_rgb(img) if isinstance(img, Image.Image) else np.asarray(img, dtype=np.uint8)
    if s.do_resize:
        h, w = _resize_hw(hwc.shape[0], hwc.shape[1], dict(s.size))
        hwc = np.array(Image.fromarray(hwc).resize((w, h), resample=s.resample))
    chw: np.ndarray = np.moveaxis(hwc, -1, 0)
    if s.do_center_crop:
        crop = dict(s.crop_size)
        chw = _center_crop(chw, crop["height"], crop["width"])
    if s.do_rescale:
        chw = (chw.astype(np.float64) * s.rescale_factor).astype(np.float32)
    if s.do_normalize:
        x = chw if np.issubdtype(chw.dtype, np.floating) else chw.astype(np.float32)
        mean, std = np.array(s.image_mean, dtype=x.dtype), np.array(s.image_std, dtype=x.dtype)
        chw = ((x.T - mean) / std).T
    return np.ascontiguousarray(chw, dtype=np.float32)


def load_pixels(refs: tuple[ImageRef, ...] | list[ImageRef], s: ImageProcessorSettings) -> np.ndarray:
    """``[n, 3, H, W]`` float32 of ``refs`` in order; ``bad_image`` (naming the image) if one fails."""
    out = np.empty((len(refs), *s.shape), dtype=np.float32)
    for i, ref in enumerate(refs):
        img = decode_image(ref)
        try:
            out[i] = preprocess(img, s)
        except Exception as err:  # noqa: BLE001 - a decoded image PIL cannot convert or resize
            raise SkipRecord("bad_image", f"{ref.describe()}: cannot preprocess ({type(err).__name__}: "
                             f"{err})"[:400]) from None
    return out
