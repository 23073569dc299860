"""Training a torch model as the spec defines it (SPEC.md 20), written as a torch user writes the loop:

    optimizer = configure_optimizer(model, train_spec)        # torch.optim.AdamW, two parameter groups
    for it, micro_batches in enumerate(batches):
        loss, grad_norm, lr = train_step(model, optimizer, train_spec, it, micro_batches)

`model` is this backend's GPT or NGPT in float32 (the master weights); micro-batches are (tokens,
targets) int64 tensors on the model's device. The learning rate is spec.train.lr_at's, pushed into
every parameter group before each step: no torch scheduler is in the loop.
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import torch

from ...spec import InputError, param_table
from ...spec.train import TrainSpec, decay_split, lr_at
from ..base import check_finite_step
from .backend import ieee_float32


def configure_optimizer(model: torch.nn.Module, train_spec: TrainSpec) -> torch.optim.AdamW:
    """torch.optim.AdamW with the spec's betas and eps, its decayed group (spec.train.decay_split: every
    tensor with ndim >= 2, or none) at train_spec.weight_decay and the rest at 0."""
    params = dict(model.named_parameters())  # the canonical names
    decayed, kept = decay_split(model.spec, train_spec)
    groups = [{"params": [params[n] for n in names], "weight_decay": wd}
              for names, wd in ((decayed, train_spec.weight_decay), (kept, 0.0)) if names]
    # CUDA: the fused kernel, one launch for every tensor. CPU: torch's default, the per-tensor loop
    # `_single_tensor_adam` (torch routes foreach=None to foreach only on accelerators; on CPU
    # foreach=True gives the same bits, measured), which is the code SPEC.md 20.6 transcribes operation
    # by operation, so the spec's step differs from it by float32 rounding alone. torch's fused CPU
    # kernel is not the default because it rounds in another order: its weights differ from this
    # loop's by float32 rounding (amplified by Adam where a gradient is ~0), for no speed that matters here.
    fused = True if _device(model).type == "cuda" else None
    return torch.optim.AdamW(groups, lr=lr_at(train_spec, 0), betas=train_spec.betas, eps=train_spec.eps,
                             fused=fused)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_spec: TrainSpec, it: int,
               micro_batches, draws=None) -> tuple[float, float, float]:
    """Iteration `it`: the gradient averaged over the micro-batches, the global norm (clipped at
    train_spec.grad_clip), one AdamW update and nGPT's normalization. Returns (loss, grad norm before
    clipping, lr) as Python floats, read from the device once. A non-finite loss or gradient raises
    TrainingDiverged naming the step and the first tensor, before anything changes the weights.

    draws[k]: the (n_layer, B, T) float32 uniforms of micro-batch k under loss="early_exit", else None."""
    lr = lr_at(train_spec, it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    fsdp = is_fully_sharded(model)   # runs/distributed.py under torchrun --fsdp: the model itself is sharded
    if fsdp:
        reshard(model)  # the sharded parameters, which the optimizer holds, not an evaluation's gathered ones
    names = [p.name for p in param_table(model.spec)]
    by_name = dict(model.named_parameters())
    params = [by_name[n] for n in names]  # canonical order: the norm's summation order, the error's first tensor
    n = len(micro_batches)
    losses = []
    ddp = model.__dict__.get("_ddp")  # runs/distributed.py under torchrun: DDP over this model's loss
    with ieee_float32():
        for k, (tokens, targets) in enumerate(micro_batches):
            # DDP all-reduces, FSDP reduce-scatters, the gradients in the backward of the last micro-batch
            # only (SPEC.md 25); the earlier ones accumulate locally
            if fsdp:
                model.set_requires_gradient_sync(k == n - 1)
            sync = ddp is None or (k == n - 1 and not ddp.skip_sync)
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with _compute_precision(model, train_spec):
                    u = None if draws is None else draws[k]
                    loss = (model.loss(tokens, targets, u) if ddp is None else ddp(tokens, targets, u)) / n
                loss.backward()  # outside autocast, as torch recommends: backward runs in each op's forward dtype
            losses.append(loss.detach())
        for p in params:  # a parameter the loss does not reach has gradient 0 (the spec's), not None, which
            if p.grad is None:  # AdamW would skip, freezing its decay and its moments
                p.grad = torch.zeros_like(p)
        # clip_grad_norm_ in its two halves: the norm, then (only once it is known finite) the scaling.
        # clip_grad_norm_ itself would first multiply every gradient by a NaN coefficient, and the
        # error could no longer tell which gradient went non-finite first.
        norm = global_norm([p.grad for p in params])
        # the one host read of the step; the loss is the micro-batches' (loss / n) summed in double
        values = torch.stack([*(x.float() for x in losses), norm.float()]).tolist()
        loss_value, norm_value = sum(values[:-1]), values[-1]
        # FSDP: the norm is the world's, so every rank is here together when a gradient must be gathered
        check_finite_step(it, loss_value, norm_value,
                          lambda: {nm: full_tensor(p.grad).detach().float().cpu().numpy()
                                   for nm, p in zip(names, params)})
        if train_spec.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, train_spec.grad_clip, norm)
        optimizer.step()
        if model.spec.has_unit_norm_weights:
            model.normalize_()  # SPEC.md 20.8: part of the step, in place so the optimizer keeps its tensors
    return loss_value, norm_value, lr


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """clip_grad_norm_'s norm of the per-tensor norms, accumulated in float64.

    torch's float32 vector_norm on the CPU (and so get_total_norm and clip_grad_norm_) was off by 2.7e-3
    relative over one 50257 x 768 gradient (GPT-2's wte), 8.4e-5 on the gpt2 trajectory case: clipping
    scaled every gradient, and so every moment, by that much. Accumulated in float64 it is exact to
    ~1e-13 (SPEC.md 20.5). MPS has no float64: there, torch's own float32 reduction."""
    acc = torch.float32 if grads[0].device.type == "mps" else torch.float64
    if is_sharded(grads[0]):  # FSDP: each rank holds a shard of each gradient (SPEC.md 25.7)
        return _sharded_global_norm(grads, acc)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=acc) for g in grads]))


