"""A throwaway Slurm cluster on this machine, for tests: munged, slurmctld and two slurmd.

Everything (munge key and socket, slurm.conf, state, spool, pid and log files) lives in one
directory. The two nodes ``n1`` and ``n2`` are two slurmd processes on this host, both at
127.0.0.1 on their own ports. There is no accounting database: job states come from
``scontrol show job`` (finished jobs stay listed for ``MinJobAge`` seconds).

    cluster = SlurmCluster(tmp_dir)
    cluster.start()                  # installs slurm-wlm and munge with apt-get if missing
    job = cluster.sbatch("job.sh", "arg", options=["--nodes=2", "--time=1"], env={"X": "1"})
    assert cluster.wait(job, timeout=60) == "COMPLETED"
    cluster.stop()                   # every daemon and job process, by pid

Client commands need ``cluster.env`` (it holds ``SLURM_CONF``). Every wait has a timeout.
Nothing is left running after ``stop()``, also when ``start()`` failed half-way: every
process of the cluster, job processes included, carries the variable ``MARKER`` naming the
cluster's directory, and ``stop()`` kills what is left of them by pid. If the test process
itself is SIGKILLed, the daemons get SIGTERM from the kernel (PR_SET_PDEATHSIG) and the next
``start()`` kills the job processes they left (``reap_orphans``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import free_port

MARKER = "DILOCO_SLURM_TEST_CLUSTER"
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class ClusterUnavailable(RuntimeError):
    """Slurm or munge is not installed and cannot be installed here (the caller may skip)."""


def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin dirs a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def ensure_installed(timeout: float = 400) -> None:
    """Install Debian's ``slurm-wlm`` and ``munge`` when a daemon or client is missing.

    Only as root with apt-get; ``apt-get update`` only when the first install fails.
    Raises ClusterUnavailable with the reason otherwise.
    """
    missing = [name for name in (*DAEMONS, *CLIENTS) if which(name) is None]
    if not missing:
        return
    if os.geteuid() != 0 or which("apt-get") is None:
        raise ClusterUnavailable(
            f"{', '.join(missing)} not found; install slurm-wlm and munge "
            "(apt-get, as root) to run the Slurm tests"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=timeout)
        out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    still = [name for name in (*DAEMONS, *CLIENTS) if which(name) is None]
    if out.returncode != 0 or still:
        raise ClusterUnavailable(f"apt-get install slurm-wlm munge failed: {out.stderr[-2000:]}")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies without tearing down."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes; reap it if it is our child.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def kill_pids(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM every pid, then SIGKILL those still alive after ``timeout`` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _pid_alive(pid)]
            time.sleep(0.05)
        if not pids:
            return


class SlurmCluster:
    """A two-node Slurm cluster rooted at ``root`` (see the module docstring)."""

    def __init__(self, root: Path, nodes: int = 2, partition: str = "debug") -> None:
        self.root = Path(root).resolve()
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge-run"
        if len(str(self.munge_dir)) > 80:  # a unix socket path has at most 107 bytes
            self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.logs = {
            "munged": self.root / "log" / "munged.log",
            "slurmctld": self.root / "log" / "slurmctld.log",
            **{n: self.root / "log" / f"slurmd-{n}.log" for n in self.node_names},
        }
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # Every daemon, job step and job process carries MARKER: stop() finds stragglers
        # (slurmstepd, a job's children) by it and kills them by pid.
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": os.pathsep.join([os.environ.get("PATH", ""), *SBIN]),
            MARKER: str(self.root),
        }
        for var in list(self.env):  # a cluster we run inside must not leak into ours
            if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and var != "SLURM_CONF":
                del self.env[var]

    # ---------------------------------------------------------------- start
    def start(self, timeout: float = 60.0) -> None:
        """Install if needed, write the configs, start the daemons, wait for idle nodes."""
        ensure_installed()
        reap_orphans()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "owner.pid").write_text(f"{os.getpid()}\n")
        try:
            self._write_files()
            self._start_munged(timeout)
            self._popen("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
            for node in self.node_names:
                self._popen(node, [which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _write_files(self) -> None:
        for sub in ("munge-key", "log", "state", "spool", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        os.chmod(self.root / "munge-key", 0o700)
        key = self.root / "munge-key" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))  # what `dd if=/dev/urandom bs=1 count=1024` does
        os.chmod(key, 0o400)
        user = current_user()
        ports = {node: free_port() for node in self.node_names}
        cpus = os.cpu_count() or 1
        mem_mb = max(1, int(_mem_total_mb() * 0.9))
        host = socket.gethostname()
        r = self.root
        lines = [
            "# Written by tests/slurm_cluster.py: a local test cluster, nodes are slurmd",
            "# processes on this host.",
            "ClusterName=diloco-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=debug",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # a requeued job restarts in seconds
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldTimeout=60",
            "SlurmdTimeout=60",
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",
        ]
        for node in self.node_names:
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[node]} "
                f"CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={self.partition} Nodes={','.join(self.node_names)} Default=YES "
            "MaxTime=INFINITE State=UP OverSubscribe=NO"
        )
        self.conf.write_text("\n".join(lines) + "\n")

    def _popen(self, name: str, cmd: list[str | None]) -> subprocess.Popen[bytes]:
        out = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest reaches teardown, not the daemons
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        self._procs[name] = proc
        return proc

    def _start_munged(self, timeout: float) -> None:
        r = self.root
        cmd = [
            which("munged"),
            "--foreground",  # its pid is ours; munged.pid records the same one
            "--force",  # tmp dirs are under a world-writable /tmp
            f"--key-file={r / 'munge-key' / 'munge.key'}",
            f"--socket={self.munge_socket}",
            f"--pid-file={r / 'run' / 'munged.pid'}",
            f"--log-file={self.logs['munged']}",
            f"--seed-file={self.munge_dir / 'munge.seed'}",
            "--num-threads=2",
        ]
        proc = self._popen("munged", cmd)
        self._until(self.munge_socket.exists, timeout, "munged socket", proc=proc)

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tail()}")
            states = self.node_states()
            return len(states) == len(self.node_names) and all(
                s.rstrip("*~#!%$@^-") == "idle" for s in states.values()
            )

        self._until(idle, timeout, "both nodes idle in sinfo")

    def _until(
        self,
        check: Callable[[], bool],
        timeout: float,
        what: str,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what}: exited with {proc.returncode}\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}")

    # -------------------------------------------------------------- clients
    def run(
        self, *cmd: str, timeout: float = 30.0, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command with the cluster's environment (or ``env=``)."""
        kw.setdefault("env", self.env)
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
        return out

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` from sinfo; empty while slurmctld does not answer."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
        if out.returncode != 0:
            return {}
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def sbatch(
        self,
        script: str | Path,
        *args: str,
        options: tuple[str, ...] | list[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> str:
        """Submit ``script`` with sbatch ``options`` and script ``args``; return the job id.

        ``env`` is added to the cluster's environment, which the job inherits
        (sbatch's default ``--export=ALL``).
        """
        out = self.run(
            "sbatch",
            "--parsable",
            *options,
            str(script),
            *args,
            env={**self.env, **(env or {})},
            cwd=cwd,
        )
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the job is gone)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False, timeout=10)
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\S+?)=(\S*)", out.stdout))

    def wait(self, job_id: str, timeout: float) -> str:
        """Poll until the job ends; return its final state (COMPLETED, FAILED, ...).

        On timeout the job is cancelled and TimeoutError raised with the logs' tails.
        """
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "UNKNOWN")
            if state in FINAL_STATES:
                return state
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(
            f"job {job_id} still {state} after {timeout}s; cancelled\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for name in ("munged", "slurmctld", *self.node_names):
            for path in (self.logs[name], self.root / "log" / f"{name}.stdout"):
                if path.exists() and path.stat().st_size:
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ----------------------------------------------------------------- stop
    def stop(self, timeout: float = 15.0) -> None:
        """Cancel jobs, stop slurmd, slurmctld and munged by pid, kill stray job processes."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", f"--partition={self.partition}", check=False, timeout=10)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    out = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
                    if out.returncode != 0 or not out.stdout.strip():
                        break
                    time.sleep(0.3)
        order = [*self.node_names, "slurmctld", "munged"]
        for name in order:
            proc = self._procs.get(name)
            if proc is not None:
                kill_pids([proc.pid], timeout)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
        with contextlib.suppress(OSError, ValueError, IndexError):  # a munged that forked
            pid = int((self.root / "run" / "munged.pid").read_text().split()[0])
            if pid in self.stray_pids():  # alive and ours, not a reused pid
                kill_pids([pid], timeout)
        kill_pids(self.stray_pids(), 5.0)
        if not self.munge_dir.is_relative_to(self.root):
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    def stray_pids(self) -> list[int]:
        """Processes (other than this one) that carry this cluster's marker variable."""
        return [pid for pid, root in _marked_pids() if root == str(self.root)]


def _marked_pids() -> list[tuple[int, str]]:
    """``(pid, cluster root)`` of live processes carrying a test cluster's marker variable."""
    prefix = f"{MARKER}=".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in environ:
            if var.startswith(prefix) and _pid_alive(int(entry.name)):
                found.append((int(entry.name), var[len(prefix) :].decode(errors="replace")))
    return found


def reap_orphans() -> list[int]:
    """Kill what a test cluster whose test process died (SIGKILL, no teardown) left behind.

    The daemons die with their parent (PR_SET_PDEATHSIG), but job steps (slurmstepd and
    the job's processes) outlive slurmd. They carry the cluster's marker; the cluster's
    ``owner.pid`` names the test process. A cluster whose owner is alive is left alone.
    """
    killed = []
    for pid, root in _marked_pids():
        try:
            owner = int((Path(root) / "owner.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not _pid_alive(owner):
            killed.append(pid)
    kill_pids(killed, 2.0)
    return killed


def _mem_total_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1024


def current_user() -> str:
    """The user the daemons run as (jobs are submitted by the same user)."""
    return pwd.getpwuid(os.geteuid()).pw_name
