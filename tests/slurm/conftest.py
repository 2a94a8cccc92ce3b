"""A one-node SLURM cluster on this machine for the `slurm`-marked tests (jobs/slurm/local_cluster.sh).

It needs root and Debian's slurm/munge/mariadb packages (`jobs/slurm/local_cluster.sh install`).
Where it cannot start, the tests skip with the reason; with DISTILL_REQUIRE_SLURM=1 (CI) they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distill.conftest import corpus, stdlib_teacher  # noqa: F401  (the jobs' text and teacher)
from tests.distill.helpers import REPO

SCRIPT = REPO / "jobs" / "slurm" / "local_cluster.sh"
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


@dataclass
class Cluster:
    directory: Path
    env: dict[str, str]

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60, check=True, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, what: str, condition, timeout: float = 300.0, every: float = 1.0):
        """Poll `condition()` until it returns something true; fail with `what` after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(every)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (SLURM logs in {self.directory / 'log'})")


def _cannot_start() -> str | None:
    path = f"/usr/sbin:{os.environ.get('PATH', '')}"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root"
    missing = [d for d in DAEMONS if shutil.which(d, path=path) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): jobs/slurm/local_cluster.sh install"
    if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
        return "a SLURM controller already runs on this machine; the tests start their own"
    return None


def _unavailable(reason: str):
    if os.environ.get("DISTILL_REQUIRE_SLURM") == "1":
        pytest.fail(f"DISTILL_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    reason = _cannot_start()
    if reason:
        _unavailable(reason)
    directory = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(SCRIPT), "start", str(directory)], capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        subprocess.run([str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=300)
        _unavailable(f"the local SLURM cluster did not start: {started.stderr.strip()[-2000:]}")
    # The jobs run this checkout's code with this interpreter (jobs/slurm/distill.sbatch reads PYTHON).
    env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf"), "PATH": f"/usr/sbin:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    yield Cluster(directory, env)
    stopped = subprocess.run([str(SCRIPT), "stop", str(directory)], capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
