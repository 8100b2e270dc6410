"""``frozen_optimizer_state: cpu`` without stalling the step: asynchronous, reused host copies of the
optimizer state of frozen layers.

:class:`OptimizerStateOffload` moves a parameter's optimizer-state tensors (Adam's moments; never the
``step`` counter) between the training device and host memory:

* each parameter's state tensor gets ONE host buffer, allocated the first time it leaves the device
  (pinned where CUDA is available, so copies run as DMA without a host stall) and reused on every later
  trip; host memory is bounded by the optimizer state of the layers that were ever frozen;
* each direction runs on its own side stream (PCIe is full duplex), after both have waited for what the
  training stream has queued (so a device→host copy reads the moments the last ``optimizer.step()``
  wrote) and for each other's earlier copies (a host buffer is written only after the copy that read it
  ended, and read only after the copy that wrote it ended); nothing here blocks the host, so the copies of
  one selection overlap the next forward and backward;
* host→device copies of the newly selected layers are issued as soon as the set is chosen; a step
  pre-hook on the optimizer makes the training stream wait for them (a stream wait, not a host sync) just
  before ``optimizer.step()`` reads them;
* the device tensor a device→host copy reads from stays referenced until the training stream has waited
  on the event recorded after that copy (or the host saw the event complete), so the caching allocator
  cannot hand its memory to new work while the copy still reads it;
* anything that reads host state on the host (``optimizer.state_dict()`` for a checkpoint, :meth:`close`)
  first waits for every pending copy.

On a device without streams (CPU) the same code runs with :class:`NoCopyStreams`, whose methods do
nothing; when parameters already live in host memory no copy is needed and none is made (``always_copy``
makes the copies anyway, so that tests on a CPU-only machine exercise the buffers and the bookkeeping).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable

import torch

LOG = logging.getLogger(__name__)

HOST = torch.device("cpu")


class NoCopyStreams:
    """The stream/event layer for devices without streams: every call does nothing."""

    def prepare(self) -> None:
        """Order the copies about to be issued after the training stream's queued work and earlier copies."""

    def copies(self, direction: str):
        """Context in which the copies of one direction ("d2h" or "h2d") are issued."""
        return contextlib.nullcontext()

    def record(self) -> Any:
        """An event marking every copy issued so far."""
        return None

    def wait(self, event: Any) -> None:
        """Make the training stream wait for ``event`` (no host sync)."""

    def query(self, event: Any) -> bool:
        """True when the copies before ``event`` have finished (never blocks)."""
        return True

    def synchronize(self, event: Any) -> None:
        """Block the host until the copies before ``event`` have finished."""


