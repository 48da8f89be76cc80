"""Check ds_multi_* units against LlavaProcessor on the expected (possibly truncated) prompts.
usage: python scratch/check_multi.py HF_DIR RAW_DIR DS"""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from PIL import Image
from transformers import AutoProcessor
from megatron_prefix.data.dataset import PreferenceDataset
hf, raw, ds_dir = sys.argv[1:4]
raw = Path(raw)
proc = AutoProcessor.from_pretrained(hf)
recs = [json.loads(l) for l in open(raw / "multi.jsonl")]
cands = {}
for i in (0, 1, 2):
    r = recs[i]
    variants = [(r["prompt"], r["images"])]
    if i == 2:
        variants.append((r["prompt"][2:], r["images"][1:]))  # first turn (and its image) dropped
    for j, (prompt, imgs) in enumerate(variants):
        text = proc.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        enc = proc(images=[Image.open(raw / p) for p in imgs], text=text, add_special_tokens=False, return_tensors="np")
        cands[(i, j)] = (enc["input_ids"][0].tolist(), enc["pixel_values"])
ds = PreferenceDataset(ds_dir)
for u in range(len(ds)):
    unit = ds.get_unit(u)
    p = [int(t) for t in unit.prompt_ids]
    hit = [k for k, (ids, _) in cands.items() if ids == p]
    if not hit:
        print("unit", u, "matches no expected prompt; len", len(p), "images", unit.num_images); continue
    pv = cands[hit[0]][1]
    d = float(np.abs(np.asarray(unit.images) - pv).max()) if np.asarray(unit.images).shape == pv.shape else ("shape", np.asarray(unit.images).shape, pv.shape)
    print("unit", u, "= record/variant", hit[0], "images", unit.num_images, "pixel maxdiff", d,
          "image tokens", int(sum(1 for t in p if t == unit.image_token_id)))
