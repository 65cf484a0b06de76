"""Bad input to the Python API (planning, applying, compressing): a clear error naming the bad
input, raised before any work, with the caller's model unchanged. The command line's catalogue
is tests/test_bad_inputs_cli.py."""

import warnings

import pytest
import torch
from torch import nn

import rankcut as rc


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(x.flatten(1))


class Net2(Net):
    """Net with layer ``conv`` narrower: the same names, other shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)


X = torch.rand(2, 3, 8, 8)
FAST = {"allow_slower": True}
LABELLED = (X, torch.zeros(2, dtype=torch.long))


def fresh():
    torch.manual_seed(0)
    return Net().eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    """Every tensor bitwise as it was (NaN where it was NaN: a poisoned weight stays so)."""
    after = model.state_dict()

    def same(a, b) -> bool:
        return a.shape == b.shape and a.dtype == b.dtype and bool(
            ((a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point()
             else a == b).all())

    return after.keys() == before.keys() and all(same(after[k], v) for k, v in before.items())


def poisoned(value=float("nan")):
    model = fresh()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = value
    return model


PLAN_CASES = [
    # (id, model factory, call(model), exception, message pattern)
    ("example_inputs None", fresh, lambda m: rc.plan(m, None, target="macs=2x", **FAST),
     ValueError, "example_inputs must be a tensor"),
    ("example_inputs a number", fresh, lambda m: rc.plan(m, 3.0, target="macs=2x", **FAST),
     ValueError, "example_inputs must be a tensor"),
    ("example_inputs empty tuple", fresh, lambda m: rc.plan(m, (), target="macs=2x", **FAST),
     ValueError, "example_inputs must be a tensor"),
    ("model not a module", fresh, lambda m: rc.plan("resnet20", X, target="macs=2x"),
     ValueError, "model: expected an nn.Module"),
    ("unknown method", fresh, lambda m: rc.plan(m, X, method="qr", target="macs=2x"),
     ValueError, "method: expected one of auto, svd, cur"),
    ("no rank and no target", fresh, lambda m: rc.plan(m, X), ValueError, "rank, target"),
    ("target 1x", fresh, lambda m: rc.plan(m, X, target="macs=1x"), ValueError,
     "target: expected .*got 'macs=1x'"),
    ("target garbage", fresh, lambda m: rc.plan(m, X, target="speed=2x"), ValueError,
     "target: expected .*got 'speed=2x'"),
    ("target fraction above 1", fresh, lambda m: rc.plan(m, X, target="params=1.5"),
     ValueError, "target: expected .*got 'params=1.5'"),
    ("rank rule garbage", fresh, lambda m: rc.plan(m, X, rank="lots"), ValueError,
     "rank: expected an int >= 1.*got 'lots'"),
    ("rank 0", fresh, lambda m: rc.plan(m, X, rank=0), ValueError,
     "rank: expected an int >= 1.*got 0$"),
    ("rank_multiple 0", fresh, lambda m: rc.plan(m, X, target="macs=2x", rank_multiple=0),
     ValueError, "rank_multiple"),
    ("include matches nothing", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", include=["layer9.*"], **FAST), ValueError,
     "include: 'layer9.*' matches no Conv2d or Linear layer"),
    ("exclude matches nothing", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", exclude=["nope"], **FAST), ValueError,
     "exclude: 'nope' matches no Conv2d or Linear layer"),
    ("include type absent", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", include=[nn.Conv1d], **FAST), ValueError,
     "include: 'Conv1d' matches no"),
    ("include not a pattern", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", include=[3], **FAST), ValueError, "include:"),
    ("NaN weight", poisoned, lambda m: rc.plan(m, X, target="macs=2x", **FAST), ValueError,
     "layer 'conv': its weight has 1 non-finite value"),
    ("infinite weight", lambda: poisoned(float("inf")),
     lambda m: rc.plan(m, X, rank=4, **FAST), ValueError, "layer 'conv': .*non-finite"),
    ("NaN calibration data", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", calib_data=[torch.full((4, 3, 8, 8), 1.0),
                                                           torch.full((4, 3, 8, 8), 1e400)],
                       **FAST), ValueError, "calib_data: batch 1 has NaN or infinite inputs"),
    ("calibration data not batches", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", calib_data=5, **FAST), ValueError,
     "calib_data: expected batches"),
    ("calibration data a generator", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", calib_data=(torch.rand(4, 3, 8, 8)
                                                           for _ in range(2)), **FAST),
     ValueError, "calib_data: a one-shot iterator \\(generator\\) is read more than once"),
    ("calibration batches of strings", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", calib_data=["a", "b"], **FAST), ValueError,
     "calib_data: expected batches"),
    ("empty calibration data", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", calib_data=[], **FAST), ValueError,
     "never ran"),
    ("raw uint8 images as calibration data", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", calib_data=torch.zeros(4, 3, 8, 8,
                                                                      dtype=torch.uint8),
                       **FAST), ValueError, "calib_data: batch 0's inputs are uint8"),
    ("calibration inputs and targets of unequal lengths", fresh,
     lambda m: rc.plan(m, X, target="macs=2x",
                       calib_data=(torch.rand(4, 3, 8, 8), torch.zeros(2, dtype=torch.long)),
                       **FAST), ValueError, "calib_data: 4 inputs but 2 targets"),
    ("empty calibration tensor", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", calib_data=torch.empty(0, 3, 8, 8), **FAST),
     ValueError, "calib_data: batch 0 is empty"),
    ("target with nothing to factorize", lambda: nn.Sequential(nn.Conv1d(4, 8, 3),
                                                               nn.Conv1d(8, 8, 3)),
     lambda m: rc.plan(m, torch.rand(1, 4, 16), target="macs=2x", **FAST), ValueError,
     "target: nothing to factorize: the model has no Conv2d or Linear layer"),
    ("target when every layer is excluded", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", exclude=["*"], **FAST), ValueError,
     "target: nothing to factorize: every Conv2d/Linear layer is skipped"),
    ("unknown solver option", fresh,
     lambda m: rc.plan(m, X, method="cp", rank=4, options={"cp": {"max_iterr": 3}}, **FAST),
     ValueError, r"options: cp: options .*max_iterr"),
    ("options keyed by a non-method", fresh,
     lambda m: rc.plan(m, X, method="cp", rank=4, options={"max_iter": 3}, **FAST),
     ValueError, "options: 'max_iter' is not a method"),
    ("options not a dict", fresh,
     lambda m: rc.plan(m, X, method="cp", rank=4, options=[("cp", {})], **FAST),
     ValueError, "options: expected a dict of solver options per method"),
    # the model's own forward failing on the example inputs: named, not torch's shape error
    ("example_inputs of another image size", fresh,
     lambda m: rc.plan(m, torch.rand(2, 3, 16, 16), target="macs=2x", **FAST), ValueError,
     r"example_inputs: the model's forward pass fails on them \(\(2, 3, 16, 16\) float32\): "
     "RuntimeError"),
    ("integer example_inputs for a float model", fresh,
     lambda m: rc.plan(m, torch.zeros(2, 3, 8, 8, dtype=torch.long), rank=4, **FAST),
     ValueError, r"example_inputs: .*\(2, 3, 8, 8\) int64"),
    ("an empty batch of example_inputs", fresh,
     lambda m: rc.plan(m, torch.rand(0, 3, 8, 8), target="macs=2x", **FAST), ValueError,
     r"example_inputs: an empty batch \(shape \(0, 3, 8, 8\)\)"),
    ("float64 calibration batches for a float32 model", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", calib_data=[torch.rand(4, 3, 8, 8,
                                                                      dtype=torch.float64)],
                       **FAST), ValueError, r"calib_data: the model's forward pass fails"),
    ("min_params as text", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", min_params="1000", **FAST), ValueError,
     "min_params: expected a number >= 0, got '1000'"),
    ("min_params NaN", fresh,
     lambda m: rc.plan(m, X, target="macs=2x", min_params=float("nan"), **FAST), ValueError,
     "min_params: expected a number >= 0"),
    # a bare layer was planned as layer "" and "replaced" by a child its forward never called
    ("model a bare Linear", lambda: nn.Linear(64, 10),
     lambda m: rc.plan(m, torch.rand(1, 64), rank=4, min_params=0, **FAST), ValueError,
     r"model: a bare Linear; .* pass nn.Sequential\(layer\)"),
    ("model a bare Conv2d", lambda: nn.Conv2d(16, 32, 3),
     lambda m: rc.plan(m, torch.rand(1, 16, 8, 8), target="macs=2x", **FAST), ValueError,
     "model: a bare Conv2d"),
]

APPLY_CASES = [
    ("plan not a Plan", fresh, lambda m: rc.apply(m, {"conv": "svd"}), ValueError,
     "plan: expected a rankcut.Plan"),
    ("plan for the model itself", lambda: nn.Linear(64, 10),
     lambda m: rc.apply(m, rc.Plan({"": rc.LayerPlan("svd", 4)})), ValueError,
     "model: a bare Linear"),
    ("layer not in the model", fresh,
     lambda m: rc.apply(m, rc.Plan({"conv9": rc.LayerPlan("svd", 4)})), ValueError,
     "plan layer 'conv9': the model has no such module"),
    ("method does not apply", fresh,
     lambda m: rc.apply(m, rc.Plan({"head": rc.LayerPlan("tucker", (4, 4))})), ValueError,
     "plan layer 'head': method 'tucker' does not apply to Linear"),
    ("planned for another type", fresh,
     lambda m: rc.apply(m, rc.Plan({"conv": rc.LayerPlan("svd", 4, module_type="Linear")})),
     ValueError, "plan layer 'conv': planned for a Linear"),
    ("solver option misnamed method", fresh,
     lambda m: rc.apply(m, rc.Plan({"conv": rc.LayerPlan("cp", 4, options={"method": "als"})})),
     ValueError, "chosen with 'solver'"),
    ("unknown solver", fresh,
     lambda m: rc.apply(m, rc.Plan({"conv": rc.LayerPlan("cp", 4, options={"solver": "sgd"})})),
     ValueError, "plan layer 'conv': solver: expected one of 'als'"),
    ("solver option the solver lacks", fresh,
     lambda m: rc.apply(m, rc.Plan({"conv": rc.LayerPlan("svd", 4, options={"max_iter": 3})})),
     ValueError, "plan layer 'conv': options .* do not fit rankcut.decompose.svd"),
    ("data_aware for spatial SVD", fresh,
     lambda m: rc.apply(m, rc.Plan({"conv": rc.LayerPlan("spatial_svd", 4,
                                                         options={"data_aware": True})}),
                        calib_data=[X]), ValueError,
     "data_aware is implemented for methods 'svd', 'cur', 'cp', 'tucker' only"),
    ("data_aware without calibration data", fresh,
     lambda m: rc.apply(m, rc.Plan({"conv": rc.LayerPlan("svd", 4,
                                                         options={"data_aware": True})})),
     ValueError, "calib_data: the plan asks for data-aware"),
    ("NaN weight", poisoned, lambda m: rc.apply(m, rc.Plan({"conv": rc.LayerPlan("svd", 4)})),
     ValueError, "layer 'conv': its weight has 1 non-finite value"),
    ("form for svd", fresh, lambda m: rc.LayerPlan("svd", 4, form="cp3"), ValueError,
     "form: only method.s. 'cp' take a form"),
    ("form conflicts with the alias", fresh, lambda m: rc.LayerPlan("cp3", 4, form="cp4"),
     ValueError, "form: 'cp3' is the form"),
    ("plan layer written as a string", fresh,
     lambda m: rc.Plan.from_dict({**rc.Plan({}).to_dict(), "layers": {"conv": "svd"}}),
     ValueError, "plan layer 'conv': layer plan: expected a mapping of method, ranks"),
    ("ranks as a float", fresh, lambda m: rc.LayerPlan("svd", 2.5), ValueError, "ranks:"),
    ("a plan entry set as its JSON form", fresh,
     lambda m: rc.Plan().__setitem__("conv", {"method": "svd", "ranks": [4]}), ValueError,
     r"plan\['conv'\]: expected a LayerPlan .*got dict"),
    ("a plan entry named by a number", fresh,
     lambda m: rc.Plan({3: rc.LayerPlan("svd", 4)}), ValueError,
     "plan: a layer's name must be a string"),
    ("a plan made for another model's layer of that name", fresh,
     lambda m: rc.apply(m, rc.Plan({"conv": rc.plan(Net2(), X, method="svd", rank=4,
                                                    **FAST)["conv"]})), ValueError,
     r"plan layer 'conv': planned for a weight of shape \[8, 16, 3, 3\], the model's is "
     r"\[32, 16, 3, 3\]"),
    ("a weight shape that is no shape", fresh,
     lambda m: rc.LayerPlan("svd", 4, predicted={"weight_shape": "32x16"}), ValueError,
     "predicted: weight_shape: expected a list of sizes"),
    ("a plan naming a module held at two paths", lambda: nn.Sequential(
        *(lambda c: [c, nn.ReLU(), c])(nn.Conv2d(16, 16, 3, padding=1))),
     lambda m: rc.apply(m, rc.Plan({"2": rc.LayerPlan("svd", 4)})), ValueError,
     "plan layer '2': cannot factorize: the same module is also at 0"),
    ("a plan naming a layer with tied weights", lambda: (lambda s: (
        setattr(s[2], "weight", s[0].weight), s)[1])(
        nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))),
     lambda m: rc.apply(m, rc.Plan({"0": rc.LayerPlan("svd", 4)})), ValueError,
     r"plan layer '0': cannot factorize: its parameters are shared with 2 \(tied weights\)"),
    ("ranks as a bool", fresh, lambda m: rc.LayerPlan("svd", (True,)), ValueError, "ranks:"),
    ("options not a mapping", fresh, lambda m: rc.LayerPlan("svd", 4, options=["x"]),
     ValueError, "options: expected a mapping"),
]

COMPRESS_CASES = [
    ("distill as the text 'no'", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", distill="no"), ValueError,
     "distill: expected True, False or None, got 'no'"),
    ("sequential as 1", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", sequential=1), ValueError,
     "sequential: expected True, False or None"),
    ("a transform that is a name", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", transform="normalize"), ValueError,
     "transform: expected a callable"),
    ("transfer given its own freeze", fresh,
     lambda m: rc.transfer(m, LABELLED, 3, epochs=1, freeze=["stem"]), ValueError,
     "freeze: transfer trains the new head alone"),
    ("finetune_options typo", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", finetune_options={"lrr": 0.1}), ValueError,
     r"finetune_options: unknown keys \['lrr'\]"),
    ("finetune_options sets what compress sets", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", finetune_options={"epochs": 2}),
     ValueError, "epochs: pass to rankcut.compress itself"),
    ("old schedule name for the lr schedule", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", finetune_options={"schedule": "constant"}),
     ValueError, r"finetune_options: unknown keys \['schedule'\]"),
    ("plan_options typo", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", plan_options={"allow_slowr": True}),
     ValueError, r"plan_options: unknown keys \['allow_slowr'\]"),
    ("plan_options not a dict", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", plan_options=["allow_slower"]), ValueError,
     "plan_options: expected a dict"),
    ("a plan and a target", fresh,
     lambda m: rc.compress(m, X, target="macs=3x",
                           plan=rc.Plan({"conv": rc.LayerPlan("svd", 4)})), ValueError,
     "plan: a ready plan cannot be combined with rank= or target="),
    ("unknown schedule", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", schedule="twice"), ValueError,
     "schedule: expected one of one_shot"),
    ("rounds 0", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", schedule="multistage", rounds=0),
     ValueError, "rounds"),
    ("plan given as a file name", fresh,
     lambda m: rc.compress(m, X, plan="out/plan.json", schedule="layerwise"), ValueError,
     "plan: expected a rankcut.Plan .*got str"),
    ("min_accuracy as text", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", schedule="multistage", min_accuracy="90",
                           val_data=(X, torch.zeros(2, dtype=torch.long))), ValueError,
     "min_accuracy: expected top-1 in percent"),
    ("min_accuracy as a fraction", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", schedule="multistage", min_accuracy=0.9,
                           val_data=(X, torch.zeros(2, dtype=torch.long))), ValueError,
     r"min_accuracy: expected top-1 in percent.*\(e.g. 90 for 90%\), got 0.9"),
    ("min_accuracy NaN", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", schedule="multistage",
                           min_accuracy=float("nan"),
                           val_data=(X, torch.zeros(2, dtype=torch.long))), ValueError,
     "min_accuracy: expected top-1 in percent"),
    ("val_data a bare tensor", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", val_data=X, plan_options=FAST), ValueError,
     "val_data:"),
    ("min_accuracy without val_data", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", min_accuracy=90.0), ValueError,
     "min_accuracy: needs val_data"),
    ("model not a module", fresh, lambda m: rc.compress(None, X, target="macs=2x"),
     ValueError, "model: expected an nn.Module"),
    ("nothing to factorize", lambda: nn.Sequential(nn.Conv1d(4, 8, 3)),
     lambda m: rc.compress(m, torch.rand(1, 4, 16), target="macs=2x", plan_options=FAST),
     ValueError, "target: nothing to factorize"),
    ("epochs without train_data", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", epochs=1, plan_options=FAST), ValueError,
     "epochs: fine-tuning needs train_data"),
    ("steps_per_layer without train_data", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", schedule="layerwise", steps_per_layer=3,
                           plan_options=FAST), ValueError,
     "steps_per_layer: fine-tuning needs train_data"),
    ("epochs 0", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", epochs=0, train_data=LABELLED,
                           plan_options=FAST), ValueError, "epochs: expected an int >= 1, got 0"),
    ("steps not an int", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", steps=2.5, train_data=LABELLED,
                           plan_options=FAST), ValueError, "steps: expected an int >= 1"),
    ("epochs and steps", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", epochs=1, steps=3, train_data=LABELLED,
                           plan_options=FAST), ValueError, "give epochs or steps, not both"),
    ("steps_per_layer 0", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", schedule="layerwise", steps_per_layer=0,
                           train_data=LABELLED, plan_options=FAST), ValueError,
     "steps_per_layer: expected an int >= 1, got 0"),
    ("resume without a checkpoint_dir", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", epochs=1, train_data=LABELLED,
                           finetune_options={"resume": True}, plan_options=FAST), ValueError,
     "finetune_options: resume=True needs checkpoint_dir"),
    ("sequential with layerwise", fresh,
     lambda m: rc.compress(m, X, target="macs=2x", schedule="layerwise", sequential=False,
                           plan_options=FAST), ValueError, "sequential: schedule 'layerwise'"),
    ("transfer head empty", fresh,
     lambda m: rc.transfer(m, LABELLED, 3, head=""), ValueError,
     "head: expected the name of a module"),
    ("transfer of a model name", fresh,
     lambda m: rc.transfer("resnet20_cifar", (X, torch.zeros(2, dtype=torch.long)), 3),
     ValueError, "model: expected an nn.Module"),
    ("export of a model name", fresh,
     lambda m: rc.export("resnet20_cifar", "m.onnx", example_inputs=X), ValueError,
     "model: expected an nn.Module"),
    ("export with no example inputs", fresh, lambda m: rc.export(m, "m.onnx", example_inputs=()),
     ValueError, r"example_inputs: .*required with format='onnx'\), got \(\)"),
    ("export inputs of the wrong shape", fresh,
     lambda m: rc.export(m, "m.pt", format="torchscript", example_inputs=torch.rand(2, 5, 8, 8),
                         fuse=False), ValueError,
     r"example_inputs: the model's forward pass fails on them \(\(2, 5, 8, 8\) float32\)"),
    ("export check None", fresh,
     lambda m: rc.export(m, "m.onnx", example_inputs=X, check=None), ValueError,
     "check: expected True or False, got None"),
    ("fuse inputs of the wrong shape", fresh,
     lambda m: rc.fuse(m, torch.rand(2, 5, 8, 8), memory_format="channels_last"), ValueError,
     r"example_inputs: the model's forward pass fails on them"),
    ("export atol as text", fresh,
     lambda m: rc.export(m, "m.onnx", example_inputs=X, atol="0.1"), ValueError,
     "atol: expected a number >= 0, got '0.1'"),
    ("transfer to 0 classes", fresh,
     lambda m: rc.transfer(m, (X, torch.zeros(2, dtype=torch.long)), 0), ValueError,
     "num_classes"),
]


def _calib():
    return [(X, torch.zeros(2, dtype=torch.long))]


def _within_reuse(max_entries):
    with rc.decompose.reuse_svds(max_entries=max_entries):
        pass


# the library's other public helpers: refused before their work (the sensitivity pass, the
# timing), with a ValueError naming the argument instead of an AttributeError or IndexError
def _labelled(y=None, x=None):
    return (X if x is None else x, torch.zeros(2, dtype=torch.long) if y is None else y)


def _report(**changes):
    good = {"schema": "rankcut.report", "version": 1,
            "totals": {"params": [10, 5], "macs": [10, 5], "model_bytes": [40, 20]}}
    return {k: v for k, v in {**good, **changes}.items() if v is not ...}


def _finetune(m, data=None, **kw):
    from rankcut.train import finetune

    return finetune(m, _labelled() if data is None else data,
                    **{"steps": 1, "batch_size": 2, "progress": False, **kw})


def _evaluate(m, data=None, **kw):
    from rankcut.train import evaluate

    return evaluate(m, _labelled() if data is None else data, **kw)


UINT8 = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)

_DENSE = rc.curves.Candidate("dense", (), None, 10, 10, 0.0)

HELPER_CASES = [
    # training and evaluation (rankcut.train)
    ("evaluating raw uint8 images", fresh, lambda m: _evaluate(m, _labelled(x=UINT8)),
     ValueError, r"data: the model's forward pass fails on them \(\(2, 3, 8, 8\) uint8\).*"
                 "integer inputs"),
    ("fine-tuning on raw uint8 images", fresh, lambda m: _finetune(m, _labelled(x=UINT8)),
     ValueError, r"train_data: the model's forward pass fails on them .*uint8"),
    ("evaluating a result object", fresh,
     lambda m: _evaluate(object()), ValueError,
     "model: expected an nn.Module, got object"),
    ("fine-tuning a result object", fresh, lambda m: _finetune(object()), ValueError,
     "model: expected an nn.Module"),
    ("a teacher that is no module", fresh, lambda m: _finetune(m, teacher="resnet56"),
     ValueError, "teacher: expected an nn.Module"),
    ("labels as an (N, 1) column", fresh,
     lambda m: _evaluate(m, _labelled(torch.zeros(2, 1, dtype=torch.long))), ValueError,
     r"data: expected one class index per input, targets of shape \(2,\), got shape "
     r"\(2, 1\)"),
    ("one-hot labels", fresh,
     lambda m: _finetune(m, _labelled(torch.eye(10)[[0, 1]])), ValueError,
     r"train_data: expected one class index per input.*got shape \(2, 10\)"),
    ("soft labels", fresh, lambda m: _evaluate(m, _labelled(torch.tensor([0.5, 1.0]))),
     ValueError, "labels: expected class indices, got fractional values"),
    ("evaluating on a device the model is not on", fresh,
     lambda m: _evaluate(m, device="cuda"), ValueError,
     "device: the model is on cpu, not cuda; move it there first"),
    ("fine-tuning on a device that does not exist", fresh,
     lambda m: _finetune(m, device="gpu"), ValueError, "device: expected cpu, cuda"),
    ("a loader's batch size given again", fresh,
     lambda m: _finetune(m, torch.utils.data.DataLoader(
         torch.utils.data.TensorDataset(*_labelled()), batch_size=2), batch_size=32),
     ValueError, "batch_size: train_data is a DataLoader, which batches itself"),
    ("empty val_data", fresh,
     lambda m: _finetune(m, val_data=(torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))),
     ValueError, "val_data: no samples to evaluate on"),
    # reports read back (rankcut.report)
    ("a report without totals", fresh,
     lambda m: rc.report.Report.from_dict(_report(totals=...)), ValueError,
     "report: field 'totals': expected a JSON object, got nothing"),
    ("a report's totals without the file size", fresh,
     lambda m: rc.report.Report.from_dict(_report(totals={"params": [1, 1], "macs": [1, 1]})),
     ValueError, r"report: totals\['model_bytes'\]: expected \[before, after\] numbers"),
    ("a report whose plan is text", fresh,
     lambda m: rc.report.Report.from_dict(_report(plan="x")), ValueError,
     "report: field 'plan': expected a JSON object or null"),
    ("a report whose meta is an array", fresh,
     lambda m: rc.report.Report.from_dict(_report(meta=[1])), ValueError,
     "report: field 'meta': expected a JSON object, got list"),
    ("an analysis without rules", fresh,
     lambda m: rc.report.Analysis.from_dict(
         {"schema": "rankcut.analysis", "version": 1, "methods": [],
          "totals": {"params": 1, "macs": 1, "model_bytes": 1}}), ValueError,
     "analysis: field 'rules': expected a JSON array, got nothing"),
    ("analyze with labels beyond the outputs", fresh,
     lambda m: rc.report.analyze(m, X, calib_data=[_labelled(torch.tensor([57, 1]))],
                                 latency=False), ValueError,
     "labels: the data has class 57 but the model has 10 outputs"),
    ("synthetic calibration from one example", lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval(),
     lambda m: rc.data.synthetic_calibration(m, X[0], n=4, steps=1, progress=False),
     ValueError, r"example_inputs: the model's forward pass fails on them \(\(2, 8, 8\) "
                 r"float32\)"),
    ("timing a model name", fresh, lambda m: rc.profile.measure_latency("resnet20", X),
     ValueError, "model: expected an nn.Module"),
    ("comparing against a model name", fresh,
     lambda m: rc.profile.compare_latency(m, "small", X), ValueError,
     "second: expected an nn.Module"),
    ("comparing on second inputs the second model cannot take", fresh,
     lambda m: rc.profile.compare_latency(m, fresh(), X, second_inputs=torch.rand(2, 5, 8, 8),
                                          warmup=0, repeats=1), ValueError,
     r"second_inputs: the model's forward pass fails on them \(\(2, 5, 8, 8\) float32\)"),
    ("page faults as Latency objects", fresh,
     lambda m: rc.profile.allocator_advice(rc.profile.measure_latency(m, X, repeats=1), 5.0),
     ValueError, r"original_faults: expected a count of page faults >= 0 or None, got Latency"),
    ("page faults negative", fresh, lambda m: rc.profile.allocator_advice(5.0, -1),
     ValueError, r"compressed_faults: expected a count of page faults >= 0 or None, got -1"),
    ("page faults NaN", fresh, lambda m: rc.profile.allocator_advice(float("nan"), 5),
     ValueError, r"original_faults: expected a count of page faults >= 0 or None, got nan"),
    ("repeats as a float", fresh, lambda m: rc.profile.measure_latency(m, X, repeats=1e3),
     ValueError, "warmup, repeats: expected ints >= 0 and >= 1, got 10, 1000.0"),
    ("repeats as text", fresh, lambda m: rc.profile.measure_latency(m, X, repeats="50"),
     ValueError, "warmup, repeats: expected ints"),
    ("profile batches None", fresh, lambda m: rc.profile.profile(m, X, batches=None),
     ValueError, "batches: expected an int or a sequence of ints"),
    ("timing on inputs the model cannot take", fresh,
     lambda m: rc.profile.measure_latency(m, torch.rand(2, 3, 16, 16), warmup=0, repeats=1),
     ValueError, r"example_inputs: the model's forward pass fails on them"),
    ("fusing on inputs the model cannot take", fresh,
     lambda m: rc.fuse(m, torch.rand(2, 3, 16, 16), memory_format="auto"), ValueError,
     r"example_inputs: the model's forward pass fails on them"),
    ("sensitivity of a layer the model lacks", fresh,
     lambda m: rc.select.sensitivity_plan(m, ["nope"], _calib(), total=5), ValueError,
     "names: the model has no module 'nope'"),
    ("sensitivity of a ReLU", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
     lambda m: rc.select.sensitivity_plan(m, ["1"], _calib(), total=5), ValueError,
     "names: '1' is a ReLU"),
    ("sensitivity total below the layers", fresh,
     lambda m: rc.select.sensitivity_plan(m, ["stem", "conv"], _calib(), total=1), ValueError,
     "total: expected an int >= the number of layers"),
    ("sensitivity lam 2", fresh,
     lambda m: rc.select.sensitivity_plan(m, ["conv"], _calib(), total=5, lam=2), ValueError,
     r"lam: expected a number in \[0, 1\]"),
    ("sensitivity MACs target", fresh,
     lambda m: rc.select.sensitivity_plan(m, ["conv"], _calib(), target="macs=2x"),
     ValueError, "target: sensitivity ranks take a params target"),
    ("NaN sensitivity loss", fresh,
     lambda m: rc.select.allocate_ranks([float("nan"), 1.0], [1, 1], 4), ValueError,
     "losses, sizes: expected finite"),
    ("compare with data of the wrong type", fresh,
     lambda m: rc.report.compare(m, m, X, data="cifar10", latency=False), ValueError,
     "data: expected a torch Dataset"),
    ("analyze NaN weights", poisoned, lambda m: rc.report.analyze(m, X, latency=False),
     ValueError, "layer 'conv': its weight has 1 non-finite"),
    ("calibration from unlabelled examples", fresh,
     lambda m: rc.data.calibration(torch.utils.data.TensorDataset(torch.rand(4, 3))),
     ValueError, r"ds: expected \(input, class label\) examples"),
    ("dataset None", fresh, lambda m: rc.data.dataset(None), ValueError,
     "name: expected a dataset name"),
    ("rank rule of a ReLU", fresh, lambda m: rc.select.layer_ranks(nn.ReLU(), "svd", "params=0.5"),
     ValueError, "module: expected a Conv2d or Linear"),
    ("input_hw a number", fresh,
     lambda m: rc.select.layer_ranks(m.conv, "svd", "macs=0.5", input_hw=8), ValueError,
     r"input_hw: expected \(H, W\)"),
    ("input_hw with a bool", fresh,  # (True would have read as a height of 1)
     lambda m: rc.select.layer_ranks(m.conv, "svd", "macs=0.5", input_hw=(True, 8)), ValueError,
     r"input_hw: expected \(H, W\)"),
    ("a trial rank of ()", fresh,
     lambda m: rc.select.layer_sensitivities(m, ["conv"], [LABELLED], trial_rank=()),
     ValueError, "trial_rank: expected an int >= 1"),
    ("allocate over a layer without candidates", fresh,
     lambda m: rc.select.allocate({"a": []}, "params", 10), ValueError,
     "frontiers: layer 'a' has no candidate"),
    ("allocate in a misspelt kind", fresh,
     lambda m: rc.select.allocate({"a": [_DENSE]}, "Params", 10), ValueError,
     "kind: expected one of params, macs, latency, got 'Params'"),
    ("allocate within a NaN budget", fresh,
     lambda m: rc.select.allocate({"a": [_DENSE]}, "params", float("nan")), ValueError,
     "budget: expected a finite number"),
    ("allocate_ranks without a total", fresh,
     lambda m: rc.select.allocate_ranks([1.0, 2.0], [3, 4], None), ValueError,
     r"total: expected an int >= the number of layers \(2\), got None"),
    ("a trial rank of 2.5", fresh,
     lambda m: rc.select.layer_sensitivities(m, ["conv"], [LABELLED], trial_rank=2.5),
     ValueError, "trial_rank: expected an int >= 1"),
    ("the cost at an input size of 8", fresh,
     lambda m: rc.layers.layer_cost(m.conv, input_hw=8), ValueError,
     r"input_hw: expected \(H, W\) of the input, got 8"),
    ("the cost of a config without its rank", fresh,
     lambda m: rc.layers.layer_cost(m.conv, {"layer": "SVDConv2d"}, input_hw=(8, 8)),
     ValueError, "config: expected rank, whole numbers >= 1"),
    ("the cost of a negative rank", fresh,
     lambda m: rc.layers.layer_cost(m.head, {"layer": "LowRankLinear", "rank": -4}),
     ValueError, "config: expected rank"),
    ("the cost of a Tucker config with one rank", fresh,
     lambda m: rc.layers.layer_cost(m.conv, {"layer": "TuckerConv2d", "ranks": [4]},
                                    input_hw=(8, 8)),
     ValueError, r"config: expected ranks \(R_out, R_in\)"),
    ("a latency table on a 'gpu'", fresh, lambda m: rc.select.LatencyTable("gpu"), ValueError,
     "device: expected cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("reuse_svds keeping -1", fresh, lambda m: _within_reuse(-1), ValueError, "max_entries"),
    ("truncation errors of nothing", fresh, lambda m: rc.decompose.truncation_errors([]),
     ValueError, "mats: expected a non-empty list"),
    ("energy rank of a list", fresh, lambda m: rc.decompose.energy_rank([3.0, 2.0], 0.9),
     ValueError, "singular_values: expected a 1-D tensor"),
    ("energy 95 for 95%", fresh, lambda m: rc.decompose.energy_rank(torch.ones(3), 95),
     ValueError, r"energy: expected a fraction in \(0, 1\]"),
    ("Tucker modes as text", fresh,
     lambda m: rc.decompose.tucker(torch.rand(4, 4, 3), 2, modes="01"), ValueError,
     "modes: expected a sequence of mode indices"),
]


FINETUNE_CASES = ("epochs 0", "steps not an int", "epochs and steps", "steps_per_layer 0",
                  "resume without a checkpoint_dir")


@pytest.mark.parametrize("name", FINETUNE_CASES)
def test_bad_fine_tuning_arguments_are_refused_before_planning(name, monkeypatch):
    """compress refuses them before planning and fitting (minutes to hours), not when
    finetune starts."""
    import importlib

    compress_module = importlib.import_module("rankcut.compress")  # (rc.compress: the function)

    def planned(*args, **kwargs):
        raise AssertionError("planned before the arguments were checked")

    monkeypatch.setattr(compress_module, "_Job", planned)  # (what plans, fits and tunes)
    _, factory, call, error, match = next(c for c in COMPRESS_CASES if c[0] == name)
    with pytest.raises(error, match=match):
        call(factory())


def test_a_params_rank_rule_needs_no_input_size():
    conv = nn.Conv2d(16, 32, 3)
    (rank,) = rc.select.layer_ranks(conv, "svd", "params=0.25")
    assert 1 <= rank and rank * (16 * 9 + 32) <= 0.25 * 32 * 16 * 9 + 32
    assert rc.select.layer_ranks(conv, "svd", "params=0.25", input_hw=(8, 8)) == (rank,)


ALL_CASES = PLAN_CASES + APPLY_CASES + COMPRESS_CASES + HELPER_CASES


@pytest.mark.parametrize("factory, call, error, match", [c[1:] for c in ALL_CASES],
                         ids=[c[0] for c in ALL_CASES])
def test_bad_api_input_is_a_clear_error_and_changes_nothing(factory, call, error, match):
    model = factory()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            call(model)
    assert unchanged(model, before)


def test_cp_rank_far_above_break_even_neither_hangs_nor_grows_the_model():
    model = fresh()
    with pytest.warns(UserWarning, match="no layer's factorization is smaller"):
        plan = rc.plan(model, X, method="cp", rank=5000, **FAST)
    assert not plan.active
    assert "smaller than the dense layer" in plan["conv"].reason
    with pytest.warns(UserWarning, match="clamped to"):
        small = rc.apply(model, rc.Plan({"conv": rc.LayerPlan("cp", 2000)}))
    assert sum(p.numel() for p in small.conv.parameters()) <= model.conv.weight.numel() + 32


def test_svd_rank_above_full_rank_keeps_layers_dense_with_a_warning():
    model = fresh()
    with pytest.warns(UserWarning, match="at the ranks of 10000"):
        plan = rc.plan(model, X, method="svd", rank=10000, **FAST)
    assert not plan.active
    small = rc.apply(model, plan)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in
                                                             model.parameters())


def test_a_rank_rule_whose_every_layer_is_vetoed_as_slower_says_so(fake_latency):
    fake_latency(lambda module: 9.0)  # every primitive alike: a factorized layer is slower
    with pytest.warns(UserWarning, match="measured slower than its dense layer on this device "
                                         r"\(pass allow_slower=True"):
        plan = rc.plan(fresh(), X, method="svd", rank=2)
    assert not plan.active


def test_labels_beyond_the_models_outputs_are_named_not_an_index_error():
    """A model built for fewer classes than the data has: evaluation and fine-tuning say so
    (cross-entropy would raise an IndexError on the CPU, a device-side assert on CUDA)."""
    from rankcut.train import evaluate, finetune

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    data = (torch.rand(8, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0, 1, 0, 1]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="the data has class 2 but the model has 2 outputs"):
        evaluate(model, data)
    with pytest.raises(ValueError, match="the data has class 2 but the model has 2 outputs"):
        finetune(model, data, steps=1, batch_size=8, progress=False)
    assert unchanged(model, before)
    evaluate(model, (data[0], data[1].clamp(max=1)))  # labels that fit are fine
    # a bad label in a later batch than the first: on the CPU every batch is checked
    later = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.rand(16, 3, 8, 8), torch.tensor([0, 1] * 4 + [0, 1, 1, 0, 2, 0, 1, 0])),
        batch_size=8, shuffle=False)
    with pytest.raises(ValueError, match="the data has class 2 but the model has 2 outputs"):
        finetune(model, later, steps=2, progress=False)


def test_check_tensor_finds_a_non_finite_entry_in_any_slice_it_checks():
    """check_tensor tests finiteness in slices of about 16 M entries (no whole-tensor mask for a
    25,088-wide moment): an entry in the last slice, in a transposed view, in a vector and in a
    0-d tensor is found and counted."""
    from rankcut.decompose._checks import check_tensor

    big = torch.zeros(5000, 4000)  # 20 M entries: two slices
    check_tensor(big, "big")
    big[-1, -1] = float("nan")
    with pytest.raises(ValueError, match="big: expected finite entries, got 1 NaN"):
        check_tensor(big, "big")
    with pytest.raises(ValueError, match="got 1 NaN"):
        check_tensor(big.mT, "view")
    for x in (torch.tensor([0.0, float("inf")]), torch.tensor(float("-inf"))):
        with pytest.raises(ValueError, match="got 1 NaN or infinite"):
            check_tensor(x, "x")


def test_numpy_integer_ranks_are_ranks():
    """A rank computed with NumPy (np.int64) is a rank like an int, in a LayerPlan's ranks
    and as the whole of them; a bool is not."""
    import numpy as np

    assert rc.LayerPlan("svd", np.int64(8)).ranks == (8,)
    assert rc.LayerPlan("tucker", [np.int32(4), np.int64(6)]).ranks == (4, 6)
    assert all(type(r) is int for r in rc.LayerPlan("tucker", [np.int32(4), 6]).ranks)
    with pytest.raises(ValueError, match="ranks:"):
        rc.LayerPlan("svd", (np.bool_(True),))


def test_a_path_with_a_tilde_is_under_the_home_folder(tmp_path, monkeypatch):
    """rc.save / rc.load read "~/out" as the shell does, not as a folder named "~" here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = fresh()
    small = rc.apply(model, rc.Plan({"conv": rc.LayerPlan("svd", 4)}))
    rc.save(small, "~/out")
    assert (tmp_path / "home" / "out").is_dir() and not (tmp_path / "~").exists()
    again = rc.load(fresh(), "~/out")
    assert torch.allclose(again(X), small(X))


