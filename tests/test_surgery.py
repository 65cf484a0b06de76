import json
import os

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.layers import CPConv2d, LowRankLinear, SpatialConv2d, SVDConv2d, TuckerConv2d


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x)) + x


class Net(nn.Module):
    """A stem, repeated nested blocks, a depthwise conv, a 1x1 conv and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(Block(16), Block(16), Block(16))
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.proj = nn.Conv2d(16, 32, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 40),
                                  nn.ReLU(), nn.Linear(40, 10))

    def forward(self, x):
        return self.head(self.proj(self.dw(self.blocks(self.stem(x)))))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def full_plan():
    return rc.Plan({
        "blocks.0.conv": rc.LayerPlan("cp", (8,), form="cp3", options={"max_iter": 10}),
        "blocks.1.conv": rc.LayerPlan("tucker", (8, 6), module_type="Conv2d"),
        "blocks.2.conv": rc.LayerPlan("spatial_svd", (12,)),
        "proj": rc.LayerPlan("svd", (8,)),
        "head.2": rc.LayerPlan("cur", (10,), options={"solver": "deim"}),
        "head.4": rc.LayerPlan("svd", (4,), module_type="Linear"),
        "stem": rc.LayerPlan.skipped("input stem"),
    }, meta={"target": "params=2x"})


def test_plan_json_round_trip_and_table():
    plan = full_plan()
    plan["proj"].predicted = {"params": 392, "macs": 25088, "error": 0.25}
    again = rc.Plan.from_json(plan.to_json())
    assert again == plan and again.meta == {"target": "params=2x"}
    assert list(again) == list(plan)  # order kept
    assert again["blocks.0.conv"].form == "cp3" and again["blocks.1.conv"].ranks == (8, 6)
    table = str(plan)
    assert "blocks.1.conv  tucker" in table and "25,088" in table and "input stem" in table
    assert repr(plan) == "Plan(6 of 7 layers factorized)"
    assert json.loads(plan.to_json())["schema"] == "rankcut.plan"


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="qr"), "method: expected one of svd, cur, spatial_svd, cp, cp4, cp3, tucker or "
                        "'skip', got 'qr'"),
    (dict(method="tucker", ranks=(4,)), r"ranks: method 'tucker' expects 2 rank\(s\)"),
    (dict(method="svd", ranks=(0,)), r"expects 1 rank\(s\) >= 1, got \(0,\)"),
    (dict(method="cp", ranks=(4,), form="cp5"), "form: expected one of 'cp4', 'cp3'"),
    (dict(method="svd", ranks=(4,), form="cp4"), "form: only method.s. 'cp' take a form"),
])
def test_bad_layer_plans_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rc.LayerPlan(**kwargs)


@pytest.mark.parametrize("text, match", [
    ("{", "plan: not valid JSON"),
    ('{"schema": "other"}', 'expected a JSON object with "schema": "rankcut.plan"'),
    ('{"schema": "rankcut.plan", "version": 99}', "schema version 99 is not supported"),
    ('{"schema": "rankcut.plan", "version": 1, "layers": {"a": {"method": "svd", '
     '"ranks": [2], "colour": 1}}}', r"plan layer 'a': layer plan: unknown keys \['colour'\]"),
    # edited by hand: each a ValueError naming the part, not an OverflowError/AttributeError
    ('{"schema": "rankcut.plan", "version": 1, "layers": {"a": {"method": "svd", '
     '"ranks": [Infinity]}}}', r"plan layer 'a': ranks: method 'svd' expects 1 rank"),
    ('{"schema": "rankcut.plan", "version": 1, "layers": []}', '"layers" must be a JSON object'),
    ('{"schema": "rankcut.plan", "version": 1, "meta": "abc"}', '"meta" must be a JSON object'),
    ('{"schema": "rankcut.plan", "version": 1, "layers": {"a": {"method": "svd", "ranks": 4, '
     '"predicted": {"error": "high"}}}}', "plan layer 'a': predicted: expected a mapping whose"),
    ('{"schema": "rankcut.plan", "version": 1, "layers": {"a": {"method": "svd", "ranks": 4, '
     '"reason": 5}}}', "plan layer 'a': reason: expected a string"),
    ('{"schema": "rankcut.plan", "version": 1, "layers": {"a": {"method": 3}}}',
     "plan layer 'a': method: expected a name"),
])
def test_bad_plan_json_is_rejected(text, match):
    with pytest.raises(ValueError, match=match):
        rc.Plan.from_json(text)


def test_plan_json_ranks_may_be_one_number_and_predictions_print():
    text = ('{"schema": "rankcut.plan", "version": 1, "layers": {"a": {"method": "svd", '
            '"ranks": 4, "predicted": {"params": 10, "error": null}}}}')
    plan = rc.Plan.from_json(text)
    assert plan["a"].ranks == (4,) and "a      svd     4" in str(plan)
    # predictions that are not finite (JSON's NaN and Infinity load) print as they are
    odd = rc.Plan.from_json(text.replace('"params": 10', '"params": Infinity'))
    assert "inf" in str(odd)


def test_apply_replaces_by_qualified_name_and_leaves_the_original_bitwise_unchanged(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = rc.apply(net, full_plan())
    assert small is not net
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(isinstance(m, nn.Conv2d) for m in (net.blocks[0].conv, net.blocks[1].conv))
    expected = {"blocks.0.conv": CPConv2d, "blocks.1.conv": TuckerConv2d,
                "blocks.2.conv": SpatialConv2d, "proj": SVDConv2d, "head.2": LowRankLinear,
                "head.4": LowRankLinear}
    for name, kind in expected.items():
        assert isinstance(small.get_submodule(name), kind), name
    assert isinstance(small.stem, nn.Conv2d) and type(small.dw) is nn.Conv2d
    n_before = sum(p.numel() for p in net.parameters())
    assert sum(p.numel() for p in small.parameters()) < n_before
    x = torch.randn(2, 3, 12, 12)
    assert small(x).shape == (2, 10)


def test_apply_at_full_rank_keeps_the_function(net):
    plan = rc.Plan({"blocks.1.conv": rc.LayerPlan("tucker", (16, 16)),
                    "head.2": rc.LayerPlan("svd", (32,))})
    x = torch.randn(2, 3, 12, 12)
    assert torch.allclose(rc.apply(net, plan)(x), net(x), atol=1e-5)


def test_inplace_edits_the_model_itself(net):
    out = rc.apply(net, rc.Plan({"proj": rc.LayerPlan("svd", (4,))}), inplace=True)
    assert out is net and isinstance(net.proj, SVDConv2d)


@pytest.mark.parametrize("plan, match", [
    (rc.Plan({"blocks.9.conv": rc.LayerPlan("svd", (4,))}),
     "plan layer 'blocks.9.conv': the model has no such module"),
    (rc.Plan({"head.4": rc.LayerPlan("cp", (4,))}),
     "plan layer 'head.4': method 'cp' does not apply to Linear"),
    (rc.Plan({"proj": rc.LayerPlan("tucker", (4, 4))}),
     "plan layer 'proj': method 'tucker' does not apply to a 1x1 convolution"),
    (rc.Plan({"dw": rc.LayerPlan("svd", (4,))}),
     "plan layer 'dw': cannot factorize: depthwise convolution"),
    (rc.Plan({"head.4": rc.LayerPlan("svd", (4,), module_type="Conv2d")}),
     "plan layer 'head.4': planned for a Conv2d, the model has a Linear"),
    (rc.Plan({"blocks.0.conv": rc.LayerPlan("cp", (4,), options={"iterations": 3})}),
     r"plan layer 'blocks.0.conv': options \{'iterations': 3\} do not fit "
     "rankcut.decompose.cp"),
])
def test_a_plan_that_does_not_fit_is_rejected_before_any_change(net, plan, match):
    plan["blocks.1.conv"] = rc.LayerPlan("svd", (4,))  # a valid entry alongside the bad one
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        rc.apply(net, plan, inplace=True)
    assert isinstance(net.blocks[1].conv, nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_target_layers_default_skips_and_patterns(net):
    t = rc.target_layers(net)
    assert t["stem"].startswith("input stem (3 input channels)")
    assert t["dw"].startswith("depthwise convolution")
    assert t["head.4"] == "too small (410 parameters < min_params=1024)"
    assert t["proj"] == "too small (544 parameters < min_params=1024)"
    assert t["blocks.0.conv"] is None and t["head.2"] is None
    t = rc.target_layers(net, include=["blocks.*", nn.Linear], exclude="blocks.1.*",
                         min_params=100)
    assert t["blocks.0.conv"] is None and t["head.4"] is None
    assert t["blocks.1.conv"] == "excluded by blocks.1.*"
    assert t["proj"] == "not matched by include" and t["head.2"] is None
    forced = rc.target_layers(net, include=["stem", "dw"])
    assert forced["stem"] is None  # named exactly: the stem heuristic is overridden
    assert forced["dw"].startswith("depthwise")  # impossibilities are not
    with pytest.raises(ValueError, match="include: expected module names, glob patterns"):
        rc.target_layers(net, include=[3])


def test_save_and_load_round_trip(net, tmp_path):
    plan = full_plan()
    small = rc.apply(net, plan)
    rc.save(small, tmp_path / "out", plan=plan)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors", "plan.json"]
    fresh = Net().eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = rc.load(fresh, tmp_path / "out")
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(loaded(x), small(x))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    stored = rc.load_plan(tmp_path / "out")
    assert stored.meta["target"] == "params=2x" and len(stored.meta["weights_sha256"]) == 64
    assert stored["head.2"].ranks == (small.head[2].rank,)  # CUR's realised width is stored


def test_save_records_realised_ranks_and_layers_the_plan_omits(net, tmp_path):
    small = rc.apply(net, rc.Plan({"blocks.0.conv": rc.LayerPlan("tucker", (99, 99)),
                                   "proj": rc.LayerPlan("svd", (4,))}))
    small.head[4] = LowRankLinear.from_dense(small.head[4], 3)  # done by hand, outside the plan
    rc.save(small, tmp_path, plan=rc.Plan({"proj": rc.LayerPlan("svd", (4,))}))
    stored = rc.load_plan(tmp_path)
    assert stored["blocks.0.conv"].ranks == (16, 16)  # clamped to the channels
    assert stored["head.4"].method == "svd" and stored["head.4"].ranks == (3,)
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(rc.load(Net().eval(), tmp_path)(x), small(x))


class _MyConv(nn.Conv2d):  # a user's subclass that keeps torch's forward
    pass


def test_a_subclass_of_conv2d_saved_without_a_plan_loads_back(tmp_path):
    """rc.save without a plan records the factorized layer as a "Conv2d"; the model's layer is
    a subclass of it and fits (before, load refused it: planned for a Conv2d, a _MyConv)."""
    torch.manual_seed(0)
    model = nn.Sequential(_MyConv(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    small = rc.apply(model, rc.Plan({"0": rc.LayerPlan("svd", (4,))}))
    rc.save(small, tmp_path)
    assert rc.load_plan(tmp_path)["0"].module_type == "Conv2d"
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(rc.load(model, tmp_path)(x), small(x))
    with pytest.raises(ValueError, match="planned for a _MyConv, the model has a Conv2d"):
        rc.apply(model, rc.Plan({"2": rc.LayerPlan("svd", (4,), module_type="_MyConv")}))


def test_a_non_finite_buffer_of_the_architecture_itself_loads(tmp_path):
    """A -inf mask buffer is part of the model (base_model holds it too): loaded, where a NaN
    weight is refused."""
    torch.manual_seed(0)

    def masked():
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))
        model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
        return model.eval()

    small = rc.apply(masked(), rc.Plan({"0": rc.LayerPlan("svd", (4,))}))
    rc.save(small, tmp_path)
    assert torch.equal(rc.load(masked(), tmp_path).mask, small.mask)
    small[2].weight.data[0, 0, 0, 0] = float("nan")
    rc.save(small, tmp_path)
    with pytest.raises(ValueError, match="tensor '2.weight' holds NaN"):
        rc.load(masked(), tmp_path)


def test_a_save_does_not_load_into_a_model_that_strides_or_dilates_otherwise(tmp_path):
    """Same names, types and shapes, another stride: the factorized layer would take the new
    model's geometry and compute another function; refused, naming the layer."""
    torch.manual_seed(0)

    def model(stride=1, dilation=1):
        return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=stride, dilation=dilation),
                             nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()

    small = rc.apply(model(), rc.Plan({"0": rc.LayerPlan("svd", (4,))}))
    rc.save(small, tmp_path)
    assert rc.load_plan(tmp_path).meta["conv_geometry"]["0"]["stride"] == [1, 1]
    x = torch.randn(1, 8, 9, 9)
    assert torch.equal(rc.load(model(), tmp_path)(x), small(x))
    with pytest.raises(ValueError, match=r"layer '0' was saved from a convolution with stride "
                                         r"\[1, 1\]; the model's has stride \[2, 2\]"):
        rc.load(model(stride=2), tmp_path)
    with pytest.raises(ValueError, match="dilation"):
        rc.load(model(dilation=2), tmp_path)
    # a hand-edited record (the hash covers the weights only): named, not an AttributeError
    plan_file = tmp_path / "plan.json"
    edited = json.loads(plan_file.read_text())
    edited["meta"]["conv_geometry"]["0"] = None
    plan_file.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="meta.conv_geometry must map layer names"):
        rc.load(model(), tmp_path)


