"""
The KV cache of the Eso-LM sampler (paper §5.3), in the gpt-fast spirit: per-layer K/V buffers preallocated
once for the batch and the sequence length, written by index, never grown by concatenation.

Slots [0, committed) hold the post-RoPE K/V of clean tokens, in denoising order; they never change.
A forward pass writes the K/V of the tokens it is fed at [committed, committed + T) and attends to
[0, committed + T). Those writes are provisional until the sampler calls commit(n) for the first n of them:
it commits the clean tokens it fed (the previous step's, now sampled) and never the current mask tokens,
whose slots the next step overwrites with the same tokens' clean K/V (pitfall 14). The model reads and
writes the cache it is handed but never advances it: only the sampler calls commit.
"""
import torch


class KVCache:

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device="cpu", dtype=torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.committed = 0  # slots [0, committed) are final
        self.max_len = max_len

    @classmethod
    def for_model(cls, config, batch_size, max_len=None, device="cpu", dtype=torch.float32):
        return cls(config.n_layer, batch_size, config.n_head, max_len or config.block_size,
                   config.n_embd // config.n_head, device, dtype)

    def update(self, layer, k, v):
        """Write k, v (B, nh, T, hd) provisionally after the committed prefix; return K/V over the prefix
        and them, (B, nh, committed + T, hd)."""
        end = self.committed + k.size(2)
        assert end <= self.max_len, f"cache of {self.max_len} slots cannot hold {end}"
        self.k[layer, :, :, self.committed:end] = k
        self.v[layer, :, :, self.committed:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n):
        """Make the first n provisional slots permanent: the clean tokens of the last forward pass."""
        self.committed += n
        assert self.committed <= self.max_len