def _sharded_global_norm(grads: list[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """global_norm of sharded (DTensor) gradients: each tensor's squared norm is its shards' float64 sums of
    squares added by one all-reduce (SUM; the same bits on every rank), then the norm of the per-tensor norms
    as in one process. It differs from one process's only in float64 rounding (~1e-16)."""
    import torch.distributed as dist

    squares = torch.stack([torch.linalg.vector_norm(g.to_local(), dtype=acc).square() for g in grads])
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grads[0].device_mesh.get_group())
    return torch.linalg.vector_norm(squares.sqrt())


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor: a parameter (or its gradient or moment) that FSDP has spread over the ranks. Looked up, not
    imported: importing torch.distributed.tensor costs 0.5 s, and a process that shards nothing never has."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one gathered from every rank (a collective: every rank must call it, in the
    same order), any other as it is."""
    return t.full_tensor() if is_sharded(t) else t


def like_param(array, p: torch.Tensor) -> torch.Tensor:
    """`array` (an optimizer moment read from a checkpoint) laid out as parameter `p`: its dtype and device and,
    under FSDP, its shard of the same placement. Every rank holds the whole array and keeps its own slice:
    no communication."""
    whole = torch.tensor(array, dtype=p.dtype, device=p.device)
    if not is_sharded(p):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)


def reshard(model: torch.nn.Module) -> None:
    """Register every unit's sharded parameters again (a local step, no communication). FSDP2 leaves the
    root's parameters gathered after a forward without backward (an evaluation), and while they are,
    named_parameters() gives the gathered tensors, not the sharded ones the optimizer holds."""
    fsdp = sys.modules["torch.distributed.fsdp"]
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """`model` went through fully_shard (attach_fsdp)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _compute_precision(model: torch.nn.Module, train_spec: TrainSpec):
    """SPEC.md 20.9: under mixed_bfloat16, autocast computes the forward (and so the backward) in bfloat16
    from the float32 master weights; the gradients land in float32 .grad."""
    if train_spec.precision == "mixed_bfloat16":
        return torch.autocast(device_type=_device(model).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- data parallel (SPEC.md 25): DDP under torchrun ----------------------------------------------------------
class _Loss(torch.nn.Module):
    """The model's loss as a forward, so that DDP (which hooks forward) wraps what the step differentiates."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, draws=None):
        return self.model.loss(tokens, targets, draws)


def attach_ddp(model: torch.nn.Module, fault=None) -> None:
    """Wrap `model`'s loss in DistributedDataParallel (the process group is initialized) and keep it on the
    model, outside its module tree, for train_step. DDP averages the gradients as SUM then / W in its
    default hook. `fault` (negative controls only, runs/distributed.py): ("divide_by", N) replaces the
    hook with SUM / N; ("skip_sync", None) never synchronizes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = _device(model)
    # the buffers are constants, equal on every rank: no sync before each forward (torch >= 2.12 spells it
    # forward_sync_buffers and warns about broadcast_buffers)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(_Loss(model), device_ids=[device.index] if device.type == "cuda" else None,
                                  **no_buffer_sync)
    ddp.skip_sync = fault is not None and fault[0] == "skip_sync"
    if fault is not None and fault[0] == "divide_by":
        divisor = fault[1]

        def wrong_average(state, bucket):
            tensor = bucket.buffer()
            return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True).get_future().then(
                lambda fut: fut.value()[0].div_(divisor))

        ddp.register_comm_hook(None, wrong_average)
    model.__dict__["_ddp"] = ddp  # not a submodule: the model's state and parameter names stay canonical


