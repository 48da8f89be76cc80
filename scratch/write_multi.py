"""Records for scenario 3 (multi-image, image in a later turn, truncation, count mismatch).
usage: python scratch/write_multi.py RAW_DIR  -> RAW_DIR/multi.jsonl"""
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
I = {"type": "image"}
def T(t): return {"type": "text", "text": t}
def A(t): return [{"role": "assistant", "content": [T(t)]}]
recs = [
  # 0: two images in one prompt
  {"images": ["img/astronaut.png", "img/coffee.jpg"], "prompt": [{"role": "user", "content": [I, I, T("Compare them.")]}],
   "chosen": A("A person and a cup."), "rejected": A("Two cats.")},
  # 1: image in the second user turn
  {"images": ["img/chelsea.png"], "prompt": [{"role": "user", "content": [T("Hello there.")]},
     {"role": "assistant", "content": [T("Hi, how can I help?")]},
     {"role": "user", "content": [I, T("What is this animal?")]}],
   "chosen": A("A cat."), "rejected": A("A dog.")},
  # 2: image in both user turns (truncation target: first turn + its image dropped)
  {"images": ["img/astronaut.png", "img/rocket.jpg"], "prompt": [{"role": "user", "content": [I, T("Who is this?")]},
     {"role": "assistant", "content": [T("An astronaut.")]},
     {"role": "user", "content": [I, T("And this?")]}],
   "chosen": A("A rocket."), "rejected": A("A cat.")},
  # 3: mismatch: 2 images, 1 image part
  {"images": ["img/astronaut.png", "img/coffee.jpg"], "prompt": [{"role": "user", "content": [I, T("What?")]}],
   "chosen": A("x."), "rejected": A("y.")},
  # 4: mismatch: LLaVA string with two <image>, one image
  {"prompt": "USER: <image>\n<image>\nWhat? ASSISTANT:", "chosen": " x.", "rejected": " y.", "images": ["img/coffee.jpg"]},
  # 5: image in a response
  {"prompt": "USER: <image>\nWhat? ASSISTANT:", "chosen": " <image> x.", "rejected": " y.", "images": ["img/coffee.jpg"]},
  # 6: 0 image parts but 1 image
  {"images": ["img/coffee.jpg"], "prompt": [{"role": "user", "content": [T("What?")]}], "chosen": A("x."), "rejected": A("y.")},
]
(d / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
