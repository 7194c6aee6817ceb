"""
The KV cache of the Eso-LM sampler (the paper's unified cache, Fig. 2), in the gpt-fast spirit: one K and one V
buffer per layer, preallocated for the batch and the sequence length, written by index, never grown.

Slots [0, committed) hold the post-RoPE K/V of clean tokens, in denoising order; they never change. Before each
forward pass the sampler says how many tokens it feeds and how many slots attention reads (`feed(n, keys)`): the
pass writes its n tokens' K/V at slots [committed, committed + n) and reads [0, keys). Those writes stay
provisional until the sampler commits the first of them: the clean tokens it fed (the previous step's, now
sampled), never the masks fed after them, whose slots the next step overwrites with the same tokens' clean K/V
(a mask's K/V, committed, would be read by every later token as if it were context). The model reads and writes
the cache it is handed but never advances it.

For CUDA graphs every step must have the same shapes and the buffers the same addresses: the sampler then feeds
a padded chunk and reads all max_len slots, and a caller that samples more than once hands the same cache to every
run (static=True). Each layer's buffer is a tensor of its own, marked static, so that a compiled step writes it in
place (a write into a slice of one big buffer is compiled as a copy of the whole slice).
"""
import torch


class KVCache:

    def __init__(self, config, batch_size, max_len, device="cpu", dtype=torch.float32, static=False):
        """One K and one V buffer (B, nh, max_len, hd) per layer of the model `config` describes."""
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)] for _ in "kv")
        if static:  # a graph replay writes these buffers in place: their addresses must never change
            for buffer in self.k + self.v:
                torch._dynamo.mark_static_address(buffer)
        self.dtype = dtype
        self.reset()

    def reset(self):
        """Empty the cache for a new run (the buffers stay where they are)."""
        self.committed, self.slots = 0, None

    def feed(self, n, keys):
        """The next pass is fed n tokens: it writes their K/V at slots [committed, committed + n) (a tensor of
        indices, so that a captured graph replays at any `committed`) and reads slots [0, keys)."""
        self.slots = torch.arange(self.committed, self.committed + n, device=self.k[0].device)
        self.keys = keys

    def update(self, layer, k, v):
        """Write k, v (B, nh, n, hd) provisionally at the fed slots; return K/V (B, nh, keys, hd)."""
        self.k[layer].index_copy_(2, self.slots, k.to(self.dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.dtype))
        return self.k[layer][:, :, :self.keys], self.v[layer][:, :, :self.keys]

    def commit(self, n):
        """Make the first n slots fed by the last pass permanent: its clean tokens, never its masks."""
        assert n <= len(self.slots), "commit only slots the last pass fed"
        self.committed += n
        self.slots = None
