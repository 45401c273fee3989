"""Export to other runtimes: `export_gguf` writes a GGUF on llama.cpp's exact grids (RTN, GPTQ
onto the grids, or an artifact's own grid) and checks it in llama.cpp; `export_onnx` writes an ONNX
decoder with a KV cache (fp32 / fp16 / int8 / int4) and checks it in onnxruntime.

    from jisu.export import export_gguf, ExportOptions
    export_gguf("smollm2", "out.gguf", ExportOptions(qtype="Q4_K_M", recipe="gptq"))
"""
from __future__ import annotations

from .onnx_export import OnnxOptions, OnnxResult, export_onnx
from .run import ExportOptions, ExportResult, export_gguf

__all__ = ["export_gguf", "ExportOptions", "ExportResult", "export_onnx", "OnnxOptions", "OnnxResult"]
