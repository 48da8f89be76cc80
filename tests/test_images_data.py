"""Image preference data end to end up to MicroBatch: readers, preprocessing, tokens, store, rows, batches.

Real photographs (``skimage.data``, written as PNG/JPEG files) and generated images; the tiny HF LLaVA
of ``tests/llava_fixtures.py`` gives the image processor settings, the image token and the tokenizer.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_prefix.data.builder import BuildConfig, build_dataset
from megatron_prefix.data.dataset import PreferenceDataset
from megatron_prefix.data.images import ImageProcessorSettings, decode_image, load_image_spec, preprocess
from megatron_prefix.data.readers import open_records
from megatron_prefix.data.records import ImageRef, Message, PreferenceRecord
from megatron_prefix.data.row import layout_docs, pack_row
from megatron_prefix.data.tokenizers import load_tokenizer
from megatron_prefix.data.units import UnitBuilder, UnitConfig
from megatron_prefix.model.batch import MicroBatch
from tests.llava_fixtures import TOKENS_PER_IMAGE, make_photo_files, make_tiny_llava, photographs
from tools.build_dataset import main as build_main


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def hf_processor(llava):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(llava))


def _user(*parts) -> dict:
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def _asst(text: str, part_list: bool = False) -> list[dict]:
    content = [{"type": "text", "text": text}] if part_list else text
    return [{"role": "assistant", "content": content}]


def trl_vision_file(folder: Path) -> tuple[Path, dict[str, Path]]:
    """TRL's vision preference format, images as paths relative to the data file's folder."""
    photos = make_photo_files(folder / "img")
    rows = [
        {"images": ["img/" + photos["astronaut"].name], "prompt": [_user(None, "Who is this?")],
         "chosen": _asst("an astronaut"), "rejected": _asst("a cat", part_list=True)},
        {"images": ["img/" + photos["coffee"].name, "img/" + photos["chelsea"].name],
         "prompt": [_user(None, None, "Compare the two pictures.")],
         "chosen": _asst("coffee, then a cat"), "rejected": _asst("two rockets")},
        {"images": ["img/" + photos["rocket"].name], "prompt": [_user("What flies here?", None)],
         "chosen": "a rocket", "rejected": "a bird"},
    ]
    path = folder / "vision.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, photos


def build(inputs, out: Path, llava: Path, workers: int = 1, image_processor: bool = True, **unit_kw) -> dict:
    cfg = BuildConfig(
        inputs=[str(p) for p in inputs], tokenizer=str(llava), output=str(out), format="pair",
        units=UnitConfig(template_date="2026-01-01", **{"max_unit_tokens": 512, **unit_kw}), pack_tokens=1024,
        workers=workers,
        image_processor=str(llava) if image_processor else None,
    )
    return build_dataset(cfg, log=lambda _: None)


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ preprocessing


def _generated_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (37, 91, 4), dtype=np.uint8), "RGBA"),  # transparency
        Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8), "L"),  # grey, tall
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)),  # smaller than the crop
    ]


def test_preprocess_equals_transformers_clip_image_processor(llava, tmp_path):
    """Pixel-exact (max abs diff 0.0) against CLIPImageProcessor on real photographs and generated images."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    spec = load_image_spec(llava)
    photos = [decode_image(ImageRef(path=str(p))) for p in make_photo_files(tmp_path).values()]
    images = photos + _generated_images()
    big = ImageProcessorSettings.from_dict({"size": {"shortest_edge": 64}, "crop_size": 64}, "test")
    cases = [(spec.processor, AutoImageProcessor.from_pretrained(str(llava)), images),
             (big, CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}), images)]
    for ours_settings, theirs, imgs in cases:
        for img in imgs:
            ours = preprocess(img, ours_settings)
            want = theirs(images=img, return_tensors="np")["pixel_values"][0]
            assert ours.dtype == np.float32 and ours.shape == want.shape == ours_settings.shape
            assert np.abs(ours - want).max() == 0.0, (img.size, img.mode)


