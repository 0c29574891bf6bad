"""The training step's fast path: fewer, larger operations, no host synchronisation per step, and on
a CUDA GPU one CUDA graph per input shape.

An SDXL LoRA step is launch-bound: the UNet with a rank-4 LoRA on every attention projection is
thousands of small kernels (a profiled H100 step: 102 ms of GPU work, 628 ms of CPU time), plus one
autocast cast per LoRA weight and call when the LoRA trains in fp32 beside fp16 weights. This module
runs the same step as the accelerate loop (same loss, gradients, clipping, AdamW update and fp16
loss scaling, so the same weights are learned) in a form that avoids that overhead:

- **LoRA in the compute dtype.** The model's LoRA parameters stay fp32: they are the master weights
  the optimizer updates, and what checkpoints and the LoRA file hold. When the compute dtype is
  fp16 or bf16 the UNet runs with copies of them in that dtype (torch.func.functional_call), so no
  linear casts a weight; gradients come back in the compute dtype and are summed into the masters'
  fp32 gradients. The copies are refreshed from the masters after each update, which rounds exactly
  as autocast's cast did.
- **No host synchronisation in a step.** The loss stays on the device until a logged step reads it;
  fp16 loss scaling skips a step with non-finite gradients on the device (fused AdamW's found_inf)
  and updates the scale with accelerate's own scaler tensors, so checkpoints carry it as before.
- **CUDA graphs.** A micro-batch's forward and backward is captured once per input shape (aspect-ratio
  buckets and a smaller last batch give a few shapes) into one memory pool shared by all graphs, and
  the update (unscale, clip, AdamW with capturable=True and a tensor learning rate, zeroing, copies,
  scale update) into one more graph; later steps copy their inputs into static buffers and replay. A
  shape runs eagerly the first time (which warms up lazily initialised kernels and optimizer state),
  is captured the second time, replayed after. No compile step: capture costs one step per shape.
  When capture fails the job logs a warning and runs the same step eagerly from then on.

On a CPU the step is just as launch-bound (a tiny UNet's operations are microseconds each), and a thread
pool can cost more than it gives: every operation waits for all its threads, and on a machine whose other
cores are busy one descheduled thread stalls each of them. So unless OMP_NUM_THREADS names a count (the
local stack sets 1), the first micro-batch's forward and backward is timed with torch's default pool and
with one thread, twice each after a warm-up pass, and the job trains with the pool only when it is clearly
faster (POOL_ADVANTAGE), else with one thread (logged). The passes
read no random numbers and leave the gradients and the loss as they found them; only the thread count may
differ between two runs, which changes the weights in their last bits at most.

Compiling the UNet's repeated blocks was the alternative: it fuses element-wise work but still
launches every kernel from the CPU each step, and compiling SDXL costs minutes; replaying a graph
removes the launches, which is where the step's time goes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from ml.train.loss import diffusion_loss

log = logging.getLogger(__name__)

# A CPU job keeps torch's thread pool only when a forward and backward is this much faster with it than with one thread.
POOL_ADVANTAGE = 1.25
# Capture a shape the second time it is seen (the first, eager, run warms up lazy initialisation).
_RUNS_BEFORE_CAPTURE = 1


@dataclass
class StepInputs:
    """One micro-batch, as the loop draws it on the CPU (fp32 latents and noise, int64 timesteps)."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def shape_key(self) -> tuple:
        return tuple(tuple(t.shape) for t in (self.latents, self.prompt_embeds, self.pooled, self.time_ids))

    def on(self, device: torch.device, dtype: torch.dtype) -> "StepInputs":
        """On the device as the UNet takes them: latents and noise channels-last, all but timesteps in dtype."""
        nhwc = torch.channels_last
        return StepInputs(self.latents.to(device, dtype, memory_format=nhwc),
                          self.noise.to(device, dtype, memory_format=nhwc), self.timesteps.to(device),
                          self.prompt_embeds.to(device, dtype), self.pooled.to(device, dtype),
                          self.time_ids.to(device, dtype))


def fast_path_blockers(hp, world: int) -> list[str]:
    """Why this job runs the accelerate loop instead (empty: the fast path applies)."""
    reasons = []
    if not hp.fast_path:
        reasons.append("fast_path is false")
    if world > 1:
        reasons.append("several processes")
    if hp.train_text_encoder:
        reasons.append("train_text_encoder")
    if hp.optimizer != "adamw":
        reasons.append(f"optimizer {hp.optimizer}")
    if hp.gradient_checkpointing:
        reasons.append("gradient_checkpointing")
    return reasons