def test_a_save_under_a_file_is_refused_naming_the_path(net, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="path: .*lies under .*a-file, which is a file"):
        rc.save(rc.apply(net, full_plan()), tmp_path / "a-file" / "out")


def test_save_records_a_skipped_layer_factorized_since_by_hand(net, tmp_path):
    plan = rc.Plan({"proj": rc.LayerPlan("svd", (4,)),
                    "head.4": rc.LayerPlan.skipped("kept dense", "Linear")})
    small = rc.apply(net, plan)
    small.head[4] = LowRankLinear.from_dense(small.head[4], 3)
    rc.save(small, tmp_path, plan=plan)
    assert rc.load_plan(tmp_path)["head.4"].ranks == (3,)
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(rc.load(Net().eval(), tmp_path)(x), small(x))


def test_save_refuses_what_load_cannot_rebuild(net, tmp_path):
    small = rc.apply(net, rc.Plan({"blocks.1.conv": rc.LayerPlan("tucker", (8, 6))}))
    # a factorized layer factorized again: the dense model has no "blocks.1.conv.core"
    twice = rc.apply(small, rc.Plan({"blocks.1.conv.core": rc.LayerPlan("svd", (2,))}))
    with pytest.raises(ValueError, match="'blocks.1.conv.core' is factorized inside"):
        rc.save(twice, tmp_path / "twice")
    # a fused model: its BatchNorms folded into the factors, which no plan records
    fused = rc.fuse(small, torch.randn(1, 3, 12, 12))
    with pytest.raises(ValueError, match="model: a fused model"):
        rc.save(fused, tmp_path / "fused")
    for bad, match in ((("not a model",), "model: expected an nn.Module"),
                       ((small, {"proj": "svd"}), "plan: expected a rankcut.Plan")):
        with pytest.raises(ValueError, match=match):
            rc.save(bad[0], tmp_path / "bad", *bad[1:])
    # a bare factorized layer: load rebuilds layers inside a model, never the model itself
    with pytest.raises(ValueError, match="a bare LowRankLinear.*nn.Sequential"):
        rc.save(LowRankLinear.from_dense(nn.Linear(6, 5), 3), tmp_path / "bare")
    assert not any((tmp_path / d).exists() for d in ("twice", "fused", "bad", "bare"))


