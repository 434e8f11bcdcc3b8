"""tdlight: extreme compression of BERT-family encoders by shared-factor Tucker decomposition.

Three lines for inference::

    import tdlight
    model = tdlight.load_compressed("outputs/decompose/<run>/model")
    tokenizer = tdlight.load_tokenizer("outputs/decompose/<run>/model")
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_compressed": "tdlight.model.io",
    "save_compressed": "tdlight.model.io",
    "save_model": "tdlight.model.io",
    "load_tokenizer": "tdlight.model.io",
    "export_dense": "tdlight.model.io",
    "export_onnx": "tdlight.model.onnx",
    "record_plan": "tdlight.model.io",
    "compress": "tdlight.model.surgery",
    "densify": "tdlight.model.surgery",
    "load_teacher": "tdlight.model.teacher",
    "CompressionSpec": "tdlight.tensor.spec",
    "decompose": "tdlight.tensor.decompose",
}


def __getattr__(name: str):
    # Lazy so that `import tdlight.tensor` stays plain torch (no transformers import).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tdlight' has no attribute {name!r}")


__all__ = sorted(_LAZY)
