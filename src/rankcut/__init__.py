"""rankcut: compress trained PyTorch models with low-rank factorizations.

    import rankcut as rc
    plan = rc.Plan({"layer3.0.conv1": rc.LayerPlan("tucker", (32, 32))})
    small = rc.apply(model, plan)          # a new model; `model` is untouched
    rc.save(small, "out/", plan=plan)      # plan.json + model.safetensors
    small = rc.load(model, "out/")         # rebuilt from the original architecture
    rc.export(small, "small.onnx", example_inputs=x)   # checked with onnxruntime

The decompositions live in :mod:`rankcut.decompose`, the factorized layers in
:mod:`rankcut.layers`.
"""

from . import decompose, layers
from .export import export
from .io import load, load_plan, save
from .plans import LayerPlan, Plan
from .select import plan
from .surgery import apply, target_layers

__version__ = "0.1.0"

__all__ = [
    "LayerPlan",
    "Plan",
    "__version__",
    "apply",
    "decompose",
    "export",
    "layers",
    "load",
    "load_plan",
    "plan",
    "save",
    "target_layers",
]
