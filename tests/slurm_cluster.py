"""A real two-node SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd.

Debian's `slurm-wlm` and `munge` (`.ci/run` installs them). Everything lives in a temporary
directory: a fresh munge key and socket, a minimal slurm.conf, free ports, state and logs. The two
nodes are two slurmd on this host, each with its own port, pid file and spool (`%n` in slurm.conf is
the node's name), so a `--nodes 2` job really gets two nodes and srun starts one task on each with
its own SLURM_NODEID. The first node is named after this host's short hostname (the rendezvous
host of a job must resolve), the second `HOST-n2`; both declare all of this machine's CPUs. Jobs see
the cluster through SLURM_CONF, which `LocalSlurm.env` sets. `LocalSlurm.start` raises
`SlurmUnavailable` with the reason when the programs are missing or the daemons do not come up, so
tests can skip with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")

CONF = """ClusterName=calmtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=5
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""
NODE = ("NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory={memory_mb} "
        "State=UNKNOWN")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (a test skips with it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """`with LocalSlurm(tmp) as slurm:` a running two-node cluster; `slurm.env` is a job's environment."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host, f"{self.host}-n2"]
        self.conf = self.root / "slurm.conf"
        self._procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        missing = [p for p in PROGRAMS if shutil.which(p) is None]
        if missing:
            raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing; "
                                   "apt-get install slurm-wlm munge, as .ci/run does)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs slurmd as root (it starts job steps as the submitting user)")
        try:
            socket.gethostbyname(self.host)  # a job's rendezvous host: the first node, named after this host
        except OSError as exc:
            raise SlurmUnavailable(f"this host's name {self.host!r} does not resolve ({exc})") from exc
        for sub in ("state", *(f"spool-{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        self._spawn(["munged", "-F", "-f", f"--key-file={key}", f"--socket={self.root}/munge.socket",
                     f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
                     f"--seed-file={self.root}/munged.seed"], "munged")
        self._wait_for(lambda: (self.root / "munge.socket").exists(), "munged", "munged.log")
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 9 // 10
        nodes = "\n".join(NODE.format(name=n, host=self.host, port=_free_port(), cpus=os.cpu_count(),
                                       memory_mb=memory_mb) for n in self.nodes)
        self.conf.write_text(CONF.format(host=self.host, root=self.root, ctld_port=_free_port(), nodes=nodes,
                                         names=",".join(self.nodes)))
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for name in self.nodes:
            self._spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}")
        self._wait_for(self._nodes_idle, "slurmctld/slurmd", "slurmctld.log")

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self._procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))

    def _nodes_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True,
                              timeout=10)
        states = proc.stdout.split()
        return proc.returncode == 0 and len(states) == len(self.nodes) and set(states) <= {"idle", "mix", "alloc"}

    def _wait_for(self, ready, what: str, log: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self._procs):
                break
            if ready():
                return
            time.sleep(0.5)
        tail = "".join((self.root / f).read_text(errors="replace")[-1500:] for f in (log, f"{what.split('/')[0]}.out")
                       if (self.root / f).is_file())
        raise SlurmUnavailable(f"{what} did not come up within {seconds:.0f} s:\n{tail}")

    def sbatch(self, script: str, workdir: Path, nodes: int = 1, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """Submit a batch script on `nodes` nodes (one task each) and wait for it (`sbatch --wait`); its
        output lands in workdir/slurm.out. `env`: the submitting environment (SLURM_CONF is added)."""
        path = workdir / "job.sh"
        path.write_text(script)
        argv = ["sbatch", "--wait", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={os.cpu_count()}",
                f"--chdir={workdir}", f"--output={workdir / 'slurm.out'}", str(path)]
        try:
            return subprocess.run(argv, env={**(env or self.env), "SLURM_CONF": str(self.conf)}, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", "--name", path.name], env=self.env, capture_output=True)  # its steps too
            raise

    def stop(self) -> None:
        if self._procs and all(p.poll() is None for p in self._procs):  # jobs a failed test left: end their steps
            subprocess.run(["scancel", "--user", str(os.geteuid())], env=self.env, capture_output=True, timeout=30)
        for proc in reversed(self._procs):  # the slurmd, slurmctld, then munged: only the ones started here
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
