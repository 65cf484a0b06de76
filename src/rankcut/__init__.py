"""rankcut: compress trained PyTorch models with low-rank factorizations.

    import rankcut as rc
    plan = rc.Plan({"layer3.0.conv1": rc.LayerPlan("tucker", (32, 32))})
    small = rc.apply(model, plan)          # a new model; `model` is untouched
    rc.save(small, "out/", plan=plan)      # plan.json + model.safetensors
    small = rc.load(model, "out/")         # rebuilt from the original architecture
    rc.export(small, "small.onnx", example_inputs=x)   # checked with onnxruntime
    result = rc.compress(model, x, target="macs=2x", train_data=train, epochs=1)  # + fine-tuning

The decompositions live in :mod:`rankcut.decompose`, the factorized layers in
:mod:`rankcut.layers`, the registry of methods in :mod:`rankcut.methods`; ``rc.models``,
``rc.data``, ``rc.train``, ``rc.select``, ``rc.report`` and ``rc.profile`` are there after
``import rankcut as rc``, as ``torchvision.models`` is after ``import torchvision``.
"""

from . import (
    curves,
    data,
    decompose,
    defaults,
    layers,
    methods,
    models,
    profile,
    report,
    select,
    train,
)
from .compress import CompressResult, compress, transfer
from .export import export
from .fuse import fuse
from .io import load, load_plan, save
from .plans import LayerPlan, Plan
from .select import plan
from .surgery import apply, target_layers

__version__ = "0.1.0"

__all__ = [
    "CompressResult",
    "LayerPlan",
    "Plan",
    "__version__",
    "apply",
    "compress",
    "curves",
    "data",
    "decompose",
    "defaults",
    "export",
    "fuse",
    "layers",
    "load",
    "load_plan",
    "methods",
    "models",
    "plan",
    "profile",
    "report",
    "save",
    "select",
    "target_layers",
    "train",
    "transfer",
]
