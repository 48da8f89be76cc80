"""Fault injection: kills at named points, corrupt and hostile files, concurrent jobs (issue 10).

Each case asserts what is kept, what is refused, and the message. One tiny trained run (2 steps,
a checkpoint per step, a held-out eval) is shared by the module and copied per case. Kill points use the
``MEGATRON_PREFIX_FAULT`` hook (``megatron_prefix/faults.py``).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_prefix.data.builder import BuildConfig, build_dataset
from megatron_prefix.data.dataset import PreferenceDataset
from megatron_prefix.data.units import UnitConfig
from megatron_prefix.locks import DirLock, LockHeld
from megatron_prefix.training.exit_codes import EXIT_PREEMPTED, EXIT_USER_ERROR
from tests import train_helpers as th
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

STEPS = 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(dataset, trained run dir, its output): iter_0000001 and iter_0000002, latest -> iter_0000002."""
    root = tmp_path_factory.mktemp("faults")
    data = th.build_demo_dataset(root / "data", records=48)
    run = root / "run"
    recipe = th.write_recipe(root / "r.yaml", data, run, train={"max_steps": STEPS},
                             checkpoint={"interval": 1, "dir": str(run)},
                             data={"eval_fraction": 0.2, "eval_units": 8})
    out = th.train(recipe)
    return data, run, out


def _copy(base, tmp_path, **sections) -> tuple[Path, Path]:
    """A copy of the trained run and a recipe pointing at it."""
    data, run, _ = base
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    recipe = th.write_recipe(tmp_path / "r.yaml", data, dst, train={"max_steps": STEPS},
                             checkpoint={"interval": 1, "dir": str(dst)},
                             data={"eval_fraction": 0.2, "eval_units": 8}, **sections)
    return dst, recipe


def _manager(run: Path, **cfg):
    from megatron_prefix.training.checkpoint import CheckpointConfig, CheckpointManager

    return CheckpointManager(CheckpointConfig(dir=str(run), **cfg), log=lambda msg: None)


def _resume_error(run: Path) -> str:
    from megatron_prefix.training.checkpoint import CheckpointError

    mgr = _manager(run)
    try:
        with pytest.raises(CheckpointError) as err:
            mgr.resume_point(log=lambda msg: None)
    finally:
        mgr.close()
    return str(err.value)


# ------------------------------------------------------------------------- corrupt checkpoint files


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "distcp_flipped": ("__0_0.distcp", _flip),
    "distcp_truncated": ("__0_1.distcp", _truncate),
    "metadata_truncated": (".metadata", _truncate),
    "common_pt_truncated": ("common.pt", _truncate),
    "train_state_garbage": ("train_state.json", lambda p: p.write_text("{not json")),
    "rng_missing": ("rng/rank_00000.pt", lambda p: p.unlink()),
    "manifest_garbage": ("manifest.json", lambda p: p.write_text("[1, 2")),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_offered(base, tmp_path, case):
    name, damage = CORRUPTIONS[case]
    run, _ = _copy(base, tmp_path)
    damage(run / "iter_0000002" / name)
    msg = _resume_error(run)
    assert name in msg, msg
    assert str(run / "iter_0000002") in msg
    assert "checkpoint.resume_from=iter_0000001" in msg  # offered, not taken
    assert (run / "latest").read_text().strip() == "iter_0000002"  # nothing moved
    mgr = _manager(run, resume_from="iter_0000001")  # the explicit override resumes from it
    try:
        assert mgr.resume_point(log=lambda msg: None) == run / "iter_0000001"
    finally:
        mgr.close()
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("content", ["", "iter_0000009\n", "../../etc\n", "\x00\xff"])
def test_bad_latest_marker_is_named(base, tmp_path, content):
    run, _ = _copy(base, tmp_path)
    (run / "latest").write_text(content, errors="surrogateescape")
    msg = _resume_error(run)
    assert str(run / "latest") in msg
    assert "checkpoint.resume_from=iter_0000002" in msg