def test_train_data_that_nothing_would_use_is_warned_about():
    """train_data with no epochs or steps, the layers fitted to calibration data in sequence
    (no BatchNorm re-estimation then): nothing reads it, and the call says so."""
    data = (torch.rand(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))
    with pytest.warns(UserWarning, match="train_data is not used: no epochs, steps"):
        rc.compress(fresh(), X, target="macs=2x", calib_data=[X], train_data=data,
                    plan_options=FAST, progress=False)


def test_an_empty_cifar_file_is_damaged_not_an_empty_split(tmp_path):
    """A CIFAR binary batch cut off before its first byte read as zero records: the split came
    out 10,000 images short, silently."""
    from rankcut.data import read_cifar_binary_batch

    empty = tmp_path / "data_batch_1.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="data_batch_1.bin: the file is empty"):
        read_cifar_binary_batch(empty, 1)


def test_a_data_root_variable_naming_no_folder_is_warned_about(tmp_path, monkeypatch):
    """$RANKCUT_DATA set to a folder that is not there (a typo) is said, not skipped in
    silence for another copy of the data."""
    from rankcut.data import find_data_root

    monkeypatch.setenv("RANKCUT_DATA", str(tmp_path / "no-such-folder"))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"\$RANKCUT_DATA=.*no-such-folder.* is not a directory"):
        assert find_data_root() is None
    monkeypatch.setenv("RANKCUT_DATA", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_data_root() == tmp_path


def test_a_warm_up_as_long_as_the_run_is_warned_about():
    with pytest.warns(UserWarning, match="warmup_steps: 3 is not below the run's 3 steps"):
        _finetune(fresh(), steps=3, warmup_steps=3)


@pytest.mark.parametrize("option, needs", [("checkpoint_every", "checkpoint_dir"),
                                           ("eval_every", "val_data")])
def test_a_finetune_setting_that_would_do_nothing_is_warned_about(option, needs):
    with pytest.warns(UserWarning, match=f"{option} without {needs}: it does nothing"):
        _finetune(fresh(), **{option: 5})


def test_sensitivity_ranks_refuse_a_layer_they_cannot_factorize_before_any_trial(monkeypatch):
    """A layer the method cannot factorize at the trial rank (a depthwise conv) is refused
    before the first layer's trial decomposition, not after it; NumPy integer trial ranks are
    ranks."""
    import numpy as np

    import rankcut.select.sensitivity as sensitivity

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10)).eval()
    trials = []
    monkeypatch.setattr(sensitivity, "mean_loss", lambda *a, **k: trials.append(1) or 1.0)
    batches = [LABELLED]
    with pytest.raises(ValueError, match="plan layer '1'"):
        rc.select.sensitivity_plan(model, ["0", "1"], batches, total=8)
    with pytest.raises(ValueError, match="method: 'auto' gives no uniform factorization"):
        rc.select.sensitivity_plan(model, ["1", "0"], batches, total=8, method="auto")
    with pytest.raises(ValueError, match="method: expected one of svd"):  # (no uniform rank)
        rc.select.sensitivity_plan(model, ["0", "1"], batches, total=8, method="auto")
    assert trials == []
    plan = rc.select.sensitivity_plan(model, ["0", "3"], batches, total=8,
                                      trial_rank=np.int64(2))
    assert len(trials) == 2 and sum(lp.ranks[0] for lp in plan.layers.values()) == 8
