"""The SLURM launcher (launch/slurm/): dry run under a faked job, the multi-node rendezvous on localhost,
and (slow) a real SLURM on localhost with preemption, requeue and resume.

The real-SLURM test needs ``slurm-wlm`` and ``munge`` (Debian packages): with ``CI`` or
``MEGATRON_PREFIX_INSTALL_SLURM=1`` set and apt available it installs them (quietly, bounded in time);
otherwise, or when the daemons do not start, it is skipped with the reason. See tests/slurm_helpers.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests import train_helpers as th
from tests.conftest import ROOT

SBATCH = {task: ROOT / "launch" / "slurm" / f"train_{task}.sbatch" for task in ("dpo", "rm")}
LAUNCH = ROOT / "launch" / "slurm" / "launch.sh"
VENV_BIN = str(Path(os.sys.executable).parent)


def fake_job(**extra) -> dict:
    """A faked 4-node SLURM job environment (no scontrol: the launcher's own node-list parser)."""
    env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mp-dpo", "SLURM_JOB_NODELIST": "node[01-03],gpu7",
        "SLURM_NNODES": "4", "SLURM_GPUS_PER_NODE": "h100:8", "LAUNCH_NO_SCONTROL": "1",
    }
    env.update(extra)
    return env


def dry_run(task: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH[task]), "--dry-run", *args], env=env, capture_output=True, check=False,
                          text=True, timeout=30, cwd=ROOT)


def torchrun_lines(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.startswith("torchrun ")]


@pytest.mark.parametrize("task", ["dpo", "rm"])
def test_dry_run_prints_one_torchrun_per_node(task):
    args = ["--config", "configs/llama3-8b-dpo.yaml", "train.max_steps=100", "data.path=/data/my set"]
    proc = dry_run(task, args, fake_job())
    assert proc.returncode == 0, proc.stderr
    cmds = torchrun_lines(proc.stdout)
    assert len(cmds) == 4, proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("# on ")] == [
        "# on node01:", "# on node02:", "# on node03:", "# on gpu7:"]
    endpoints = set()
    for cmd in cmds:
        assert "--nnodes=4" in cmd and "--nproc-per-node=8" in cmd and "--rdzv-backend=c10d" in cmd
        endpoints |= {a.split("=", 1)[1] for a in cmd if a.startswith("--rdzv-endpoint=")}
        worker = cmd.index(str(ROOT / "launch" / "slurm" / "worker.py"))
        assert cmd[worker + 1:] == [task, *args]  # the job's config and overrides, quoting kept
    assert endpoints == {f"node01:{20000 + 4242}"}
    srun = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--ntasks-per-node=1" in srun[0] and "--nodes=4" in srun[0]
    assert srun[0][-len(args) - 2:] == ["--node", task, *args]


def test_dry_run_container_gpus_and_port_from_the_environment():
    env = fake_job(SLURM_GPUS_ON_NODE="4", MASTER_PORT="31000", CONTAINER_IMAGE="registry#mp:1",
                   CONTAINER_MOUNTS="/lustre:/lustre", CONFIG="configs/demo-cpu.yaml")
    proc = dry_run("dpo", ["x.y=1"], env)
    assert proc.returncode == 0, proc.stderr
    cmd = torchrun_lines(proc.stdout)[0]
    assert "--nproc-per-node=4" in cmd and "--rdzv-endpoint=node01:31000" in cmd
    assert cmd[-4:] == ["dpo", "--config", "configs/demo-cpu.yaml", "x.y=1"]
    assert cmd[cmd.index("dpo") - 1] == "/opt/megatron_prefix/launch/slurm/worker.py"
    srun = shlex.split(next(line for line in proc.stdout.splitlines() if line.startswith("srun ")))
    assert "--container-image=registry#mp:1" in srun and "--container-mounts=/lustre:/lustre" in srun
    assert "--container-workdir=/opt/megatron_prefix" in srun


