"""Every cpu op on odd shapes, on every kernel path this CPU runs, in a process whose kernels
are built with AddressSanitizer (`SPIKEINFER_CPU_SANITIZE=1`, libasan preloaded): an overrun of a
hand-indexed scratch or output buffer aborts with ASan's report instead of corrupting a
neighbour. Run by `test_cpu_backend.py::test_kernels_under_address_sanitizer`; prints "clean" at
the end.
"""

from __future__ import annotations

import os

import torch

from spikeinfer import cpu_backend as cb
from spikeinfer.quant import binarize


def spikes(*shape, rate, gen):
    return (torch.rand(*shape, generator=gen) < rate).float()


def run_all(gen: torch.Generator) -> None:
    for T, M, K, N in [(1, 1, 1, 1), (3, 5, 15, 17), (2, 7, 65, 33), (2, 3, 300, 130)]:
        x = cb.pack_spikes(spikes(T, M, K, rate=0.3, gen=gen))
        signs, alpha = binarize(torch.randn(N, K, generator=gen))
        w, bias = cb.pack_signs(signs), torch.randn(N, generator=gen)
        cb.unpack_spikes(x, K)
        cb.neuron_scan(cb.binary_gemm(x, w, K, alpha, bias), 0.7)
        residual = cb.pack_spikes(spikes(T, M, N, rate=0.5, gen=gen))
        gate = (torch.rand(N, generator=gen) < 0.8).float()
        for epilogue in (cb.EPILOGUE_PLAIN, cb.EPILOGUE_GELU):
            cb.spike_linear_neuron(
                x, w, K, alpha, bias, epilogue=epilogue, gate=gate, return_current=True
            )
        ln_weight, ln_bias = torch.rand(N, generator=gen) + 0.5, torch.randn(N, generator=gen)
        cb.spike_linear_neuron(
            x,
            w,
            K,
            alpha,
            bias,
            epilogue=cb.EPILOGUE_LAYERNORM,
            residual=residual,
            ln_weight=ln_weight,
            ln_bias=ln_bias,
            return_current=True,
        )
    for T, B, S, d, H in [(1, 1, 1, 4, 1), (2, 2, 17, 8, 3), (2, 1, 70, 32, 2)]:
        D = d * H
        x, k, v = (cb.pack_spikes(spikes(T, B, S, D, rate=0.3, gen=gen)) for _ in range(3))
        signs, alpha = binarize(torch.randn(D, D, generator=gen))
        mask = torch.zeros(B, S)
        mask[0, S // 2 :] = -1e4  # padded keys
        cb.spiking_attention_neuron(
            x,
            cb.pack_signs(signs),
            D,
            alpha,
            torch.randn(D, generator=gen),
            k,
            v,
            mask,
            H,
            head_gate=torch.ones(H),
            return_current=True,
        )
    # Bernoulli draws: rows silent, saturated, mostly decided (packed path) and mostly undecided
    # (direct path), K around the 16-lane blocks and 64-bit words.
    for K in (1, 15, 16, 17, 63, 64, 65, 200):
        for silent in (0.0, 0.5, 1.0):
            rates = torch.rand(19, K, generator=gen)
            rates[torch.rand(19, K, generator=gen) < silent] = 0.0
            rates[torch.rand(19, K, generator=gen) < 0.1] = 1.0
            cb.bernoulli_pack(rates, torch.arange(K), K + 3, 5, 7, 3)


if __name__ == "__main__":
    gen = torch.Generator().manual_seed(0)
    paths = {"avx512-vpopcntdq": ["avx512", "avx2", "portable"], "avx2": ["avx2", "portable"]}
    for path in paths.get(cb.isa(), ["portable"]):
        os.environ["SPIKEINFER_CPU_ISA"] = path
        run_all(gen)
    print("clean")