class CudaCopyStreams(NoCopyStreams):
    """Two side streams per device (one per direction) for the copies, and CUDA events that order the
    training stream after them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.streams = {"d2h": torch.cuda.Stream(device=device), "h2d": torch.cuda.Stream(device=device)}

    def prepare(self) -> None:
        d2h, h2d = self.streams["d2h"], self.streams["h2d"]
        h2d.wait_stream(d2h)  # earlier device→host copies wrote host buffers the new host→device ones read
        d2h.wait_stream(h2d)  # earlier host→device copies read host buffers the new device→host ones write
        main = torch.cuda.current_stream(self.device)
        d2h.wait_stream(main)
        h2d.wait_stream(main)

    @contextlib.contextmanager
    def copies(self, direction: str):
        with torch.cuda.stream(self.streams[direction]):
            yield

    def record(self) -> Any:
        events = []
        for stream in self.streams.values():
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return events

    def wait(self, event: Any) -> None:
        main = torch.cuda.current_stream(self.device)
        for e in event:
            main.wait_event(e)

    def query(self, event: Any) -> bool:
        return all(e.query() for e in event)

    def synchronize(self, event: Any) -> None:
        for e in event:
            e.synchronize()


def default_streams(device: torch.device) -> NoCopyStreams:
    return CudaCopyStreams(device) if device.type == "cuda" else NoCopyStreams()


def _state_tensors(param_state: dict) -> Iterable[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in param_state.items() if k != "step" and torch.is_tensor(v)]


class OptimizerStateOffload:
    """Host copies of frozen parameters' optimizer state, moved asynchronously (see the module doc).

    ``optimizer``: the torch optimizer (not accelerate's wrapper). ``streams_for(device)`` gives the
    stream/event layer of a device (tests pass fakes that record the calls). The step pre-hook and a
    state-dict pre-hook are installed here and removed by :meth:`close`.
    """

    def __init__(self, optimizer: Any, *, streams_for: Callable[[torch.device], NoCopyStreams] = default_streams,
                 always_copy: bool = False):
        self.optimizer = optimizer
        self.streams_for = streams_for
        self.always_copy = always_copy
        self._streams: dict[torch.device, NoCopyStreams] = {}
        self._host: dict[tuple[int, str], torch.Tensor] = {}  # (id(param), state key) -> host buffer
        self._pinned = torch.cuda.is_available()
        self._ready: dict[torch.device, Any] = {}  # device -> event after its latest copies, not yet waited on
        self._sources: dict[torch.device, list[tuple[Any, list[torch.Tensor]]]] = {}  # read by pending copies
        self.last_d2h_bytes = self.last_h2d_bytes = 0
        self.total_d2h_bytes = self.total_h2d_bytes = 0
        self.moves = 0
        self._hooks = []
        if hasattr(optimizer, "register_step_pre_hook"):
            self._hooks.append(optimizer.register_step_pre_hook(self._before_step))
        else:
            LOG.warning("irtuning: the optimizer %s has no register_step_pre_hook, so frozen_optimizer_state: cpu "
                        "waits for its copies right after each selection (no overlap)", type(optimizer).__name__)
        if hasattr(optimizer, "register_state_dict_pre_hook"):
            self._hooks.append(optimizer.register_state_dict_pre_hook(lambda opt: self.synchronize()))

    # ---- buffers ------------------------------------------------------------------------------------
    def _streams_of(self, device: torch.device) -> NoCopyStreams:
        if device not in self._streams:
            self._streams[device] = self.streams_for(device)
        return self._streams[device]

    def _host_buffer(self, p: torch.Tensor, key: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._host.get((id(p), key))
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            pin = self._pinned and like.device.type == "cuda"
            buf = torch.empty(like.shape, dtype=like.dtype, device=HOST, pin_memory=pin)
            self._host[(id(p), key)] = buf
        return buf

    def host_buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._host.values())

    def host_buffers(self) -> dict[tuple[int, str], torch.Tensor]:
        """(id(param), state key) -> host buffer (for tests and the memory account)."""
        return dict(self._host)

    # ---- moves --------------------------------------------------------------------------------------
    def move(self, to_host: Iterable[torch.Tensor], to_device: Iterable[torch.Tensor]) -> tuple[int, int]:
        """Issue the copies of one selection: the state of ``to_host`` parameters into their host buffers,
        the state of ``to_device`` parameters back onto each parameter's device. Returns the bytes
        (device→host, host→device) issued; the state dicts point at the destinations at once."""
        state = self.optimizer.state
        d2h: dict[torch.device, list] = {}
        h2d: dict[torch.device, list] = {}
        for p in to_host:
            for key, value in _state_tensors(state.get(p, {})):
                if value.device != HOST or self.always_copy and not self._is_buffer(p, key, value):
                    d2h.setdefault(value.device, []).append((p, key, value))
        for p in to_device:
            for key, value in _state_tensors(state.get(p, {})):
                if value.device != p.device or self.always_copy and self._is_buffer(p, key, value):
                    h2d.setdefault(p.device, []).append((p, key, value))
        d2h_bytes = h2d_bytes = 0
        for device in sorted(set(d2h) | set(h2d), key=str):
            streams = self._streams_of(device)
            self._release_finished(device)
            # Destinations of host→device copies are allocated on the training stream: the side stream
            # waits for that stream below, so no queued kernel still uses their memory when the copies land.
            dests = [torch.empty_like(v, device=p.device) for p, _, v in h2d.get(device, [])]
            sources = []
            streams.prepare()
            with streams.copies("d2h"):
                for p, key, value in d2h.get(device, []):
                    buf = self._host_buffer(p, key, value)
                    buf.copy_(value, non_blocking=True)
                    state[p][key] = buf
                    sources.append(value)
                    d2h_bytes += value.numel() * value.element_size()
            with streams.copies("h2d"):
                for dest, (p, key, value) in zip(dests, h2d.get(device, []), strict=True):
                    dest.copy_(value, non_blocking=True)
                    state[p][key] = dest
                    h2d_bytes += value.numel() * value.element_size()
            event = streams.record()
            self._ready[device] = event
            if sources:
                self._sources.setdefault(device, []).append((event, sources))
            if not self._hooks:
                self._before_step(self.optimizer, (), {})
        self.last_d2h_bytes, self.last_h2d_bytes = d2h_bytes, h2d_bytes
        self.total_d2h_bytes += d2h_bytes
        self.total_h2d_bytes += h2d_bytes
        self.moves += 1
        return d2h_bytes, h2d_bytes

    def _is_buffer(self, p, key, value) -> bool:
        return self._host.get((id(p), key)) is value

    def _release_finished(self, device: torch.device) -> None:
        streams = self._streams_of(device)
        self._sources[device] = [(e, s) for e, s in self._sources.get(device, []) if not streams.query(e)]

    def _before_step(self, optimizer, args, kwargs) -> None:
        """Step pre-hook: the training stream waits for the latest copies; their sources may then go."""
        for device, event in list(self._ready.items()):
            self._streams_of(device).wait(event)
            # Work queued on the training stream from now on runs after every copy so far: the memory the
            # device→host copies read can be handed out again.
            self._sources.pop(device, None)
        self._ready.clear()

    def synchronize(self) -> None:
        """Block the host until every copy issued so far has finished (host state is then readable)."""
        for device, event in self._ready.items():
            self._streams_of(device).synchronize(event)
        for device, pending in self._sources.items():
            for event, _ in pending:
                self._streams_of(device).synchronize(event)
        self._sources.clear()

    def close(self) -> None:
        """Wait for pending copies and remove the optimizer hooks."""
        self.synchronize()
        self._before_step(self.optimizer, (), {})
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
