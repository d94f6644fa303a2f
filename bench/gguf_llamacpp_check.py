"""A GGUF written by ``llamatune export``, run by llama.cpp itself (through llama-cpp-python).

    pip install llama-cpp-python      # builds llama.cpp from source: about 5 minutes on 2 cores
    python bench/gguf_llamacpp_check.py MODEL_FOLDER OUT.gguf [--type f16] [--prompts 8]

Exports ``MODEL_FOLDER`` (a merged run or any Llama folder) with ``llamatune export`` (which
checks it with transformers' reader first), then loads the file in llama.cpp and compares with
the folder loaded by plain transformers on the same prompts (the folder's chat template,
tokenized by transformers): llama.cpp's tokenization of each prompt, and its greedy answer of
up to 32 tokens, token for token, against transformers on the weights cast to the export type.
transformers' reader undoes the query/key reordering it expects; llama.cpp computes with the
file as written, so this is the check that the reordering is the one llama.cpp's rope needs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("gguf")
    ap.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    import torch
    from transformers import AutoTokenizer

    from llamatune.export import FALLBACK_PROMPTS, reference_model, stop_ids

    out = Path(args.gguf)
    if not out.exists():
        subprocess.run([sys.executable, "-m", "llamatune", "export", args.folder, "--gguf",
                        str(out), "--type", args.type], check=True, cwd=REPO)
    tok = AutoTokenizer.from_pretrained(args.folder)
    ref = reference_model(Path(args.folder), args.type)
    stops = stop_ids(Path(args.folder), tok)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, logits_all=False, verbose=False,
                          n_threads=2)
    rows, same_tokens, same_answers = [], 0, 0
    for prompt in FALLBACK_PROMPTS[: args.prompts]:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cpp_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        same_tokens += cpp_ids == ids
        with torch.no_grad():
            hf = ref.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                              do_sample=False, eos_token_id=stops,
                              pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        hf = hf[: next((i + 1 for i, t in enumerate(hf) if t in stops), len(hf))]
        llm.reset()
        cpp = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            cpp.append(t)
            if t in stops or len(cpp) == args.max_new_tokens:
                break
        same_answers += cpp == hf
        rows.append({"prompt": prompt, "transformers": tok.decode(hf), "llama.cpp":
                     tok.decode(cpp), "same": cpp == hf})
    result = {"gguf": str(out), "type": args.type, "prompts": len(rows),
              "same_tokenization": same_tokens, "same_greedy_answers": same_answers,
              "llama_cpp_python": llama_cpp.__version__, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