def test_both_checkpoints_corrupt_offers_nothing(base, tmp_path):
    run, _ = _copy(base, tmp_path)
    for it in ("iter_0000001", "iter_0000002"):
        _truncate(run / it / ".metadata")
    msg = _resume_error(run)
    assert "No earlier complete checkpoint" in msg and "resume_from" not in msg


def test_checkpoint_without_manifest_loads_with_a_note(base, tmp_path):
    from megatron_prefix.training.checkpoint import verify

    run, _ = _copy(base, tmp_path)
    (run / "iter_0000002" / "manifest.json").unlink()
    note = verify(run / "iter_0000002")
    assert note and "no manifest.json" in note
    _truncate(run / "iter_0000002" / ".metadata")  # unverified, but still read safely and named
    msg = _resume_error(run)
    assert ".metadata" in msg and "truncated or corrupt" in msg


def test_resume_from_resumes_bitwise_and_a_finished_rerun_adds_nothing(base, tmp_path):
    """The refusal message is checked above (in-process); here the override drives a real resume."""
    run, recipe = _copy(base, tmp_path)
    _flip(run / "iter_0000002" / "__0_0.distcp")
    out = th.train(recipe, ["checkpoint.resume_from=iter_0000001"])
    assert "resuming from" in out and "iter_0000001" in out and "__0_0.distcp" in out
    assert (run / "latest").read_text().strip() == "iter_0000002"
    for split in ("train", "eval"):  # step 2 and the final eval again, bit for bit, once each
        got, want = th.metrics(run, split), th.metrics(base[1], split)
        assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in want], split
    # a rerun of the finished run: nothing trained, nothing appended (the final eval line is not repeated);
    # the override only applies while latest is unusable, so it is ignored, saying so
    before = (run / "metrics.jsonl").read_text()
    out = th.train(recipe, ["checkpoint.resume_from=iter_0000001"])
    assert "ignored" in out and "nothing to do" in out
    assert (run / "metrics.jsonl").read_text() == before and len(th.metrics(run, "eval")) == 1
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000001", "iter_0000002"]


# ------------------------------------------------------------------------- hostile .metadata


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(ckpt: Path, marker: Path, refresh_manifest: bool = True) -> None:
    """Replace .metadata by a pickle that creates ``marker`` when unpickled (a consistent attacker also
    rewrites the manifest)."""
    from megatron_prefix.training.checkpoint import write_manifest

    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    if refresh_manifest:
        write_manifest(ckpt)


def test_real_metadata_passes_the_safe_unpickler(base):
    from torch.distributed.checkpoint.metadata import Metadata

    from megatron_prefix.compat.safe_metadata import load_metadata

    meta = load_metadata(base[1] / "iter_0000002" / ".metadata")
    assert isinstance(meta, Metadata) and any("embedding" in k for k in meta.state_dict_metadata)


def test_hostile_metadata_is_refused_by_every_reader(base, tmp_path):
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_prefix.compat.safe_metadata import UnsafeMetadataError, install_safe_metadata_reader
    from megatron_prefix.convert.to_hf import inspect_checkpoint

    run, _ = _copy(base, tmp_path)
    marker = tmp_path / "pwned"
    _plant(run / "iter_0000002", marker)
    install_safe_metadata_reader()
    for reader in (FileSystemReader, CachedMetadataFileSystemReader):
        with pytest.raises(UnsafeMetadataError, match=r"\.metadata.*posix\.system"):
            reader(str(run / "iter_0000002")).read_metadata()
    with pytest.raises(ValueError, match=r"\.metadata.*posix\.system"):
        inspect_checkpoint(run)
    assert "posix.system" in _resume_error(run)
    assert not marker.exists()


