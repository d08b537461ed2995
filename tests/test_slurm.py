"""launch/slurm/*.sbatch against a real single-node SLURM cluster (scripts/slurm-test-cluster.sh).

Real slurmctld + slurmd + munge, real ``sbatch``/``srun``, the real trainer on 2 CPU tasks (S on
one, U on the other) on the bundled shards (batch size 1, a few steps). Preemption is a real
warning signal to the batch shell (``scancel -b -s USR2``, what ``--signal=B:USR2@N`` does at the
deadline), a real ``scontrol requeue`` and a real restart of the same job id.

Also a real two-node cluster (``SLURM_CI_NODES=2``): two slurmd, each in its own network
namespace with its own address, so multinode.sbatch's ranks (S on n1, U on n2) rendezvous and
exchange gradients over a network between the namespaces.

Needs root (installing and starting the daemons); skipped with the reason otherwise (the two-node
test also without ``ip``/``nsenter``/``unshare`` or network namespaces).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "scripts" / "slurm-test-cluster.sh"
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
MULTINODE_SBATCH = REPO / "launch" / "slurm" / "multinode.sbatch"
MAX_STEPS = 3
CKPT_EVERY = 1
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _run(cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """The local test cluster: installed and started here, stopped at the end if we started it."""
    if sys.platform != "linux":
        pytest.skip("the SLURM test cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root: scripts/slurm-test-cluster.sh installs and starts system daemons")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    install = _run(["bash", str(CLUSTER), "install"], timeout=600)
    if install.returncode != 0:
        pytest.skip(f"SLURM could not be installed: {(install.stdout + install.stderr)[-1500:]}")
    was_up = "slurmctld: running" in _run(["bash", str(CLUSTER), "status"]).stdout
    # Two counted-only GPUs, so multinode.sbatch's --gpus-per-node request can be scheduled.
    up = _run(["bash", str(CLUSTER), "up"], timeout=120, env={**os.environ, "SLURM_CI_FAKE_GPUS": "2"})
    assert up.returncode == 0, f"slurm-test-cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    yield
    if not was_up:
        _run(["bash", str(CLUSTER), "down"], timeout=120)


def _job_env() -> dict[str, str]:
    """The submitting shell: no SLURM/torch.distributed variables of an enclosing job, CPU only."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_")) and k not in drop}
    env.update(DD_PYTHON=sys.executable, DD_REPO=str(REPO), DD_DEVICE="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return env


def _overrides(shards: Path) -> list[str]:
    return [
        f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}", "data.batch_size=1",
        "data.shuffle_buffer=8",
        f"train.max_steps={MAX_STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.log_every=1", "train.val_every=0",
        "train.image_every=0", "train.timeout_s=60", "optim.warmup_steps=0",
    ]


