"""Image preference data for the vision training tests and ``benchmarks/vision_sharing.py``.

``write_image_preferences(directory, records, k)`` writes ``prefs.jsonl`` in TRL's vision preference
format (``images`` beside a prompt whose content parts include ``{"type": "image"}``; ``chosen`` /
``rejected`` assistant messages; for K > 2 the ranked shape: ``responses`` + ``ranks``) whose image
paths are relative to the JSONL file: real photographs (``llava_fixtures.make_photo_files``, from
``skimage.data``) and generated pictures (gradients, stripes, checkerboards of several sizes and aspect
ratios, so resize and center crop matter). Some prompts hold two images, a few none (text rows in an image
dataset). ``build_image_dataset`` runs ``tools/build_dataset.py --image-processor`` on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.llava_fixtures import make_photo_files

QUESTIONS = ("What is in the picture?", "Describe the image.", "Which colour dominates?",
             "Is this a photograph or a drawing?", "Count the objects.")
ANSWERS = ("a person in a white suit", "a cup of coffee", "a cat looking up", "a rocket on the pad",
           "stripes of colour", "a checkerboard", "a smooth gradient", "nothing at all")


def generated_images(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` synthetic pictures (PNG), varied sizes and patterns."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        y, x = np.mgrid[0:h, 0:w]
        kind = i % 3
        if kind == 0:
            arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
        elif kind == 1:
            arr = np.stack([(x // 4 % 2) * 255, (y // 3 % 2) * 200, np.full_like(x, int(rng.integers(0, 255)))], -1)
        else:
            arr = rng.integers(0, 256, (h, w, 3))
        path = directory / f"gen_{i:03d}.png"
        Image.fromarray(arr.astype(np.uint8)).save(path)
        out.append(path)
    return out


def _user(text: str, images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def write_image_preferences(directory: Path, records: int = 24, k: int = 2, seed: int = 0) -> Path:
    """``directory/prefs.jsonl`` (TRL vision format, relative image paths); returns its path."""
    import numpy as np

    directory = Path(directory)
    photos = [p.relative_to(directory) for p in make_photo_files(directory / "photos").values()]
    generated = [p.relative_to(directory) for p in generated_images(directory / "generated", 8, seed)]
    pool = photos + generated
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(records):
        n_images = 0 if i % 11 == 5 else (2 if i % 7 == 3 else 1)
        images = [str(pool[(i + j * 5) % len(pool)]) for j in range(n_images)]
        question = QUESTIONS[i % len(QUESTIONS)]
        answers = [ANSWERS[int(a)] + "." * (1 + j % 3) for j, a in enumerate(rng.permutation(len(ANSWERS))[:k])]
        rec: dict = {"prompt": _user(question, n_images)}
        if n_images:
            rec["images"] = images
        if k == 2:
            rec["chosen"], rec["rejected"] = _assistant(answers[0]), _assistant(answers[1])
        else:
            rec["responses"], rec["ranks"] = answers, list(range(k))
        lines.append(json.dumps(rec))
    path = directory / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_image_dataset(jsonl: Path, hf_dir: Path, out: Path, pack_tokens: int = 256) -> Path:
    """``tools/build_dataset.py --tokenizer HF --image-processor HF`` on ``jsonl``; returns ``out``."""
    cmd = [sys.executable, str(ROOT / "tools" / "build_dataset.py"), "--input", str(jsonl), "--tokenizer",
           str(hf_dir), "--image-processor", str(hf_dir), "--output", str(out), "--max-unit-tokens",
           str(pack_tokens), "--pack-tokens", str(pack_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"build_dataset failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return out


def convert_in(hf_dir: Path, out: Path) -> Path:
    """``tools/convert_hf_to_mcore.py`` (TP 1): the megatron checkpoint of the HF LLaVA."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_mcore.py"), "--hf", str(hf_dir), "--out",
                    str(out), "--no-progress"], check=True, capture_output=True, cwd=ROOT)
    return out