def test_image_spec_from_the_model_folder(llava, tmp_path):
    spec = load_image_spec(llava)
    fixture = json.loads((llava / "fixture.json").read_text())
    assert spec.image_token_id == fixture["image_token_id"] and spec.tokens_per_image == TOKENS_PER_IMAGE
    assert spec.processor.shape == (3, 28, 28) and spec.image_token == "<image>"
    meta = spec.to_meta(5)
    assert meta["shape"] == [3, 28, 28] and meta["count"] == 5 and meta["dtype"] == "float32"
    # older transformers: preprocessor_config.json; the "full" strategy keeps the CLS token
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((llava / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (old / "config.json").write_text(json.dumps(cfg))
    proc = json.loads((llava / "processor_config.json").read_text())["image_processor"]
    (old / "preprocessor_config.json").write_text(json.dumps(proc))
    old_spec = load_image_spec(old)
    assert old_spec.processor == spec.processor and old_spec.tokens_per_image == TOKENS_PER_IMAGE + 1
    with pytest.raises(ValueError, match="no image processor settings"):
        load_image_spec(tmp_path)


# ------------------------------------------------------------------------------------------ readers


def test_readers_trl_vision_llava_strings_base64_and_parquet_bytes(tmp_path):
    path, photos = trl_vision_file(tmp_path)
    recs = [r for r in open_records([path], "pair", log=lambda _: None)]
    assert all(isinstance(r, PreferenceRecord) for r in recs)
    assert [len(r.images) for r in recs] == [1, 2, 1]
    assert recs[0].images[0].path == str(tmp_path / "img" / photos["astronaut"].name)
    assert recs[0].prompt[0].parts == (("image", ""), ("text", "Who is this?"))
    assert recs[0].responses == ("an astronaut", "a cat")
    assert recs[2].prompt[0].content == "What flies here?<image>\n"

    png = photos["astronaut"].read_bytes()
    b64 = base64.b64encode(png).decode()
    rows = [
        {"prompt": "USER: <image>\nWhat? ASSISTANT:", "chosen": " x", "rejected": " y", "image": b64},
        {"prompt": "<image><image>", "chosen": "x", "rejected": "y",
         "images": ["data:image/png;base64," + b64, {"bytes": b64, "path": "ignored.png"}]},
    ]
    jpath = tmp_path / "llava.jsonl"
    jpath.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = list(open_records([jpath], "pair", log=lambda _: None))
    assert [r.images[0].data == png for r in recs] == [True, True] and recs[1].images[1].data == png

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt": [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Q"}]}]],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "b"}]}]],
        "images": [[{"bytes": png, "path": "astronaut.png"}]],
    })
    pq.write_table(table, tmp_path / "rows.parquet")
    [rec] = list(open_records([tmp_path / "rows.parquet"], "pair", log=lambda _: None))
    assert rec.images[0].data == png and rec.prompt[0].parts == (("image", ""), ("text", "Q"))


def test_datasets_image_feature_parquet(tmp_path):
    """``datasets``' own Image feature written to Parquet ({"bytes", "path"} structs) reads back."""
    datasets = pytest.importorskip("datasets")
    photos = make_photo_files(tmp_path / "img", ("coffee",))
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
    })
    pil = Image.open(photos["coffee"])  # datasets keeps a file's path (bytes null) ...
    made = Image.fromarray(photographs(("rocket",))["rocket"])  # ... and embeds an in-memory image's bytes
    ds = datasets.Dataset.from_dict({
        "images": [[pil, made]],
        "prompt": [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                                  {"type": "text", "text": "Q"}]}]],
        "chosen": ["coffee"], "rejected": ["tea"],
    }, features=features)
    ds.to_parquet(str(tmp_path / "ds.parquet"))
    [rec] = list(open_records([tmp_path / "ds.parquet"], "pair", log=lambda _: None))
    assert rec.images[0].path == str(photos["coffee"]) and rec.images[1].data is not None
    assert np.array_equal(np.array(decode_image(rec.images[1])), np.array(made))


# ------------------------------------------------------------------------------------------ tokens


