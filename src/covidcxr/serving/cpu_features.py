"""What this CPU can do for int8 inference, and whether an int8 model measured elsewhere still holds here.

ONNX Runtime's fast int8 kernels multiply uint8 activations by int8 weights (U8S8). With VNNI they
accumulate in 32 bits. With AVX2 alone they go through VPMADDUBSW, whose 16-bit intermediate sums
saturate: the saturation issue of ONNX Runtime's and OpenVINO's quantisation docs. A model's int8
accuracy is therefore a property of the CPU it runs on as well as of the model.
"""

from __future__ import annotations

#: x86 instructions that run ONNX Runtime's U8S8 kernels without the 16-bit intermediate saturation of
#: AVX2's VPMADDUBSW. Without them int8 x int8 products can saturate: a quick model that lost 0.0016
#: validation AUC on an AVX-512 VNNI CPU lost 0.11 on an AVX2-only one (bench/results/int8_variants_avx2.json).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_flags() -> list[str]:
    """The int8 dot-product extensions this CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return []
    return [flag for flag in VNNI_FLAGS if flag in words]


def int8_portability_warning(quantization: dict | None, here: list[str]) -> str | None:
    """A warning when an int8 model measured on a CPU with VNNI is run on one without it, else None."""
    if not quantization or quantization.get("weights", "int8") != "int8" or here:
        return None
    measured = (quantization.get("measured_on") or {}).get("cpu_int8_flags")
    if not measured:
        return None
    return (f"this int8 model's validation AUC was measured on a CPU with {', '.join(measured)}; this CPU has none "
            "of them, and its U8S8 kernels can saturate (AUC losses of 0.1 were measured). Re-export it here "
            "(covidcxr export --quantize int8 measures it again) or use the fp32 ONNX model")
