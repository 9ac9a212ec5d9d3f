"""``precision: auto``: pick the Trainer precision from what the hardware computes natively.

Machines of one kind differ: some CPUs have native bf16 (avx512_bf16 / AMX), others only AVX2. bf16 autocast is
5-8x faster than float32 on the first kind and about 7x *slower* on the second (SmolLM2-135M, prefill of
8 x 400 tokens on a 2-core AVX2 CPU: 17 s in float32, 120 s under bf16 autocast), so a recipe cannot hard-code
either. The rule:

* CPU: ``"bf16-mixed"`` when oneDNN reports native bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``),
  else ``"32-true"``.
* CUDA GPU: ``"bf16-mixed"`` when ``torch.cuda.is_bf16_supported()``, else ``"16-mixed"`` (float16 autocast
  with a loss scaler).
* anything else (e.g. Apple MPS): ``"32-true"``.

The ``lit-echo`` CLI resolves ``trainer.precision: auto`` with :func:`resolve_precision` before the Trainer is
built and logs the choice and its reason; any other value is used as given.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def accelerator_device_type(accelerator) -> str:
    """The torch device type a Trainer ``accelerator`` setting will use (``"auto"``: CUDA when available)."""
    name = str(accelerator).lower() if isinstance(accelerator, str) else AUTO
    if name in ("gpu", "cuda"):
        return "cuda"
    if name == AUTO:
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    return name


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (``"cpu"``, ``"cuda"``, ...) computes bf16 matmuls natively."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision, device_type: str, bf16_is_native: bool | None = None) -> tuple[object, str]:
    """``(precision, reason)``: ``precision`` unchanged unless it is ``"auto"``, which becomes a Lightning value.

    ``device_type``: ``"cpu"``, ``"cuda"``, ``"mps"`` (see :func:`accelerator_device_type`). ``bf16_is_native``:
    None detects it on this machine (:func:`native_bf16`).
    """
    if precision != AUTO:
        return precision, "as configured"
    native = native_bf16(device_type) if bf16_is_native is None else bf16_is_native
    if native:
        return "bf16-mixed", f"{device_type} computes bf16 natively"
    if device_type == "cuda":
        return "16-mixed", "this GPU has no native bf16; float16 autocast instead"
    if device_type == "cpu":
        return "32-true", ("this CPU has no native bf16 (no avx512_bf16/AMX), where bf16 autocast runs several "
                           "times slower than float32")
    return "32-true", f"no mixed-precision rule for {device_type}"
