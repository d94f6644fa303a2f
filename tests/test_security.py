"""Security rules, checked on the package's source: no pickles, safe YAML, no remote code.

* ``torch.load`` only with ``weights_only=True``; no ``pickle``/``dill``/``joblib`` or
  ``numpy.load(allow_pickle=True)``; no ``eval``/``exec``;
* YAML through ``yaml.safe_load`` (or the ``SafeLoader``) only;
* ``trust_remote_code`` is never passed as a literal ``True``: it comes from the recipe's
  ``model.trust_remote_code``, off by default and in every shipped recipe.
"""

import ast
import json
from pathlib import Path

import yaml

PKG = Path(__file__).resolve().parents[1] / "llamatune"
REPO = PKG.parent


def _sources(root: Path):
    for f in sorted(root.rglob("*.py")):
        yield f, ast.parse(f.read_text(), str(f))


def _name(node) -> str:
    """``torch.load`` for ``torch.load(...)``, ``load`` for a bare name."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _violations(root: Path = PKG) -> list[str]:
    found = []
    for f, tree in _sources(root):
        where = f.relative_to(root.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                for m in mods:
                    if m.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "joblib",
                                           "cloudpickle", "shelve", "marshal"):
                        found.append(f"{where}:{node.lineno}: imports {m}")
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            if name in ("eval", "exec"):
                found.append(f"{where}:{node.lineno}: calls {name}")
            if name.endswith("torch.load") or name == "load" and _kw(node, "weights_only"):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")):
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    found.append(f"{where}:{node.lineno}: numpy.load with allow_pickle")
            if name.startswith("yaml.") and name.split(".")[-1] in (
                    "load", "load_all", "unsafe_load", "unsafe_load_all", "full_load",
                    "full_load_all"):
                found.append(f"{where}:{node.lineno}: {name} (use yaml.safe_load)")
            loader = _kw(node, "Loader")
            if loader is not None and _name(loader) not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
                found.append(f"{where}:{node.lineno}: YAML Loader {_name(loader)}")
            trc = _kw(node, "trust_remote_code")
            if trc is not None:
                literal_true = isinstance(trc, ast.Constant) and trc.value is not False
                from_config = _name(trc).endswith(".trust_remote_code")
                if literal_true or not (from_config or isinstance(trc, ast.Constant)):
                    found.append(f"{where}:{node.lineno}: trust_remote_code={ast.unparse(trc)} "
                                 "(only the recipe's model.trust_remote_code may turn it on)")
    return found


def test_package_source_follows_the_rules():
    assert _violations() == []


def test_the_scan_catches_what_it_forbids(tmp_path):
    """The checker itself finds each forbidden pattern (so a clean result means something)."""
    (tmp_path / "pkg").mkdir()
    bad = tmp_path / "pkg" / "probe.py"
    bad.write_text(
        "import pickle\nimport torch\nimport yaml\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nyaml.load('a')\n"
        "yaml.compose('a', Loader=yaml.Loader)\neval('1')\n"
        "f(trust_remote_code=True)\nf(trust_remote_code=flag)\n")
    found = _violations(tmp_path / "pkg")
    assert len(found) == 8, found


def test_trust_remote_code_is_off_by_default_and_in_every_shipped_recipe():
    from llamatune.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(recipe.read_text()) or {}
        assert not (raw.get("model") or {}).get("trust_remote_code", False), recipe


def test_a_folder_with_custom_code_is_not_executed(tmp_path, tiny_model_dir):
    """A model folder that ships modelling code: loading it runs none of that code."""
    import shutil

    from llamatune.config import ModelConfig
    from llamatune.model import load_model

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    try:
        load_model(ModelConfig(path=str(folder)), None, trainable=False)
    except Exception:  # noqa: BLE001 - refusing to load is fine too; running the code is not
        pass
    assert not marker.exists()
