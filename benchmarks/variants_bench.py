"""Variants: size and perplexity of int8/int4 against fp32, and int8 decode speed against fp32 and llama.cpp.

One run builds a small tree in a temporary STEMMA_HOME (a master pretrained on the shipped corpus, then its
`quantized` int8 and int4 variants, exactly as stemma.yaml declares them), reads the perplexities stemma's build
measured on the master's test split, and times greedy single-stream decoding of the same prompt: stemma fp32,
stemma int8 (weight-only, int8 matmul forward), and the peer, llama.cpp (llama-cpp-python) running the same
model exported by `stemma pull --format gguf --gguf-type q8_0` (an f32 GGUF quantised to q8_0 by llama.cpp's own
quantizer), and at f16 for reference. Rounds alternate so drift hits every contender; medians.

    python benchmarks/variants_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CORPUS, parser, print_table, write_json  # noqa: E402


def spec(d: Path, quick: bool) -> Path:
    cfg = {"n_layer": 4, "n_embd": 256, "n_head": 4, "context": 128, "vocab_size": 4096,
           "steps": 80 if quick else 300, "batch_size": 16, "lr": 0.002, "warmup": 10}
    doc = {"name": "bench", "datasets": {"en": {"paths": [str(CORPUS / "en-manpages.jsonl"),
                                                          str(CORPUS / "en-python.jsonl")], "language": "en"}},
           "nodes": {"master": {"method": "pretrain", "dataset": "en", "config": cfg},
                     "master/int8": {"method": "quantized", "layer": "device", "config": {"bits": 8}},
                     "master/int4": {"method": "quantized", "layer": "device", "config": {"bits": 4}}}}
    p = d / "stemma.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def stemma_decode(model, ids: list[int], n: int) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return n / (time.perf_counter() - t0)


def llama_decode(llm, ids: list[int], n: int) -> float:
    llm.reset()
    t0 = time.perf_counter()
    k = 0
    for _ in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        k += 1
        if k == n:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    rounds, new = (3, 32) if args.quick else (5, 64)
    with tempfile.TemporaryDirectory(prefix="stemma-variants-bench-") as d:
        os.environ["STEMMA_HOME"] = str(Path(d) / "home")
        from stemma.build import build
        from stemma.pull import pull
        from stemma.spec import load_spec
        from stemma.workspace import Workspace

        ws = Workspace.init()
        build(ws, load_spec(spec(Path(d), args.quick)))
        fp32, int8, int4 = (ws.resolve_version(n) for n in ("master", "master/int8", "master/int4"))
        ds = ws.version_datasets(fp32.id)["train"]
        ppl = {k: ws.get_metric(v.id, "perplexity", ds, "test") for k, v in
               (("fp32", fp32), ("int8", int8), ("int4", int4))}
        size = {k: v.row.bytes for k, v in (("fp32", fp32), ("int8", int8), ("int4", int4))}
        tok = ws.tokenizer(fp32.row.tokenizer)
        prompt = tok.encode("The grep command searches the named input files for lines containing")
        ids = prompt.ids
        m32, m8 = ws.load_model(fp32.id), ws.load_model(int8.id)
        peers = {}
        try:
            import llama_cpp

            for kind in ("q8_0", "f16"):
                g = pull(ws, fp32, Path(d) / f"gguf-{kind}", "gguf", gguf_type=kind)
                peers[f"llama.cpp {kind}"] = llama_cpp.Llama(str(g / "model.gguf"), n_ctx=128, verbose=False,
                                                             n_threads=torch.get_num_threads())
        except ImportError:
            print("llama-cpp-python is not installed (pip install 'stemma[gguf]'); the llama.cpp columns are empty")
        runs: dict[str, list[float]] = {"fp32": [], "int8": [], "llama.cpp q8_0": [], "llama.cpp f16": []}
        stemma_decode(m32, ids, 4), stemma_decode(m8, ids, 4)  # warm-up
        for peer in peers.values():
            llama_decode(peer, ids, 4)
        for _ in range(rounds):
            runs["fp32"].append(stemma_decode(m32, ids, new))
            runs["int8"].append(stemma_decode(m8, ids, new))
            for name, peer in peers.items():
                runs[name].append(llama_decode(peer, ids, new))
    med = {k: statistics.median(v) if v else None for k, v in runs.items()}
    figures = {
        "int8_size_ratio": size["fp32"] / size["int8"], "int8_ppl_increase": ppl["int8"] / ppl["fp32"] - 1,
        "int4_size_ratio": size["fp32"] / size["int4"], "int4_ppl_increase": ppl["int4"] / ppl["fp32"] - 1,
        "int8_vs_fp32_speed": med["int8"] / med["fp32"],
        "int8_vs_llamacpp_q8_speed": med["int8"] / med["llama.cpp q8_0"] if med["llama.cpp q8_0"] else None,
        "int8_vs_llamacpp_f16_speed": med["int8"] / med["llama.cpp f16"] if med["llama.cpp f16"] else None,
        "tokens_per_s": med, "runs": runs, "bytes": size, "perplexity": ppl, "new_tokens": new, "rounds": rounds,
        "peer": "llama.cpp (llama-cpp-python) on the model's GGUF, q8_0 by llama.cpp's quantizer (and f16)",
    }
    fmt = lambda x: "-" if x is None else f"{x:,.0f}"  # noqa: E731
    print_table(
        f"variants: GPT-2 4x256, greedy decode of {new} tokens x {rounds} rounds (medians)",
        [("decode tokens/s: stemma fp32 vs int8", fmt(med["fp32"]), fmt(med["int8"]),
          f"{figures['int8_vs_fp32_speed']:.2f}"),
         ("decode tokens/s: llama.cpp q8_0 vs stemma int8", fmt(med["llama.cpp q8_0"]), fmt(med["int8"]),
          "-" if figures["int8_vs_llamacpp_q8_speed"] is None else f"{figures['int8_vs_llamacpp_q8_speed']:.2f}"),
         ("decode tokens/s: llama.cpp f16 vs stemma int8", fmt(med["llama.cpp f16"]), fmt(med["int8"]),
          "-" if figures["int8_vs_llamacpp_f16_speed"] is None else f"{figures['int8_vs_llamacpp_f16_speed']:.2f}"),
         ("bytes: fp32 vs int8", f"{size['fp32']:,}", f"{size['int8']:,}", f"{figures['int8_size_ratio']:.2f}x"),
         ("bytes: fp32 vs int4", f"{size['fp32']:,}", f"{size['int4']:,}", f"{figures['int4_size_ratio']:.2f}x"),
         ("ppl: fp32 vs int8", f"{ppl['fp32']:.3f}", f"{ppl['int8']:.3f}", f"{figures['int8_ppl_increase']:+.2%}"),
         ("ppl: fp32 vs int4", f"{ppl['fp32']:.3f}", f"{ppl['int4']:.3f}", f"{figures['int4_ppl_increase']:+.2%}")],
    )
    print("targets: int8 >= 3.5x smaller, <= 2% perplexity; int4 >= 6x smaller, <= 10% perplexity")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
