"""Scale-out on torch.distributed: FSDP2 data parallelism and expert parallelism.

Launched by `torchrun`, every rank builds the same model from the same seed, then:
- data parallel: each transformer block (and the rest, MTP modules included, as the root) is
  wrapped with FSDP2's `fully_shard`, so parameters, gradients and optimizer moments are
  sharded across ranks and gathered block by block for compute;
- expert parallel (`expert_parallel: true`): the routed experts of every MoE layer are split
  evenly across ranks and left out of FSDP. Each rank routes its own tokens, sends every
  (token, expert) pair to the rank holding that expert with `all_to_all`, the owner runs its
  experts, and a second `all_to_all` brings the outputs back (V3 section 3.2, at the scale of
  torch.distributed collectives instead of DeepEP kernels).
gloo on the CPU, NCCL on GPUs. Checkpoints go through torch.distributed.checkpoint: each rank
writes its own shards, under single-process names, and they reload on any number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.errors import NanoseekError
from nanoseek.experts import run_experts
from nanoseek.model import MoE


@dataclass
class Context:
    """Where this process runs: its rank among world_size, its device, the data-parallel mesh."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None  # DeviceMesh when distributed
    expert_parallel: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op in a single process)."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup(device: str = "auto") -> Context:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NanoseekError("config key 'device': cuda was asked for, but torch sees no GPU")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(device=torch.device("cuda" if use_cuda else "cpu"))
    from torch.distributed.device_mesh import init_device_mesh

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # Ranks on one machine share its cores; more threads than cores only adds contention.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(rank=rank, world_size=world, device=dev, mesh=init_device_mesh(dev.type, (world,)))


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Expert parallelism.
# ---------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int]):
        ctx.splits = (out_splits, in_splits)
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits)
        return back, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits)


class DistributedMoE(MoE):
    """A MoE layer whose routed experts live on `ep_world` ranks: rank r holds experts
    [r * E / ep_world, (r + 1) * E / ep_world), kept in `experts` under their global index.

    With ep_world 1 (plain FSDP) every rank holds every expert; each expert still runs on
    an empty slice when no token chose it, so that every rank has a gradient for every
    expert, as FSDP's reduce-scatter needs.
    """

    ep_rank: int
    ep_world: int

    def routed(self, x, weights, indices, counts) -> torch.Tensor:
        n_local = self.n_experts // self.ep_world
        first = self.ep_rank * n_local
        order = indices.flatten().argsort(stable=True)
        token_of = order // self.top_k
        send = x[token_of]  # (token, slot) pairs sorted by expert: rank 0's experts first
        if self.ep_world > 1:
            per_rank = counts.view(self.ep_world, n_local)  # pairs for [owner rank, its local expert]
            incoming = torch.empty_like(per_rank)
            dist.all_to_all_single(incoming, per_rank)  # [source rank, my local expert]
            send_splits, recv_splits = per_rank.sum(1).tolist(), incoming.sum(1).tolist()
            received = all_to_all(send, recv_splits, send_splits)
            # Received rows come by source rank, then expert; regroup them by expert.
            expert_of = torch.arange(n_local, device=x.device).repeat(self.ep_world)
            expert_of = expert_of.repeat_interleave(incoming.flatten())
            regroup = expert_of.argsort(stable=True)
            xs, sizes = received[regroup], incoming.sum(0)
        else:
            xs, sizes = send, counts
        local = [self.experts[str(first + j)] for j in range(n_local)]
        ys = run_experts(local, xs, sizes)
        if self.ep_world > 1:
            ys = all_to_all(ys[regroup.argsort()], send_splits, recv_splits)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys)


def distribute_experts(model: nn.Module, ep_rank: int, ep_world: int) -> list[nn.Parameter]:
    """Turn every MoE layer (MTP's too) into a DistributedMoE holding this rank's experts;
    returns the expert parameters it keeps."""
    kept: list[nn.Parameter] = []
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        if moe.n_experts % ep_world:
            raise NanoseekError(
                f"expert parallelism: n_routed_experts {moe.n_experts} is not divisible by the {ep_world} ranks"
            )
        n_local = moe.n_experts // ep_world
        local = range(ep_rank * n_local, (ep_rank + 1) * n_local)
        moe.experts = nn.ModuleDict({str(e): moe.experts[e] for e in local})
        moe.__class__ = DistributedMoE
        moe.ep_rank, moe.ep_world = ep_rank, ep_world
        if ep_world > 1:
            kept += list(moe.experts.parameters())
    return kept


