"""Checks that the images of a dataset are the ones the model reads (run at start and on resume).

A dataset built with ``tools/build_dataset.py --image-processor DIR`` records in ``meta.json["images"]``
how its images were laid out: ``image_token_id`` (the id every ``<image>`` placeholder was expanded to),
``tokens_per_image`` (how many copies), ``shape`` ([C, H, W] of the stored pixels) and the processor
settings. The model reads them through ``model.vision`` (``VisionConfig``): the same image token id,
``tokens_per_image`` feature rows per image, and RGB pixels of ``image_size`` x ``image_size``. Any difference would train on images the model cannot see (or on the
wrong token positions), so it is refused at start, naming the dataset, the model and both values.

- an image dataset with a text-only model: refused (the images would be read as ordinary tokens);
- a text dataset with a vision model: fine (rows without images skip the vision encoder).

Pure logic: no torch, no megatron.
"""

from __future__ import annotations

from typing import Any

IMAGE_CHANNELS = 3  # RGB: the only input model.vision takes (``vision_config.vision_from_hf`` refuses others)


def image_mismatches(meta_images: dict, vision: Any) -> list[str]:
    """``what: the dataset has A, the model B`` for each image setting that differs (empty: they agree).

    ``vision``: a ``VisionConfig`` (``image_token_id``, ``tokens_per_image``, ``image_size``)."""
    out = []
    if int(meta_images.get("image_token_id", -1)) != vision.image_token_id:
        out.append(f"image_token_id: the dataset has {meta_images.get('image_token_id')}, the model "
                   f"(model.vision.image_token_id) {vision.image_token_id}")
    if int(meta_images.get("tokens_per_image", -1)) != vision.tokens_per_image:
        out.append(f"tokens_per_image: the dataset has {meta_images.get('tokens_per_image')}, the model "
                   f"{vision.tokens_per_image} (model.vision image_size {vision.image_size} / patch_size "
                   f"{vision.patch_size}, select_strategy {vision.select_strategy})")
    shape = [IMAGE_CHANNELS, vision.image_size, vision.image_size]
    got = [int(x) for x in meta_images.get("shape", [])]
    if got != shape:
        out.append(f"image shape [C, H, W]: the dataset has {got}, the model reads {shape} "
                   f"(model.vision.image_size {vision.image_size})")
    return out


def check_dataset_images(meta: dict, vision: Any, data_path: str, model_source: str) -> None:
    """Raise ``ValueError`` when the dataset's images do not fit the model (see the module doc).

    ``meta``: the dataset's ``meta.json``; ``vision``: ``model.vision`` (a ``VisionConfig``, or None for a
    text model); ``model_source``: where the model config came from (for the message).
    """
    images = meta.get("images")
    if not images or not images.get("count"):
        return  # a text dataset (or one built with --image-processor but holding no image) trains any model
    if vision is None:
        raise ValueError(
            f"data.path: the dataset {data_path} holds {images.get('count', '?')} images (image token id "
            f"{images.get('image_token_id')}, {images.get('tokens_per_image')} tokens per image) but the model "
            f"of {model_source} has no vision encoder (model.vision is not set); train a vision-language "
            "model (model.hf_config=HF_LLAVA_DIR, or checkpoint.load of a converted LLaVA), or rebuild the "
            "dataset without images"
        )
    diffs = image_mismatches(images, vision)
    if diffs:
        raise ValueError(
            f"data.path: the images of the dataset {data_path} (its meta.json \"images\") do not match the "
            f"model of {model_source}: " + "; ".join(diffs)
            + ". Rebuild the dataset with tools/build_dataset.py --image-processor <the model's HF folder>"
        )
