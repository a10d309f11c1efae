"""Where the models run and in which numeric precision: `run.device`, `model.precision`,
`model.reference_precision`, `reward.precision` and `model.tf32`, resolved once per process (`resolve`); and the
base model loaded there (`load_model`).

Devices: 'auto' is the accelerator this process owns where there is one (under `accelerate launch` / `torchrun`
each process takes its local GPU, `Dist.device`), else the CPU; 'cpu', 'cuda' (this process's GPU) and 'cuda:N'
name one. Every model of a run is put on that one device (the composition root, pipeline.build_trainer, does it),
and every tensor the method makes is made there, from a model's parameters or the batch it works on.

Precisions (per model):
  fp32        float32 weights and compute (the default on the CPU)
  bf16-mixed  float32 master weights and optimiser state; the forward passes run under bf16 autocast; log-softmax,
              log-probs, KL, values, advantages and losses stay float32 (the default on a GPU with bf16)
  bf16        bfloat16 weights: for models that only infer (the original model, the Values Coach when asked), and
              for the Apprentice's frozen base under a LoRA adapter (the adapter and the value head train in
              float32); the Apprentice without LoRA is refused in bf16 (`check_trainable`: use bf16-mixed)
              Buffers (a rotary embedding's `inv_freq`) stay float32 in every precision.
  fp16        float16 weights (only through the older `model.dtype=float16`)
A model's precision is recorded on it (`set_precision`) and `lm.hf.autocast(module)` is the one switch its forward
passes use, so the sampler, the Apprentice, the original model and the Values Coach each run in their own.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from megacoach.errors import ConfigError
from megacoach.lm.hf import PRECISION_ATTR

PRECISIONS = ("fp32", "bf16-mixed", "bf16", "fp16")
_WEIGHTS = {"fp32": torch.float32, "bf16-mixed": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


def weights_dtype(precision: str) -> torch.dtype:
    return _WEIGHTS[precision]


def weights_dtype_name(precision: str) -> str:
    return str(_WEIGHTS[precision]).removeprefix("torch.")


# ------------------------------------------------------------------------------------------ devices
def resolve_device(spec: str = "auto", local_rank: int = 0, processes: int = 1) -> torch.device:
    """`run.device` as a torch.device for this process (ConfigError for a device that is not there)."""
    if not re.match(DEVICE_PATTERN, spec or ""):
        raise ConfigError(f"run.device: {spec!r} is not a device (expected 'auto', 'cpu', 'cuda' or 'cuda:N')")
    if spec == "cpu":
        return torch.device("cpu")
    have = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if have else torch.device("cpu")
    if not have:
        raise ConfigError(f"run.device={spec}: no CUDA device is available to this torch {torch.__version__} "
                          "(use run.device=cpu, or auto)")
    n = torch.cuda.device_count()
    if spec == "cuda":
        return torch.device("cuda", local_rank % n if processes > 1 else torch.cuda.current_device())
    index = int(spec.split(":")[1])
    if index >= n:
        raise ConfigError(f"run.device={spec}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", index)


def bf16_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def tf32_capable(device: torch.device) -> bool:
    """TF32 matmuls exist on NVIDIA GPUs from compute capability 8.0 (Ampere) on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