def test_prompt_ids_equal_the_hf_processor(llava, hf_processor, tmp_path):
    """Our expanded prompt ids == LlavaProcessor(images=..., text=prompt_text)["input_ids"]; responses
    carry no image token; the chat template got the content-part lists. A chat prompt gets no BOS added
    (the text policy, TRL's: the template writes its own; this one writes none), so it is compared with
    ``add_special_tokens=False``; a raw-text LLaVA prompt gets the BOS, as the processor's default."""
    path, _ = trl_vision_file(tmp_path)
    tok = load_tokenizer(str(llava))
    assert tok.takes_parts
    builder = UnitBuilder(tok, UnitConfig(template_date="2026-01-01"), load_image_spec(llava))
    spec = builder.images
    for rec in open_records([path], "pair", log=lambda _: None):
        [unit] = builder.build(rec)
        text = tok.render_chat(list(rec.prompt), add_generation_prompt=True, parts=True)
        conv = [{"role": m.role, "content": [{"type": k, **({"text": t} if k == "text" else {})}
                                              for k, t in m.parts]} for m in rec.prompt]
        assert text == hf_processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        pil = [decode_image(r) for r in rec.images]
        want = hf_processor(images=pil, text=text, return_tensors="np", add_special_tokens=False)
        assert unit.prompt_ids.tolist() == want["input_ids"][0].tolist()
        assert np.array_equal(unit.images, want["pixel_values"])
        assert unit.num_image_tokens == len(rec.images) * TOKENS_PER_IMAGE
        assert all(spec.image_token_id not in r for r in unit.response_ids)
    photo = make_photo_files(tmp_path / "p", ("chelsea",))["chelsea"]
    text = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    rec = PreferenceRecord(text, (" a cat", " a dog"), (1.0, 0.0), "f", 1, (ImageRef(path=str(photo)),))
    [unit] = builder.build(rec)
    want = hf_processor(images=[decode_image(rec.images[0])], text=text, return_tensors="np")
    assert unit.prompt_ids.tolist() == want["input_ids"][0].tolist() and unit.prompt_ids[0] == tok.bos_id
    assert np.array_equal(unit.images, want["pixel_values"])


