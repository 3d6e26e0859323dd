"""The teacher's top-K next-token log-probabilities at the positions a cache stores.

The model body runs once per batch; the output layer then runs only on the hidden states that
predict stored tokens, a chunk of rows at a time, with the log-softmax over the whole
vocabulary and the top-K taken in fp32 on the device. No [batch, seq, vocab] tensor is ever
held: at most one [rows, vocab] chunk. On CUDA the results go to the host through pinned
buffers on a side stream, so the copy of one batch overlaps the forward pass of the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

FP16_MIN = float(np.finfo(np.float16).min)
# Bytes of fp32 logits per row chunk: enough rows (500+ at V=128256 on CPU) that the matmul
# runs at full speed, few enough that the chunk is a small part of the device's memory.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


class HeadMismatchError(ValueError):
    """The top-K computed from hidden states disagrees with the model's own forward pass."""


class TopKScorer:
    """Top-K log-probabilities of a causal LM at chosen positions of a padded batch.

    `model` is a transformers causal LM whose `get_decoder()` returns the body (hidden states
    after the final norm) and whose `get_output_embeddings()` is the lm_head; the logit scale
    (Cohere) and final soft-capping (Gemma 2) of the config are applied like the model does.
    `check_against_forward` proves the equivalence on real input before a run relies on it.
    """

    def __init__(self, model, *, k: int, row_chunk: int | None = None):
        self.model = model
        self.body = model.get_decoder() if hasattr(model, "get_decoder") else None
        if self.body is None or self.body is model:
            raise ValueError(
                f"{type(model).__name__}: cannot separate the model body from its output layer "
                "(get_decoder() returns nothing); pass a decoder-only causal LM"
            )
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise ValueError(f"{type(model).__name__}: the model has no output layer weight")
        self.head = head
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)
        self.plain_linear = isinstance(head, torch.nn.Linear)
        self.vocab_rows = int(self.weight.shape[0])
        if not 1 <= k <= self.vocab_rows:
            raise ValueError(f"k={k}: must be in [1, {self.vocab_rows}] (the teacher's vocabulary)")
        self.k = k
        config = model.config
        self.logit_scale = getattr(config, "logit_scale", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.device = self.weight.device
        if row_chunk is None:
            budget = CHUNK_BYTES["cuda" if self.device.type == "cuda" else "cpu"]
            row_chunk = max(16, budget // (4 * self.vocab_rows))
        if row_chunk < 1:
            raise ValueError(f"row_chunk={row_chunk}: must be at least 1")
        self.row_chunk = int(row_chunk)
        self._logits_buffer: torch.Tensor | None = None  # reused on CPU: no page faults per chunk

    # -- the pass ------------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L, D] final hidden states of a right-padded batch.

        No attention mask is passed: with padding on the right and causal attention, no real
        token attends to a pad token, so the states of real tokens are those of an unpadded
        pass, and the kernels take their fastest causal path.
        """
        out = self.body(input_ids=input_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @torch.inference_mode()
    def score(
        self, input_ids: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K of the rows `rows` (flat indices into [B, L]) of a padded batch.

        Returns (ids int32 [N, K], logprobs fp16 [N, K]) on the device, each row sorted by
        log-probability, descending; log-probabilities below the fp16 range become -65504.
        """
        hidden = self.hidden_states(input_ids)
        flat = hidden.reshape(-1, hidden.shape[-1])
        return self.topk(flat.index_select(0, rows))

    @torch.inference_mode()
    def topk(self, hidden_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int32 [N, K], logprobs fp16 [N, K]) from final hidden states [N, D]."""
        n = hidden_rows.shape[0]
        ids = torch.empty((n, self.k), dtype=torch.int32, device=self.device)
        logprobs = torch.empty((n, self.k), dtype=torch.float16, device=self.device)
        for start in range(0, n, self.row_chunk):
            stop = min(n, start + self.row_chunk)
            values, indices = self.topk_fp32(hidden_rows[start:stop])
            ids[start:stop].copy_(indices)
            logprobs[start:stop].copy_(values.clamp_min_(FP16_MIN))
        return ids, logprobs

    def topk_fp32(self, hidden_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 top-K log-probabilities and int64 ids of one chunk of rows."""
        return topk_logprobs_(self.logits_fp32(hidden_rows), self.k)

    def logits_fp32(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """[rows, V] fp32 logits, as the model's own forward computes them."""
        n = hidden_rows.shape[0]
        if self.plain_linear and self.device.type == "cpu" and self.weight.dtype == torch.float32:
            buffer = self._logits_buffer
            if buffer is None or buffer.shape[0] < n:
                buffer = torch.empty((max(n, self.row_chunk), self.vocab_rows))
                self._logits_buffer = buffer
            logits = buffer[:n]
            if self.bias is None:
                torch.mm(hidden_rows, self.weight.t(), out=logits)
            else:
                torch.addmm(self.bias, hidden_rows, self.weight.t(), out=logits)
        elif self.plain_linear:
            logits = F.linear(hidden_rows, self.weight, self.bias).float()
        else:
            logits = self.head(hidden_rows).float()
        if self.logit_scale is not None:
            logits.mul_(float(self.logit_scale))
        if self.softcap is not None:
            logits.div_(float(self.softcap)).tanh_().mul_(float(self.softcap))
        return logits

    # -- the proof -----------------------------------------------------------------------
    @torch.inference_mode()
    def check_against_forward(self, input_ids: np.ndarray, *, tokens: int = 32) -> float:
        """Compare with `model(input_ids).logits.log_softmax(-1)` on up to `tokens` tokens.

        First the output layer: this path on the same sequence must give the model's own
        log-probabilities (same shapes, so any difference is a transformation of the logits
        this path misses), within 2e-3 nats in fp32 and 2**-6 of the largest logit in 16-bit
        dtypes. Then padding: the sequence cut shorter and scored in a right-padded batch
        beside the whole one must agree with its own forward pass; rounding differs between
        batch shapes, so 16-bit dtypes are allowed 1 nat (a real leak of padding into the
        states moves them further). Raises HeadMismatchError; returns the largest difference.
        """
        full = torch.as_tensor(np.asarray(input_ids[:tokens], dtype=np.int64), device=self.device)
        t = int(full.shape[0])
        if t < 2:
            return 0.0
        exact = self.weight.dtype == torch.float32

        def reference(ids: torch.Tensor) -> tuple[torch.Tensor, float]:
            logits = self.model(input_ids=ids[None], use_cache=False).logits[0].float()
            return torch.log_softmax(logits, dim=-1), float(logits.abs().max())

        whole, largest = reference(full)
        values, ids = self.topk_fp32(self.hidden_states(full[None])[0])
        head_error = _topk_error(whole, values, ids, self.k)
        head_tolerance = 2e-3 if exact else 2e-3 + largest * 2**-6
        short = max(2, t // 2)
        batch = torch.zeros((2, t), dtype=torch.int64, device=self.device)
        batch[0], batch[1, :short] = full, full[:short]
        padded = self.hidden_states(batch)[1, :short]
        values, ids = self.topk_fp32(padded)
        pad_error = _topk_error(reference(full[:short])[0], values, ids, self.k)
        pad_tolerance = 2e-3 if exact else 1.0
        if head_error > head_tolerance or pad_error > pad_tolerance:
            what = "output layer" if head_error > head_tolerance else "padded batch"
            raise HeadMismatchError(
                f"{type(self.model).__name__}: the top-{self.k} from the {what} differs from "
                f"the model's own forward pass by {max(head_error, pad_error):.3g} nats "
                f"(allowed {head_tolerance if what == 'output layer' else pad_tolerance:.3g}); "
                "this architecture transforms its logits or attends to padding in a way kd "
                "cache does not reproduce: report it with the model's config"
            )
        return max(head_error, pad_error)


def _topk_error(reference: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, k: int):
    """How far stored (values, ids) are from the reference log-probabilities: the value of
    each id, and no id left out that beats the K-th stored one."""
    at_ids = float((reference.gather(1, ids) - values).abs().max())
    missed = float((reference.topk(k, dim=-1).values[:, -1] - values[:, -1]).clamp_min(0).max())
    return max(at_ids, missed)


def topk_logprobs_(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest log-softmax entries of each row of fp32 `logits` [n, V],
    sorted descending, computed exactly; `logits` is overwritten.

    Selecting from the whole row is the costly part of a top-K, so it is done in two steps:
    the row's maxima over blocks of 64 (or 32) columns, then the k blocks with the largest
    maxima. Every one of the k largest entries lies in those blocks (an entry outside them
    would have k larger block maxima, so k larger entries, above it), so the top-k of their
    k x 64 columns, plus the columns after the last whole block, is the top-k of the row.
    The log-sum-exp then reuses the row maximum (the first value) and the logits' own memory.
    """
    n, vocab = logits.shape
    block = next((b for b in (64, 32) if 4 * k * b <= vocab), 0)
    if block:
        blocks = vocab // block
        maxima = logits[:, : blocks * block].view(n, blocks, block).amax(dim=-1)
        chosen = maxima.topk(k, dim=-1, sorted=False).indices
        columns = torch.arange(block, device=logits.device)
        candidates = (chosen.unsqueeze(-1) * block + columns).reshape(n, k * block)
        if blocks * block < vocab:
            tail = torch.arange(blocks * block, vocab, device=logits.device)
            candidates = torch.cat([candidates, tail.expand(n, -1)], dim=1)
        values, picked = logits.gather(1, candidates).topk(k, dim=-1, sorted=True)
        ids = candidates.gather(1, picked)
    else:
        values, ids = logits.topk(k, dim=-1, sorted=True)
    top = values[:, :1].clone()
    lse = logits.sub_(top).exp_().sum(dim=-1, keepdim=True).log_().add_(top)
    return values.sub_(lse), ids


@dataclass
class PendingCopy:
    """Results on their way to the host; `result()` waits for them as numpy arrays."""

    tensors: list[torch.Tensor]
    done: torch.cuda.Event | None = None

    def result(self) -> list[np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        return [t.numpy() for t in self.tensors]


class HostCopies:
    """Moves batch results to the host without stalling the device.

    On CUDA each copy runs on a side stream into pinned host memory, after an event marks the
    results ready on the compute stream; the compute stream goes on with the next batch. The
    device tensors are recorded on the side stream so the allocator does not hand their memory
    to the next batch before the copy has read it. Elsewhere the results already are on the host.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.stream is None:
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def start(self, tensors: list[torch.Tensor]) -> PendingCopy:
        if self.stream is None:
            return PendingCopy([t.cpu() for t in tensors])
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            hosts = []
            for tensor in tensors:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(self.stream)
                hosts.append(host)
            done = torch.cuda.Event()
            done.record(self.stream)
        return PendingCopy(hosts, done)