# ------------------------------------------------------------------------------------------ precisions
def compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile (run.compile) cannot run on `device` here, or None when it can: Inductor's CPU backend
    builds C++ kernels and needs a C++ compiler ($CXX, g++, clang++ or c++; Debian: `apt-get install g++`); on a
    GPU it needs Triton, which CUDA builds of torch ship."""
    if device.type == "cpu":
        names = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        if not any(n and shutil.which(n) for n in names):
            return "no C++ compiler found (set CXX, or install g++: apt-get install g++)"
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return f"torch.compile on {device.type} needs Triton, which is not installed"
    return None


def compile_in_process() -> bool:
    """Have Inductor compile in this process (`compile_threads = 1`) unless TORCHINDUCTOR_COMPILE_THREADS says
    otherwise. Its default, a pool of compile-worker processes (one per core), is started whenever a kernel is
    not yet in Inductor's on-disk cache; on the 2-core CPU machine it held ~1.4 GB of memory through a short demo
    run with a cold cache (peak RSS of all its processes 2.83 GB with the pool, 1.37-1.48 GB without) and saved no
    time (the one compiled graph, the response head, has few kernels: 3 min 4 s with the pool, 3 min 4-9 s
    without). Returns True if it set the option."""
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return False
    from torch._inductor import config as inductor_config

    inductor_config.compile_threads = 1
    return True


def set_precision(module: nn.Module, precision: str, cast: bool = True) -> nn.Module:
    """Record `precision` on `module` (and cast its floating weights to the precision's dtype when `cast` and
    they are not in it already). Buffers keep their dtype: a float32 buffer such as a rotary embedding's `inv_freq`
    stays float32 (in bf16 its frequencies would be off by up to 0.4%, and every position's angle with them)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    target = _WEIGHTS[precision]
    if cast and any(p.is_floating_point() and p.dtype != target for p in module.parameters()):
        kept = [(m, name, b) for m in module.modules() for name, b in m._buffers.items()
                if b is not None and b.is_floating_point()]
        module.to(target)
        for m, name, b in kept:  # the same tensors as before the cast (on the same device)
            m._buffers[name] = b
    setattr(module, PRECISION_ATTR, precision)
    return module


def check_trainable(precision: str, lora: bool) -> None:
    """ConfigError where the Apprentice would train half-precision weights directly: with bf16 (or fp16) weights
    every trainable parameter must be float32, which LoRA gives (its adapter and the value head are float32 over the
    frozen half-precision base); without LoRA every weight trains, and Adam's small updates round away in bfloat16
    (on the CPU, 8 steps changed 20% of the weights against 98% with float32 masters): bf16-mixed is that run."""
    if precision in ("bf16", "fp16") and not lora:
        raise ConfigError(f"model.precision={precision}: the Apprentice would train {weights_dtype_name(precision)} "
                          "weights directly (most Adam updates round away); use model.precision=bf16-mixed (float32 "
                          "master weights, bf16 compute), or a LoRA adapter (ppo.lora_r) over a frozen bf16 base")


def move(module: nn.Module, device: torch.device) -> nn.Module:
    """Put a model (its parameters and buffers) on `device` (a no-op where it is already)."""
    if any(t.device != device for t in module.parameters()) or any(t.device != device for t in module.buffers()):
        module.to(device)
    return module


def place(module: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Put a Hugging Face model on `device` in `precision` (a no-op for a float32 model already there)."""
    return set_precision(move(module, device), precision)


# ------------------------------------------------------------------------------------------ the run's plan
@dataclass(frozen=True)
class Hardware:
    device: torch.device
    apprentice: str  # the Apprentice (its value head always float32)
    reference: str  # the original model (the Coherence Coach's reference)
    values_coach: str  # the Values Coach as PPO uses it
    values_coach_training: str  # the Values Coach while it trains (bf16 is for inference: trained bf16-mixed)
    tf32: bool  # TF32 matmuls switched on

    def describe(self) -> dict:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        return {"device": name, "apprentice": self.apprentice, "value_head": "fp32",
                "original_model": self.reference, "values_coach": self.values_coach,
                "values_coach_training": self.values_coach_training, "tf32": self.tf32,
                "torch": torch.__version__, "cuda": torch.version.cuda}

    def line(self) -> str:
        d = self.describe()
        return (f"device {d['device']}: Apprentice {self.apprentice} (value head fp32), original model "
                f"{self.reference}, Values Coach {self.values_coach} (trains in {self.values_coach_training})"
                + (", TF32 matmuls on" if self.tf32 else ""))

    def apply(self) -> None:
        """Process-wide switches: TF32 for float32 matmuls and convolutions on a GPU that has it, through torch's
        `fp32_precision` settings ('tf32' or 'ieee'; the older `allow_tf32` flags are deprecated). The CPU is never
        touched."""
        if self.device.type == "cuda":
            precision = "tf32" if self.tf32 else "ieee"
            torch.backends.cuda.matmul.fp32_precision = precision
            torch.backends.cudnn.conv.fp32_precision = precision


def _pick(field: str, asked: str, device: torch.device, legacy: str | None) -> str:
    if asked != "auto":
        if asked in ("bf16-mixed", "bf16") and device.type == "cuda" and not bf16_capable(device):
            raise ConfigError(f"{field}={asked}: this GPU has no bfloat16 support (use fp32)")
        return asked
    if legacy is not None:
        return legacy
    return "bf16-mixed" if bf16_capable(device) else "fp32"


def resolve(cfg, local_rank: int = 0, processes: int = 1) -> Hardware:
    """The run's device and every model's precision from its config (ConfigError for a contradiction)."""
    device = resolve_device(cfg.run.device, local_rank, processes)
    m = cfg.model
    legacy = None if m.dtype == "float32" else _DTYPE_PRECISION[m.dtype]
    if legacy is not None and m.precision != "auto":
        raise ConfigError(f"model.dtype={m.dtype} and model.precision={m.precision}: model.dtype is the older way "
                          "to say a precision (bfloat16 = precision bf16); set only model.precision")
    apprentice = _pick("model.precision", m.precision, device, legacy)
    reference = apprentice if m.reference_precision == "auto" else _pick("model.reference_precision",
                                                                         m.reference_precision, device, None)
    coach = apprentice if cfg.reward.precision == "auto" else _pick("reward.precision", cfg.reward.precision,
                                                                    device, None)
    training = "bf16-mixed" if coach == "bf16" else coach
    return Hardware(device, apprentice, reference, coach, training, bool(m.tf32 and tf32_capable(device)))


def cpu_fp32() -> Hardware:
    """The plan of a CPU run on the defaults."""
    return Hardware(torch.device("cpu"), "fp32", "fp32", "fp32", "fp32", False)


def load_model(cfg, hw: Hardware | None = None):
    """(model, tokenizer): `model.name_or_path` on the run's device in the Apprentice's precision (`hw`, default
    resolved from `cfg` for one process)."""
    from megacoach.lm.loading import load_causal_lm

    hw = hw or resolve(cfg)
    model, tok = load_causal_lm(cfg.model.name_or_path, weights_dtype_name(hw.apprentice),
                                fused_activation=cfg.model.fused_activation, device=hw.device)
    set_precision(model, hw.apprentice)
    return model, tok