# -- sharded data parallel (SPEC.md 25.7): FSDP2 under torchrun --fsdp ----------------------------------------
def attach_fsdp(model: torch.nn.Module, fault=None) -> None:
    """Shard `model` in place with FSDP2's fully_shard (the process group is initialized): each block is one
    unit (gathered for its forward and backward, then freed), the root holds the rest (embeddings, the final
    norm, nGPT's head). The parameters become DTensors, each rank holding a 1/W slice of dimension 0 of every
    tensor; AdamW's moments follow them. The gradients are reduce-scattered as SUM then / W (never the AVG
    op, SPEC.md 25.3) in float32, in the backward of the last micro-batch only (train_step).

    Mixed precision stays autocast over float32 parameters, as in one process (SPEC.md 20.9):
    MixedPrecisionPolicy(param_dtype=bfloat16) would gather bfloat16 parameters and so also run the
    norms, the embeddings and the residual stream in bfloat16, another computation.

    `fault` (negative controls only, runs/distributed.py): ("divide_by", N) divides the SUM by N."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if fault is not None and fault[0] == "skip_sync":
        raise InputError("GPTSPEC_DP_FAULT=skip_sync is DDP's control: under FSDP a rank holds no gradient of its "
                         "shard until the reduce-scatter, so there is no unsynchronized step to take")
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    # a block shared by every layer (blocks="shared", SPEC.md 16.1) runs n_layer times per forward: it stays
    # in the root's unit rather than being gathered and freed n_layer times
    blocks = list(model.h) if len(model.h) > 1 else []
    units = [*blocks, model]
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    register_fsdp_forward_method(model, "loss")  # the step differentiates model.loss, not forward
    for unit in units:  # per unit: these setters do not recurse
        unit.set_force_sum_reduction_for_comms(True)
        if fault is not None and fault[0] == "divide_by":
            unit.set_gradient_divide_factor(float(fault[1]))