def test_a_save_that_fails_leaves_the_previous_save_loadable(net, tmp_path):
    """A plan that cannot be written as JSON (a Generator among a layer's options) stops the
    save before the weights are replaced; NumPy numbers are written as numbers."""
    import numpy as np

    x = torch.randn(2, 3, 12, 12)
    good = rc.apply(net, rc.Plan({"proj": rc.LayerPlan("svd", (4,))}))
    rc.save(good, tmp_path)
    bad_plan = rc.Plan({"proj": rc.LayerPlan("cur", (3,), options={"seed": torch.Generator()})})
    with pytest.raises(ValueError, match="plan layer 'proj': .*Generator.*JSON values only"):
        rc.save(rc.apply(net, bad_plan), tmp_path, plan=bad_plan)
    assert torch.equal(rc.load(net, tmp_path)(x), good(x))
    numpy_plan = rc.Plan({"proj": rc.LayerPlan("svd", (2,), predicted={
        "params": np.int64(100), "error": np.float32(0.5)})})
    rc.save(rc.apply(net, numpy_plan), tmp_path, plan=numpy_plan)
    again = rc.load_plan(tmp_path)
    assert again["proj"].predicted == {"params": 100, "error": 0.5} and again["proj"].ranks == (2,)
    # what load finds wrong in the plan names the plan file
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"plan\.json: plan layer 'proj'"):
        rc.load(other, tmp_path)


