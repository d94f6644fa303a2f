"""Write the example notebooks in examples/ (outputs stripped). Run: python scripts/make_notebooks.py

Each notebook has one cell tagged ``parameters`` (papermill's convention): the test suite
executes every notebook with small overrides injected right after that cell.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parents[1] / "examples"


def params(src: str):
    cell = new_code_cell(src)
    cell.metadata["tags"] = ["parameters"]
    return cell


NB01 = [
    new_markdown_cell(
        "# 01 Quickstart: QLoRA SFT of the default model\n\n"
        "A LoRA adapter on a 4-bit (nf4) SmolLM2-135M-Instruct, trained on the shipped "
        "Alpaca-style set with `recipes/alpaca_qlora.yaml`, then asked a question. On a GPU it "
        "takes well under a minute; without one it falls back to the CPU (bitsandbytes runs 4-bit "
        "there too) and takes a few minutes at the recipe's 60 steps.\n\n"
        "Run from the repository root (or `llamatune cp alpaca_qlora alpaca_qlora.yaml` and "
        "point `RECIPE` at the copy)."),
    params('RECIPE = "recipes/alpaca_qlora.yaml"\n'
           'MODEL = "smollm2-135m-instruct"   # or a Llama folder, e.g. /models/Llama-2-7b-hf\n'
           'QUANTIZATION = "4bit"             # 4bit (QLoRA), 8bit or none\n'
           'MAX_STEPS = 60\n'
           'BATCH_SIZE = 8\n'
           'OUTPUT_DIR = "runs/quickstart"'),
    new_code_cell(
        "import torch\n\n"
        "on_gpu = torch.cuda.is_available()\n"
        "print('GPU:', torch.cuda.get_device_name(0) if on_gpu else 'none, training on the CPU')"),
    new_code_cell(
        "from llamatune.config import load_config\n\n"
        "cfg = load_config(RECIPE, [f\"model.path={MODEL}\", f\"model.quantization={QUANTIZATION}\",\n"
        "                           f\"train.max_steps={MAX_STEPS}\", f\"train.batch_size={BATCH_SIZE}\",\n"
        "                           f\"output_dir={OUTPUT_DIR}\", \"overwrite=true\"])\n"
        "cfg.model, cfg.train.max_steps"),
    new_markdown_cell("Train (the same code `llamatune sft` runs). The run directory gets the "
                      "adapter, the config, the tokenizer with the run's chat template, "
                      "`metrics.jsonl` and `plots/`."),
    new_code_cell("from llamatune.recipes import sft\n\nsft.main(cfg, RECIPE)"),
    new_code_cell(
        "from pathlib import Path\n\n"
        "from IPython.display import Image, display\n\n"
        "from llamatune.report import key_figures\n\n"
        "print(key_figures(OUTPUT_DIR))\n"
        "display(Image(filename=str(Path(OUTPUT_DIR, 'plots', 'loss.png'))))"),
    new_code_cell(
        "from llamatune.generate import load_for_inference\n\n"
        "bot = load_for_inference(OUTPUT_DIR)\n"
        "question = [{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}]\n"
        "answer = bot.reply(question, max_new_tokens=60)\n"
        "print(answer)"),
]

NB02 = [
    new_markdown_cell(
        "# 02 The RLHF pipeline, stage by stage\n\n"
        "The Llama-2-Chat recipe through the Python API: supervised fine-tuning, a reward model "
        "started from the SFT model, then PPO against it (policy, frozen reference, value head "
        "and reward model on one base in memory). `llamatune pipeline recipes/llama2_chat.yaml` "
        "does the same in one command; this notebook shows the pieces."),
    params('OUT = "runs/rlhf_notebook"\n'
           'SFT_STEPS = 60\n'
           'RM_STEPS = 12\n'
           'PPO_STEPS = 40\n'
           'EVAL_PROMPTS = 16'),
    new_markdown_cell("## 1. SFT on the Alpaca-style set"),
    new_code_cell(
        "from llamatune.config import load_config\n"
        "from llamatune.recipes import ppo, reward, sft\n\n"
        "sft_cfg = load_config(\"recipes/alpaca.yaml\", [\n"
        "    f\"output_dir={OUT}/sft\", f\"train.max_steps={SFT_STEPS}\", \"overwrite=true\"])\n"
        "sft.main(sft_cfg, \"recipes/alpaca.yaml\")"),
    new_markdown_cell("## 2. A reward model, starting from the SFT model\n\n"
                      "Its adapter starts as a copy of the SFT adapter; whole topics of the "
                      "preference pairs are held out."),
    new_code_cell(
        "rm_cfg = load_config(\"recipes/reward.yaml\", [\n"
        "    f\"output_dir={OUT}/reward\", f\"model.adapter={OUT}/sft\",\n"
        "    f\"train.max_steps={RM_STEPS}\", \"overwrite=true\"])\n"
        "reward.main(rm_cfg, \"recipes/reward.yaml\")"),
    new_markdown_cell("## 3. PPO against the reward model\n\n"
                      "The policy is a trainable copy of the SFT adapter, the reference a frozen "
                      "one; the reward model's adapter and head are stacked on the same base."),
    new_code_cell(
        "ppo_cfg = load_config(\"recipes/ppo.yaml\", [\n"
        "    f\"output_dir={OUT}/ppo\", f\"model.adapter={OUT}/sft\",\n"
        "    f\"ppo.reward_model={OUT}/reward\", f\"train.max_steps={PPO_STEPS}\",\n"
        "    f\"data.eval_split={EVAL_PROMPTS}\", \"overwrite=true\"])\n"
        "ppo.main(ppo_cfg, \"recipes/ppo.yaml\")"),
    new_markdown_cell("## 4. What happened\n\n"
                      "Key figures of each stage, and PPO's reward and KL curves."),
    new_code_cell(
        "from pathlib import Path\n\n"
        "from IPython.display import Image, display\n\n"
        "from llamatune.report import key_figures\n\n"
        "for stage in (\"sft\", \"reward\", \"ppo\"):\n"
        "    print(stage, key_figures(f\"{OUT}/{stage}\"))\n"
        "for name in (\"reward.png\", \"kl.png\"):\n"
        "    display(Image(filename=str(Path(OUT, \"ppo\", \"plots\", name))))"),
    new_markdown_cell("## 5. The reward model judges the SFT and the PPO answers\n\n"
                      "Greedy answers of both models to PPO's held-out prompts, scored by the "
                      "reward model."),
    new_code_cell(
        "import statistics\n\n"
        "from llamatune.data import prepare\n"
        "from llamatune.generate import load_for_inference\n"
        "from llamatune.model import load_tokenizer, resolve_model_path\n"
        "from llamatune.score import load_reward_model\n\n"
        "cfg = load_config(f\"{OUT}/ppo/config.yaml\")\n"
        "tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))\n"
        "held = [s[\"messages\"] for s in prepare(cfg, tok, \"prompts\", \"eval\").eval]\n"
        "rm = load_reward_model(f\"{OUT}/reward\")\n"
        "for name in (\"sft\", \"ppo\"):\n"
        "    bot = load_for_inference(f\"{OUT}/{name}\")\n"
        "    answers = [a for a, _ in bot.complete(held, cfg.ppo.max_new_tokens)]\n"
        "    convs = [c + [{\"role\": \"assistant\", \"content\": a}] for c, a in zip(held, answers)]\n"
        "    scores = rm.score(convs)\n"
        "    print(f\"{name}: mean reward {statistics.fmean(scores):.3f}; e.g. {answers[0]!r}\")"),
]

NB03 = [
    new_markdown_cell(
        "# 03 Merge, chat, plain transformers, GGUF\n\n"
        "Merge a run's adapter into standalone weights (checked against base + adapter before "
        "anything is written), chat with the result, load it with plain `transformers`, and export "
        "a GGUF for llama.cpp / Ollama (read back by transformers' GGUF loader and compared before "
        "it is published). `RUN_DIR` is any SFT, DPO or PPO run, for example the one notebook 01 "
        "wrote."),
    params('RUN_DIR = "runs/quickstart"\n'
           'OUT = "models/notebook"\n'
           'GGUF_TYPE = "f16"                 # f16, bf16 or q8_0'),
    new_code_cell(
        "import shutil\n"
        "from pathlib import Path\n\n"
        "from llamatune.merge import run_merge\n\n"
        "merged = Path(OUT, \"merged\")\n"
        "shutil.rmtree(merged, ignore_errors=True)\n"
        "run_merge(RUN_DIR, str(merged))"),
    new_code_cell(
        "from llamatune.generate import load_for_inference\n\n"
        "bot = load_for_inference(str(merged))\n"
        "question = [{\"role\": \"user\", \"content\": \"Name three uses of a paperclip.\"}]\n"
        "print(bot.reply(question, max_new_tokens=60))"),
    new_markdown_cell("Plain transformers: no peft, no llamatune. The folder's chat template "
                      "and generation config carry the run's format and stop tokens."),
    new_code_cell(
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "tok = AutoTokenizer.from_pretrained(merged)\n"
        "model = AutoModelForCausalLM.from_pretrained(merged)\n"
        "question = [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]\n"
        "ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors=\"pt\",\n"
        "                              return_dict=True)\n"
        "out = model.generate(**ids, max_new_tokens=40, do_sample=False)\n"
        "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))"),
    new_markdown_cell("## GGUF for llama.cpp and Ollama"),
    new_code_cell(
        "from llamatune.export import run_export\n\n"
        "gguf_path = Path(OUT, \"model.gguf\")\n"
        "run_export(str(merged), str(gguf_path), GGUF_TYPE)\n"
        "print(Path(OUT, \"model.Modelfile\").read_text())"),
    new_code_cell(
        "back = AutoModelForCausalLM.from_pretrained(OUT, gguf_file=\"model.gguf\")\n"
        "out = back.generate(**ids, max_new_tokens=40, do_sample=False)\n"
        "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))"),
]


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, cells in (("01_quickstart", NB01), ("02_rlhf_pipeline", NB02),
                        ("03_merge_chat_export", NB03)):
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print(f"wrote examples/{name}.ipynb")


if __name__ == "__main__":
    main()