def make_optimizer(params: list[torch.nn.Parameter], learning_rate: float, device: torch.device):
    """Fused AdamW; on CUDA capturable, with the learning rate a device tensor the LR scheduler
    fills in place, so a captured update follows the schedule."""
    if device.type == "cuda":
        # initial_lr a float: the LR scheduler then computes floats and fills the tensor, never reads it.
        group = {"params": params, "lr": torch.tensor(learning_rate, device=device), "initial_lr": learning_rate}
        return torch.optim.AdamW([group], lr=learning_rate, fused=True, capturable=True)
    return torch.optim.AdamW([{"params": params, "lr": learning_rate}], lr=learning_rate, fused=device.type == "cpu")


class FastStep:
    """Micro-batch forward/backward and optimizer update of the UNet's LoRA (see the module docstring).

    unet: the (accelerate-prepared) UNet with its LoRA adapter; optimizer: the torch optimizer over
    the LoRA parameters (from make_optimizer; accelerate's wrapper unwrapped); scaler: accelerate's
    GradScaler with fp16, else None.
    """

    def __init__(self, unet, optimizer: torch.optim.Optimizer, noise_scheduler, weight_dtype: torch.dtype,
                 device: torch.device, gradient_accumulation_steps: int, max_grad_norm: float,
                 snr_gamma: float | None, scaler=None, graphs: bool = True):
        self.unet = unet
        self.optimizer = optimizer
        self.noise_scheduler = noise_scheduler
        self.weight_dtype = weight_dtype
        self.device = device
        self.accumulation = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.snr_gamma = snr_gamma
        self.graphs = graphs and device.type == "cuda"

        self.names = [name for name, p in unet.named_parameters() if p.requires_grad]
        self.masters = [p for p in unet.parameters() if p.requires_grad]
        with torch.no_grad():
            for master in self.masters:  # static gradient buffers: a captured backward adds into them
                master.grad = torch.zeros_like(master)
            # Compute-dtype copies, leaves whose gradients are taken explicitly.
            self.copies = None
            if weight_dtype != self.masters[0].dtype:
                self.copies = [m.detach().to(weight_dtype).requires_grad_(True) for m in self.masters]
        self.loss_sum = torch.zeros((), device=device)  # this step's loss, accumulated over micro-batches
        self.step_loss = torch.zeros((), device=device)  # the last finished step's

        self.scaler = scaler
        self.found_inf = None
        if scaler is not None:
            if scaler._scale is None:  # its tensors (a resumed scale included), so checkpoints save ours
                scaler._lazy_init_scale_growth_tracker(device)
            self.found_inf = torch.zeros((), device=device)  # 0-d, as GradScaler's: AdamW subtracts it from steps

        # None: not chosen; a thread count is chosen once, on a CPU with torch's default pool (choose_cpu_threads).
        self.thread_choice: dict | None = None
        self._choose_threads = (device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS")
                                and torch.get_num_threads() > 1)
        self._runs: dict[tuple, int] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, StepInputs]] = {}
        self._update_runs = 0
        self._update_graph = None
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        if self.graphs:  # a resumed optimizer may have loaded its learning rate as a number or onto the CPU
            for group in optimizer.param_groups:
                if not (isinstance(group["lr"], torch.Tensor) and group["lr"].device.type == "cuda"):
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)

    # -- the work itself: run eagerly or under capture ------------------------------------------

    def _unet_call(self):
        if self.copies is None:
            return self.unet
        parameters = dict(zip(self.names, self.copies))

        def call(*args, **kwargs):
            return torch.func.functional_call(self.unet, parameters, args, kwargs)

        return call

    def _forward_backward(self, inputs: StepInputs) -> None:
        loss = diffusion_loss(self._unet_call(), self.noise_scheduler, inputs.latents, inputs.noise,
                              inputs.timesteps, inputs.prompt_embeds, inputs.pooled, inputs.time_ids,
                              self.snr_gamma)
        scaled = loss / self.accumulation  # as accelerator.backward does
        if self.scaler is not None:
            scaled = scaled * self.scaler._scale
        if self.copies is None:
            scaled.backward()  # adds into the masters' gradient buffers
        else:
            grads = torch.autograd.grad(scaled, self.copies)
            torch._foreach_add_([m.grad for m in self.masters], grads)
        self.loss_sum.add_(loss.detach() / self.accumulation)

    @torch.no_grad()
    def _update(self) -> None:
        grads = [m.grad for m in self.masters]
        if self.scaler is not None:
            self.found_inf.zero_()
            inverse = self.scaler._scale.double().reciprocal().float()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, inverse)
            self.optimizer.found_inf = self.found_inf  # fused AdamW skips the update when it is set
        torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm)
        self.optimizer.step()
        torch._foreach_zero_(grads)
        if self.copies is not None:
            torch._foreach_copy_(self.copies, self.masters)
        if self.scaler is not None:
            torch._amp_update_scale_(self.scaler._scale, self.scaler._growth_tracker, self.found_inf,
                                     self.scaler._growth_factor, self.scaler._backoff_factor,
                                     self.scaler._growth_interval)
        self.step_loss.copy_(self.loss_sum)
        self.loss_sum.zero_()

    # -- public ---------------------------------------------------------------------------------

    def choose_cpu_threads(self, inputs: StepInputs) -> dict:
        """The faster of torch's default thread pool and one thread for this micro-batch's forward and backward,
        set for the rest of the job (the module docstring); the gradients and the loss are left as they were.
        Returns (and keeps as thread_choice) ``{threads, pool, pool_seconds, one_thread_seconds}``."""
        pool = torch.get_num_threads()
        on_device = inputs.on(self.device, self.weight_dtype)
        best: dict[int, float] = {}
        before = [m.grad.clone() for m in self.masters], self.loss_sum.clone()
        self._forward_backward(on_device)  # warms up lazily initialised kernels; not timed
        for threads in (pool, 1, pool, 1):
            torch.set_num_threads(threads)
            started = time.perf_counter()
            self._forward_backward(on_device)
            best[threads] = min(best.get(threads, float("inf")), time.perf_counter() - started)
        with torch.no_grad():
            torch._foreach_copy_([m.grad for m in self.masters], before[0])
            self.loss_sum.copy_(before[1])
        # The pool only when clearly faster: on a shared machine its stalls cost more than a small gain.
        chosen = pool if best[pool] * POOL_ADVANTAGE < best[1] else 1
        torch.set_num_threads(chosen)
        self.thread_choice = {"threads": chosen, "pool": pool, "pool_seconds": best[pool], "one_thread_seconds": best[1]}
        log.info("CPU threads: %d (a forward and backward took %.1f ms with torch's pool of %d, %.1f ms with 1; "
                 "OMP_NUM_THREADS sets a count instead)", chosen, best[pool] * 1e3, pool, best[1] * 1e3)
        return self.thread_choice

    def micro_step(self, inputs: StepInputs) -> None:
        """Forward and backward of one micro-batch; gradients add up until update()."""
        if self._choose_threads:
            self._choose_threads = False
            self.choose_cpu_threads(inputs)
        key = inputs.shape_key()
        if key in self._graphs:
            graph, static = self._graphs[key]
            for buffer, value in zip(_fields(static), _fields(inputs)):
                buffer.copy_(value, non_blocking=True)
            graph.replay()
            return
        runs = self._runs.get(key, 0)
        if self.graphs and runs >= _RUNS_BEFORE_CAPTURE:
            static = inputs.on(self.device, self.weight_dtype)
            graph = self._capture(lambda: self._forward_backward(static), f"micro-batch shape {key[0]}")
            if graph is not None:
                self._graphs[key] = (graph, static)
                graph.replay()
                return
        self._runs[key] = runs + 1
        self._forward_backward(inputs.on(self.device, self.weight_dtype))

    def update(self) -> None:
        """Unscale (fp16), clip, AdamW step, zero gradients, refresh the compute copies."""
        if self._update_graph is not None:
            self._update_graph.replay()
            return
        if self.graphs and self._update_runs >= _RUNS_BEFORE_CAPTURE:
            self._update_graph = self._capture(self._update, "optimizer update")
            if self._update_graph is not None:
                self._update_graph.replay()
                return
        self._update_runs += 1
        self._update()

    def captured(self) -> int:
        """CUDA graphs in use: one per micro-batch shape, one for the update."""
        return len(self._graphs) + (self._update_graph is not None)

    def step_was_skipped(self) -> bool:
        """Whether the last update found non-finite fp16 gradients (reads the device: a sync)."""
        return self.found_inf is not None and bool(self.found_inf.item())

    def last_loss(self) -> float:
        """The last finished step's loss (reads the device: call on logged steps only)."""
        return float(self.step_loss)

    def _capture(self, work, what: str):
        """Capture work into a CUDA graph without running it; None (and eager from now on) on failure."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                work()
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to the same eager step
            log.warning("CUDA graph capture of the %s failed (%s: %s); training on eagerly", what,
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self.graphs = False
            self._graphs.clear()
            self._update_graph = None
            torch.cuda.synchronize()
            return None
        log.info("captured the %s in a CUDA graph", what)
        return graph


def _fields(inputs: StepInputs) -> tuple[torch.Tensor, ...]:
    return (inputs.latents, inputs.noise, inputs.timesteps, inputs.prompt_embeds, inputs.pooled, inputs.time_ids)