def test_a_frozen_layer_stays_frozen_when_factorized(net, tmp_path):
    for p in net.blocks[1].conv.parameters():
        p.requires_grad_(False)
    plan = rc.Plan({"blocks.1.conv": rc.LayerPlan("tucker", (8, 6)),
                    "proj": rc.LayerPlan("svd", (4,))})
    small = rc.apply(net, plan)
    assert not any(p.requires_grad for p in small.blocks[1].conv.parameters())
    assert all(p.requires_grad for p in small.proj.parameters())
    assert not any(m.training for m in small.modules())  # in eval mode, as the model was
    # undone, the dense layer is as frozen as its factors were
    dense = small.blocks[1].conv.to_dense()
    assert not dense.weight.requires_grad and not dense.training
    # a bias trained alone (the weight frozen) stays trainable, the factors frozen
    net.proj.weight.requires_grad_(False)
    small = rc.apply(net, plan)
    named = dict(small.proj.named_parameters())
    assert [n for n, p in named.items() if p.requires_grad] == [
        n for n in named if n.endswith("bias")] != []
    assert small.proj.to_dense().bias.requires_grad
    assert not small.proj.to_dense().weight.requires_grad


def test_save_refuses_a_plan_the_model_does_not_carry_out(net, tmp_path):
    with pytest.raises(ValueError, match="plan layer 'proj' is not factorized in this model"):
        rc.save(net, tmp_path, plan=rc.Plan({"proj": rc.LayerPlan("svd", (4,))}))
    assert not (tmp_path / "plan.json").exists()


