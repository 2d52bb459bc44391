"""One training over one process or many (torchrun): process group and device, the split of the global batch over
the ranks, stop requests from signals, and the step status that all ranks read and act on together.

SIGINT, SIGTERM and SIGHUP ask for a stop (StopRequest); every rank learns of it at the same step through
StepStatus or StopRequest.agreed, so all ranks save and exit together. Nothing here assumes a GPU count: a plain
`python train.py` is rank 0 of 1.
"""
import os
import signal
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each asks for a stop after the current step
REPEAT_SIGNAL_SECONDS = 5.0  # a signal repeated within this time is the same stop request, not an abort
STATUS_READ_SECONDS = 2.0  # longest wall time between two reads of the step status (loss, stop request)


# ----------------------------------------------------------------------------------------------------------
# Process group, batch split
# ----------------------------------------------------------------------------------------------------------
def setup_distributed(device_name: str) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from torchrun's environment; a plain run is rank 0 of 1."""
    rank, local_rank, world_size = (int(os.environ.get(name, default)) for name, default in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:  # device_id binds NCCL to this rank's GPU at once instead of at the first collective
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=device if use_cuda else None)
    return rank, local_rank, world_size, device


def split_batch(global_batch: int, world_size: int, batch_size: int, exact: bool) -> tuple[int, int]:
    """(per-device batch, accumulation steps) with per-device batch x world size x accumulation = global batch.

    The per-device batch is the largest divisor of global_batch / world_size that is at most `batch_size`
    (fewest accumulation steps, largest BatchNorm batch), or exactly `batch_size` when `exact`. Errors name the
    nearest values that work."""
    per_device, remainder = divmod(global_batch, world_size)
    if remainder or not per_device:
        lower = global_batch // world_size * world_size
        options = " or ".join(str(value) for value in (lower, lower + world_size) if value > 0)
        raise SystemExit(f"--global_batch {global_batch} cannot be split over world size {world_size}: use "
                         f"--global_batch {options} (a multiple of the world size)")
    divisors = [value for value in range(1, per_device + 1) if per_device % value == 0]
    if not exact:
        batch_size = max(value for value in divisors if value <= batch_size)
    elif batch_size not in divisors:
        options = " or ".join(str(value) for value in ([max(d for d in divisors if d < batch_size)] +
                                                         [d for d in divisors if d > batch_size][:1]))
        raise SystemExit(f"--batch_size {batch_size} does not divide the {per_device} mixtures per device "
                         f"(--global_batch {global_batch} / world size {world_size}): use --batch_size {options}, "
                         "or leave --batch_size out to derive it")
    return batch_size, per_device // batch_size


# ----------------------------------------------------------------------------------------------------------
# Stop requests and the step status
# ----------------------------------------------------------------------------------------------------------
class StopRequest:
    """SIGINT, SIGTERM and SIGHUP as a request to stop after the current step, saving last.pt first.

    torchrun forwards every signal it receives to each worker, and cluster schedulers (SLURM's scancel and time
    limits) signal every process of the job, so a rank often receives the same request twice within
    milliseconds: a signal within REPEAT_SIGNAL_SECONDS of the first one is the same request. A Ctrl-C after that
    raises KeyboardInterrupt at once. The flag belongs to this process; ranks agree on it with `agreed` or
    through StepStatus.
    """

    def __init__(self, announce: bool):
        self.announce = announce  # rank 0 acknowledges the request on stderr the moment it arrives
        self.signal_name, self.first_arrival = None, 0.0
        self.pid = os.getpid()  # forked DataLoader workers inherit the handler; only this process stops

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:
            return
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self.first_arrival = signal.Signals(signum).name, now
            if self.announce:  # os.write, not print: the main thread may be inside a print right now
                os.write(2, f"\n{self.signal_name}: stopping after this step (last.pt is saved first); Ctrl-C again "
                            "to abort\n".encode())
        elif signum == signal.SIGINT and now - self.first_arrival > REPEAT_SIGNAL_SECONDS:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, device: torch.device, world_size: int) -> bool:
        """True on every rank when any rank has a request. A collective: all ranks call it at the same point."""
        flag = torch.tensor([float(self.requested)], device=device)
        if world_size > 1:
            dist.all_reduce(flag)
        return flag.item() > 0


class StepStatus:
    """What every step must tell all ranks (mean loss, non-finite values, gradient norm, stop request), without a
    host-device synchronisation per step.

    The values are summed on the device and read on the host, all-reduced together with the stop request and
    the step time, only at agreed steps: every log, checkpoint and validation step, and otherwise about every
    STATUS_READ_SECONDS of wall time. Every rank computes the next read step from the same reduced timing, so
    the ranks always read, and stop, at the same step. Checkpoints are written only right after a read, so a
    step with a non-finite loss or gradient is never saved.
    """

    def __init__(self, config, device: torch.device, world_size: int, step: int,
                 check_gradients: bool):
        self.config, self.device, self.world_size = config, device, world_size
        self.check_gradients = check_gradients  # off under the fp16 GradScaler, which skips inf gradients itself
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, non-finite steps, gradient norm
        self.steps, self.next_read, self.clock = 0, step + 1, time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """loss: this rank's mean loss of the step, grad_norm: the clipped gradients' norm (device scalars)."""
        bad = ~torch.isfinite(loss) | (~torch.isfinite(grad_norm) if self.check_gradients else False)
        self.sums += torch.stack([loss.double(), bad.double(), grad_norm.double()])
        self.steps += 1

    def due(self, step: int) -> bool:
        config = self.config
        return (step >= self.next_read or step == config.max_steps or
                any(step % interval == 0 for interval in (config.log_interval, config.checkpoint_interval,
                                                          config.eval_interval)))

    def read(self, step: int, stop_requested: bool) -> dict:
        """All-reduce and read the status (a collective). -> sums over the steps since the last read, averaged
        over ranks: steps, loss, grad_norm, seconds; and non_finite, stop (True when on any rank)."""
        host = torch.tensor([float(stop_requested), time.perf_counter() - self.clock], dtype=torch.float64)
        status = torch.cat([self.sums, host.to(self.device)])
        if self.world_size > 1:
            dist.all_reduce(status)
        loss, non_finite, grad_norm, stop, seconds = (value / self.world_size for value in status.tolist())
        report = {"steps": self.steps, "loss": loss, "grad_norm": grad_norm, "seconds": seconds,
                  "non_finite": non_finite > 0, "stop": stop > 0}
        interval = int(STATUS_READ_SECONDS * self.steps / max(seconds, 1e-9))
        self.next_read = step + max(1, min(self.config.log_interval, interval))
        self.sums.zero_()
        self.steps = 0
        self.restart_clock()
        return report

    def restart_clock(self) -> None:
        """Leave validation and checkpoint writing out of the step time."""
        self.clock = time.perf_counter()
