"""TRL-style tiny LLaVA (as TRL's scripts/generate_tiny_models.py makes trl-internal-testing/tiny-LlavaForConditionalGeneration):
llava-1.5-7b-hf shapes with text {2 layers, hidden 16, 4 heads, 2 kv} and vision {2 layers, hidden 16, 4 heads},
image 336 / patch 14 (576 tokens), image_token_index 32000, vocab 32064, saved in float16.
Tokenizer: a tiny BPE padded with unused tokens so that <image> is id 32000.
usage: python scratch/make_trl_tiny.py OUT_DIR"""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast, AddedToken)
from tests.tokenizer_fixtures import DEFAULT_TEXTS, make_hf_tokenizer
from tests.llava_fixtures import LLAVA_TEMPLATE

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
texts = list(DEFAULT_TEXTS) + ["USER: What is in the picture? ASSISTANT: a cat on a sofa"] * 10
tok_dir = make_hf_tokenizer(out / "_tok", texts, LLAVA_TEMPLATE, specials=("<unk>", "<s>", "</s>"),
                            bos_post_processor="<s>",
                            config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"})
tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
n = len(tok)
tok.add_tokens([f"<unused_{i}>" for i in range(32000 - n)])
tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
tok.add_special_tokens({"pad_token": "<pad>"})
assert tok.convert_tokens_to_ids("<image>") == 32000, tok.convert_tokens_to_ids("<image>")
base = json.loads((Path(__file__).resolve().parents[1] / "configs/hf_shapes/llava-1.5-7b.json").read_text())
base.pop("_comment")
tc = dict(base["text_config"]); tc.update(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
tc.pop("torch_dtype", None)
vc = dict(base["vision_config"]); vc.update(num_hidden_layers=2, hidden_size=16, num_attention_heads=4)
cfg = LlavaConfig(text_config=tc, vision_config=vc, image_token_index=32000, projector_hidden_act="gelu",
                  vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                  pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
model = LlavaForConditionalGeneration(cfg)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
model = model.to(torch.float16)
model.save_pretrained(str(out), safe_serialization=True)
ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                        do_resize=True, do_normalize=True, do_rescale=True, do_convert_rgb=True)
proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                      chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
proc.save_pretrained(str(out))
print("vocab", len(tok), "config vocab", cfg.text_config.vocab_size, "intermediate", cfg.text_config.intermediate_size)
