"""Gated layers (DESIGN 3, 4): drop-in `GatedLinear` / `GatedConv2d` over the npn ops.

A gated layer is a plain nn.Module (never an nn.Linear / nn.Conv2d subclass, so nothing that
walks a model for plain layers mistakes it for one) with the same ``weight`` / ``bias``
parameters as the torch layer, plus ``phi`` (one gate parameter per unit) and three int64
buffers in its state_dict: ``seed`` and ``offset`` (its address in the noise stream, DESIGN 4.1)
and ``allocated`` (how many leading units the Expander has handed out).

The objective (npn_kernels.training) drives a layer through four plain attributes:
``paired`` (the input is a doubled batch [x; x]: ARM's one-pass evaluation, DESIGN 4.3; or, with
PAIRED_FROM_ONE, the batch x itself, which the layer's output doubles),
``draws`` (a list: every training draw appends (offset tensor, rows, u): u is the noise a paired
Binary call's op returned, else None), ``replay`` (a list of
such draws: the next forward re-uses the oldest one, with ARM's antithetic gates for Binary
layers in training, and advances nothing) and ``penalties`` (a dict: a layer whose op can
compute its penalty in the same call (GatedLinear) enters {layer: penalty} at its first forward,
so that the penalty's gradient is written into the layer's own dW and d phi).
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from npn_kernels import backends, ops
from npn_kernels.gates import Binary, HardConcrete, check_gate, compute_dtype
from npn_kernels.ops import eager
from npn_kernels.ops.gated_linear.function import cpp_layer, layer_forward
from npn_kernels.ops.uniforms.function import uniforms_op
from npn_kernels.ops.gates.function import FLOAT_DTYPES, check_finite, checked_l0_penalty, kernel_checks_phi

GRANULARITIES = ("weight", "in", "out")
# Louizos et al.'s initial drop rate: phi = log(1 - d) - log(d) + N(0, 1e-2) (= N(0, 1e-2) at d = 0.5)
HC_DROPRATE = 0.5
HC_INIT_STD = 1e-2
# NPN's initial phi, in units of 1/k0: open units at 3/k0 (pi = sigmoid(3) = 0.95 at k = k0),
# hibernating ones at -40/k0 (pi = 4e-18: closed at any k >= k0 / 10)
ACTIVE_PHI = 3.0
HIBERNATING_PHI = -40.0
DEFAULT_GATE = Binary()  # a frozen dataclass: safe to share as the default
# ``paired`` of a layer whose input is one batch x standing for the paired batch [x; x]: its output
# has the paired pass's 2·rows rows (npn.objective hands the first layer of an nn.Sequential the
# batch itself; the C++ layer then never writes [x; x]). The value of the ops' ``paired`` argument.
PAIRED_FROM_ONE = 2


def _number(name: str, value, *, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _active_count(init_active, units: int) -> int:
    """Units that start active: None (all), an int in [1, units], or a fraction in (0, 1] (rounded, >= 1)."""
    if init_active is None:
        return units
    if isinstance(init_active, bool) or not isinstance(init_active, numbers.Real):
        raise TypeError(f"init_active: expected None, an int or a float, got {type(init_active).__name__}")
    if isinstance(init_active, numbers.Integral):
        if not 1 <= init_active <= units:
            raise ValueError(f"init_active: expected an int in [1, {units}] (the layer's units), got {init_active}")
        return int(init_active)
    if not 0 < init_active <= 1:
        raise ValueError(f"init_active: expected a fraction in (0, 1], got {init_active!r}")
    return max(1, round(float(init_active) * units))


def _fits(value, tensor: Tensor) -> bool:
    """Whether torch's load_state_dict would copy ``value`` into ``tensor`` (it also takes a [1]
    entry for a 0-dim tensor: checkpoints from torch 0.3)."""
    if not torch.overrides.is_tensor_like(value):
        return False
    return value.shape == tensor.shape or (tensor.dim() == 0 and tuple(value.shape) == (1,))


class GatedModule(nn.Module):
    """What GatedLinear and GatedConv2d share: gate, phi, the noise counter and the penalty.

    Subclasses set ``weight`` / ``bias`` and implement ``_op`` (the fused op), ``_apply_gates``
    (the same layer with explicit gate values, for ARM's antithetic replay), ``_rows`` and
    ``_group_shapes``.
    """

    def _init_gates(self, phi_shapes, gate, granularity, noise, init_active, l0, weight_decay, init_k, factory):
        self.gate = check_gate(gate)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        if noise not in ("batch", "example"):
            raise ValueError(f"noise: expected 'batch' or 'example', got {noise!r}")
        if noise == "example" and granularity == "weight":
            raise ValueError("noise: 'example' needs granularity 'in' or 'out' (one gate per example and unit)")
        self.granularity, self.noise = granularity, noise
        self.l0 = _number("l0", l0, positive=False)
        self.weight_decay = _number("weight_decay", weight_decay, positive=False)
        self.init_k = _number("init_k", init_k, positive=True)
        self.phi = nn.Parameter(torch.empty(phi_shapes[granularity], **factory))
        count = _active_count(init_active, self.phi.numel())
        self.reset_gates(count)
        # drawn from torch's default (CPU) generator: torch.manual_seed fixes it on every device
        self.register_buffer("seed", torch.randint(0, 2**62, (), dtype=torch.int64).to(device=factory["device"]))
        self.register_buffer("offset", torch.zeros((), dtype=torch.int64, device=factory["device"]))
        self.register_buffer("allocated", torch.tensor(count, dtype=torch.int64, device=factory["device"]))
        self.paired = False
        self.draws: list[tuple[Tensor, int, Tensor | None]] | None = None
        self.replay: list[tuple[Tensor, int, Tensor | None]] | None = None
        self.penalties: dict[GatedModule, Tensor] | None = None

    @torch.no_grad()
    def reset_gates(self, active: int) -> None:
        """phi at its initial values: the first ``active`` units (row-major) open, the rest hibernating."""
        if isinstance(self.gate, HardConcrete):
            self.phi.normal_(math.log(1 - HC_DROPRATE) - math.log(HC_DROPRATE), HC_INIT_STD)
        else:
            self.phi.fill_(ACTIVE_PHI / self.init_k)
        self.phi.view(-1)[active:] = HIBERNATING_PHI / self.init_k

    # ---- checkpoints ---------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        """All or nothing: torch copies every entry whose shape fits and only reports the others, so
        a checkpoint of another width would leave this layer with its own weight beside the
        checkpoint's seed, offset and allocated (and phi, where phi's shape is unchanged)."""
        args = (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        own = {prefix + name: t for name, t in itertools.chain(self._parameters.items(), self._buffers.items())
               if t is not None and name not in self._non_persistent_buffers_set}  # fmt: skip
        present = [key for key in own if key in state_dict]
        fitting = {key for key in present if _fits(state_dict[key], own[key])}
        if len(fitting) == len(present):
            super()._load_from_state_dict(state_dict, prefix, *args)
            return
        # torch reports the misfits in its own words; the fitting entries are withheld, not copied
        withheld = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in fitting}
        known = len(missing_keys)
        super()._load_from_state_dict(withheld, prefix, *args)
        missing_keys[known:] = [k for k in missing_keys[known:] if k not in fitting]  # withheld is not missing

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        weight, counter, training = self.weight, self.offset, self.training  # one module lookup each
        if isinstance(x, Tensor):  # named here: the op would blame the layer's weight for x's dtype or device
            if x.dtype != weight.dtype:
                raise TypeError(f"x: expected dtype {weight.dtype} (the layer's weight), got {x.dtype}")
            if x.device != weight.device:
                raise ValueError(f"x: expected device {weight.device} (the layer's weight), got {x.device}")
        if self.paired == PAIRED_FROM_ONE:
            # this path doubles the batch itself; once: a model that calls the layer again hands it
            # rows of the paired pass
            vars(self)["paired"] = True
            x = torch.cat([x, x])
        if self.replay is not None and training:  # evaluation draws nothing: nothing to replay
            offset, rows, _ = self.replay.pop(0)
            return self._replay(x, offset, rows)
        # the op keeps its offset tensor for the backward: hand it a copy, then advance the buffer.
        # Not .clone(): inductor drops a clone of a graph input that the graph then mutates
        # (pytorch#198131), and the compiled backward would regenerate the gates at the advanced
        # offset; "+ 0" is kept, as inductor does not fold arithmetic on a mutated input.
        offset = counter + 0
        paired = self.paired and training
        penalize = self.penalties is not None and self not in self.penalties
        u = None  # the noise of a paired Binary call, where its op returns it
        if paired and isinstance(self.gate, Binary):
            y, p, u = self._op(x, offset, paired=True, penalize=penalize)
        elif paired and self.noise == "example":
            # hard-concrete, one gate per example: both halves must see the first half's gates
            first, second = x.chunk(2)
            (y1, p, _), (y2, _, _) = self._op(first, offset, penalize=penalize), self._op(second, offset)
            y = torch.cat([y1, y2])
        else:  # plain; in a paired pass (batch noise) both halves of [x; x] share the one gate vector
            y, p, _ = self._op(x, offset, penalize=penalize)
        if p is not None:
            self.penalties[self] = p
        if training:
            self._drew(counter, offset, self._rows(x) // 2 if paired else self._rows(x), u)
        return y

    def _drew(self, counter: Tensor, offset: Tensor, rows: int, u: Tensor | None) -> None:
        """After a training draw at ``offset``: records it for the objective and advances the
        counter past its noise."""
        if self.draws is not None:
            self.draws.append((offset, rows, u))
        # a buffer needs no autograd: no no_grad() block (~3 us a call)
        counter.add_(ops.counters_for(self.phi.numel() * (rows if self.noise == "example" else 1)))

    def _replay(self, x: Tensor, offset: Tensor, rows: int) -> Tensor:
        """The layer on x with the gates of a recorded draw: ARM's z' for Binary gates in training."""
        if not (self.training and isinstance(self.gate, Binary)):
            return self._op(x, offset)[0]
        u = self.noise_of(offset, rows)
        pi = self.gate.probs(self.phi.detach().to(compute_dtype(self.phi.dtype)))
        return self._apply_gates(x, (u.to(pi.dtype) > 1 - pi).to(x.dtype))  # z' = 1[u > 1 - pi] (DESIGN 2.1)

    def noise_of(self, offset: Tensor, rows: int) -> Tensor:
        """The uniforms u of a draw at ``offset``: phi's shape (batch noise) or [rows, units] (example).
        The op itself: seed and offset are the layer's own int64 scalars, on phi's device."""
        if self.noise == "example":
            return uniforms_op(rows * self.phi.numel(), self.seed, offset).view(rows, -1)
        return uniforms_op(self.phi.numel(), self.seed, offset).view(self.phi.shape)

    # ---- gates ---------------------------------------------------------------------------------

    def gate_probs(self) -> Tensor:
        """P(z != 0) per unit: phi's shape, differentiable in phi."""
        return self.gate.probs(self.phi)

    @torch.no_grad()
    def active_mask(self) -> Tensor:
        """Evaluation-time z != 0 per unit (bool, phi's shape)."""
        phi = self.phi.to(compute_dtype(self.phi.dtype))
        if isinstance(self.gate, Binary):
            return self.gate.probs(phi) >= 0.5  # z = pi·1[pi >= 0.5]; pi >= 0.5 > 0
        g = self.gate
        return torch.clamp(torch.sigmoid(phi) * (g.zeta - g.gamma) + g.gamma, 0, 1) > 0

    def num_active(self) -> int:
        return int(self.active_mask().sum())

    @property
    def group_size(self) -> int:
        """|g|: weights per unit."""
        return self.weight.numel() // self.phi.numel()

    def unit_masks(self, units: Tensor) -> dict[nn.Parameter, Tensor]:
        """{parameter: bool mask of its entries that belong to ``units``} (indices into phi.view(-1))."""
        mask = torch.zeros(self.phi.numel(), dtype=torch.bool, device=self.phi.device)
        mask[units] = True
        phi_view, weight_view = self._group_shapes()
        masks = {self.phi: mask.view(self.phi.shape)}
        masks[self.weight] = mask.view(phi_view).expand(weight_view).reshape(self.weight.shape)
        if self.bias is not None and self.granularity == "out":  # "out" gates multiply after the bias
            masks[self.bias] = mask
        return masks

    def penalty(self) -> Tensor:
        """L0 + expected-L2 penalty (DESIGN 2.1/2.2) + weight_decay/2·||bias||² (the bias is ungated): 0-dim."""
        phi_view, weight_view = self._group_shapes()
        # the layer's own arguments, checked when it was built (ops.l0_penalty re-checks each per call)
        phi = self.phi if kernel_checks_phi(self.phi) else check_finite("phi", self.phi)
        # each parameter itself where its view would have its own shape: the op groups W itself,
        # and no autograd view stands between the penalty's gradient and the layer's, which
        # autograd then adds in place (see ops.gates.function.block_groups)
        phi = phi if phi_view == tuple(phi.shape) else phi.view(phi_view)
        weight = self.weight if weight_view == tuple(self.weight.shape) else self.weight.view(weight_view)
        p = checked_l0_penalty(phi, self.gate, float(self.group_size), weight, self.l0, self.weight_decay)
        if self.bias is not None and self.weight_decay:
            p = p + (self.weight_decay / 2) * self.bias.to(p.dtype).square().sum()
        return p

    def _gates_repr(self) -> str:
        extra = "".join(f", {n}={getattr(self, n):g}" for n in ("l0", "weight_decay") if getattr(self, n))
        return (f"gate={self.gate!r}, granularity={self.granularity!r}, noise={self.noise!r}{extra}, "
                f"active={self.num_active()}/{self.phi.numel()}")  # fmt: skip


