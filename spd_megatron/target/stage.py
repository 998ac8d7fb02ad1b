"""TargetStage: this rank's share of the target model, one forward step at an explicit position."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from spd_megatron.target.arch import ArchSpec
from spd_megatron.target.build import StagePlacement
from spd_megatron.target.kv_cache import StageKVCache, causal_mask


class TargetStage:
    """Runs the layers of one pipeline stage over a KV cache.

    The first stage takes token ids ``[1, n]``; the others take the previous stage's hidden states
    ``[n, 1, h]`` (megatron layout). Non-last stages return hidden ``[n, 1, h]``; the last stage
    returns full-vocabulary logits ``[1, n, V]`` (gathered across TP ranks).

    Anchor taps: ``set_taps(indices)`` records the residual stream ``h^k`` (k = layers done, 0 = the
    embedding, pre-final-norm) for the indices this stage produces, in ``self.taps`` after each
    forward. Nothing is recorded (and no hook exists) when no tap is asked for.

    Devices: the model lives on ``device``. Inputs given on another device (token ids built on the
    host, hidden states that came through a gloo link) are moved there first (a no-op on CPU);
    outputs stay there. ``decode_graphs`` (``model.cuda_graphs``) replays one-token steps as CUDA
    graphs; None runs every step eagerly. ``compiled`` (``model.compile``, target/compiled.py)
    runs the row counts it was compiled for through ``torch.compile``.
    """

    def __init__(self, model: torch.nn.Module, arch: ArchSpec, placement: StagePlacement,
                 max_seq_len: int, device: Optional[torch.device] = None) -> None:
        self.model = model
        self.arch = arch
        self.placement = placement
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.cache = StageKVCache(max_seq_len)
        self.taps: dict[int, Tensor] = {}
        self.tap_indices: tuple[int, ...] = ()
        self._hooks: list = []
        self._dummy_ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.decode_graphs = None  # a target.cuda_graphs.DecodeGraphs, or None (eager)
        self.compiled = None  # a target.compiled.CompiledSteps, or None (eager)

    @property
    def produced_indices(self) -> range:
        """Hidden-state indices k this stage produces (0 = embedding on the first stage)."""
        first = 0 if self.placement.is_first else self.placement.layer_start + 1
        return range(first, self.placement.layer_end + 1)

    def set_taps(self, indices: Iterable[int]) -> None:
        """Record h^k for every k in ``indices`` that this stage produces."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.taps = [], {}
        self.tap_indices = tuple(sorted(set(indices) & set(self.produced_indices)))
        for k in self.tap_indices:
            module = self._module_producing(k)
            self._hooks.append(module.register_forward_hook(self._recorder(k)))
        if self.compiled is not None and self.cache.length == 0:
            self.warm_up_compiled()  # compile the new tap set now, not during a decode

    def warm_up_compiled(self) -> None:
        """Compile every row count of ``self.compiled`` for the current taps (on an empty cache)."""
        dtype = next(self.model.parameters()).dtype
        h = self.arch.hidden_size

        def make_input(count: int) -> Tensor:
            if self.placement.is_first:
                return torch.zeros(1, count, dtype=torch.long, device=self.device)  # [1, R] ids
            return torch.zeros(count, 1, h, dtype=dtype, device=self.device)  # [R, 1, h]

        self.compiled.warm_up(make_input, self.tap_indices)

    def _module_producing(self, k: int) -> torch.nn.Module:
        if k == 0:
            return self.model.embedding
        return self.model.decoder.layers[k - 1 - self.placement.layer_start]

    def _recorder(self, k: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.taps[k] = hidden  # [n, 1, h]

        return hook

    def forward(self, start: int, token_ids: Optional[Tensor] = None,
                hidden: Optional[Tensor] = None) -> Tensor:
        """Process ``n`` consecutive tokens at positions [start, start + n), extending the cache.

        Args:
            start: position of the first token; the cache is truncated to ``start`` first.
            token_ids: [1, n] ids (first stage only).
            hidden: [n, 1, h] input hidden states (non-first stages only).

        Returns:
            [n, 1, h] hidden states, or [1, n, V] logits on the last stage (on ``self.device``).
        """
        count = token_ids.shape[1] if self.placement.is_first else hidden.shape[0]
        token_ids = None if token_ids is None else token_ids.to(self.device)
        hidden = None if hidden is None else hidden.to(self.device)
        if count == 1 and self.decode_graphs is not None:
            out = self.decode_graphs.step(start, token_ids, hidden)
            if out is not None:
                return out
        if self.compiled is not None:
            result = self.compiled.run(token_ids if self.placement.is_first else hidden, start, self.tap_indices)
            if result is not None:
                out, taps = result
                self.taps = dict(taps)
                return out
        return self.eager_forward(start, count, token_ids, hidden)

    def eager_forward(self, start: int, count: int, token_ids: Optional[Tensor],
                      hidden: Optional[Tensor]) -> Tensor:
        """``forward`` without CUDA graphs; inputs already on ``self.device``."""
        self.cache.prepare_write(start, count)
        if not self.placement.is_first:
            self.model.set_input_tensor(hidden)
        mask = causal_mask(start, count, self.arch.sliding_window, self.device)
        out = self.model(
            token_ids if self.placement.is_first else self._dummy_ids,
            None,
            mask,
            inference_context=self.cache.context,
            runtime_gather_output=True,
        )
        self.cache.commit_write(start, count)
        return out
