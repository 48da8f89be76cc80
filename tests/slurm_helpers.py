"""A private SLURM on localhost for tests: munged + slurmctld + slurmd(s), all under one tmp dir.

``LocalSlurm(tmp, nodes=1)`` writes a slurm.conf for localhost (CPU only, ``proctrack/linuxproc``,
``task/none``, no cgroups, ``select/cons_tres``, ``SlurmUser=root``, free ports), starts the daemons in
the foreground as children of the test and stops every one of them in ``stop()`` (the test fixture
calls it in ``finally``). ``env`` is the environment for ``sbatch``/``scontrol`` (``SLURM_CONF``).
``ensure_slurm()`` returns None when the binaries are there (installing ``slurm-wlm munge`` with apt
first when ``CI`` or ``MEGATRON_PREFIX_INSTALL_SLURM=1`` is set), else the reason to skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
INSTALL_TIMEOUT_S = 240
CRED_EXPIRE_S = 15  # a requeued job waits this long (default 120 s) before it may start again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> list[str]:
    return [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]


def ensure_slurm() -> str | None:
    """None when SLURM and munge are installed (after an opt-in quiet apt install), else why not."""
    if not _missing():
        return None
    opt_in = os.environ.get("CI") or os.environ.get("MEGATRON_PREFIX_INSTALL_SLURM") == "1"
    if not opt_in:
        return f"SLURM not installed ({', '.join(_missing())} missing); set MEGATRON_PREFIX_INSTALL_SLURM=1 to apt-get it"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM not installed and apt-get as root is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
            subprocess.run(cmd, env=env, capture_output=True, check=True, timeout=INSTALL_TIMEOUT_S)
    except (subprocess.SubprocessError, OSError) as err:
        return f"installing slurm-wlm/munge failed: {err}"
    return f"still missing after apt-get: {_missing()}" if _missing() else None


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """munged, slurmctld and ``nodes`` slurmd (``n1``..``nN``, all on 127.0.0.1) under ``root``."""

    def __init__(self, root: Path, nodes: int = 1, cpus: int = 4):
        self.root = Path(root)
        self.nodes = nodes
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        for sub in ("munge", "state", "log", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o711)
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env.pop("SLURM_JOB_ID", None)

    # ------------------------------------------------------------------------------------------------

    def write_conf(self) -> None:
        r = self.root
        ctld_port = _free_port()
        lines = [
            "ClusterName=mptest", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire={CRED_EXPIRE_S}",  # also the requeue delay
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SwitchType=switch/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",
            "SlurmdParameters=config_overrides", "ReturnToService=2", "JobRequeue=1", "MinJobAge=600",
            "KillWait=30", "InactiveLimit=0", "MessageTimeout=30", "SlurmctldTimeout=60", "SlurmdTimeout=120",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        for i in range(1, self.nodes + 1):
            lines.append(f"NodeName=n{i} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} "
                         f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN")
        nodes = "n1" if self.nodes == 1 else f"n[1-{self.nodes}]"
        lines.append(f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
        (r / "plugstack.conf").write_text("")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self, timeout: float = 60) -> None:
        """Start the daemons and wait until every node is idle; RuntimeError (with the logs) otherwise."""
        self.write_conf()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._start("munged", [_sbin("munged"), "-F", "-f", f"--socket={self.socket}", f"--key-file={key}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: self.socket.exists(), 10, "munged socket")
        self._start("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for i in range(1, self.nodes + 1):
            (self.root / "spool" / f"n{i}").mkdir(exist_ok=True)
            self._start(f"slurmd-n{i}", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", f"n{i}"])
        self._wait(self._all_idle, timeout, "nodes idle")

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return len(states) == self.nodes and all(s.startswith("idle") for s in states.values())

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM: {what} not reached in {timeout}s: {self.logs()}")

    def logs(self, tail: int = 1500) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path.name}\n{text[-tail:]}")
        return "\n".join(out)

    def run(self, cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def stop(self) -> None:
        """Cancel every job, then stop every daemon this object started (TERM, then KILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--user=root"], check=False, timeout=10)
            except subprocess.SubprocessError:
                pass
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()