def test_hostile_metadata_through_checkpoint_load_and_convert(base, tmp_path, capsys):
    import importlib.util

    run, _ = _copy(base, tmp_path)
    marker = tmp_path / "pwned"
    _plant(run / "iter_0000002", marker)
    recipe = th.write_recipe(tmp_path / "load.yaml", base[0], tmp_path / "new",
                             checkpoint={"load": str(run)}, train={"max_steps": 1})
    out = th.train(recipe, expect_rc=EXIT_USER_ERROR)
    assert "posix.system" in out and ".metadata" in out and "Traceback" not in out
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools" / "convert_mcore_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--ckpt", str(run), "--out", str(tmp_path / "hf"), "--no-progress"]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert not marker.exists()


# ------------------------------------------------------------------------- changed model


def test_changed_model_is_refused_on_resume_and_on_load(base, tmp_path):
    run, recipe = _copy(base, tmp_path)
    out = th.train(recipe, ["model.hidden_size=64", "train.max_steps=3"], expect_rc=EXIT_USER_ERROR)
    assert "model.hidden_size: the checkpoint has 32, this run asks 64" in out and "Traceback" not in out
    assert (run / "latest").read_text().strip() == "iter_0000002"
    out = th.train(recipe, ["model.num_layers=3", f"checkpoint.load={run}", f"checkpoint.dir={tmp_path / 'new'}"],
                   expect_rc=EXIT_USER_ERROR)
    assert "model.num_layers: the checkpoint has 2, this run asks 3" in out
    assert not (tmp_path / "new" / "latest").exists()


def test_model_mismatch_names_every_field():
    from megatron_prefix.training.resume import model_mismatch

    saved = dict(th.TINY_MODEL, vocab_size=300)
    asked = dict(th.TINY_MODEL, hidden_size=64, num_query_groups=4, vocab_size=512, init_method_std=0.1)
    diffs = model_mismatch(saved, asked)
    assert [d.split(":")[0] for d in diffs] == ["model.hidden_size", "model.num_query_groups"]
    assert model_mismatch(saved, asked, only={"num_layers"}) == []


# ------------------------------------------------------------------------- concurrent runs, locks


def test_two_trainings_on_one_dir_and_kill_during_save(base, tmp_path):
    from megatron_prefix.training.checkpoint import CheckpointError

    run, recipe = _copy(base, tmp_path)
    first = th.start(recipe, ["train.max_steps=400", "checkpoint.interval=0"])
    try:
        th.wait_for_step(run, STEPS + 1, first)
        # a second job's start-up on the same checkpoint.dir (in-process: the launcher turns this
        # CheckpointError into a message and exit code 2, as for every checkpoint error)
        with pytest.raises(CheckpointError) as err:
            _manager(run)
        assert f"locked by process {first.pid} on host {socket.gethostname()}" in str(err.value)
    finally:
        th.kill(first)  # SIGKILL: its lock stays behind, stale
    assert json.loads((run / ".lock").read_text())["pid"] == first.pid
    latest = (run / "latest").read_text().strip()
    assert latest == "iter_0000002"  # the first job never saved (interval 0); the second never ran
    # a third job takes the stale lock over, trains a step and is killed in the middle of its save
    out = th.train(recipe, ["train.max_steps=3"], expect_rc=-signal.SIGKILL,
                   extra_env={"MEGATRON_PREFIX_FAULT": "kill_in_save:3"})
    assert f"took over the stale lock {run / '.lock'} of process {first.pid}" in out
    assert (run / "iter_0000003.tmp").is_dir() and (run / "latest").read_text().strip() == "iter_0000002"
    assert [r["step"] for r in th.metrics(run)] == [1, 2, 3]  # the first job's steps 3.. were dropped
    mgr = _manager(run)  # the next start-up (stale lock again) removes the half save, resumes at step 2
    try:
        assert not (run / "iter_0000003.tmp").exists()
        assert mgr.resume_point(log=lambda msg: None) == run / "iter_0000002"
    finally:
        mgr.close()
    assert not (run / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "x"}))
    lock = DirLock(path, "checkpoint.dir")
    note = lock.acquire()
    assert note and f"process {dead.pid}" in note and "no longer running" in note
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(LockHeld, match=f"locked by process {os.getpid()}"):
        DirLock(path, "checkpoint.dir").acquire()
    lock.release()
    assert not path.exists()
    path.write_text(json.dumps({"host": "elsewhere", "pid": dead.pid}))  # another host: never taken over
    with pytest.raises(LockHeld, match="on host elsewhere"):
        DirLock(path, "checkpoint.dir").acquire()


