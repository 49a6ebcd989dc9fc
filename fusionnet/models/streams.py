"""Running a model's branches each on its own CUDA stream, so that small trunks' kernels can overlap.

A :class:`StreamRunner` is a branch runner (``FusionNet.set_branch_runner``): it owns its side streams
(made once per device and slot), and the trainer installs it through :class:`fusionnet.engine.callbacks.BranchStreams`
when ``TrainConfig.branch_streams`` is on. Results equal running the branches in turn (tests/test_cuda.py).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch


class StreamRunner:
    """``runner(x, {name: call})`` -> ``{name: call()}``, each call on its own CUDA stream.

    Each side stream first waits for the work already queued on the caller's stream (which produced ``x``); the
    caller's stream then waits for all of them. The caching allocator is told where tensors are used across
    streams (``record_stream``), so no memory is reused while another stream may still read it. Autograd runs each
    backward op on its forward op's stream.
    """

    def __init__(self) -> None:
        self.streams: dict[tuple[int, int], torch.cuda.Stream] = {}  # (device index, slot) -> a side stream

    def _stream(self, device: torch.device, slot: int) -> "torch.cuda.Stream":
        key = (device.index if device.index is not None else torch.cuda.current_device(), slot)
        if key not in self.streams:
            self.streams[key] = torch.cuda.Stream(device)
        return self.streams[key]

    def __call__(self, x: torch.Tensor, calls: Mapping[str, Callable[[], object]]) -> dict[str, object]:
        main = torch.cuda.current_stream(x.device)
        results, used = {}, []
        for slot, (name, call) in enumerate(calls.items()):
            stream = self._stream(x.device, slot)
            stream.wait_stream(main)
            x.record_stream(stream)
            with torch.cuda.stream(stream):
                results[name] = call()
            used.append(stream)
        for stream in used:
            main.wait_stream(stream)
        for t in _tensors(results):
            t.record_stream(main)
        return results


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]
