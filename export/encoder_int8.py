"""INT8 encoder for the cpu target: ONNX Runtime's dynamic quantisation of the weight MatMuls.

TinyViT spends about half of its time in MatMuls (the attention and MLP projections); quantising
their weights per output channel to INT8 (activations quantised on the fly) makes the LiteMedSAM
encoder about 1.4x faster on an AVX-512 VNNI CPU. Convolutions, LayerNorms, softmax and the
activation-by-activation MatMuls of attention stay FP32. The quantised file replaces the FP32
one only when its embeddings agree with PyTorch's: cosine similarity over the channels at every
embedding cell, mean >= ``MIN_MEAN_COSINE`` and each >= ``MIN_COSINE``. Triton's onnxruntime
backend on a GPU (TensorRT) has no use for it: the gpu target keeps FP32 / FP16.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellsam_triton.contracts import NAMES
from cellsam_triton.errors import UserError

MIN_MEAN_COSINE = 0.99
MIN_COSINE = 0.9


@dataclass
class QuantReport:
    """How closely the INT8 encoder follows PyTorch's FP32 one on the check inputs."""

    path: Path
    mean_cosine: float
    min_cosine: float
    quantized: int  # MatMuls quantised

    def __str__(self) -> str:
        return (f"{self.path}: INT8 encoder ({self.quantized} weight MatMuls per-channel INT8) vs PyTorch: "
                f"cosine per embedding cell mean {self.mean_cosine:.4f}, min {self.min_cosine:.4f} "
                f"(needs >= {MIN_MEAN_COSINE} and >= {MIN_COSINE})")


def cosine_per_cell(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine similarity over the channel axis (1) of two [B,C,H,W] arrays, one value per cell."""
    have, want = have.astype(np.float64), want.astype(np.float64)
    norms = np.linalg.norm(have, axis=1) * np.linalg.norm(want, axis=1)
    return (have * want).sum(axis=1) / np.maximum(norms, 1e-12)


def weight_matmuls(model) -> list[str]:
    """Names of the MatMul nodes with a constant (weight) input."""
    constants = {i.name for i in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in constants for i in n.input)]


def quantize_encoder(path: Path, inputs: list[np.ndarray], want: list[np.ndarray]) -> QuantReport:
    """Replace the FP32 encoder at ``path`` by its INT8 version if it agrees with ``want`` on ``inputs``."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=path.parent) as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(path), str(prepared))
        nodes = weight_matmuls(onnx.load(str(prepared)))
        quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8, nodes_to_quantize=nodes, per_channel=True,
                         reduce_range=True)  # 7-bit weights: u8s8 kernels without AVX512-VNNI saturate otherwise
        session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
        cosines = np.concatenate([cosine_per_cell(session.run([NAMES.image_embeddings], {NAMES.image: x})[0], y).ravel()
                                  for x, y in zip(inputs, want)])
        report = QuantReport(path, float(cosines.mean()), float(cosines.min()), len(nodes))
        if not (report.mean_cosine >= MIN_MEAN_COSINE and report.min_cosine >= MIN_COSINE):
            raise UserError(f"INT8 encoder disagrees with PyTorch: {report}")
        quantized.replace(path)
    return report