def test_damaged_saves_are_refused_with_a_clear_error(net, tmp_path):
    small = rc.apply(net, full_plan())
    rc.save(small, tmp_path, plan=full_plan())
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[:-100])  # truncated
    with pytest.raises(ValueError, match="contents do not match plan.json"):
        rc.load(Net(), tmp_path)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed
    with pytest.raises(ValueError, match="contents do not match plan.json"):
        rc.load(Net(), tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: not found"):
        rc.load(Net(), tmp_path)
    weights.write_bytes(data)
    (tmp_path / "plan.json").write_text("{ not json")
    with pytest.raises(ValueError, match="plan.json: plan: not valid JSON"):
        rc.load(Net(), tmp_path)
    with pytest.raises(FileNotFoundError, match="plan.json: not found"):
        rc.load(Net(), tmp_path / "elsewhere")


def test_a_plan_for_another_architecture_is_refused(net, tmp_path):
    rc.save(rc.apply(net, full_plan()), tmp_path, plan=full_plan())

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3)

    with pytest.raises(ValueError, match="plan layer 'blocks.0.conv': the model has no such"):
        rc.load(Other(), tmp_path)


def test_weights_that_do_not_fit_are_refused(net, tmp_path):
    plan = rc.Plan({"proj": rc.LayerPlan("svd", (4,))})
    rc.save(rc.apply(net, plan), tmp_path, plan=plan)
    stored = rc.load_plan(tmp_path)
    stored["proj"] = rc.LayerPlan("svd", (5,))  # hand-edited rank: shapes no longer match
    (tmp_path / "plan.json").write_text(stored.to_json())
    with pytest.raises(ValueError, match="cannot load into the rebuilt model"):
        rc.load(Net(), tmp_path)


def test_attention_output_projections_are_skipped_and_refused():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.mlp = nn.Linear(64, 64)

        def forward(self, x):
            return self.mlp(self.attn(x, x, x)[0])

    model = Attn()
    t = rc.target_layers(model)
    assert t["attn.out_proj"].startswith("output projection of nn.MultiheadAttention")
    assert t["mlp"] is None
    with pytest.raises(ValueError, match="plan layer 'attn.out_proj': cannot factorize"):
        rc.apply(model, rc.Plan({"attn.out_proj": rc.LayerPlan("svd", (8,))}))
    small = rc.apply(model, rc.Plan({"mlp": rc.LayerPlan("svd", (8,))}))
    assert small(torch.randn(2, 5, 64)).shape == (2, 5, 64)
    # nn.TransformerEncoderLayer's inference fast path reads linear1/linear2.weight itself
    enc = nn.Sequential(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)).eval()
    t = rc.target_layers(enc, min_params=0)
    assert t["0.linear1"].startswith("feed-forward layer of nn.TransformerEncoderLayer")
    with pytest.raises(ValueError, match="plan layer '0.linear2': cannot factorize"):
        rc.apply(enc, rc.Plan({"0.linear2": rc.LayerPlan("svd", (8,))}))


