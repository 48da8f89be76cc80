"""Write TRL-vision-format and LLaVA-<image>-string preference JSONL from real photographs.
usage: python scratch/write_trl_data.py DIR"""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.llava_fixtures import make_photo_files

d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
photos = make_photo_files(d / "img")
names = sorted(photos)
rel = {n: f"img/{photos[n].name}" for n in names}
trl, llava = [], []
for i in range(8):
    n = names[i % len(names)]
    q = ["What is in the picture?", "Describe the image.", "Is it outdoors?", "What colour dominates?"][i % 4]
    trl.append({"images": [rel[n]],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"It shows {n}."}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"A picture of number {i}."}]}]})
    llava.append({"prompt": f"USER: <image>\n{q} ASSISTANT:", "chosen": f" It shows {n}.",
                  "rejected": f" A picture of number {i}.", "image": rel[n]})
(d / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
(d / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))
print(d / "trl.jsonl", d / "llava.jsonl")