def _reset_like_torch(weight: Tensor, bias: Tensor | None) -> None:
    """nn.Linear's / nn.Conv2d's default initialization (same calls, so the same numbers per seed)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}: expected an int > 0, got {value!r}")
    return int(value)


def _int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    values = (value, value) if isinstance(value, numbers.Integral) else value if isinstance(value, (tuple, list)) else ()
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum
                               for v in values):  # fmt: skip
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return int(values[0]), int(values[1])


def _factory(device, dtype) -> dict:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected None or a float16, bfloat16, float32 or float64 dtype, got {dtype}")
    return {"device": device, "dtype": dtype}


class GatedLinear(GatedModule):
    """nn.Linear with gates on its weights, inputs ("in", default) or outputs ("out").

    weight [out_features, in_features], bias [out_features] (as nn.Linear); phi:
    [out_features, in_features] ("weight"), [in_features] ("in") or [out_features] ("out").
    forward: x [..., in_features] -> [..., out_features].
    """

    def __init__(self, in_features, out_features, bias=True, *, gate=DEFAULT_GATE, granularity="in", noise="batch",
                 init_active=None, l0=0.0, weight_decay=0.0, init_k=7.0, device=None, dtype=None):  # fmt: skip
        super().__init__()
        factory = _factory(device, dtype)
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        _reset_like_torch(self.weight, self.bias)
        shapes = {"weight": (out_features, in_features), "in": (in_features,), "out": (out_features,)}
        self._init_gates(shapes, gate, granularity, noise, init_active, l0, weight_decay, init_k, factory)

    def _rows(self, x: Tensor) -> int:
        return x.numel() // self.in_features

    def forward(self, x: Tensor) -> Tensor:
        # torch.compile traces the general path (the shortcut reads the module's dicts directly)
        y = self._cpp_training_call(x) if self.training and not torch.compiler.is_compiling() else None
        return super().forward(x) if y is None else y

    def _cpp_training_call(self, x: Tensor) -> Tensor | None:
        """GatedModule.forward for the common training call, straight to the cpu backend's C++
        layer: x [M, in_features] of the weight's dtype and device, structured gates with batch
        noise, no replay, no parametrization, nothing tracing. The same op, arguments, draw record
        and counter advance in fewer Python steps: GatedModule.forward + layer_forward cost
        ~45 us a call over the op, ~100 us of a ~2.5 ms C4 step (2026-11-25). None: the call
        takes the general path (which also raises the errors)."""
        d = vars(self)
        params = d["_parameters"]
        weight, phi = params.get("weight"), params.get("phi")  # absent under torch's parametrize
        if (
            weight is None
            or phi is None
            or d["replay"] is not None
            or d["noise"] != "batch"
            or d["granularity"] == "weight"
            or type(x) is not Tensor
            or x.dim() != 2
            or x.shape[1] != weight.shape[1]
            or x.dtype != weight.dtype
            or x.device != weight.device
            or backends.select(x.device) != "cpu"
        ):
            return None
        bias, gate, paired = params.get("bias"), d["gate"], d["paired"]
        seed, counter = d["_buffers"]["seed"], d["_buffers"]["offset"]
        from_one = paired == PAIRED_FROM_ONE
        if (paired and not (isinstance(gate, Binary) and (from_one or x.shape[0] % 2 == 0))) or eager.traced(
            (x, weight, bias, phi, seed, counter)
        ):
            return None
        penalties = d["penalties"]
        penalize = penalties is not None and self not in penalties
        coef = [float(weight.numel() // phi.numel()), float(d["l0"]), float(d["weight_decay"])] if penalize else []
        offset = counter + 0  # a copy the op keeps, then the buffer advances (see GatedModule.forward)
        y, aux, p = cpp_layer(x, weight, bias, phi, seed, offset, gate.family, list(gate.params), d["granularity"],
                              True, paired, False, coef)  # fmt: skip
        if penalize:
            penalties[self] = p
        if from_one:
            d["paired"] = True  # once (see GatedModule.forward)
        self._drew(counter, offset, x.shape[0] // 2 if paired is True else x.shape[0], aux if paired else None)
        return y

    def _op(self, x: Tensor, offset: Tensor, paired: bool = False,
            penalize: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
        """(y, the layer's penalty from the same op with ``penalize``, else None, the noise u of a
        paired call with batch noise, else None): layer_forward's."""
        penalty = (float(self.group_size), self.l0, self.weight_decay) if penalize else None
        return layer_forward(x, self.weight, self.bias, self.phi, self.gate, self.granularity, self.seed, offset,
                             self.training, self.noise, paired, penalty)  # fmt: skip

    def _apply_gates(self, x: Tensor, z: Tensor) -> Tensor:
        """The layer with gate values z (phi's shape, or [rows, units] for example noise)."""
        if self.granularity == "weight":
            return F.linear(x, self.weight * z, self.bias)
        if self.granularity == "in":
            xz = x * z if z.dim() == 1 else (x.reshape(-1, self.in_features) * z).view_as(x)
            return F.linear(xz, self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        return y * z if z.dim() == 1 else (y.reshape(-1, self.out_features) * z).view_as(y)

    def _group_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(phi's view, weight's view): phi broadcasts against the weight over each unit's group."""
        n, k = self.out_features, self.in_features
        return {"weight": ((n, k), (n, k)), "in": ((1, k), (n, k)), "out": ((n, 1), (n, k))}[self.granularity]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._gates_repr())  # fmt: skip