class Job:
    """One submitted batch job: its id, its log (appended across restarts) and its run folder."""

    def __init__(self, script: Path, run_dir: Path, log: Path, shards: Path, sbatch_args: tuple[str, ...] = (),
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.run_dir, self.log = run_dir, log
        cmd = ["sbatch", "--parsable", f"--output={log}", *sbatch_args, str(script), *_overrides(shards), *extra]
        env = {**_job_env(), "DD_RUN_DIR": str(run_dir), **(env or {})}
        # The clients of this job's cluster (SLURM_CONF: the two-node cluster's config).
        self.client_env = {**os.environ, "SLURM_CONF": env["SLURM_CONF"]} if "SLURM_CONF" in env else None
        result = _run(cmd, cwd=REPO, env=env)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        self.id = result.stdout.strip().split(";")[0]

    def info(self) -> dict[str, str]:
        text = _run(["scontrol", "show", "job", "-o", self.id], env=self.client_env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log yet)"

    def describe(self) -> str:
        return f"job {self.id} {self.info()}\n--- log ---\n" + re.sub(r"[^\n]*\r", "", self.text())[-6000:]

    def wait_done(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in DONE:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job not finished after {timeout:.0f} s: {self.describe()}")

    def wait_file(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline or self.info().get("JobState") in DONE:
                raise AssertionError(f"{path} never appeared: {self.describe()}")
            time.sleep(0.5)

    def scancel(self, *args: str) -> subprocess.CompletedProcess:
        return _run(["scancel", *args, self.id], env=self.client_env)

    def cancel(self) -> None:
        self.scancel()


def _rank_pid(job_id: str, rank: int) -> int:
    """PID of the trainer process of ``rank`` (the task process itself, not a DataLoader worker)."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (f"SLURM_JOB_ID={job_id}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ
                and b"train.py" in cmdline and b"python" in cmdline[0]):
            found[int(proc.name)] = ppid
    mains = [pid for pid, ppid in found.items() if ppid not in found]
    assert len(mains) == 1, f"expected one trainer process of rank {rank} in job {job_id}, found {found}"
    return mains[0]


def _job_processes(job_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"SLURM_JOB_ID={job_id}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _export(run_dir: Path) -> dict[str, dict]:
    from safetensors.torch import load_file

    return {name: load_file(str(run_dir / "export" / f"{name}.safetensors")) for name in ("S", "U")}


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: None, bundled_shards: Path, module_tmp_path: Path):
    """`sbatch train.sbatch` with 2 CPU tasks, run to the end (also the reference of the requeue test)."""
    base = module_tmp_path / "slurm_uninterrupted"
    base.mkdir()
    job = Job(TRAIN_SBATCH, base / "run", base / "job.log", bundled_shards, ("--ntasks=2",))
    try:
        info = job.wait_done(timeout=300)
    finally:
        job.cancel()
    return job, info


def test_two_cpu_tasks_train_s_and_u_to_completion(uninterrupted) -> None:
    job, info = uninterrupted
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert info["Restarts"] == "0"
    log = job.text()
    assert "(restart 0) on localhost: 2 tasks" in log
    # Split placement: rank 0 trains S, rank 1 trains U.
    assert re.search(r"groups \{'S': \(0,\), 'U': \(1,\)\}", log), job.describe()
    assert f"training done at step {MAX_STEPS}" in log, job.describe()
    assert (job.run_dir / "export" / "S.safetensors").is_file()
    assert (job.run_dir / "export" / "U.safetensors").is_file()
    from distill_depth.train.checkpoint import load_branches

    models, cfg = load_branches(str(job.run_dir))
    assert set(models) == {"S", "U"} and cfg.train.max_steps == MAX_STEPS


def _preempt(job: Job, while_running: Callable[[], None] = lambda: None) -> dict[str, str]:
    """After the first complete checkpoint (and ``while_running()``): what --signal=B:USR2@N does at
    the deadline (USR2 to the batch shell only); wait until the requeued job has finished."""
    try:
        job.wait_file(job.run_dir / "checkpoints" / f"step_{CKPT_EVERY:08d}" / "COMPLETE", timeout=240)
        while_running()
        signalled = job.scancel("-b", "-s", "USR2")
        assert signalled.returncode == 0, signalled.stderr
        return job.wait_done(timeout=360)
    finally:
        job.cancel()


def _assert_preempted_and_resumed(job: Job, info: dict[str, str], reference: Job, nodes: str) -> None:
    """One checkpoint on the warning signal, one requeue, one resume from it, and final weights
    equal to those of the uninterrupted ``reference`` run, bit for bit."""
    log = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert info["Restarts"] == "1", job.describe()
    assert "batch shell got SIGUSR2" in log and f"requeueing job {job.id}" in log, job.describe()
    stopped = re.search(r"stopped by signal at step (\d+); checkpoint complete", log)
    resumed = re.search(r"resuming from checkpoint step (\d+) \((\S+)\)", log)
    assert stopped and resumed, job.describe()
    assert CKPT_EVERY <= int(stopped.group(1)) == int(resumed.group(1)) < MAX_STEPS, job.describe()
    assert Path(resumed.group(2)) == job.run_dir / "checkpoints" / f"step_{int(stopped.group(1)):08d}"
    assert f"(restart 1) on {nodes}: 2 tasks" in log, job.describe()
    assert f"training done at step {MAX_STEPS}" in log, job.describe()
    expected, got = _export(reference.run_dir), _export(job.run_dir)
    for name in ("S", "U"):
        assert expected[name].keys() == got[name].keys()
        differing = [k for k in expected[name] if not bool((expected[name][k] == got[name][k]).all())]
        assert not differing, f"branch {name}: {len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"


def test_warning_signal_checkpoints_requeues_and_resumes_to_identical_weights(
    uninterrupted, bundled_shards: Path, tmp_path: Path
) -> None:
    reference, _ = uninterrupted
    # Also tracked by W&B (offline): both starts must log into the same run id.
    job = Job(TRAIN_SBATCH, tmp_path / "run", tmp_path / "job.log", bundled_shards, ("--ntasks=2",),
              ("train.report_to=wandb",), {"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    info = _preempt(job)
    _assert_preempted_and_resumed(job, info, reference, "localhost")
    wandb_runs = sorted((job.run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2, f"expected one offline W&B run folder per start, got {wandb_runs}"
    assert len({path.name.rsplit("-", 1)[1] for path in wandb_runs}) == 1, f"W&B run id changed: {wandb_runs}"


def test_hard_killed_rank_fails_the_job_fast_and_keeps_the_checkpoint(
    slurm_cluster: None, bundled_shards: Path, tmp_path: Path
) -> None:
    """SIGKILL on rank 1 (started by multinode.sbatch, 1 node x 2 tasks): FAILED, no hang, no requeue."""
    if "gpu" not in _run(["sinfo", "-h", "-o", "%G"]).stdout:
        pytest.skip("the running test cluster has no GPU GRES for multinode.sbatch's --gpus-per-node: "
                    "restart it with `scripts/slurm-test-cluster.sh down && SLURM_CI_FAKE_GPUS=2 "
                    "scripts/slurm-test-cluster.sh up`")
    sbatch_args = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=2")
    # Enough steps that the job is still training when the kill comes.
    job = Job(MULTINODE_SBATCH, tmp_path / "run", tmp_path / "job.log", bundled_shards, sbatch_args,
              ("train.max_steps=50",))
    checkpoint = job.run_dir / "checkpoints" / f"step_{CKPT_EVERY:08d}"
    try:
        job.wait_file(checkpoint / "COMPLETE", timeout=240)
        os.kill(_rank_pid(job.id, 1), 9)
        killed_at = time.monotonic()
        info = job.wait_done(timeout=90)
        took = time.monotonic() - killed_at
    finally:
        job.cancel()
    assert info["JobState"] == "FAILED", job.describe()
    assert info["ExitCode"] != "0:0" and info["Restarts"] == "0", job.describe()
    assert took < 60, f"the job needed {took:.0f} s to fail after the kill"
    assert "(restart 0) on localhost: 2 tasks" in job.text()
    deadline = time.monotonic() + 15
    while _job_processes(job.id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _job_processes(job.id), "processes of the failed job are still alive"
    from distill_depth.train.checkpoint import complete_checkpoints, load_branches

    newest = complete_checkpoints(job.run_dir)[-1]
    assert newest.name >= checkpoint.name
    models, _ = load_branches(str(job.run_dir))
    assert set(models) == {"S", "U"}
    from safetensors.torch import load_file

    for name, model in models.items():
        saved = load_file(str(newest / name / "model.safetensors"))
        state = model.state_dict()
        assert all(bool((state[k] == v).all()) for k, v in saved.items()), name


# --- two nodes: scripts/slurm-test-cluster.sh with SLURM_CI_NODES=2 ---------------------------------
# Nodes n1 (10.77.0.1) and n2 (10.77.0.2): each a slurmd in its own network namespace, so the
# ranks that slurmd starts can only reach each other over the namespaces' bridge, as on two machines.
TWO_NODES_DIR = Path("/tmp/slurm-ci-2n")


def _cluster2(command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_CI_NODES": "2", "SLURM_CI_DIR": str(TWO_NODES_DIR), "SLURM_CI_FAKE_GPUS": "1"}
    return _run(["bash", str(CLUSTER), command], timeout=timeout, env=env)


@pytest.fixture(scope="session")
def slurm_two_nodes(slurm_cluster: None) -> Iterator[str]:
    """The two-node test cluster, started here and always stopped again (daemons, namespaces,
    bridge), also when a test fails. Yields its SLURM_CONF."""
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the two-node SLURM cluster needs {', '.join(missing)} (iproute2, util-linux)")
    probe = f"dd-probe-{os.getpid()}"
    made = _run(["ip", "netns", "add", probe])
    _run(["ip", "netns", "del", probe])
    if made.returncode != 0:
        pytest.skip(f"no network namespaces here (`ip netns add` failed: {made.stderr.strip()})")
    if "slurmctld: running" in _cluster2("status").stdout:
        pytest.skip(f"a two-node test cluster already runs (state in {TWO_NODES_DIR}); stop it first with "
                    "`SLURM_CI_NODES=2 scripts/slurm-test-cluster.sh down`")
    try:
        up = _cluster2("up")
        assert up.returncode == 0, f"two-node slurm-test-cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield str(TWO_NODES_DIR / "etc" / "slurm.conf")
    finally:
        down = _cluster2("down")
        assert down.returncode == 0, f"two-node slurm-test-cluster.sh down failed:\n{down.stdout}\n{down.stderr}"


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def test_two_nodes_s_on_one_u_on_the_other_preempted_requeued_resumed_to_identical_weights(
    slurm_two_nodes: str, uninterrupted, bundled_shards: Path, tmp_path: Path
) -> None:
    """multinode.sbatch, 2 nodes x 1 task: rank 0 (S) on n1, rank 1 (U) on n2, rendezvous and gloo
    traffic between the two network namespaces; warning signal, requeue, resume; the final
    weights equal the single-node uninterrupted run's bit for bit."""
    reference, _ = uninterrupted
    nodes = _run(["sinfo", "-h", "-N", "-o", "%N %T"], env={**os.environ, "SLURM_CONF": slurm_two_nodes}).stdout
    assert nodes.split() == ["n1", "idle", "n2", "idle"], nodes
    sbatch_args = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=1")
    job = Job(MULTINODE_SBATCH, tmp_path / "run", tmp_path / "job.log", bundled_shards, sbatch_args,
              env={"SLURM_CONF": slurm_two_nodes})

    def ranks_on_their_nodes() -> None:
        for rank, node in ((0, "n1"), (1, "n2")):
            pid = _rank_pid(job.id, rank)
            environ = (Path(f"/proc/{pid}") / "environ").read_bytes().split(b"\0")
            assert f"SLURMD_NODENAME={node}".encode() in environ, f"rank {rank} is not on {node}"
            # The trainer process lives in the node's network namespace (its own address).
            assert _netns_inode(f"/proc/{pid}/ns/net") == _netns_inode(f"/run/netns/dd-{node}"), (
                f"rank {rank} (pid {pid}) is not in the network namespace of {node}")

    info = _preempt(job, ranks_on_their_nodes)
    _assert_preempted_and_resumed(job, info, reference, "n[1-2]")
    log = job.text()
    assert "(restart 0) on n[1-2]: 2 tasks, rendezvous n1:" in log, job.describe()
    assert re.search(r"groups \{'S': \(0,\), 'U': \(1,\)\}", log), job.describe()