def test_a_subclass_with_its_own_forward_is_skipped_and_refused():
    """A Conv2d or Linear subclass that computes otherwise than its weight's product (weight
    standardisation, a scale) is never factorized from its raw weight; one that keeps torch's
    forward is."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            return self._conv_forward(x, (w - w.mean()) / w.std(), self.bias)

    Plain = type("Plain", (nn.Linear,), {})
    model = nn.Sequential(StdConv(8, 8, 3), nn.Flatten(), Scaled(8 * 4 * 4, 64),
                          Plain(64, 64))
    t = rc.target_layers(model, min_params=0)
    assert "a StdConv, a subclass of nn.Conv2d with its own forward" in t["0"]
    assert "a Scaled, a subclass of nn.Linear" in t["2"] and t["3"] is None
    for name in ("0", "2"):
        with pytest.raises(ValueError, match=f"plan layer '{name}': .*subclass"):
            rc.apply(model, rc.Plan({name: rc.LayerPlan("svd", (4,))}))
    with pytest.raises(ValueError, match="subclass of nn.Linear"):
        LowRankLinear.from_dense(Scaled(6, 5), 5)
    x = torch.randn(2, 8, 6, 6)
    full = rc.apply(model, rc.Plan({"3": rc.LayerPlan("svd", (64,))}))
    assert torch.allclose(full(x), model(x), atol=1e-4)


def test_shared_modules_tied_weights_and_reused_layers_are_left_dense(tmp_path):
    """A target priced on a layer replaced at one path of two, on a weight another module keeps,
    or on one call of a layer run twice, would be met on paper only: such layers are skipped,
    with the reason."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    shared = nn.Sequential(conv, nn.ReLU(), conv, nn.Conv2d(16, 16, 3, padding=1))
    reasons = rc.target_layers(shared, min_params=0)
    assert "the same module is also at 2" in reasons["0"] and reasons["3"] is None
    tied = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 8))
    tied[2].weight = tied[0].weight
    reasons = rc.target_layers(tied, min_params=0)
    assert "shared with 2 (tied weights)" in reasons["0"]
    assert "shared with 0 (tied weights)" in reasons["2"] and reasons["3"] is None

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            return self.head(self.block(self.block(x)))

    model = Twice()
    plan = rc.plan(model, torch.rand(1, 16, 8, 8), method="svd", target="params=1.5x",
                   min_params=0, allow_slower=True)
    assert "called 2 times in one forward pass" in plan.layers["block"].reason
    assert "head" in plan.active
    # its MACs counted per call, as the built model runs them
    from rankcut.profile import count_macs

    x = torch.rand(1, 16, 8, 8)
    macs = plan.meta["predicted"]["macs"]
    assert macs == [count_macs(model, x), count_macs(rc.apply(model, plan), x)]
    # the candidates kept on disk are those of the layers planned: a later process reads them
    import os

    os.environ["RANKCUT_CACHE"] = str(tmp_path / "cache")
    try:
        for _ in range(2):
            cache = rc.select.CandidateCache.cached()
            rc.plan(model, torch.rand(1, 16, 8, 8), method="svd", target="params=1.5x",
                    min_params=0, allow_slower=True, cache=cache)
        assert cache.disk_hits == 1
    finally:
        del os.environ["RANKCUT_CACHE"]
    small = rc.apply(shared, rc.plan(shared, torch.rand(1, 16, 8, 8), method="svd",
                                     rank="params=0.5", min_params=0, allow_slower=True))
    assert small[0] is small[2] and type(small[0]) is nn.Conv2d  # both paths as they were


def test_a_rank_multiple_keeps_a_params_rule_within_its_fraction():
    """rank_multiple rounds a params/macs rule's rank down (it spends at most the fraction);
    an energy rule's up (it keeps at least the energy)."""
    layer = nn.Sequential(nn.Linear(512, 512))
    plan = rc.plan(layer, torch.rand(1, 512), method="svd", rank="params=0.1", rank_multiple=8,
                   allow_slower=True)
    (lp,) = plan.active.values()
    assert lp.ranks == (24,) and lp.predicted["params"] <= 0.1 * (512 * 512 + 512)
