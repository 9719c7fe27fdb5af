"""Mamba: a selective state space model as a memory layer (Gu & Dao, 2023)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from memory_models.layer import MemoryConfig, MemoryLayer
from memory_models.state import MemoryState

#: `SelectiveScan` keeps the SSM state of every this many steps for its backward pass, which
#: recomputes the others.
RECOMPUTE_SEGMENT = 16


@dataclasses.dataclass
class MambaState(MemoryState):
    ssm: Tensor  # [B, E, N]: the selective SSM state h, E = d_inner channels, N = d_state
    conv: Tensor  # [B, E, K-1]: the last conv_size - 1 inputs of the x branch, oldest first

    def live_entries(self) -> Tensor:
        # Each channel's N state dimensions are the entries; all of them are always in use.
        return self._always_live(self.ssm.shape[2])


class MambaConfig(MemoryConfig):
    """`memory_size` is d_state, the SSM state size N per channel (the paper's default is 16).

    The layer works on d_inner = `expand` * d_model channels; a sequence's state is the SSM state
    h `[d_inner, d_state]` plus the short convolution's last `conv_size` - 1 inputs, so it is flat
    in the sequence length.

    `forget_threshold`: the discretised decays a = exp(dt * A), one per channel, state dimension
    and step, that are at or under it are snapped to 0, which resets that part of the state
    outright (the meaning an LSTM forget gate has). Decays depend on the input only, never on the
    state, so the layer stays chunk invariant. 0 gives the paper's layer.

    `dt_rank` (None: ceil(d_model / 16)) is the rank of the step-size projection; the step size
    starts log-uniform in [`dt_min`, `dt_max`] (the paper's dt bias initialisation).
    """

    shape_bound = frozenset({"memory_size"})  # d_state sizes A, B and C

    kind: Literal["mamba"] = "mamba"
    threshold_range = (0.9, 0.999)  # the discretised decays exp(dt A)
    memory_size: int = Field(default=16, ge=1)
    expand: int = Field(default=2, ge=1)
    conv_size: int = Field(default=4, ge=1)
    dt_rank: int | None = Field(default=None, ge=1)
    dt_min: float = Field(default=1e-3, gt=0.0)
    dt_max: float = Field(default=0.1, gt=0.0)

    @model_validator(mode="after")
    def _dt_range_is_ordered(self) -> MambaConfig:
        if self.dt_min > self.dt_max:
            raise ValueError(
                f"dt_min={self.dt_min} is above dt_max={self.dt_max}: the initial step sizes are "
                "drawn from [dt_min, dt_max]"
            )
        return self

    def build(self, d_model: int) -> MambaLayer:
        return MambaLayer(self, d_model)


class MambaLayer(MemoryLayer):
    """The Mamba block (Gu & Dao, 2023, figure 3) around the S6 selective SSM (section 3.2,
    Algorithm 2).

    Per token: `in_proj` splits into the x branch and the gate z (d_inner each); the x branch goes
    through a causal depthwise conv1d of width `conv_size` and SiLU, giving u. From u come the
    step size dt = softplus(dt_proj(x_proj(u)[:dt_rank])) per channel and B_t, C_t (d_state each).
    A = -exp(A_log) is diagonal per (channel, state), initialised S4D-real: A[n] = -(n + 1).
    Discretisation as in the paper's code, ZOH for A and Euler for B:

        a_t = exp(dt_t * A),  h_t = a_t * h_{t-1} + dt_t * B_t * u_t,  y_t = C_t . h_t + D * u_t

    and the output is `out_proj(y * SiLU(z))`. The conv's carried inputs are part of the state,
    so any split of a sequence into calls, single tokens included, gives the full pass.

    `forget_threshold` snaps decays at or under it to 0 in both paths (`snap_decays`).

    Fast path: the projections and the conv for the whole call at once, then `SelectiveScan`: the
    recurrence one step at a time on a `[B, d_state, d_inner]` state, with a hand-written
    backward that recomputes states from every RECOMPUTE_SEGMENT-th one (the paper's
    recomputation, section 3.3.2). Chosen by measurement on CPU (B=16, T=256, d_model=128, one
    thread, forward + backward of the layer): chunked scans were slower than a step loop
    (pairwise differences of cumulative log-decays in chunks of 4: 4x, of 8: 8x; a two-level scan
    carrying the state between chunks of 16: 1.5x or more), because a decay per (channel, state)
    makes the pairwise form cost chunk-size times the loop's work. Plain autograd through the
    same loop is as fast but needs 4x the memory (peak of a forward + backward at T=1024: 1.36 GB
    against 0.34 GB). The state keeps its autograd history; a trainer cuts it with `state.detach()`.
    """

    state_type = MambaState
    config: MambaConfig

    def __init__(self, config: MambaConfig, d_model: int) -> None:
        super().__init__(config, d_model)
        self.d_inner = config.expand * d_model
        self.d_state = config.memory_size
        self.dt_rank = config.dt_rank or math.ceil(d_model / 16)
        inner, state = self.d_inner, self.d_state
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        # No padding: the carried conv state supplies the left context of every call.
        self.conv = nn.Conv1d(inner, inner, config.conv_size, groups=inner)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1.0)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        self._init_step_size()

    def _init_step_size(self) -> None:
        """dt_proj's weight keeps unit variance; its bias makes softplus(bias) log-uniform in
        [dt_min, dt_max] (the paper's dt initialisation)."""
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        low, high = math.log(self.config.dt_min), math.log(self.config.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (high - low) + low)
        with torch.no_grad():
            # The inverse of softplus: log(exp(dt) - 1), written to stay exact for small dt.
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> MambaState:
        inner, width = self.d_inner, self.config.conv_size - 1
        return MambaState(
            ssm=torch.zeros(batch_size, inner, self.d_state, device=device, dtype=dtype),
            conv=torch.zeros(batch_size, inner, width, device=device, dtype=dtype),
        )

    def state_size_bytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        values = self.d_inner * (self.d_state + self.config.conv_size - 1)
        return values * torch.finfo(dtype).bits // 8

    def forward(self, x: Tensor, state: MambaState | None = None) -> tuple[Tensor, MambaState]:
        """`x: [B, T, D]` -> `y: [B, T, D]`, every step but the recurrence batched over T."""
        state = self._state_or_init(x, state)
        branch, gate = self.in_proj(x).chunk(2, dim=-1)  # [B, T, E] each
        u, conv_state = self._convolve(branch, state.conv)
        dt, b, c = self._select(u)
        ssm_out, h = self._scan(u, dt, b, c, state.ssm)
        y = (ssm_out + self.D * u) * F.silu(gate)
        return self.out_proj(y), MambaState(ssm=h, conv=conv_state)

    def _convolve(self, branch: Tensor, carried: Tensor) -> tuple[Tensor, Tensor]:
        """SiLU of the causal depthwise conv over `[carried ; branch]`, and the next conv state.

        `branch: [B, T, E]`, `carried: [B, E, K-1]` -> `u: [B, T, E]`, `[B, E, K-1]`.
        """
        inputs = torch.cat([carried, branch.transpose(1, 2)], dim=2)  # [B, E, K-1+T]
        u = F.silu(self.conv(inputs)).transpose(1, 2)
        return u, inputs[:, :, inputs.shape[2] - carried.shape[2] :]

    def _select(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The input-dependent SSM parameters (the "selection"): `u: [..., E]` -> dt `[..., E]`,
        B and C `[..., N]`."""
        low_rank, b, c = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(low_rank)), b, c

    def _scan(
        self, u: Tensor, dt: Tensor, b: Tensor, c: Tensor, h: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`u, dt: [B, T, E]`, `b, c: [B, T, N]`, `h: [B, E, N]` -> `C_t . h_t: [B, T, E]` and
        the last h, through `SelectiveScan` (time-major, state `[B, N, E]`)."""
        # exp2 of a base-2 exponent is exp, several times faster on CPU.
        rate = torch.exp(self.A_log).T * -math.log2(math.e)  # [N, E]

        def time_major(t: Tensor) -> Tensor:
            return t.transpose(0, 1).contiguous()

        y, h = SelectiveScan.apply(
            time_major(dt),
            time_major(dt * u),
            time_major(b),
            time_major(c),
            rate,
            h.transpose(1, 2).contiguous(),
            self.config.forget_threshold,
        )
        return y.transpose(0, 1), h.transpose(1, 2).contiguous()

    def reference_forward(
        self, x: Tensor, state: MambaState | None = None
    ) -> tuple[Tensor, MambaState]:
        """One token at a time, each equation of the class docstring written out literally."""
        state = self._state_or_init(x, state)
        h, carried = state.ssm, state.conv
        A = -torch.exp(self.A_log)  # [E, N]
        conv_weight = self.conv.weight[:, 0]  # [E, K]
        outputs = []
        for x_t in x.unbind(1):
            branch, gate = self.in_proj(x_t).chunk(2, dim=-1)  # [B, E] each
            window = torch.cat([carried, branch[:, :, None]], dim=2)  # [B, E, K]
            u = F.silu((window * conv_weight).sum(-1) + self.conv.bias)
            dt, b, c = self._select(u)  # [B, E], [B, N], [B, N]
            decay = snap_decays(torch.exp(dt[:, :, None] * A), self.config.forget_threshold)
            h = decay * h + dt[:, :, None] * b[:, None, :] * u[:, :, None]
            y = (h * c[:, None, :]).sum(-1) + self.D * u
            outputs.append(self.out_proj(y * F.silu(gate)))
            carried = window[:, :, 1:]
        return torch.stack(outputs, dim=1), MambaState(ssm=h, conv=carried)


def snap_decays(decay: Tensor, threshold: float) -> Tensor:
    """Decays at or under `threshold` become 0: that part of the state is reset."""
    if threshold == 0.0:
        return decay
    return F.threshold(decay, threshold, 0.0)


def _decay(dt_t: Tensor, rate: Tensor, threshold: float) -> Tensor:
    """a_t = exp2(dt_t * rate), snapped: `dt_t: [B, E]`, `rate: [N, E]` -> `[B, N, E]`."""
    return snap_decays(torch.exp2(dt_t[:, None, :] * rate), threshold)


def _advance(h: Tensor, decay: Tensor, b_t: Tensor, dt_u_t: Tensor) -> Tensor:
    """h_t = a_t * h_{t-1} + B_t (dt_t u_t) in `[B, N, E]`, as a new tensor."""
    return (decay * h).baddbmm_(b_t[:, :, None], dt_u_t[:, None, :])


class SelectiveScan(torch.autograd.Function):
    """The S6 recurrence over T with a hand-written backward that recomputes the states.

    Time-major inputs: `dt, dt_u: [T, B, E]` (dt_u = dt * u), `b, c: [T, B, N]`, `rate: [N, E]`
    (A in base 2: a_t = exp2(dt_t * rate)), `h0: [B, N, E]`. Returns `y: [T, B, E]` with
    y_t = C_t . h_t, and the last state. Forward keeps only every RECOMPUTE_SEGMENT-th state;
    backward replays a segment's states from it, then walks the segment back in time. Training
    then holds a few states instead of T of them, and no step pays for autograd's bookkeeping.

    The state is laid out `[B, N, E]` so that C_t . h_t sums over a middle dim and vectorises
    along E; a sum over an innermost dim of 16 costs several times more. Not twice
    differentiable.
    """

    @staticmethod
    def forward(ctx, dt, dt_u, b, c, rate, h0, threshold: float):
        y = dt.new_empty(dt.shape)
        checkpoints, h = [], h0
        for t in range(dt.shape[0]):
            if t % RECOMPUTE_SEGMENT == 0:
                checkpoints.append(h)
            h = _advance(h, _decay(dt[t], rate, threshold), b[t], dt_u[t])
            torch.bmm(c[t, :, None, :], h, out=y[t, :, None, :])
        ctx.threshold = threshold
        ctx.save_for_backward(dt, dt_u, b, c, rate, torch.stack(checkpoints))
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y, g_h):
        *inputs, checkpoints = ctx.saved_tensors
        steps = inputs[0].shape[0]
        grads = _ScanGrads.for_inputs(*inputs)
        g_y = g_y.contiguous()  # it arrives as a transposed view
        adjoint = g_h.clone(memory_format=torch.contiguous_format)  # dLoss/dh_t, back in time
        for index in reversed(range(len(checkpoints))):
            start = index * RECOMPUTE_SEGMENT
            stop = min(start + RECOMPUTE_SEGMENT, steps)
            states, decays = _replay(checkpoints[index], inputs, ctx.threshold, start, stop)
            for t in reversed(range(start, stop)):
                i = t - start
                adjoint = grads.step_back(t, adjoint, states[i], states[i + 1], decays[i], g_y)
        return *grads.finish(), adjoint, None


def _replay(
    h: Tensor, inputs: list[Tensor], threshold: float, start: int, stop: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Steps `start` to `stop` again from the state before `start`: the states before and after
    each step (`stop - start + 1` of them) and the decays, each `[B, N, E]`."""
    dt, dt_u, b, _, rate = inputs
    states, decays = [h], []
    for t in range(start, stop):
        decays.append(_decay(dt[t], rate, threshold))
        states.append(_advance(states[-1], decays[-1], b[t], dt_u[t]))
    return states, decays


@dataclasses.dataclass
class _ScanGrads:
    """What `SelectiveScan.backward` fills one step at a time, beside the inputs it needs."""

    inputs: list[Tensor]  # dt, dt_u, b, c, rate as saved
    dt: Tensor  # [T, B, E], without the factor ln 2 of d exp2(z)/dz until `finish`
    dt_u: Tensor  # [T, B, E]
    b: Tensor  # [T, B, N]
    c: Tensor  # [T, B, N]
    rate: Tensor  # [B, N, E]: per batch row, summed over the batch once at the end
    exponent: Tensor  # [B, N, E] workspace: dLoss/d(dt_t * rate) of the current step

    @classmethod
    def for_inputs(cls, dt, dt_u, b, c, rate) -> _ScanGrads:
        state = torch.zeros(dt.shape[1], *rate.shape, dtype=dt.dtype, device=dt.device)
        return cls(
            inputs=[dt, dt_u, b, c, rate],
            dt=torch.empty_like(dt),
            dt_u=torch.empty_like(dt_u),
            b=torch.empty_like(b),
            c=torch.empty_like(c),
            rate=state,
            exponent=torch.empty_like(state),
        )

    def step_back(
        self, t: int, adjoint: Tensor, h_prev: Tensor, h: Tensor, decay: Tensor, g_y: Tensor
    ) -> Tensor:
        """Step t's gradients, from `adjoint` = dLoss/dh_t less this step's read; returns
        dLoss/dh_{t-1}, computed in place."""
        dt, dt_u, b, c, rate = self.inputs
        adjoint.baddbmm_(c[t, :, :, None], g_y[t, :, None, :])  # y_t = C_t . h_t
        # Sums over E as row-times-transposed-matrix products: BLAS runs those several times
        # faster than matrix-times-column on this layout.
        torch.bmm(g_y[t, :, None, :], h.mT, out=self.c[t, :, None, :])
        torch.bmm(dt_u[t, :, None, :], adjoint.mT, out=self.b[t, :, None, :])
        torch.bmm(b[t, :, None, :], adjoint, out=self.dt_u[t, :, None, :])
        # Through a_t = exp2(dt_t * rate); 0 where a decay was snapped, as in autograd.
        exponent = torch.mul(adjoint, h_prev, out=self.exponent).mul_(decay)
        torch.sum(exponent * rate, dim=1, out=self.dt[t])
        self.rate.addcmul_(exponent, dt[t, :, None, :])
        return adjoint.mul_(decay)

    def finish(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Gradients for dt, dt_u, b, c and rate."""
        ln2 = math.log(2.0)
        return self.dt.mul_(ln2), self.dt_u, self.b, self.c, self.rate.sum(0).mul_(ln2)