class GatedConv2d(GatedModule):
    """nn.Conv2d with gates on its output channels ("out", default), input channels ("in") or weights.

    weight [C_out, C_in / groups, kh, kw], bias [C_out] (as nn.Conv2d); phi: [C_out] ("out"),
    [C_in] ("in") or weight's shape ("weight"). forward: x [N, C_in, H, W] -> [N, C_out, H', W'].
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True, *,
                 gate=DEFAULT_GATE, granularity="out", noise="batch", init_active=None, l0=0.0, weight_decay=0.0,
                 init_k=7.0, device=None, dtype=None):  # fmt: skip
        super().__init__()
        factory = _factory(device, dtype)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.groups = _positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: expected a divisor of in_channels and out_channels, got {groups}")
        self.kernel_size = _int_pair("kernel_size", kernel_size, 1)
        self.stride, self.dilation = _int_pair("stride", stride, 1), _int_pair("dilation", dilation, 1)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same', 'valid', an int >= 0 or a pair of them, got {padding!r}")
        if padding == "same" and self.stride != (1, 1):
            raise ValueError(f"padding: 'same' needs stride 1 (as nn.Conv2d), got stride {self.stride}")
        self.padding = padding if isinstance(padding, str) else _int_pair("padding", padding, 0)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        _reset_like_torch(self.weight, self.bias)
        shapes = {"weight": tuple(self.weight.shape), "in": (in_channels,), "out": (out_channels,)}
        self._init_gates(shapes, gate, granularity, noise, init_active, l0, weight_decay, init_k, factory)

    def _rows(self, x: Tensor) -> int:
        return x.shape[0]

    def _op(self, x: Tensor, offset: Tensor, paired: bool = False, penalize: bool = False) -> tuple[Tensor, None, None]:
        """(y, None, None): the conv op neither computes the penalty (``penalize`` is ignored) nor
        returns its noise."""
        y = ops.gated_conv2d(x, self.weight, self.bias, self.phi, self.gate, self.granularity, self.stride,
                             self.padding, self.dilation, self.groups, seed=self.seed, offset=offset,
                             training=self.training, noise=self.noise, paired=paired)  # fmt: skip
        return y, None, None

    def _apply_gates(self, x: Tensor, z: Tensor) -> Tensor:
        """The layer with gate values z (phi's shape, or [N, channels] for example noise)."""
        def conv(inp: Tensor, weight: Tensor) -> Tensor:
            return F.conv2d(inp, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

        if self.granularity == "weight":
            return conv(x, self.weight * z)
        zc = z.view(1 if z.dim() == 1 else z.shape[0], -1, 1, 1)
        return conv(x * zc, self.weight) if self.granularity == "in" else conv(x, self.weight) * zc

    def _group_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(phi's view, weight's view); "in" with groups G: weight [G, C_out/G, C_in/G, kh, kw], phi [G, 1, C_in/G, 1, 1]."""
        w = tuple(self.weight.shape)
        if self.granularity == "weight":
            return w, w
        if self.granularity == "out":
            return (w[0], 1, 1, 1), w
        g = self.groups
        if g == 1:
            return (1, w[1], 1, 1), w
        return (g, 1, w[1], 1, 1), (g, w[0] // g, *w[1:])

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")  # fmt: skip
        return s + ", " + self._gates_repr()


def check_module(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def gated_modules(model: nn.Module) -> list[GatedModule]:
    """Every gated layer of ``model`` (through wrappers such as DDP: model.modules())."""
    return [m for m in check_module(model).modules() if isinstance(m, GatedModule)]


def penalty(model: nn.Module) -> Tensor:
    """Sum of the penalties of every gated layer of ``model``: a 0-dim tensor (0.0 if it has none)."""
    return penalty_with(gated_modules(model), {})


def penalty_terms(modules: list[GatedModule], computed: dict[GatedModule, Tensor]) -> list[Tensor]:
    """The penalty of each of ``modules`` (a model's gated layers): the one the layer already
    computed in a forward (its ``penalties``) as it is, else computed here."""
    return [computed[m] if m in computed else m.penalty() for m in modules]


def penalty_with(modules: list[GatedModule], computed: dict[GatedModule, Tensor]) -> Tensor:
    """The sum of :func:`penalty_terms` (0-dim; 0.0 without gated layers)."""
    total = None
    for p in penalty_terms(modules, computed):
        total = p if total is None else total + p
    return torch.zeros(()) if total is None else total
