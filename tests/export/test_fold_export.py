"""npn.fold and npn.export: output equality, smaller models, whole closed layers, saving and loading."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from export_models import BUILDERS, FAMILIES, INPUTS, Untraceable, build, lenet5, lenet300, random_gates
from torch import nn

import npn_kernels as npn

RTOL, ATOL = 1e-5, 1e-6
MODELS = list(BUILDERS)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plain(model: nn.Module) -> bool:
    return all(type(m).__module__.startswith("torch.") for m in model.modules())


def _snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def _assert_untouched(model: nn.Module, snap) -> None:
    state, flags, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert any(isinstance(m, npn.nn.GatedModule) for m in model.modules())


def _check_export(model: nn.Module, shape, *, smaller=True):
    x = torch.randn(6, *shape, dtype=torch.float64)
    snap = _snapshot(model)
    expected = model(x)
    exported = npn.export(model)
    _assert_untouched(model, snap)
    assert _plain(exported) and not exported.training
    torch.testing.assert_close(exported(x), expected, rtol=RTOL, atol=ATOL)
    s = npn.summary(model, (2, *shape))
    assert s.totals["params_export"] == _params(exported)
    if smaller:
        assert _params(exported) < s.totals["params"]
    return exported, x, expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_and_is_smaller(name, family):
    _check_export(build(name, FAMILIES[family]), INPUTS[name])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["weight", "in", "out"])
def test_export_every_granularity(granularity, family):
    gate = FAMILIES[family]
    for model in (lenet300(gate, granularity), lenet5(gate, granularity, granularity)):
        model = random_gates(model).double().eval()
        if granularity == "weight":  # random weight gates close no whole unit: close some columns / rows
            with torch.no_grad():
                if isinstance(model[0], npn.GatedLinear):
                    model[0].phi[:, :3] = -5.0  # 3 model inputs unread: index_select
                else:
                    model[7].phi[:, :16] = -5.0  # channel 0 of the second conv unread: removed
        # "weight" gates: columns of the first layer go by index_select; rows only without a bias
        _check_export(model, (784,) if isinstance(model[0], npn.GatedLinear) else (1, 28, 28))


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_layer_closes(family):
    gate = FAMILIES[family]
    m300 = build("lenet300", gate)
    with torch.no_grad():
        m300[2].phi.fill_(-5.0)  # every input of the 300->100 layer closes: the first layer has no used unit
    exported, _, _ = _check_export(m300, (784,))
    assert exported.get_submodule("0").out_features == 0 and exported.get_submodule("2").in_features == 0
    m5 = build("lenet5", gate)
    with torch.no_grad():
        m5[3].phi.fill_(-5.0)  # every output channel of the second conv closes
    exported, _, _ = _check_export(m5, (1, 28, 28))
    assert exported.get_submodule("3").out_channels == 1  # torch has no 0-channel conv: one zero channel stays
    m5 = build("lenet5", gate)
    with torch.no_grad():
        m5[0].phi.fill_(-5.0)  # the first conv closes entirely
    _check_export(m5, (1, 28, 28))


def test_lenet_shapes_follow_the_gates():
    model = build("lenet5", npn.Binary())
    exported = npn.export(model)
    c1, c2, f1, f2 = (exported.get_submodule(n) for n in ("0", "3", "7", "9"))
    open1, open2 = model[0].num_active(), model[3].num_active()
    assert c1.out_channels == c2.in_channels == open1
    read = model[7].active_mask().view(50, 16)  # f1's inputs per channel of c2 (blocks of 4·4 features)
    kept2 = model[3].active_mask() & read.any(1)
    assert c2.out_channels == int(kept2.sum()) <= open2
    assert f1.in_features == int(read[kept2].sum())  # the closed features of kept channels: index_select
    assert f2.in_features == f1.out_features <= model[9].num_active()


def test_residual_channels_kept_and_inputs_selected():
    model = build("resnet", npn.Binary())
    exported, _, _ = _check_export(model, INPUTS["resnet"])
    # stem and conv2 feed the residual sum: all their channels stay
    assert exported.stem.out_channels == 8 and exported.conv2.out_channels == 8 and exported.bn2.num_features == 8
    # conv3's closed input channels are dropped by an index_select before it
    assert exported.conv3.in_channels == model.conv3.num_active()
    assert torch.equal(exported.conv3_inputs, model.conv3.active_mask().nonzero().flatten())


def test_first_layer_inputs_are_selected_not_removed():
    model = build("lenet300", npn.Binary())
    exported, x, expected = _check_export(model, (784,))
    assert exported.get_submodule("0").in_features == model[0].num_active()
    assert exported.get_buffer("0_inputs").dtype == torch.int64  # the index buffer, in the state_dict
    assert "0_inputs" in exported.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_bn_sliced_between_convs(family):
    model = build("bn_convs", FAMILIES[family])
    exported, _, _ = _check_export(model, INPUTS["bn_convs"])
    bn1 = exported.get_submodule("1")
    assert bn1.num_features == exported.get_submodule("0").out_channels == exported.get_submodule("3").in_channels
    assert bn1.running_mean.numel() == bn1.num_features


def test_save_and_load(tmp_path):
    model = build("lenet5", npn.HardConcrete())
    exported, x, expected = _check_export(model, (1, 28, 28))
    src = exported.source
    assert src is not None and "npn_kernels" not in src
    (tmp_path / "arch_lenet5.py").write_text(src)
    torch.save(exported.state_dict(), tmp_path / "weights.pt")
    spec = importlib.util.spec_from_file_location("arch_lenet5", tmp_path / "arch_lenet5.py")
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    net = arch.Exported()
    net.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    torch.testing.assert_close(net.eval()(x), expected, rtol=RTOL, atol=ATOL)
    assert _params(net) == _params(exported)
    torch.save(exported, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(whole(x), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_source_rebuilds_every_model(name, tmp_path):
    model = build(name, npn.Binary())
    exported = npn.export(model)
    namespace: dict = {}
    exec(compile(exported.source, f"<{name}>", "exec"), namespace)  # noqa: S102
    net = namespace["Exported"]()
    torch.save(exported.state_dict(), tmp_path / "w.pt")
    net.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = torch.randn(3, *INPUTS[name], dtype=torch.float64)
    torch.testing.assert_close(net.eval()(x), model(x), rtol=RTOL, atol=ATOL)


def _fold_models(gate, granularity, noise):
    kw = {"gate": gate, "granularity": granularity, "noise": noise}
    return [
        (nn.Sequential(npn.GatedLinear(7, 5, **kw), nn.Tanh(), npn.GatedLinear(5, 3, bias=False, **kw)), (7,)),
        (nn.Sequential(npn.GatedConv2d(4, 6, 3, padding=1, groups=2, **kw), nn.ReLU(),
                       npn.GatedConv2d(6, 4, 3, stride=2, dilation=1, bias=False, **kw)), (4, 7, 7)),
    ]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("granularity", "noise"), [("weight", "batch"), ("in", "batch"), ("out", "batch"),
                                                    ("in", "example"), ("out", "example")])  # fmt: skip
def test_fold_matches(granularity, noise, family):
    for model, shape in _fold_models(FAMILIES[family], granularity, noise):
        model = model.double().eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, npn.nn.GatedModule):
                    m.phi.normal_(0.0, 2.0)  # gates strictly between 0 and 1 as well as closed ones
        snap = _snapshot(model)
        x = torch.randn(5, *shape, dtype=torch.float64)
        folded = npn.fold(model)
        _assert_untouched(model, snap)
        assert _plain(folded)
        kinds = [type(m) for m in folded.modules() if type(m) in (nn.Linear, nn.Conv2d)]
        assert len(kinds) == 2
        torch.testing.assert_close(folded(x), model(x), rtol=RTOL, atol=ATOL)
        if isinstance(model[0], npn.GatedConv2d):
            assert folded[0].groups == 2 and folded[0].padding == (1, 1) and folded[2].stride == (2, 2)
            assert folded[2].bias is None


def test_fold_float32_and_models():
    for name in MODELS:
        model = build(name, npn.HardConcrete(), dtype=torch.float32)
        x = torch.randn(4, *INPUTS[name])
        torch.testing.assert_close(npn.fold(model)(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(npn.export(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_untraceable_model_error_points_to_fold():
    model = Untraceable(npn.Binary()).double().eval()
    with pytest.raises(npn.tools.ExportError, match=r"(?s)cannot trace Untraceable.*control flow.*npn\.fold") as info:
        npn.export(model)
    assert "export_models.py" in str(info.value)  # names the failing line of the model's forward
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(npn.fold(model)(x), model(x))  # the fallback works
    s = npn.summary(model)
    assert s.totals["params_export"] is None and "npn.fold" in s.note and "fc" in str(s)


def test_training_mode_warns_and_uses_eval_gates():
    model = build("lenet300", npn.Binary()).train()
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match="training mode.*evaluation-time gates"):
        exported = npn.export(model)
    with pytest.warns(UserWarning, match="training mode"):
        folded = npn.fold(model)
    _assert_untouched(model, snap)
    assert model.training and not exported.training
    x = torch.randn(4, 784, dtype=torch.float64)
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(exported(x), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(folded(x), expected, rtol=RTOL, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        npn.export(model)  # eval mode: no warning
