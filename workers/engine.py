"""The DeepSpeed side of a worker: its own process group, the engine, and its optimizer state.

Each site is its own DeepSpeed job (a private process group: one rank on a free port, or the
N ranks of `sites[].num_workers`), so sites never block on each other's collectives; merging
happens in the coordinator. At ZeRO-3 the model is built partitioned (`partitioned_build`).
Optimizer state is saved as safetensors + JSON (DeepSpeed's own checkpoints are pickles,
which Tributary never reads from disk).
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workers.partitions import EngineWeights


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_rank_group() -> None:
    """Start a world of one for this process, unless one is already up."""
    init_group(rank=0, size=1, master_addr="127.0.0.1", master_port=free_port())


def init_group(*, rank: int, size: int, master_addr: str, master_port: int) -> None:
    """Join this site's process group: a world of one, or the N workers of a multi-worker
    site (rank 0 listens on master_addr:master_port). Unless one is already up."""
    import deepspeed  # imported here: DS_ACCELERATOR must be set before the first import

    if torch.distributed.is_initialized():
        return
    # Ray shows each actor only its own GPU, so its local rank is 0. LOCAL_SIZE = world size
    # turns on DeepSpeed's CPU shared-memory allreduce, used by a world of one only; a group
    # (possibly across nodes) takes gloo/NCCL collectives.
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK="0", LOCAL_SIZE="1" if size == 1 else "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(
        backend, store=_rendezvous(rank=rank, size=size, address=master_addr, port=master_port),
        rank=rank, world_size=size)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts the group above
    if size == 1:
        _release_shm_buffer(master_port)


def _rendezvous(*, rank: int, size: int, address: str, port: int) -> torch.distributed.Store:
    """The group's key-value store. torch's own listens on every interface; rank 0's listens
    only on `address` (127.0.0.1 for a world of one), so no other machine can reach it."""
    if rank > 0:
        return torch.distributed.TCPStore(address, port, size, False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(128)
    return torch.distributed.TCPStore(address, port, size, True,
                                      master_listen_fd=listener.detach())


def _release_shm_buffer(port: int) -> None:
    """DeepSpeed's CPU comm op maps a ~69 MB POSIX shared-memory buffer per rank and never
    unlinks it, so every killed or restarted worker would leak it in /dev/shm. A world of
    one has no peer that needs to open it: unlink the name now (our mapping stays valid)."""
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"
    for path in Path("/dev/shm").glob(pattern):
        path.unlink(missing_ok=True)


def build_engine(model: torch.nn.Module, *, ds_config: dict, lr: float, weight_decay: float,
                 micro_batch: int):
    """A DeepSpeed engine for `model`. The DeepSpeed JSON may bring its own "optimizer"
    section; otherwise torch's AdamW is used (it runs on every accelerator, CPU included),
    except with ZeRO-Offload of the optimizer, where DeepSpeed's own AdamW steps on the CPU
    (its DeepSpeedCPUAdam, built on first use; a torch optimizer there is refused by it)."""
    import deepspeed

    config = dict(ds_config)
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch)
    config.setdefault("gradient_accumulation_steps", 1)
    if offloads_optimizer(config) and "optimizer" not in config:
        config["optimizer"] = {"type": "AdamW",
                               "params": {"lr": lr, "weight_decay": weight_decay}}
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def zero_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def precision(ds_config: dict) -> str:
    """What the module's weights are in under this DeepSpeed config: bf16 or fp16 (mixed
    precision, the fp32 masters in the optimizer), or fp32."""
    for key in ("bf16", "fp16"):
        if (ds_config.get(key) or {}).get("enabled"):
            return key
    return "fp32"


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def offloads_optimizer(ds_config: dict) -> bool:
    """ZeRO-Offload: the optimizer's states (and its step) live in CPU memory."""
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") != "none"


def zero3_setting(ds_config: dict):
    """At ZeRO-3, transformers' handle on the DeepSpeed config: while it is alive, models are
    built under `deepspeed.zero.Init`, each parameter partitioned over the ranks as it is
    created, so no rank ever holds the whole model (and transformers' own code, such as
    generation, knows the parameters are partitioned). Keep it as long as the model; None
    below ZeRO-3."""
    if zero_stage(ds_config) < 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def optimizer_snapshot(weights: EngineWeights, *, into: dict | None = None) -> tuple[dict, dict]:
    """(tensors, everything else) of the optimizer's state on this rank, copied to the CPU:
    the optimizer may step on while the copy is written (`write_optimizer_snapshot`). At any
    ZeRO stage this is the inner torch optimizer's state of this rank's fp32 masters (the
    masters themselves are set from the global weights every round). `into`: the tensors of
    an earlier snapshot that nothing reads any more, copied into where names, shapes and
    dtypes match: a fresh copy faults in new pages every time, several times slower than
    copying into memory already mapped (the AdamW moments are 2× the model)."""
    inner = weights.inner
    tensors, scalars = {}, {}
    for index, key in enumerate(weights.state_keys()):
        for slot, value in inner.state.get(key, {}).items():
            name = f"{index}.{slot}"
            if not torch.is_tensor(value):
                scalars[name] = value
                continue
            old = (into or {}).get(name)
            if old is not None and old.shape == value.shape and old.dtype == value.dtype:
                tensors[name] = old.copy_(value.detach())
            else:
                tensors[name] = value.detach().to("cpu", copy=True).contiguous()
    groups = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
    return tensors, {"param_groups": copy.deepcopy(groups), "scalars": scalars}


def write_optimizer_snapshot(snapshot: tuple[dict, dict], folder: Path) -> None:
    """The snapshot as safetensors (tensors) + JSON (everything else)."""
    tensors, meta = snapshot
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer_state(weights: EngineWeights, folder: Path) -> None:
    """The state `write_optimizer_snapshot` wrote, back into this rank's optimizer."""
    meta = json.loads((folder / "optimizer.json").read_text())
    keys = weights.state_keys()
    slots: dict[int, dict] = {}
    for name, tensor in load_file(str(folder / "optimizer.safetensors")).items():
        index, slot = name.split(".", 1)
        slots.setdefault(int(index), {})[slot] = tensor.to(keys[int(index)].device)
    for name, value in meta["scalars"].items():
        index, slot = name.split(".", 1)
        slots.setdefault(int(index), {})[slot] = value
    inner = weights.inner
    inner.state.clear()
    for index, state in slots.items():
        inner.state[keys[index]] = state
    for group, saved in zip(inner.param_groups, meta["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def clear_optimizer_state(weights: EngineWeights) -> None:
    """A fresh optimizer: no moments yet."""
    weights.inner.state.clear()
