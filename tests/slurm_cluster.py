"""A real one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd.

Debian's `slurm-wlm` and `munge` (`.ci/run` installs them). Everything lives in a temporary
directory: a fresh munge key and socket, a minimal slurm.conf naming this host (short hostname,
NodeAddr 127.0.0.1, this machine's CPUs), free ports, state and logs. Jobs see it through
SLURM_CONF, which `LocalSlurm.env` sets. `LocalSlurm.start` raises `SlurmUnavailable` with the
reason when the programs are missing or the daemons do not come up, so tests can skip with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")

CONF = """ClusterName=calmtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
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
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (a test skips with it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """`with LocalSlurm(tmp) as slurm:` a running one-node cluster; `slurm.env` is a job's environment."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
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
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        self._spawn(["munged", "-F", "-f", f"--key-file={key}", f"--socket={self.root}/munge.socket",
                     f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
                     f"--seed-file={self.root}/munged.seed"], "munged")
        self._wait_for(lambda: (self.root / "munge.socket").exists(), "munged", "munged.log")
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 9 // 10
        self.conf.write_text(CONF.format(host=self.host, root=self.root, cpus=os.cpu_count(), memory_mb=memory_mb,
                                         ctld_port=_free_port(), slurmd_port=_free_port()))
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn(["slurmd", "-D", "-N", self.host, "-f", str(self.conf)], "slurmd")
        self._wait_for(self._node_idle, "slurmctld/slurmd", "slurmctld.log")

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self._procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))

    def _node_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True,
                              timeout=10)
        return proc.returncode == 0 and proc.stdout.strip() in ("idle", "mix", "alloc")

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

    def sbatch(self, script: str, workdir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """Submit a batch script and wait for it (`sbatch --wait`); its output lands in workdir/slurm.out."""
        path = workdir / "job.sh"
        path.write_text(script)
        return subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=1", f"--cpus-per-task={os.cpu_count()}",
                               f"--chdir={workdir}", f"--output={workdir / 'slurm.out'}", str(path)],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for proc in reversed(self._procs):  # slurmd, slurmctld, then munged: only the ones started here
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
