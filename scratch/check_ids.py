"""Compare the built dataset's prompt ids and pixels with HF LlavaProcessor (TRL's way: apply_chat_template
then processor(images=, text=, add_special_tokens=False); LLaVA strings: processor(text, images) default).
usage: python scratch/check_ids.py HF_DIR DATASET RAW_JSONL"""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from PIL import Image
from transformers import AutoProcessor
from megatron_prefix.data.dataset import PreferenceDataset

hf, ds_dir, raw = sys.argv[1:4]
proc = AutoProcessor.from_pretrained(hf)
ds = PreferenceDataset(ds_dir)
recs = [json.loads(l) for l in open(raw)]
bad = 0
encs = []
for r in recs:
    imgs = [Image.open(Path(raw).parent / p) for p in (r.get("images") or [r["image"]])]
    if isinstance(r["prompt"], list):
        text = proc.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        enc = proc(images=imgs, text=text, add_special_tokens=False, return_tensors="np")
    else:
        enc = proc(images=imgs, text=r["prompt"], return_tensors="np")
    encs.append((enc["input_ids"][0].tolist(), enc["pixel_values"]))
for i in range(len(ds)):
    u = ds.get_unit(i)
    p = [int(t) for t in u.prompt_ids]
    match = [e for e in encs if e[0] == p]
    ok_ids = bool(match)
    ids, pv = match[0] if match else encs[0]
    enc = {"pixel_values": pv}
    pix = np.asarray(u.images)
    dpx = float(np.abs(pix - enc["pixel_values"]).max()) if pix.shape == enc["pixel_values"].shape else f"shape {pix.shape} vs {enc['pixel_values'].shape}"
    if not ok_ids or dpx != 0.0:
        bad += 1
        print(i, "ids equal:", ok_ids, len(p or []), len(ids), "pixel maxdiff:", dpx)
        if not ok_ids:
            print(" ours:", (p or [])[:8], (p or [])[-8:]); print(" hf:  ", ids[:8], ids[-8:])
print("units checked", len(ds), "mismatching", bad)
