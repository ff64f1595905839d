"""CUDA-graph decoding: capture one decode step of any model and replay it token by token.

`GraphedStep` takes a step function `step(token_ids, state) -> (logits, new_state)` where
`token_ids` is (B,) and `state` is a list of tuples of tensors whose shapes stay fixed for a batch
size (the FP model's `MambaLM.step_unchecked`, the quantized model's `step`, ...). It owns static
buffers for the token ids and the state, captures `step` once into a `torch.cuda.CUDAGraph`
together with copies of the new state back into the static state buffers, and each call then
copies the token ids in and replays the graph: the state continues inside the graph, and the
logits land in a static output buffer.

Requirements on `step` (what CUDA graphs require): every tensor on one CUDA device, no host
synchronisation (`.item()`, `bool(tensor)`, `.any()` in an `if`, `.cpu()`, `print(tensor)`, data
dependent shapes), the same work for every call (no Python branches on tensor values), and new
state tensors that are not views of other state buffers. It may update its input state in place.
Replays run the captured kernels on the current stream, so a replay gives the same bits as the
eager step whose kernels it recorded.

Example::

    graphed = GraphedStep(model.step_unchecked, first_tokens, state)
    for _ in range(n):
        logits = graphed(tokens)          # static buffer: overwritten by the next call
        tokens = logits.argmax(-1)
    final_state = graphed.state           # static buffers (clone to keep)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["GraphCaptureError", "GraphedStep", "StepFunction"]

State = list[tuple[torch.Tensor, ...]]
StepFunction = Callable[
    [torch.Tensor, State], tuple[torch.Tensor, Sequence[Sequence[torch.Tensor]]]
]


class GraphCaptureError(RuntimeError):
    """The step could not be captured into a CUDA graph; the message names the likely cause."""


def _check_token_ids(token_ids: torch.Tensor, what: str) -> None:
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (B,), got {type(token_ids).__name__}")
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"{what} must have shape (batch,), got {tuple(token_ids.shape)}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex:
        raise TypeError(f"{what} must be an integer tensor, got {token_ids.dtype}")
    if token_ids.device.type != "cuda":
        raise ValueError(
            f"CUDA graphs need CUDA tensors, but {what} is on {token_ids.device} "
            "(a CPU model cannot be graphed: run its step eagerly)"
        )


def _as_state(state, what: str) -> State:
    """The state as a list of tuples of tensors (checked: a list of layers of tensors)."""
    if not isinstance(state, Sequence) or isinstance(state, torch.Tensor) or not state:
        raise TypeError(f"{what} must be a non-empty list of tuples of tensors, got {type(state)}")
    layers: State = []
    for index, layer in enumerate(state):
        if not isinstance(layer, Sequence) or isinstance(layer, torch.Tensor):
            raise TypeError(f"{what}[{index}] must be a tuple of tensors, got {type(layer)}")
        for tensor in layer:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{what}[{index}] holds a {type(tensor).__name__}, not a tensor")
        layers.append(tuple(layer))
    return layers


def _check_same_layout(new: State, static: State, what: str) -> None:
    if len(new) != len(static) or any(len(a) != len(b) for a, b in zip(new, static)):
        raise ValueError(f"{what} has a different structure than the state the step was given")
    for index, (new_layer, static_layer) in enumerate(zip(new, static)):
        for position, (a, b) in enumerate(zip(new_layer, static_layer)):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise ValueError(
                    f"{what}[{index}][{position}] is {a.dtype} {tuple(a.shape)} on {a.device} but "
                    f"the state had {b.dtype} {tuple(b.shape)} on {b.device}: a graphed step "
                    "must keep the state's shapes, dtypes and device"
                )


_WARM_UP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _warm_up_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up: torch gives each new stream its own cuBLAS
    workspace (32 MiB on Hopper) and keeps it for the life of the process, so a new stream per
    GraphedStep (one per ``generate`` call) would add up."""
    stream = _WARM_UP_STREAMS.get(device)
    if stream is None:
        stream = _WARM_UP_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class GraphedStep:
    """A decode step captured into a CUDA graph, with static token, state and logits buffers.

    `step(token_ids, state) -> (logits, new_state)`: see the module doc for what it may do.
    `token_ids` (B,) integer CUDA tensor: an example input (fixes the batch size and dtype).
    `state`: the state to start from (list of tuples of CUDA tensors); it is copied, not kept.
    `warmup_steps`: eager runs on a side stream before the capture (as PyTorch documents for
    cuBLAS/allocator warm-up); they do not advance the state.

    Raises ValueError/TypeError for CPU tensors or malformed inputs, and GraphCaptureError when
    the step cannot be captured (most often a host synchronisation inside it).
    """

    def __init__(
        self,
        step: StepFunction,
        token_ids: torch.Tensor,
        state: Sequence[Sequence[torch.Tensor]],
        *,
        warmup_steps: int = 2,
    ) -> None:
        if not callable(step):
            raise TypeError(f"step must be callable, got {type(step).__name__}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        _check_token_ids(token_ids, "token_ids")
        layers = _as_state(state, "state")
        self.device = token_ids.device
        for index, layer in enumerate(layers):
            for tensor in layer:
                if tensor.device != self.device:
                    raise ValueError(
                        f"state[{index}] holds a tensor on {tensor.device}, but the token ids "
                        f"are on {self.device}: a graphed step needs everything on one CUDA device"
                    )
        self._step = step
        with torch.no_grad(), torch.cuda.device(self.device):
            self._token_ids = token_ids.clone()
            self._state: State = [tuple(t.clone() for t in layer) for layer in layers]
            self._warm_up(warmup_steps)
            self._graph, self._logits = self._capture()
            # The warm-up may have run a step that updates its input state in place.
            self.set_state(layers)

    @property
    def batch_size(self) -> int:
        return self._token_ids.shape[0]

    @property
    def state(self) -> State:
        """The static state buffers: the state after the last call (overwritten by the next)."""
        return self._state

    def set_state(self, state: Sequence[Sequence[torch.Tensor]]) -> None:
        """Copy `state` (same structure, shapes and dtypes) into the static state buffers."""
        layers = _as_state(state, "state")
        _check_same_layout(layers, self._state, "state")
        with torch.no_grad():
            for static_layer, layer in zip(self._state, layers):
                for static, tensor in zip(static_layer, layer):
                    static.copy_(tensor)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: token_ids (B,) -> logits (the static output buffer; clone to keep)."""
        if not isinstance(token_ids, torch.Tensor):
            raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
        if token_ids.shape != self._token_ids.shape:
            raise ValueError(
                f"this graph was captured for batch size {self.batch_size} (token ids of shape "
                f"{tuple(self._token_ids.shape)}), got shape {tuple(token_ids.shape)}: capture a "
                "new GraphedStep for another batch size"
            )
        if token_ids.device != self.device:
            raise ValueError(
                f"token_ids are on {token_ids.device} but the graph was captured on {self.device}"
            )
        self._token_ids.copy_(token_ids)
        self._graph.replay()
        return self._logits

    # --- capture ------------------------------------------------------------------------------

    def _warm_up(self, steps: int) -> None:
        side = _warm_up_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(steps):
                logits, new_state = self._step(self._token_ids, self._state)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"step must return (logits tensor, new state), got {type(logits)}")
        _check_same_layout(_as_state(new_state, "the new state"), self._state, "the new state")

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        stream_before = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph):
                logits, new_state = self._step(self._token_ids, self._state)
                # Inside the graph: the next replay starts from this step's new state.
                for static_layer, new_layer in zip(self._state, new_state):
                    for static, new in zip(static_layer, new_layer):
                        static.copy_(new)
        except RuntimeError as exc:
            # A failed capture can leave the capture stream current: restore the caller's.
            torch.cuda.set_stream(stream_before)
            first = exc.__context__ if exc.__context__ is not None else exc
            raise GraphCaptureError(
                "could not capture the decode step into a CUDA graph. The likely cause is a "
                "host synchronisation inside the step (.item(), .any()/.all() or bool() of a "
                "tensor, .cpu(), .tolist(), printing a tensor, data-dependent shapes) or a CPU "
                f"tensor in it; run it eagerly (cuda_graph=False) instead. CUDA said: {first}"
            ) from exc
        except BaseException:
            torch.cuda.set_stream(stream_before)
            raise
        return graph, logits
