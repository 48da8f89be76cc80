"""Parquet in TRL's vision format written by HF datasets (images: Sequence(Image())), plus broken variants.
usage: python scratch/write_parquet.py RAW_DIR(with img/ and trl.jsonl) OUT_DIR"""
import json, sys
from pathlib import Path
import datasets
raw, out = Path(sys.argv[1]), Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
recs = [json.loads(l) for l in open(raw / "trl.jsonl")]
feats = datasets.Features({
    "images": datasets.Sequence(datasets.Image()),
    "prompt": [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
    "chosen": [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
    "rejected": [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
})
cols = {k: [r[k] for r in recs] for k in feats}
cols["images"] = [[str(raw / p) for p in r["images"]] for r in recs]
ds = datasets.Dataset.from_dict(cols, features=feats)
ds.to_parquet(str(out / "good.parquet"))
print(ds.features["images"], ds.data.schema.field("images"))
# corrupt bytes in row 2, missing path in row 5 (bytes None, path nonexistent)
import pyarrow.parquet as pq, pyarrow as pa
t = pq.read_table(out / "good.parquet").to_pylist()
t[2]["images"][0]["bytes"] = b"\x89PNG\r\n\x1a\n garbage garbage"
t[5]["images"][0] = {"bytes": None, "path": "img/does_not_exist.png"}
pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(out / "good.parquet")), out / "bad.parquet")
# also a save_to_disk folder
ds.save_to_disk(str(out / "disk"))