def test_startup_keeps_tmp_of_another_job(base, tmp_path):
    from megatron_prefix.training.checkpoint import CheckpointError

    run, _ = _copy(base, tmp_path)
    (run / "iter_0000003.tmp").mkdir()  # another job's save in progress
    holder = DirLock(run / ".lock", "checkpoint.dir")
    holder.acquire()
    try:
        with pytest.raises(CheckpointError, match="is locked by process"):
            _manager(run)
        assert (run / "iter_0000003.tmp").is_dir()
    finally:
        holder.release()


# ------------------------------------------------------------------------- metrics


def test_kill_during_metrics_rewrite_keeps_the_file(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')  # cut by a kill
    script = ("import sys; from megatron_prefix.training.metrics import LoggingConfig, MetricsLogger; "
              "MetricsLogger(sys.argv[1], LoggingConfig(tensorboard=False), True, resume_step=3)")
    cmd = [sys.executable, "-c", script, str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=th.env({"MEGATRON_PREFIX_FAULT": "kill_in_metrics_rewrite:3"}),
                          cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "metrics.jsonl").read_text().startswith("\n".join(lines))  # the old file, whole
    subprocess.run(cmd, env=th.env(), cwd=ROOT, check=True)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------------- reference precompute


def test_signal_during_precompute_saves_progress_and_resumes(base, tmp_path):
    data = base[0]
    ref = tmp_path / "ref"
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", train={"max_steps": 1},
                             reference={"mode": "precompute", "path": str(ref)})
    env = {"MEGATRON_PREFIX_REFERENCE_CHUNK_UNITS": "8", "MEGATRON_PREFIX_FAULT": "term_in_precompute:2"}
    out = th.train(recipe, expect_rc=EXIT_PREEMPTED, extra_env=env)
    assert "reference: preempted: progress saved" in out and "rerun" in out
    done = np.load(ref / "done.npy")
    assert 0 < done.sum() < len(done)
    out = th.train(recipe, extra_env={"MEGATRON_PREFIX_REFERENCE_CHUNK_UNITS": "8"})
    assert f"computing log-probs of {int((~done).sum())} units" in out
    assert np.load(ref / "done.npy").all()


# ------------------------------------------------------------------------- datasets


def _records(n: int) -> list[dict]:
    return [{"prompt": f"sort {i} {i + 3}", "chosen": f"{i} {i + 3}", "rejected": f"{i + 3} {i}"} for i in range(n)]


def _write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _build(inputs: list[Path], out: Path) -> dict:
    cfg = BuildConfig(inputs=[str(p) for p in inputs], tokenizer="byte", output=str(out),
                      units=UnitConfig(max_unit_tokens=256), pack_tokens=512)
    return build_dataset(cfg, log=lambda msg: None)


def _skipped(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]


def test_lone_surrogate_is_a_bad_record(tmp_path):
    recs = _records(20)
    recs[4]["chosen"] = "4 \ud800 7"  # json.dumps writes the escape "\ud800"
    src = tmp_path / "in.json"
    src.write_text(json.dumps(recs))
    stats = _build([_write_jsonl(tmp_path / "in.jsonl", recs), src], tmp_path / "ds")
    assert [(s["file"].endswith(n), s["line"], s["reason"]) for s, n in zip(_skipped(tmp_path / "ds"),
            ("in.jsonl", "in.json"))] == [(True, 5, "bad_utf8"), (True, 5, "bad_utf8")]
    assert "surrogate" in _skipped(tmp_path / "ds")[0]["detail"]
    assert len(PreferenceDataset(tmp_path / "ds")) == 38 and stats["skipped"]["bad_utf8"] == 2


