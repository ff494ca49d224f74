"""Where a run computes and how: the device asked for, its name as run.json records it, its
precision (bf16 or fp16 autocast, fp16's loss scaling, or float32) and the channels-last memory
layout."""
import functools
import platform
import sys
from pathlib import Path

import torch

from .config import UserError


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


# The CPU flags (x86 `flags`, arm64 `Features` in /proc/cpuinfo) of bf16 and fp16 instructions, as named.
BF16_INSTRUCTIONS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "BF16"}
FP16_INSTRUCTIONS = {"avx512_fp16": "AVX512-FP16", "amx_fp16": "AMX-FP16", "asimdhp": "ASIMDHP"}


def cpu_info():
    """The first processor's entries in /proc/cpuinfo, {} where there is none (not Linux)."""
    entries = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            entries.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return entries


def cpu_flags(info):
    return set((info.get("flags") or info.get("Features") or "").split())


def instructions_among(flags, instructions=BF16_INSTRUCTIONS):
    """The names of `instructions` ({flag: name}: bf16's by default) among a CPU's flags."""
    return [name for flag, name in instructions.items() if flag in flags]


def device_name(device):
    """The GPU's name, or the CPU's model with the vector instructions torch's kernels use on it
    and its bf16 ones, e.g. 'CPU: AMD EPYC (AVX512, AVX512-BF16), 2 threads': a virtual machine may
    report only a family name, and two CPUs under one name can differ in both, and in speed."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = cpu_info()
    model = info.get("model name") or platform.processor() or platform.machine()
    features = [torch.backends.cpu.get_cpu_capability(), *instructions_among(cpu_flags(info))]
    return f"CPU: {model} ({', '.join(features)}), {torch.get_num_threads()} threads"


# The first GPUs computing in bf16 natively (Ampere: A100, RTX 30xx); older ones (T4, V100, RTX
# 20xx) emulate it, slower than float32.
BF16_GPU_CAPABILITY = (8, 0)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_has_native_bf16(device):
    return torch.cuda.get_device_capability(device) >= BF16_GPU_CAPABILITY


def precision(device, config):
    """What a run on `device` computes in: "bf16" or "fp16" autocast, or "float32". fp16 where the
    config asks for it; bf16 where `config.bf16` says so, and where it says nothing (None), on a GPU
    with native bf16."""
    device = torch.device(device)
    if config.fp16:
        return "fp16"
    bf16 = config.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and gpu_has_native_bf16(device)
    return "bf16" if bf16 else "float32"


def autocast_for(device, config):
    """Autocast in the run's `precision` (BatchNorm and the loss stay float32): bf16 by default on a
    GPU with native bf16; on a CPU only when asked for, for one with bf16 instructions (AVX512-BF16,
    AMX; results/bench.md has an AMD EPYC's figures). bf16 or fp16 asked for where it is emulated
    warns."""
    device = torch.device(device)
    computes_in = precision(device, config)
    dtype = AUTOCAST_DTYPES.get(computes_in)
    if dtype is not None:
        warn_if_emulated(device, computes_in)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def loss_scaler(device, config):
    """With fp16, a GradScaler: float16's narrow range would flush small gradients to zero, so the
    loss is scaled up before backward and the gradients down before the step, and a step whose
    gradients overflowed is skipped (the scale then halves). Otherwise one that does nothing."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=config.fp16)


@functools.cache
def warn_if_emulated(device, computes_in):
    """Once a process, device and precision: bf16 autocast on a GPU older than Ampere, or bf16 or
    fp16 autocast on a CPU without instructions for it (one that lists its flags), runs emulated,
    slower than float32 (on an AVX2 AMD EPYC, res_512_d's step took 10 times as long in fp16, 8 in
    bf16)."""
    if device.type == "cuda":
        if computes_in == "bf16" and not gpu_has_native_bf16(device):
            capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
            print(f"warning: {torch.cuda.get_device_name(device)} (compute capability "
                  f"{capability}) has no native bf16: bf16 autocast runs emulated "
                  f"here, slower than float32; --set fp16=true trains in float16 instead", file=sys.stderr)
        return
    instructions = {"bf16": BF16_INSTRUCTIONS, "fp16": FP16_INSTRUCTIONS}[computes_in]
    flags = cpu_flags(cpu_info())
    if flags and not instructions_among(flags, instructions):
        print(f"warning: this CPU has no {computes_in} instructions ({', '.join(instructions.values())}): "
              f"{computes_in} autocast runs emulated here, many times slower than float32; "
              f"--set {computes_in}=false avoids it", file=sys.stderr)


def prepare(x, config):
    """Images or a model in the memory layout the config asks for: channels-last by default, in
    which cuDNN's convolutions run fastest (oneDNN's on CPUs: faster on two AMD EPYCs, as fast on
    an Intel Xeon, results/bench.md)."""
    if not config.channels_last:
        return x
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)
