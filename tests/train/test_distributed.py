"""Process start from srun's variables."""

from __future__ import annotations

from distill_depth.train.distributed import env_from_slurm, first_host


def test_srun_variables_become_torchrun_ones() -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_NTASKS_PER_NODE": "2(x4)", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "4242"}
    added = env_from_slurm(env)
    assert added == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1",
                     "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242)}
    assert env["RANK"] == "3"


def test_launcher_variables_win() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "9"}
    assert env_from_slurm(env) == {} and env["RANK"] == "0"


def test_first_host() -> None:
    assert first_host("node1") == "node1"
    assert first_host("gpu[03-05,07],cpu1") == "gpu03"
    assert first_host("a[1,2]") == "a1"
