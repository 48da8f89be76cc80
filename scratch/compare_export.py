"""Load the original HF LLaVA and exports with LlavaForConditionalGeneration; compare tensors and logits on one sample.
usage: python scratch/compare_export.py ORIG_HF EXPORT_DIR [EXPORT_DIR...]"""
import sys
from pathlib import Path
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.llava_fixtures import photographs
orig_dir = sys.argv[1]
proc = AutoProcessor.from_pretrained(orig_dir)
img = Image.fromarray(photographs(("chelsea",))["chelsea"])
enc = proc(images=[img], text="USER: <image>\nWhat is this? ASSISTANT: A cat.", return_tensors="pt")
def load(d):
    return LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
orig = load(orig_dir)
with torch.no_grad():
    lo = orig(**enc).logits
    fo = orig.get_image_features(pixel_values=enc["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default")
so = orig.state_dict()
for d in sys.argv[2:]:
    m = load(d)
    sm = m.state_dict()
    neq = [k for k in so if not torch.equal(so[k], sm[k])]
    groups = sorted({k.split(".")[1] if k.startswith("model.") else k.split(".")[0] for k in neq})
    with torch.no_grad():
        lm = m(**enc).logits
        fm = m.get_image_features(pixel_values=enc["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default")
    tower_o = orig.model.vision_tower(enc["pixel_values"], output_hidden_states=True).hidden_states[-2]
    tower_m = m.model.vision_tower(enc["pixel_values"], output_hidden_states=True).hidden_states[-2]
    fo_t = fo if torch.is_tensor(fo) else (fo.pooler_output if hasattr(fo, "pooler_output") else fo[0])
    fm_t = fm if torch.is_tensor(fm) else (fm.pooler_output if hasattr(fm, "pooler_output") else fm[0])
    if isinstance(fo_t, (list, tuple)): fo_t, fm_t = torch.cat(list(fo_t)), torch.cat(list(fm_t))
    print(d, "\n  tensors differing:", len(neq), "of", len(so), "groups", groups,
          "\n  tower hidden[-2] max diff", float((tower_o - tower_m).abs().max()),
          "\n  projected features max diff", float((fo_t - fm_t).abs().max()),
          "\n  logits max abs diff", float((lo - lm).abs().max()), "max |logit|", float(lo.abs().max()))
