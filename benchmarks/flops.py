"""Model FLOPs per token, counted analytically, and GPU peaks, for model FLOPs utilisation (MFU).

Training FLOPs per token follow Kaplan et al. (2020) and PaLM (Chowdhery et al. 2022, appendix
B): 6 per weight of every linear layer (forward 2, backward 4; the output head included, the
embedding lookup not), plus, per softmax-attention layer, 12 * d_model * the mean number of keys a
query attends: causal and within the window, where PaLM counts the full square. Norms, rotary
positions, softmax and the loss are left out, as there. MFU = achieved model FLOP/s over the
device's dense bf16 peak.
"""

from __future__ import annotations

import torch

from memory_models.model import SequenceModelConfig

# Dense bf16 tensor-core peak TFLOP/s by device name, from the vendors' data sheets (SXM parts).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def training_flops_per_token(config: SequenceModelConfig, seq_len: int) -> float | None:
    """For `attention` models on rows of `seq_len` tokens; None for other mechanisms, whose
    memory updates this count does not cover."""
    if config.memory.kind != "attention":
        return None
    model = config.build()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    window = config.memory.memory_size or seq_len
    mean_keys = sum(min(t + 1, window) for t in range(seq_len)) / seq_len
    return 6 * linear + 12 * config.n_layers * config.d_model * mean_keys


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known CUDA device; None on CPU or for an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def device_error(name: str) -> str | None:
    """Why `--device name` cannot run here, or None."""
    if name == "cuda" and not torch.cuda.is_available():
        return (
            f"--device cuda, but torch {torch.__version__} sees no CUDA device here; run on a "
            "GPU machine with a CUDA build of torch, or leave out --device (CPU)"
        )
    return None
