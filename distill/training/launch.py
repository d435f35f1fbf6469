"""Distributed training through `accelerate launch`: the command, the Accelerator, and the world check.

`distill train RECIPE` with `train.distributed.backend` ddp or deepspeed does not train in its own
process: it checks the inputs, then runs

    accelerate launch --config_file recipes/accelerate/<ddp|zero2|zero3>.yaml --num_processes N \
        -m distill train RECIPE [overrides]

and each launched process trains its share. The same code runs on GPUs (NCCL) and on CPUs (gloo).
On CPUs two Accelerate behaviours need care (see ENVIRONMENT.md): `--cpu` launches silently run one
process, so CPU DDP is launched like multi-GPU and the processes ask for `Accelerator(cpu=True)`; and
DeepSpeed only starts with `cpu=False`, with the process group forced to gloo.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill.config import DistributedConfig
from distill.errors import DistillError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
LAUNCHED_ENV = "DISTILL_LAUNCHED"


def config_file(dist: DistributedConfig) -> Path:
    """The Accelerate config a recipe's distribution uses: its own `config_file`, or the shipped one."""
    if dist.config_file:
        path = Path(dist.config_file)
        if not path.is_file():
            raise DistillError(f"train.distributed.config_file: {path} does not exist")
        return path
    name = "ddp" if dist.backend == "ddp" else f"zero{dist.zero_stage}"
    return CONFIG_DIR / f"{name}.yaml"


def world_size(dist: DistributedConfig) -> int:
    return dist.num_processes * dist.num_machines


def inside_launch() -> bool:
    """True in a process started by `accelerate launch` or torchrun (ours or the user's own)."""
    return any(key in os.environ for key in (LAUNCHED_ENV, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_executable() -> list[str]:
    script = Path(sys.executable).with_name("accelerate")
    return (
        [str(script), "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    )


def launch_command(dist: DistributedConfig, distill_args: list[str], port: int | None = None) -> list[str]:
    """`accelerate launch ... -m distill <distill_args>` for this distribution."""
    cmd = [
        *_accelerate_executable(),
        "--config_file",
        str(config_file(dist)),
        "--num_processes",
        str(world_size(dist)),
        "--num_machines",
        str(dist.num_machines),
    ]
    if dist.num_machines > 1:  # every node runs this with its own rank and the first node's address
        cmd += [
            "--machine_rank",
            "$MACHINE_RANK",
            "--main_process_ip",
            "$MAIN_IP",
            "--main_process_port",
            "29500",
        ]
    elif port is not None:
        cmd += ["--main_process_port", str(port)]
    return [*cmd, "-m", "distill", *distill_args]


def launch_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    # NOTE: DeepSpeed JIT-compiles the ops a config asks for (cpu_adam with an offloaded optimizer) on
    # first use, for minutes; keep them across runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cache_dir) / "torch_extensions"))
    return env


def run_launch(dist: DistributedConfig, distill_args: list[str], cache_dir: Path, dry_run: bool) -> int:
    """Print the launch command, and run it unless `dry_run` (or it spans several machines)."""
    from distill.processes import run

    port = None if (dry_run or dist.num_machines > 1) else _free_port()
    cmd = launch_command(dist, distill_args, port)
    print("launch: " + shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    if dist.num_machines > 1:
        print(
            f"launch: run this on each of the {dist.num_machines} machines, with MACHINE_RANK 0..{dist.num_machines - 1} "
            "and MAIN_IP the address of machine 0",
            flush=True,
        )
        return 0
    return run(cmd, env=launch_env(cache_dir))


def make_accelerator(dist: DistributedConfig, device: str, mixed_precision: str, grad_accum: int):
    """The Accelerator for this distribution on this device."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    kwargs: dict[str, Any] = {"mixed_precision": mixed_precision, "gradient_accumulation_steps": grad_accum}
    if dist.backend == "deepspeed" and device == "cpu" and "LOCAL_RANK" in os.environ:
        # DeepSpeed is only enabled with cpu=False; on a CPU machine its process group must be gloo.
        # (Without LOCAL_RANK the launch started one plain process: check_world refuses it.)
        _skip_shm_comm_build()
        return Accelerator(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    return Accelerator(cpu=device == "cpu", **kwargs)


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce (about 95 s on 2 cores,
    in every fresh TORCH_EXTENSIONS_DIR, with the other ranks waiting): only its inference all-reduce uses
    it, never ZeRO training, and without it DeepSpeed calls torch.distributed (gloo) as it does anyway.
    DeepSpeed reads the op's compatibility from one module-level dict that it keeps for edits like this."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def check_world(accelerator, dist: DistributedConfig) -> None:
    """Refuse, before any training step, a launch that is not the distribution the recipe asks for."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    got = accelerator.num_processes
    if dist.backend == "deepspeed":
        want = f"DeepSpeed ZeRO-{dist.zero_stage} on {world_size(dist)} processes"
        stage = accelerator.state.deepspeed_plugin.zero_stage if kind == DistributedType.DEEPSPEED else None
        ok = kind == DistributedType.DEEPSPEED and stage == dist.zero_stage and got == world_size(dist)
    elif dist.backend == "ddp":
        want = f"DDP on {world_size(dist)} processes"
        ok = kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) and got == world_size(dist)
    else:
        want = "one process"
        ok = got == 1
    if ok:
        return
    what = f"{got} process{'es' if got > 1 else ''}, distributed type {str(kind).rsplit('.', 1)[-1]}"
    if kind == DistributedType.DEEPSPEED:
        what += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if dist.backend == "none":
        hint = "set train.distributed.backend (ddp or deepspeed) and num_processes, or run `distill train` without a launcher"
    else:
        hint = (
            "run `distill train RECIPE` and it launches itself (`--print-launch` shows the command), "
            f"or pass --config_file {config_file(dist)} --num_processes {world_size(dist)} to accelerate launch"
        )
    raise DistillError(f"train.distributed: the recipe asks for {want}, but this launch runs {what}; {hint}")


def configure_deepspeed(accelerator, batch_size: int, grad_accum: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config from the recipe (we pass no dataloader for accelerate to infer from)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = batch_size * grad_accum * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
    if config.get("zero_optimization", {}).get("stage") == 3:
        # the final export gathers the full weights on the main process
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def is_zero3(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    )


@contextmanager
def outside_zero3():
    """Within it, transformers loads plain models, not ones ZeRO-3's zero.Init partitions across the
    processes (a frozen model loaded beside a ZeRO-3 student, such as train.hidden's teacher, must run on
    its own). Accelerate's context for this keeps transformers' ZeRO-3 config alive, so it does not."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
