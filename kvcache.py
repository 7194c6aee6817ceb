"""
The KV cache of the Eso-LM sampler (the paper's unified cache, Fig. 2), in the gpt-fast spirit: one K and one V
buffer per layer, preallocated for the batch and the sequence length, written by index, never grown by
concatenation.

Slots [0, committed) hold the post-RoPE K/V of clean tokens, in denoising order; they never change.
Before each forward pass the sampler says how many tokens it feeds and how many slots attention reads
(`feed(T, keys)`): the pass writes its T tokens' K/V at slots [committed, committed + T) and reads [0, keys).
Those writes are provisional until the sampler calls commit(n) for the first n of them: it commits the clean
tokens it fed (the previous step's, now sampled) and never the current mask tokens, whose slots the next step
overwrites with the same tokens' clean K/V (a mask's K/V, committed, would be read by every later token as if
it were context). The model reads and writes the cache it is handed but never advances it.

For CUDA graphs (torch.compile's reduce-overhead mode) every step must have the same shapes and the buffers
the same addresses: the sampler then feeds a padded chunk and reads all max_len slots, and a caller that
samples more than once hands the same cache to every run (static=True). Each layer's buffer is a tensor of its
own, marked static, so that a compiled step writes it in place (a write into a slice of one big buffer is
compiled as a copy of the whole slice).
"""
import torch


class KVCache:

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device="cpu", dtype=torch.float32,
                 static=False):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        if static:  # a graph replay writes these buffers in place: their address must never change
            for buffer in self.k + self.v:
                torch._dynamo.mark_static_address(buffer)
        self.committed = 0  # slots [0, committed) are final
        self.max_len, self.dtype = max_len, dtype
        self.slots, self.keys = None, 0

    @classmethod
    def for_model(cls, config, batch_size, max_len=None, device="cpu", dtype=torch.float32, static=False):
        return cls(config.n_layer, batch_size, config.n_head, config.block_size if max_len is None else max_len,
                   config.n_embd // config.n_head, device, dtype, static)

    def feed(self, T, keys):
        """The next forward pass is fed T tokens: it writes their K/V at slots [committed, committed + T) (a
        tensor of indices, so that a captured graph can be replayed at any `committed`) and reads [0, keys)."""
        if not (T >= 1 and self.committed + T <= keys <= self.max_len):
            raise ValueError(f"a pass must write at least one slot and read those it writes: writes {T} at "
                             f"{self.committed}, reads {keys} of {self.max_len}")
        self.slots = torch.arange(self.committed, self.committed + T, device=self.k[0].device)
        self.keys = keys

    def update(self, layer, k, v):
        """Write k, v (B, nh, T, hd) provisionally at the fed slots; return K/V (B, nh, keys, hd)."""
        if self.slots is None:
            raise ValueError("no slots to write: call feed() before each forward pass")
        if k.dtype != self.dtype:  # (the network makes its keys in fp32, its values in autocast's dtype)
            k = k.to(self.dtype)
        if v.dtype != self.dtype:
            v = v.to(self.dtype)
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer][:, :, :self.keys], self.v[layer][:, :, :self.keys]

    def reset(self):
        """Empty the cache for a new run (the buffers stay where they are)."""
        self.committed, self.slots, self.keys = 0, None, 0

    def commit(self, n):
        """Make the first n provisional slots permanent: the clean tokens of the last forward pass (its masks, fed
        after them, are never committed: the caller's n stops before them). Once per pass."""
        fed = 0 if self.slots is None else len(self.slots)
        if not 0 <= n <= fed:
            raise ValueError(f"commit({n}): the last pass was fed {fed} slots since the last commit")
        self.committed += n
        self.slots = None