def test_truncated_gzip_keeps_the_records_before_the_cut(tmp_path):
    blob = gzip.compress(_write_jsonl(tmp_path / "in.jsonl", _records(400)).read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    stats = _build([tmp_path / "cut.jsonl.gz"], tmp_path / "ds")
    kept = len(PreferenceDataset(tmp_path / "ds"))
    assert 100 < kept < 400
    assert stats["skipped"]["truncated_file"] == 1
    assert _skipped(tmp_path / "ds")[-1]["reason"] == "truncated_file"


def test_negative_eval_units_is_refused():
    from megatron_prefix.training.config import DataConfig

    with pytest.raises(ValueError, match="data.eval_units"):
        DataConfig(path="x", eval_units=-1).validate()


def test_concurrent_builds_never_mix(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", _records(3000))
    _build([src], tmp_path / "reference")
    out = tmp_path / "ds"
    holder = DirLock(tmp_path / "ds.lock", "output")
    holder.acquire()
    try:  # a build while another holds the output is refused, naming it
        with pytest.raises(LockHeld, match=f"locked by process {os.getpid()}"):
            _build([src], out)
    finally:
        holder.release()
    cmd = [sys.executable, str(ROOT / "tools" / "build_dataset.py"), "--input", str(src), "--tokenizer", "byte",
           "--output", str(out), "--max-unit-tokens", "256", "--pack-tokens", "512"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=th.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc == 0 or (rc == 2 and "is locked by process" in err), err
    assert (out / "tokens.bin").read_bytes() == (tmp_path / "reference" / "tokens.bin").read_bytes()
    assert len(PreferenceDataset(out)) == len(PreferenceDataset(tmp_path / "reference"))
    assert not list(tmp_path.glob(".ds.building-*")) and not (tmp_path / "ds.lock").exists()


def test_kill_during_build_leaves_no_dataset(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", _records(50))
    cmd = [sys.executable, str(ROOT / "tools" / "build_dataset.py"), "--input", str(src), "--tokenizer", "byte",
           "--output", str(tmp_path / "ds"), "--max-unit-tokens", "256", "--pack-tokens", "512"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=th.env({"MEGATRON_PREFIX_FAULT": "kill_in_build:0"}),
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "ds").exists()  # nothing half-built under the output name
    subprocess.run(cmd, cwd=ROOT, env=th.env(), check=True, capture_output=True)  # stale lock taken over
    assert len(PreferenceDataset(tmp_path / "ds")) == 50 and not list(tmp_path.glob(".ds.building-*"))


@pytest.mark.parametrize("damage", ["tokens_truncated", "index_garbage", "meta_garbage", "index_short"])
def test_corrupt_dataset_is_an_error_naming_the_file(tmp_path, damage):
    out = tmp_path / "ds"
    _build([_write_jsonl(tmp_path / "in.jsonl", _records(30))], out)
    if damage == "tokens_truncated":
        _truncate(out / "tokens.bin")
        name = "tokens.bin"
    elif damage == "index_garbage":
        (out / "index" / "resp_lens.npy").write_bytes(b"garbage")
        name = "resp_lens.npy"
    elif damage == "meta_garbage":
        (out / "meta.json").write_text("{")
        name = "meta.json"
    else:
        np.save(out / "index" / "unit_records.npy", np.zeros(3, dtype=np.int64))
        name = "unit_records.npy"
    with pytest.raises(ValueError, match=name) as err:
        PreferenceDataset(out)
    assert "rebuild" in str(err.value)


def test_lock_file_written_by_a_racing_process_is_waited_for(tmp_path):
    """An empty lock file (a holder between create and write) is not mistaken for a stale one."""
    path = tmp_path / ".lock"
    path.write_text("")
    t0 = time.time()
    with pytest.raises(LockHeld):
        DirLock(path, "output").acquire()
    assert time.time() - t0 < 5 and path.exists()
