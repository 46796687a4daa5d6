"""How our NF4 state compares with bitsandbytes' CPU quantizer, byte for byte
(the numbers in docs/format.md). Needs bitsandbytes; runs on the CPU in a minute."""

from __future__ import annotations

import torch

import qlora_triton as qt


def main() -> None:
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((4096, 4096), (1024, 1024)):
            for blocksize in (64, 128):
                w = torch.randn(shape).to(dtype)
                qw = qt.quantize_nf4(w, blocksize=blocksize, double_quant=True)
                packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                   compress_statistics=True)
                plain = qt.quantize_nf4(w, blocksize=blocksize, double_quant=False)
                _, plain_state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                    compress_statistics=False)
                differ = qw.absmax != state.absmax
                steps = (qw.absmax.long() - state.absmax.long()).abs().max().item()
                decode = (torch.equal(qt.dequantize_nf4(qt.NF4Weight.from_bnb(packed, state)),
                                      bnbF.dequantize_4bit(packed, state))
                          and torch.equal(qt.dequantize_nf4(qw), bnbF.dequantize_4bit(*qw.to_bnb())))
                print(f"{str(dtype):15} {str(shape):13} blocksize {blocksize:4}: "
                      f"codes {'=' if torch.equal(qw.packed, packed.reshape(-1)) else '!='}, "
                      f"plain absmax {'=' if torch.equal(plain.absmax, plain_state.absmax) else '!='}, "
                      f"offset/absmax2 {'=' if torch.equal(qw.offset, state.offset) and torch.equal(qw.absmax2, state.state2.absmax) else '!='}, "
                      f"nested codes differ in {int(differ.sum())}/{differ.numel()} "
                      f"({differ.double().mean().item():.3%}, up to {steps} steps), "
                      f"decode exact both ways: {decode}")


if __name__ == "__main__":
    main()