def parallelize(root: nn.Module, model: nn.Module, ctx: Context, per_block: bool = True) -> set[nn.Parameter]:
    """FSDP2 over `root` (the module whose forward the trainer calls, holding `model`), with
    routed experts split across ranks when ctx.expert_parallel. Returns the expert-parallel
    parameters (not FSDP's: their gradients are local to the owner rank). `per_block`: each
    block is its own FSDP unit (gathered only while it runs); without, the root is the one unit
    (GRPO's: its blocks write a KV cache passed to them in place, which FSDP2's hooks on a
    unit's inputs do not allow)."""
    from torch.distributed.fsdp import fully_shard

    ep_world = ctx.world_size if ctx.expert_parallel else 1
    experts = set(distribute_experts(model, ctx.rank if ctx.expert_parallel else 0, ep_world))
    # The MTP modules stay in the root unit: the model applies their shared_head norm outside
    # their forward, when a separately sharded module would have resharded it.
    for block in model.layers if per_block else ():
        fully_shard(block, mesh=ctx.mesh, ignored_params={p for p in block.parameters() if p in experts} or None)
    fully_shard(root, mesh=ctx.mesh, ignored_params=experts or None)
    return experts


# ---------------------------------------------------------------------------------------
# Gradients and full-state views of a sharded model.
# ---------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, ctx: Context) -> float:
    """The global gradient norm over all ranks' shards and experts; scales gradients to max_norm."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for g in grads:
        total += g.float().pow(2).sum()
    norm = ctx.all_reduce(total).sqrt().item()
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))  # one call for a MoE's thousands of tensors
    return norm


ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of this rank, without gathering anything: the model's tensors as
    `model.NAME` (FSDP's DTensor shards, the experts this rank owns, buffers all ranks hold
    alike) and AdamW's state as `optimizer.NAME.exp_avg`, ... (shaped like its parameter)."""
    tensors = {f"model.{name}": t for name, t in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{name}.{key}"] = value
    return tensors


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer | None, c) -> None:
    """The model's (and optimizer's) state from checkpoint `c`, on one rank or many: a sharded
    checkpoint is read by torch.distributed.checkpoint, each rank reading its own pieces; a
    single-process one holds full tensors, of which each rank keeps its shard."""
    from nanoseek.train import checkpoint as ckpt

    if not c.sharded:
        return load_full_state(model, optimizer, c.model, c.optimizer)
    saved = ckpt.saved_names(c)
    tensors = {f"model.{name}": t for name, t in model.state_dict().items()}
    moments: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    if optimizer is not None:
        for name, p in model.named_parameters():
            if f"optimizer.{name}.step" in saved:
                # AdamW's own layout: a float32 step count, moments shaped (and sharded) like p
                state = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
                moments[p] = state
                tensors.update({f"optimizer.{name}.{k}": v for k, v in state.items()})
    with torch.no_grad():
        ckpt.load_sharded(c, tensors)  # in place: into the parameters' (local) storage and `moments`
    if optimizer is not None:
        optimizer.state.clear()
        optimizer.state.update(moments)


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Model and optimizer state as full CPU tensors under single-process names, e.g.
    `layers.1.mlp.experts.3.up_proj.weight` and `....weight.exp_avg`. Collective: every rank
    calls it; the result is complete on rank 0 (and in a single process)."""
    params = dict(model.named_parameters())
    model_sd: dict[str, torch.Tensor] = {}
    optim_sd: dict[str, torch.Tensor] = {}
    # Expert-parallel tensors live on one rank each: collected here, gathered to rank 0 below.
    local_model: dict[str, torch.Tensor] = {}
    local_optim: dict[str, torch.Tensor] = {}

    def put(shared, local, name, t):
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()  # collective: every rank reaches the same FSDP tensors in the same order
        t = t.detach().to("cpu", copy=True).contiguous()
        (local if ctx.expert_parallel and ".experts." in name else shared)[name] = t

    for name, t in model.state_dict().items():
        put(model_sd, local_model, name, t)
    if optimizer is not None:
        for name, p in params.items():
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    put(optim_sd, local_optim, f"{name}.{key}", value)
    if ctx.expert_parallel and ctx.distributed:
        gathered = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object((local_model, local_optim), gathered, dst=0)
        for part_model, part_optim in gathered or []:
            model_sd.update(part_model)
            optim_sd.update(part_optim)
    else:
        model_sd.update(local_model)
        optim_sd.update(local_optim)
    return model_sd, optim_sd


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict[str, torch.Tensor] | None,
) -> None:
    """Copy full tensors into a (possibly sharded) model and optimizer: each rank keeps its
    own shard of every FSDP tensor and its own experts."""
    from torch.distributed.tensor import distribute_tensor

    def shaped_like(like, full):
        full = full.to(like.device, like.dtype)
        if hasattr(like, "device_mesh"):
            return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
        return full.clone()

    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            _local(t).copy_(_local(shaped_like(t, model_sd[name])))
    if optimizer is None or optim_sd is None:
        return
    optimizer.state.clear()
    for name, p in model.named_parameters():
        keys = [k for k in ADAM_STATE if f"{name}.{k}" in optim_sd]
        if not keys:
            continue
        state = {}
        for k in keys:
            full = optim_sd[f"{name}.{k}"]
            state[k] = full.clone() if k == "step" else shaped_like(p, full)
        optimizer.state[p] = state
