"""A frozen input-embedding table kept in host memory during training.

LoRA never trains the input embedding, and a batch only reads the rows of its own tokens. Keeping the table on
the CPU and copying just those rows (a few MB) to the GPU frees vocab × hidden × 2 bytes of GPU memory: 1 GiB
for a 152k-vocabulary 7B model, which lean mode spends on larger packed batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class HostEmbedding(torch.nn.Module):
    def __init__(self, embedding: torch.nn.Embedding, device: torch.device) -> None:
        super().__init__()
        # A plain attribute, not a parameter: DDP, optimizers and adapter saving never see the table.
        self.table = embedding.weight.detach().to("cpu")
        self.padding_idx = embedding.padding_idx
        self.device = device

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids.to("cpu"), self.table, self.padding_idx)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)


def embed_on_host(model: torch.nn.Module) -> int:
    """Swap the model's untied GPU input embedding for a :class:`HostEmbedding`, before LoRA is added (LoRA leaves
    it frozen); returns the GPU bytes freed (0, and nothing changed, for a tied or CPU-resident embedding)."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    weight = getattr(embedding, "weight", None)
    if (
        not isinstance(embedding, torch.nn.Embedding)
        or weight.device.type != "cuda"
        or (output is not None and getattr(output, "weight", None) is weight)  # tied: the head still needs it
    ):
        return 0
    model.set_input_embeddings(HostEmbedding(embedding, weight.device))
    return weight.numel() * weight.element_size()