def test_usage_errors_exit_64():
    assert dry_run("rm", [], fake_job()).returncode == 64  # no --config for the reward model
    proc = dry_run("dpo", ["--config", "c.yaml"], {k: v for k, v in fake_job().items() if "NODELIST" not in k})
    assert proc.returncode == 64 and "SLURM_JOB_NODELIST" in proc.stderr
    bad = subprocess.run(["bash", str(LAUNCH), "sft"], capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 64 and "usage" in bad.stderr


def test_nodelist_parser_matches_scontrol_semantics():
    script = f'source <(sed -n "/^expand_nodelist()/,/^}}/p" {LAUNCH}); expand_nodelist "$1"'
    out = subprocess.run(["bash", "-c", script, "x", "gpu[008-011,2],cpu5,r1-n[1-2]b"], check=False, capture_output=True,
                         text=True, timeout=30).stdout.split()
    assert out == ["gpu008", "gpu009", "gpu010", "gpu011", "gpu2", "cpu5", "r1-n1b", "r1-n2b"]


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return th.build_demo_dataset(tmp_path_factory.mktemp("slurm") / "data", records=64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted run every launcher run is compared with: 2 processes (DP=2), one torchrun."""
    run = tmp_path_factory.mktemp("slurm_ref")
    recipe = th.write_recipe(run / "r.yaml", data, run / "ckpt", train={"max_steps": STEPS})
    th.train(recipe, nproc=2)
    return recipe, th.metrics(run / "ckpt")


STEPS = 6


def same_losses(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), [r["step"] for r in got]
    for a, b in zip(got, ref):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6, (a, b)


@pytest.mark.dist
@pytest.mark.slow
def test_two_agents_rendezvous_like_two_nodes(tmp_path, reference):
    """The launcher's node mode twice on localhost (``--nnodes 2``, one process each, one c10d endpoint)."""
    recipe, ref = reference
    env = th.env({"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "two", "SLURM_JOB_NODELIST": "localhost,localhost",
                  "SLURM_NNODES": "2", "NPROC_PER_NODE": "1", "LAUNCH_NO_SCONTROL": "1",
                  "MASTER_PORT": str(th.free_port()), "LOG_DIR": str(tmp_path / "logs"),
                  "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    cmd = ["bash", str(LAUNCH), "--node", "dpo", "--config", str(recipe), f"checkpoint.dir={tmp_path / 'run'}"]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True) for _ in range(2)]
    outs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert re.search(r"world_size=2", "".join(outs))
    same_losses(th.metrics(tmp_path / "run"), ref)


# ------------------------------------------------------------------------------------------- real SLURM


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A private SLURM on localhost: two slurmd (n1, n2) when this build runs them, else one."""
    from tests.slurm_helpers import LocalSlurm, ensure_slurm

    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    errors = []
    for nodes in (2, 1):
        cluster = LocalSlurm(tmp_path_factory.mktemp(f"slurm{nodes}"), nodes=nodes)
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            cluster.stop()
            errors.append(f"{nodes} node(s): {str(err)[-1500:]}")
            continue
        try:
            yield cluster
        finally:
            cluster.stop()
        return
    pytest.skip("SLURM daemons did not start: " + " | ".join(errors))


def job_field(slurm, job: str, field: str) -> str:
    out = slurm.run(["scontrol", "show", "job", "-o", job], check=False).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_job(slurm, job: str, states: set[str], timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(slurm, job, "JobState")
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} not in {states} after {timeout}s (state {state!r})\n{slurm.logs()}")


@pytest.mark.dist
@pytest.mark.slow
def test_real_slurm_preempt_requeue_resume(tmp_path, slurm, reference):
    """sbatch train_dpo.sbatch (2 nodes x 1 process, or 1 node x 2), USR1 to the batch shell mid-run:
    the run saves, exits 75, the script requeues the job, it resumes and ends with the reference losses."""
    recipe, ref = reference
    run, logs = tmp_path / "run", tmp_path / "logs"
    nodes = slurm.nodes
    env = {"NPROC_PER_NODE": str(2 // nodes), "LOG_DIR": str(logs), "MEGATRON_PREFIX_ROOT": str(ROOT),
           "MASTER_PORT": str(th.free_port()), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    export = "ALL," + ",".join(f"{k}={v}" for k, v in env.items())
    out = slurm.run(["sbatch", "--parsable", f"--nodes={nodes}", f"--export={export}", "--chdir", str(ROOT),
                     f"--output={tmp_path}/job-%j.out", str(SBATCH["dpo"]), "--config", str(recipe),
                     f"checkpoint.dir={run}"], check=False)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    wait_job(slurm, job, {"RUNNING"}, 60)
    deadline = time.time() + 120
    while not any(r.get("step", 0) >= 2 for r in th.metrics(run)):
        assert time.time() < deadline and job_field(slurm, job, "JobState") == "RUNNING", (
            (tmp_path / f"job-{job}.out").read_text(errors="replace")[-4000:])
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", "--batch", job])
    state = wait_job(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 240)
    batch_log = (tmp_path / f"job-{job}.out").read_text(errors="replace")
    assert state == "COMPLETED", batch_log[-6000:]
    assert job_field(slurm, job, "Restarts") == "1", batch_log[-3000:]
    assert "preempted: the training saved its state" in batch_log and f"scontrol requeue {job}" in batch_log
    assert list((logs / f"mp-dpo-{job}" / "attempt-0" / "preempted").glob("rank*")), "no preemption marker"
    assert "resumed from" in batch_log or "resumed from" in "".join(
        p.read_text(errors="replace") for p in (logs / f"mp-dpo-{job}" / "attempt-1").glob("node-*.log"))
    same_losses(th.metrics(run), ref)