def test_string_only_template_gets_flattened_parts_and_mismatches_skip(llava, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(llava, plain)
    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    tok = load_tokenizer(str(plain))
    assert not tok.takes_parts
    builder = UnitBuilder(tok, UnitConfig(template_date="2026-01-01"), load_image_spec(plain))
    path, _ = trl_vision_file(tmp_path)
    rec = next(iter(open_records([path], "pair", log=lambda _: None)))
    [unit] = builder.build(rec)
    assert tok.decode(unit.prompt_ids.tolist()) == "user: " + "<image>" * TOKENS_PER_IMAGE + "\nWho is this?\nassistant:"
    assert unit.num_image_tokens == TOKENS_PER_IMAGE
    # a template that writes no image token for an image part: counted skip, not a wrong unit
    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    builder = UnitBuilder(load_tokenizer(str(plain)), UnitConfig(template_date="2026-01-01"), load_image_spec(plain))
    with pytest.raises(Exception, match="image token") as err:
        builder.build(rec)
    assert err.value.reason == "image_count_mismatch"


def test_truncation_drops_whole_turns_with_their_images(llava, tmp_path):
    photos = make_photo_files(tmp_path, ("astronaut", "coffee"))
    msgs = (Message("user", "<image>\n" + "long first question " * 20, (("image", ""), ("text", "long first question " * 20))),
            Message("assistant", "first answer"),
            Message("user", "<image>\nsecond?", (("image", ""), ("text", "second?"))))
    rec = PreferenceRecord(msgs, ("yes", "no"), (1.0, 0.0), "f", 1,
                           (ImageRef(path=str(photos["astronaut"])), ImageRef(path=str(photos["coffee"]))))
    builder = UnitBuilder(load_tokenizer(str(llava)), UnitConfig(max_unit_tokens=60, template_date="2026-01-01"),
                          load_image_spec(llava))
    [unit] = builder.build(rec)
    assert builder.truncated["prompt_turns_dropped"] == 1 and builder.truncated["prompt_images_dropped"] == 1
    assert unit.num_images == 1 and unit.num_image_tokens == TOKENS_PER_IMAGE
    want = preprocess(decode_image(ImageRef(path=str(photos["coffee"]))), builder.images.processor)
    assert np.array_equal(unit.images[0], want)


# ------------------------------------------------------------------------------------------ builder


def test_build_store_rows_and_batches(llava, tmp_path):
    path, photos = trl_vision_file(tmp_path)
    stats = build([path], tmp_path / "ds", llava)
    assert stats["units"] == 3 and stats["images"] == 4 and stats["image_tokens"] == 4 * TOKENS_PER_IMAGE
    assert stats["images_encoded_shared"] == 4 and stats["images_encoded_unshared"] == 8
    ds = PreferenceDataset(tmp_path / "ds")
    meta = ds.meta["images"]
    assert meta["count"] == 4 and meta["tokens_per_image"] == TOKENS_PER_IMAGE and meta["shape"] == [3, 28, 28]
    assert (tmp_path / "ds" / "images.bin").stat().st_size == 4 * 3 * 28 * 28 * 4
    assert np.load(tmp_path / "ds" / "index" / "unit_image_offsets.npy").tolist() == [0, 1, 3, 4]
    spec = load_image_spec(llava)
    unit = ds.get_unit(1)
    want = [preprocess(decode_image(ImageRef(path=str(photos[n]))), spec.processor) for n in ("coffee", "chelsea")]
    assert np.array_equal(unit.images, np.stack(want)) and unit.image_token_id == spec.image_token_id

    shared = ds.row([0, 1, 2], 1024, "shared")
    unshared = ds.row([0, 1, 2], 1024, "unshared")
    for row in (shared, unshared):
        row.validate()
    assert shared.num_images == 4 and unshared.num_images == 8  # each [prompt, r_i] carries its images
    assert np.array_equal(unshared.images[2:4], unit.images) and np.array_equal(unshared.images[4:6], unit.images)
    assert int((shared.image_index >= 0).sum()) == 4 * TOKENS_PER_IMAGE
    assert np.array_equal(shared.tokens[shared.image_index >= 0], np.full(16, spec.image_token_id))

    mb = MicroBatch.from_rows([shared, unshared])
    assert mb.pixel_values.shape == (12, 3, 28, 28)
    fi = mb.image_feature_index
    assert sorted(fi[fi >= 0].tolist()) == list(range(12 * TOKENS_PER_IMAGE))
    assert fi[1][fi[1] >= 0].min() == 4 * TOKENS_PER_IMAGE  # row 1's features follow row 0's
    text_mb = MicroBatch.from_rows([pack_row([], 1024, 0)])
    assert text_mb.pixel_values is None and text_mb.image_feature_index is None


def test_microbatch_cp_split_and_forward_kwargs(llava, tmp_path):
    path, _ = trl_vision_file(tmp_path)
    build([path], tmp_path / "ds", llava)
    ds = PreferenceDataset(tmp_path / "ds")
    rows = [ds.row([0, 1], 512), ds.row([2], 512)]
    full = MicroBatch.from_rows(rows)
    from megatron_prefix.attention.context_parallel import local_positions

    for cp in (2, 4):
        got = [MicroBatch.from_rows(rows, cp_size=cp, cp_rank=r) for r in range(cp)]
        for r, mb in enumerate(got):
            assert torch.equal(mb.image_feature_index, full.image_feature_index[:, local_positions(512, cp, r)])
            assert torch.equal(mb.pixel_values, full.pixel_values)  # every rank encodes all images
        merged = torch.cat([m.image_feature_index for m in got], dim=1)
        assert sorted(merged[merged >= 0].tolist()) == list(range(full.num_images * TOKENS_PER_IMAGE))

    seen = {}

    def model(tokens, positions, mask, **kwargs):
        seen.update(kwargs)
        return tokens

    full.forward(model)
    assert seen["pixel_values"] is full.pixel_values and seen["image_feature_index"] is full.image_feature_index
    seen.clear()
    MicroBatch.from_rows([pack_row([], 512, 0)]).forward(model)
    assert set(seen) == {"packed_seq_params"}


def test_rebuild_is_byte_identical_with_workers(llava, tmp_path):
    path, _ = trl_vision_file(tmp_path)
    build([path], tmp_path / "a", llava)
    build([path], tmp_path / "b", llava, workers=2)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    # a text rebuild over the image dataset removes images.bin and its offsets
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    build([text], tmp_path / "a", llava, image_processor=False)
    assert not (tmp_path / "a" / "images.bin").exists()
    assert not (tmp_path / "a" / "index" / "unit_image_offsets.npy").exists()
    assert "images" not in PreferenceDataset(tmp_path / "a").meta


def test_bad_images_are_counted_skips_with_file_line_and_image(llava, tmp_path):
    path, photos = trl_vision_file(tmp_path)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    cut = photos["coffee"].read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(cut[: len(cut) // 3])
    rows = [{"images": [img], "prompt": [_user(None, "What?")], "chosen": "a", "rejected": "b"}
            for img in ("img/missing.png", "img/broken.png", "img/cut.jpg", "img/" + photos["rocket"].name)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = build([path, bad], tmp_path / "ds", llava)
    assert stats["skipped"] == {"bad_image": 3} and stats["units"] == 4
    skipped = [json.loads(x) for x in (tmp_path / "ds" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["file"], s["line"], s["reason"]) for s in skipped] == [(str(bad), n, "bad_image") for n in (1, 2, 3)]
    assert "images[0]" in skipped[0]["detail"] and "missing.png" in skipped[0]["detail"]
    assert "no such file" in skipped[0]["detail"] and "unreadable image" in skipped[1]["detail"]


def test_images_without_image_processor_stop_the_build(llava, tmp_path, capsys):
    path, _ = trl_vision_file(tmp_path)
    rc = build_main(["--input", str(path), "--tokenizer", str(llava), "--output", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 2 and "--image-processor" in err and f"{path}:1" in err
    assert not (tmp_path / "ds").exists()
    rc = build_main(["--input", str(path), "--tokenizer", str(llava), "--output", str(tmp_path / "ds"),
                     "--image-processor", str(llava), "--date", "2026-01-01", "--pack-tokens", "1024",
                     "--max-unit-tokens", "1024"])
    out = capsys.readouterr().out
    assert rc == 0 and "images encoded unshared" in out
    # a tokenizer without the model's image token is refused up front
    rc = build_main(["--input", str(path), "--tokenizer", "byte", "--output", str(tmp_path / "ds2"),
                     "--image-processor", str(llava)])
    assert rc == 2 and "image token" in capsys.readouterr().err


def test_photographs_are_real():
    """The fixture's photographs are the real skimage ones (not blank arrays)."""
    for arr in photographs().values():
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.std() > 20
    buf = io.BytesIO()
    Image.fromarray(photographs(("chelsea",))["chelsea"]).save(buf, "PNG")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_image_store_is_an_error_naming_the_file(llava, tmp_path):
    path, _ = trl_vision_file(tmp_path)
    build([path], tmp_path / "ds", llava)
    ds = PreferenceDataset(tmp_path / "ds")
    assert ds.images_meta["count"] == 4 and ds.image_counts().tolist() == [1, 2, 1]
    data = (tmp_path / "ds" / "images.bin").read_bytes()
    (tmp_path / "ds" / "images.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="images.bin: corrupt dataset"):
        PreferenceDataset(tmp_path / "ds")
    (tmp_path / "ds" / "images.bin").unlink()
    with pytest.raises(ValueError, match="without images.bin"):
        PreferenceDataset(tmp_path / "ds")


def test_fixture_builds_k2_and_k4_vision_datasets(llava, tmp_path):
    from tests.llava_fixtures import build_vision_dataset

    for k in (2, 4):
        ds = PreferenceDataset(build_vision_dataset(tmp_path, llava, records=6, k=k))
        assert len(ds) == 6 and ds.images_meta["count"] == 9
        assert all(ds.get_unit(i).k == k for i in range(len(ds)))
        stats = json.loads((ds.path / "stats.json").read_text())
        assert stats["images_encoded_unshared"] == k * stats["images_encoded_shared"] == 9 * k
